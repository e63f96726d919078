"""Where a model's one-step error lies, from an evaluation's recorded rollouts (`train.evaluate --out EVAL`).

    python -m train.locate_error --eval EVAL [--token 16] [--figure OUT.png]

Each teacher-forced frame (real context, one step ahead) is compared with the real frame, and its absolute
error (the largest of the three channels, per pixel) is split three ways:
- near: within `--near` pixels of a pixel that really changes from the real frame before;
- in active tokens, away from the change: elsewhere in a token (a `--token`-pixel square of the DiT's grid)
  that holds a real change;
- in quiet tokens: tokens where nothing really changes.
A network that writes a whole token from one narrow feature spreads its error over the tokens where
something moves, as speckle: the second share, far above its share of the area. The first frame of each
clip is skipped (its previous real frame is not recorded).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from worldmodel import cli

CHANGE_LEVEL = 8  # a pixel changes when a channel moves by more than this (of 255)


def split_error(real: np.ndarray, generated: np.ndarray, token: int = 16, near: int = 2) -> dict[str, float]:
    """real, generated (N, T, H, W, 3) uint8 clips, generated[:, k] the prediction of real[:, k] from real
    frames before it -> shares of the absolute error and of the area, per region (frames 1..T-1), and
    the mean absolute error per pixel (of 255)."""
    if real.shape != generated.shape or real.ndim != 5 or real.shape[1] < 2:
        raise ValueError(f"need real and generated clips of the same shape (N, T >= 2, H, W, 3), got {real.shape} and {generated.shape}")
    n, t, h, w, _ = real.shape
    if h % token or w % token:
        raise ValueError(f"frames of {h}x{w} are not a whole number of {token}-pixel tokens")
    r, g = real.astype(np.int16), generated.astype(np.int16)
    err = np.abs(g[:, 1:] - r[:, 1:]).max(-1).astype(np.float64)  # (N, T-1, H, W)
    change = np.abs(r[:, 1:] - r[:, :-1]).max(-1) > CHANGE_LEVEL
    close = change.copy()  # dilate by `near` pixels (a square)
    for dy in range(-near, near + 1):
        for dx in range(-near, near + 1):
            close |= np.roll(np.roll(change, dy, axis=2), dx, axis=3) & _inside(h, w, dy, dx)
    active_tokens = change.reshape(n, t - 1, h // token, token, w // token, token).any(axis=(3, 5))
    active = active_tokens.repeat(token, axis=2).repeat(token, axis=3)
    regions = {"near": close, "active_away": active & ~close, "quiet": ~active}
    total = err.sum()
    out = {"active_tokens": float(active_tokens.mean()), "error_mean": float(err.mean())}
    for name, m in regions.items():
        out[f"error_{name}"] = float(err[m].sum() / total) if total else 0.0
        out[f"area_{name}"] = float(m.mean())
    return out


def _inside(h: int, w: int, dy: int, dx: int) -> np.ndarray:
    """Mask of the pixels that np.roll by (dy, dx) filled from inside the frame (not wrapped round)."""
    m = np.ones((h, w), bool)
    if dy > 0:
        m[:dy] = False
    elif dy < 0:
        m[dy:] = False
    if dx > 0:
        m[:, :dx] = False
    elif dx < 0:
        m[:, dx:] = False
    return m


def figure(real: np.ndarray, generated: np.ndarray, path: Path, token: int = 16, clips: int = 3, scale: int = 5) -> None:
    """real | generated | |error| x3 on the token grid, with the real change in cyan, for the first clips at step 1."""
    import cv2

    def up(im):
        return cv2.resize(im, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)

    rows = []
    for c in range(min(clips, real.shape[0])):
        r, g, before = real[c, 1].astype(np.int16), generated[c, 1].astype(np.int16), real[c, 0].astype(np.int16)
        diff = np.clip(np.abs(g - r) * 3, 0, 255).astype(np.uint8)
        diff[np.abs(r - before).max(-1) > CHANGE_LEVEL] = (0, 255, 255)
        diff = up(diff)
        diff[::token * scale] = (160, 70, 70)
        diff[:, ::token * scale] = (160, 70, 70)
        sep = np.full((diff.shape[0], 4, 3), 255, np.uint8)
        rows += [np.concatenate([up(real[c, 1]), sep, up(generated[c, 1]), sep, diff], 1), np.full((4, 3 * diff.shape[1] + 8, 3), 255, np.uint8)]
    img = np.concatenate(rows[:-1], 0)
    head = np.full((30, img.shape[1], 3), 255, np.uint8)
    width = real.shape[3] * scale
    for x, text in ((10, "real frame"), (width + 14, "model, one step ahead"), (2 * width + 18, "|error| x3, token grid; cyan: real change")):
        cv2.putText(head, text, (x, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.concatenate([head, img], 0)[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.locate_error", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--eval", required=True, help="an evaluation folder of train.evaluate (holds rollouts.npz)")
    p.add_argument("--token", type=int, default=16, help="pixels per side of one DiT token (tokenizer patch x DiT patch)")
    p.add_argument("--near", type=int, default=2, help="pixels around a real change that count as near it")
    p.add_argument("--figure", default=None, help="also write a real | model | error sheet of the first model here (PNG)")
    args = p.parse_args(argv)
    if args.token <= 0 or args.near < 0:
        p.error("--token must be positive and --near >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.eval) / "rollouts.npz"
    if not path.is_file():
        print(f"error: no rollouts.npz in {args.eval}; write one with `python -m train.evaluate ... --out {args.eval}`", file=sys.stderr)
        return 2
    z = np.load(path)
    names = [str(n) for n in z["model_names"]]
    print("| model | mean abs error (of 255) | active tokens | error near the change (area) | error elsewhere in active tokens (area) | error in quiet tokens (area) |")
    print("|---|---|---|---|---|---|")
    for i, name in enumerate(names):
        try:
            s = split_error(z["real"], z[f"teacher_forced_{i}"], args.token, args.near)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"| {name} | {s['error_mean']:.2f} | {s['active_tokens']:.1%} | {s['error_near']:.1%} ({s['area_near']:.1%}) | {s['error_active_away']:.1%} ({s['area_active_away']:.1%}) | {s['error_quiet']:.1%} ({s['area_quiet']:.1%}) |")
    if args.figure:
        figure(z["real"], z["teacher_forced_0"], Path(args.figure), args.token)
        print(f"wrote {args.figure} ({names[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
