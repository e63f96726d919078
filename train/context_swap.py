"""Which part of a model's own frame spoils its next prediction: the context swapped piece by piece (Breakout).

    python -m train.context_swap --model PATH[@STEPS] --record-seeds 1000 ... 1015 [--policy scripted]
        [--horizon 12] [--noise 2 8] [--gate P] [--conditions real own ...] [--out RESULT.json]

A world model that predicts one step ahead well from the real past but loses the ball in a free rollout is
hurt by something in its own frames. Each condition runs the model over the same real clips; at every step it
predicts the next frame under the clip's action, and the frame it is then given as context is:
- `real`: the real frame (teacher forcing: the one-step-ahead baseline);
- `own`: its own prediction (the free rollout);
- `noise S`: the real frame plus Gaussian pixel noise of standard deviation S (of 255), rounded;
- `own_scene_real_ball`: its own prediction, with boxes round the real and the predicted ball taken from the
  real frame (the ball as it really is, everything else the model's);
- `real_scene_own_ball`: the real frame, with those boxes taken from the prediction (only the ball the model's).
Reported per condition: the share of steps, over clips where the real game shows a ball, at which the
prediction's ball lies within BALL_MATCH_PX of the real one (read by the Breakout probe), per step and over
steps 2..H (step 1 always follows the real context), and the stray red (the probe's clutter, in balls) of the
predictions over the last 4 steps. `--gate P` runs a model with a change gate at threshold P (a screen of
thresholds: one run per P, `--conditions real own`). Where `real_scene_own_ball` falls as far as `own`, the
model's drawing of the ball itself (its place or its shape) spoils what follows, not a haze over the scene.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from envs.probe import probe_breakout
from train.common import write_json
from train.eval_clips import POLICIES, record_clips
from train.eval_metrics import BALL_MATCH_PX, probe_errors
from train.evaluate import parse_spec
from worldmodel import cli
from worldmodel.checkpoint import CheckpointError, read_config
from worldmodel.runtime import WorldModel

BOX = 3  # half-side of the square round a ball that the swaps exchange (pixels of the 64-px frame)
SWAPS = ("own_scene_real_ball", "real_scene_own_ball")
CONDITIONS = ("real", "own", "noise") + SWAPS


def ball_boxes(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int], half: int = BOX) -> np.ndarray:
    """Boolean masks (N, H, W): a (2 half + 1)-pixel square round each ball (y, x) (N,), none where it is NaN."""
    n = len(ys)
    m = np.zeros((n, *shape), bool)
    for e in range(n):
        if np.isfinite(ys[e]) and np.isfinite(xs[e]):
            y, x = int(round(ys[e])), int(round(xs[e]))
            m[e, max(0, y - half):y + half + 1, max(0, x - half):x + half + 1] = True
    return m


def context_frame(condition: str, real: np.ndarray, own: np.ndarray, real_ball: tuple[np.ndarray, np.ndarray],
                  rng: np.random.Generator, sigma: float = 0.0) -> np.ndarray:
    """The frame (N, H, W, 3) uint8 given to the model after predicting `own` for the real frame `real`."""
    if condition == "real":
        return real
    if condition == "own":
        return own
    if condition == "noise":
        return np.clip(real + rng.normal(0.0, sigma, real.shape), 0, 255).round().astype(np.uint8)
    if condition in SWAPS:
        p = probe_breakout(own)
        box = ball_boxes(*real_ball, real.shape[1:3]) | ball_boxes(p["ball_y"], p["ball_x"], real.shape[1:3])
        inside, outside = (real, own) if condition == "own_scene_real_ball" else (own, real)
        return np.where(box[..., None], inside, outside)
    raise ValueError(f"unknown condition {condition!r}")


def run_condition(wm: WorldModel, clips: np.ndarray, actions: np.ndarray, context: int, condition: str, sigma: float = 0.0,
                  seed: int = 0) -> np.ndarray:
    """Predictions (E, H, ...) of each step of clips[:, context:], each from the context the condition gives."""
    E, T = actions.shape
    real = clips[:, context:]
    truth = probe_breakout(real)
    rng = np.random.default_rng(seed)
    wm.reset(clips[:, :context], actions[:, :context], seed=seed)
    preds = np.zeros_like(real)
    for i in range(T - context):
        preds[:, i] = wm.predict_batch(actions[:, context + i])[:, 0]
        frame = context_frame(condition, real[:, i], preds[:, i], (truth["ball_y"][:, i], truth["ball_x"][:, i]), rng, sigma)
        wm.observe(frame[:, None], actions[:, context + i:context + i + 1])
    return preds


def ball_match(real: dict[str, np.ndarray], preds: dict[str, np.ndarray]) -> np.ndarray:
    """Probe readings of real frames and predictions ({key: (E, H)}) -> (H,) share of the clips whose real frame
    shows a ball where the prediction's lies within BALL_MATCH_PX (NaN at a step where no clip shows one)."""
    seen = np.isfinite(real["ball_y"])
    hit = np.where(seen, probe_errors(real, preds)["ball_match"], np.nan)
    with np.errstate(invalid="ignore"):
        return np.array([np.nanmean(hit[:, t]) if seen[:, t].any() else np.nan for t in range(hit.shape[1])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.context_swap", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--model", required=True, metavar="SPEC", help="PATH or PATH@STEPS (a Breakout world-model folder)")
    p.add_argument("--record-seeds", type=cli.seed, nargs="+", required=True, metavar="SEED", help="one real clip per seed")
    p.add_argument("--policy", choices=POLICIES, default="scripted", help="who plays the clips")
    p.add_argument("--context", type=int, default=4, help="real frames before the first prediction")
    p.add_argument("--horizon", type=int, default=12)
    p.add_argument("--noise", type=float, nargs="*", default=[2.0, 8.0], metavar="S", help="pixel-noise conditions (standard deviations, of 255)")
    p.add_argument("--gate", type=float, default=None, metavar="P", help="change-gate threshold in [0, 1) for a model with a gate (0: off; default: the model's)")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS), help="which contexts to run")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--out", default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    if args.context < 1 or args.horizon < 2:
        p.error("--context must be >= 1 and --horizon >= 2")
    if args.gate is not None and not 0 <= args.gate < 1:
        p.error(f"--gate must lie in [0, 1) (0: off), got {args.gate}")
    if any(not (np.isfinite(s) and s > 0) for s in args.noise):
        p.error(f"--noise levels must be positive numbers, got {args.noise}")
    try:
        spec = parse_spec(args.model)
        info = read_config(Path(spec.path))
        if info.get("game") != "Breakout":
            raise ValueError(f"context_swap reads the ball with the Breakout probe; {spec.path} is a model of {info.get('game')!r}")
        rec = record_clips("Breakout", args.record_seeds, args.context + args.horizon, size=tuple(info["frame_size"]),
                           frameskip=int(info.get("frameskip", 4)), policy=args.policy)
        wm = WorldModel.load(spec.path, steps=spec.steps, batch=len(rec.frames), gate=args.gate)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    conditions = [(c, s) for c in args.conditions for s in (args.noise if c == "noise" else [0.0])]
    real = rec.frames[:, args.context:]
    truth = probe_breakout(real)
    rows = []
    gate = "" if wm.gate is None else f", gate {wm.gate:g}"
    print(f"{spec.path}{gate}: ball within {BALL_MATCH_PX:g} px of the real one, % of clips, per step ({len(real)} clips); clutter of the last 4 steps")
    for name, sigma in conditions:
        preds = run_condition(wm, rec.frames, rec.actions, args.context, name, sigma, args.seed)
        read = probe_breakout(preds)
        match = ball_match(truth, read)
        label = f"{name} {sigma:g}" if name == "noise" else name
        rows.append({"condition": label, "per_step": match.tolist(), "steps_2_on": float(np.nanmean(match[1:])),
                     "clutter_last4": float(read["clutter"][:, -4:].mean())})
        print(f"  {label:20s} {' '.join(f'{100 * m:3.0f}' for m in match)}   steps 2-{args.horizon}: {100 * rows[-1]['steps_2_on']:3.0f}%"
              f"   clutter {rows[-1]['clutter_last4']:5.1f}", flush=True)
    if args.out:
        write_json(Path(args.out), {"model": str(spec.path), "steps": wm.sampling.steps, "gate": wm.gate, "seeds": rec.seeds, "policy": args.policy,
                                    "context": args.context, "horizon": args.horizon, "box": BOX, "conditions": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
