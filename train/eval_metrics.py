"""The measures `train.evaluate` reports, as plain functions of arrays: pixel error (PSNR, SSIM), state-probe
errors between real and generated frames, reward / episode-end event scores, paddle response to actions.

Per-step arrays are (E, H): episodes x rollout steps. NaN marks "undefined here" (a probe found nothing, an
event never happened) and is left out of means, never counted as zero.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004
SSIM_K1, SSIM_K2, PIXEL_MAX = 0.01, 0.03, 255.0
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what SSIM on colour frames is usually computed on
PADDLE_DEAD_ZONE = 0.25  # 64-px columns a paddle must move to count as moving (the probe reads it to ~0.05)


def nanmean(x: np.ndarray | Sequence[float], axis=None) -> float | np.ndarray:
    """Mean ignoring NaN; NaN (no warning) where nothing is left."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(np.asarray(x, dtype=np.float64), axis=axis)


# ----- pixels -----
def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame mean squared error over (..., H, W, 3) uint8 frames."""
    return ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(-3, -2, -1))


def psnr_of(mse_value: float | np.ndarray) -> float:
    """PSNR (dB) of the mean of the given squared errors (0-255 scale): the PSNR of the pooled MSE, not the
    mean of per-frame PSNRs, so frames that happen to match exactly do not dominate. Floored at 100 dB."""
    return float(10 * np.log10(255.0**2 / np.maximum(np.mean(mse_value), 255.0**2 * 1e-10)))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame mean absolute pixel difference (0-255) over (..., H, W, 3) uint8 frames."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=(-3, -2, -1))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D gaussian (size,), float64; the 2-D window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def luma(frames: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 RGB -> (..., H, W) float64 luma on the 0-255 scale."""
    return frames.astype(np.float64) @ np.asarray(LUMA)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame SSIM (Wang et al. 2004) of frames (..., H, W, 3) uint8, on the 0-255 luma: gaussian window
    11x11, sigma 1.5, K1 0.01, K2 0.03, over the 'valid' positions (windows inside the frame), averaged."""
    if a.shape != b.shape or a.shape[-1] != 3:
        raise ValueError(f"ssim compares frames (..., H, W, 3) of one shape, got {a.shape} and {b.shape}")
    lead, (H, W) = a.shape[:-3], a.shape[-3:-1]
    if min(H, W) < SSIM_WINDOW:
        raise ValueError(f"frames of {H}x{W} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
    x = torch.from_numpy(luma(a).reshape(-1, 1, H, W))  # (N, 1, H, W) float64
    y = torch.from_numpy(luma(b).reshape(-1, 1, H, W))
    g = torch.from_numpy(gaussian_window())

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable gaussian, valid positions only
        return F.conv2d(F.conv2d(t, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * PIXEL_MAX) ** 2, (SSIM_K2 * PIXEL_MAX) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))  # (N, 1, H-10, W-10)
    return s.mean((1, 2, 3)).numpy().reshape(lead)


# ----- events -----
def event_scores(predicted: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Precision, recall and accuracy of predicted events (bool) against real ones (bool), any shape.
    Precision is NaN when nothing was predicted, recall NaN when nothing happened."""
    p, r = np.asarray(predicted, dtype=bool).ravel(), np.asarray(real, dtype=bool).ravel()
    if p.shape != r.shape:
        raise ValueError(f"predicted and real events differ in shape: {p.shape} vs {r.shape}")
    tp = int((p & r).sum())
    return {
        "precision": tp / int(p.sum()) if p.any() else float("nan"),
        "recall": tp / int(r.sum()) if r.any() else float("nan"),
        "accuracy": float((p == r).mean()) if p.size else float("nan"),
        "predicted": int(p.sum()), "real": int(r.sum()), "steps": int(p.size),
    }


def reward_scores(predicted: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Reward events (a nonzero reward) scored as events, plus the mean absolute error of the values."""
    predicted, real = np.asarray(predicted, dtype=np.float64), np.asarray(real, dtype=np.float64)
    return {**event_scores(predicted != 0, real != 0), "abs_err": float(np.abs(predicted - real).mean()) if real.size else float("nan")}


def termination_scores(end_prob: np.ndarray, terminated: np.ndarray) -> dict[str, float]:
    """Episode ends: predicted when end_prob > 0.5. Accuracy, and recall/precision on the rare positive class."""
    return event_scores(np.asarray(end_prob) > 0.5, terminated)


# ----- state probes -----
BALL_MATCH_PX = 2.0  # ball_match: a ball counts as the real one's when within this many 64-px pixels


def probe_errors(real: dict[str, np.ndarray], gen: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-step disagreement of two probe readings (each {key: (E, H)}), NaN where undefined:
    paddle_abs_err (both found), paddle_found (gen finds one where real has one: 1/0), ball_agree (both or
    neither see a ball: 1/0), ball_match (neither sees a ball, or both within BALL_MATCH_PX: 1/0; a ball drawn
    in the wrong place does not count), ball_dist (Euclidean, both see it), bricks_abs_err, score_abs_err (both
    readable), clutter (red mass on the open court beyond the real frame's, in balls; NaN for probes without it)."""
    def where(ok, v):
        return np.where(ok, v, np.nan)

    real_ball, gen_ball = ~np.isnan(real["ball_x"]), ~np.isnan(gen["ball_x"])
    dist = np.hypot(gen["ball_x"] - real["ball_x"], gen["ball_y"] - real["ball_y"])  # NaN unless both show one
    real_paddle, gen_paddle = ~np.isnan(real["paddle_x"]), ~np.isnan(gen["paddle_x"])
    readable = (real["score"] >= 0) & (gen["score"] >= 0)
    return {
        "paddle_abs_err": np.abs(gen["paddle_x"] - real["paddle_x"]),
        "paddle_found": where(real_paddle, gen_paddle.astype(np.float64)),
        "ball_agree": (real_ball == gen_ball).astype(np.float64),
        "ball_match": (~real_ball & ~gen_ball | (dist <= BALL_MATCH_PX)).astype(np.float64),
        "ball_dist": dist,
        "bricks_abs_err": np.abs(gen["bricks_left"] - real["bricks_left"]).astype(np.float64),
        "score_abs_err": where(readable, np.abs(gen["score"] - real["score"]).astype(np.float64)),
        "score_readable": where(real["score"] >= 0, (gen["score"] >= 0).astype(np.float64)),
        "clutter": np.maximum(gen["clutter"] - real["clutter"], 0.0) if "clutter" in gen and "clutter" in real else np.full(real_ball.shape, np.nan),
    }


def horizon_buckets(horizons: Sequence[int]) -> list[tuple[int, int]]:
    """Step ranges (lo, hi] that end at each horizon: 1 -> (0, 1], 8 -> (1, 8], 16 -> (8, 16], ..."""
    return list(zip([0, *horizons[:-1]], horizons))


def pooled(per_step: dict[str, np.ndarray], horizons: Sequence[int]) -> dict[int, dict[str, float]]:
    """Means of per-step arrays (E, H) over the steps of each horizon bucket (see horizon_buckets)."""
    return {hi: {k: float(nanmean(v[:, lo:hi])) for k, v in per_step.items()} for lo, hi in horizon_buckets(horizons)}


def action_directions(meanings: Sequence[str]) -> np.ndarray:
    """+1 for actions that move right, -1 left, 0 otherwise (from names such as RIGHT, UPLEFT, LEFTFIRE)."""
    return np.array([(1 if "RIGHT" in m.upper() else 0) - (1 if "LEFT" in m.upper() else 0) for m in meanings], dtype=np.int64)


def paddle_response(paddle_x: np.ndarray, start: np.ndarray, actions: np.ndarray, directions: np.ndarray) -> float:
    """Fraction of LEFT/RIGHT steps after which the paddle moved (more than PADDLE_DEAD_ZONE) the way the
    action asks. paddle_x (E, H) is read on the frames the actions produced, start (E,) on the frame before
    the first; a step where either frame shows no paddle counts as no response. NaN without such steps."""
    before = np.concatenate([np.asarray(start, dtype=np.float64)[:, None], paddle_x[:, :-1]], axis=1)  # (E, H)
    move = paddle_x - before
    want = directions[actions]  # (E, H)
    asked = want != 0
    if not asked.any():
        return float("nan")
    ok = np.where(np.isnan(move), False, np.sign(np.where(np.abs(move) > PADDLE_DEAD_ZONE, move, 0.0)) == want)
    return float(ok[asked].mean())


def exact_horizons(horizon: int) -> list[int]:
    """The steps the at-a-glance figures are read at: 1, 4, 8, 16, 32, ... (doubling) up to `horizon`, and
    `horizon` itself."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    hs, h = [1], 4
    while h <= horizon:
        hs.append(h)
        h *= 2
    return hs if hs[-1] == horizon else [*hs, horizon]


GLANCE_KEYS = ("ball_agree", "ball_match", "ball_dist", "paddle_abs_err", "bricks_abs_err", "clutter")


def probe_exact_at(real: dict[str, np.ndarray], gen: dict[str, np.ndarray], horizons: Sequence[int]) -> dict[int, dict[str, float]]:
    """Probe disagreement (see probe_errors) at exactly step h of each horizon, not pooled over a bucket: the
    mean over episodes of ball_agree, ball_match, ball_dist, paddle_abs_err, bricks_abs_err and clutter at step h (NaN where
    undefined in every episode), and ball_both, the episodes where both frames show a ball (ball_dist's count)."""
    H = real["ball_x"].shape[1]
    if not all(1 <= h <= H for h in horizons):
        raise ValueError(f"horizons {list(horizons)} must lie in [1, {H}] (the steps of the readings)")
    e = probe_errors(real, gen)
    both = ~np.isnan(e["ball_dist"])  # (E, H)
    return {h: {**{k: float(nanmean(e[k][:, h - 1])) for k in GLANCE_KEYS}, "ball_both": int(both[:, h - 1].sum())} for h in horizons}


def near(events: np.ndarray, tol: int) -> np.ndarray:
    """(E, H) bool: an event within `tol` steps of each step (the events dilated along the step axis)."""
    out = events.copy()
    for d in range(1, tol + 1):
        out[:, d:] |= events[:, :-d]
        out[:, :-d] |= events[:, d:]
    return out


def events_reproduced(pred: np.ndarray, real: np.ndarray, tol: int = 1, first: int = 16) -> dict[str, float]:
    """Events (E, H) bool of a free rollout against the real ones, in the first `first` steps of each clip:
    reproduced = the fraction of real events with a predicted event within +-tol steps; false_rate = the
    fraction of predicted events with no real event within +-tol. Matches may fall up to `tol` steps past
    `first`. NaN when there is nothing to count; the counts come along."""
    pred, real = np.asarray(pred, dtype=bool), np.asarray(real, dtype=bool)
    if pred.shape != real.shape or pred.ndim != 2:
        raise ValueError(f"predicted and real events must be (episodes, steps) of one shape, got {pred.shape} and {real.shape}")
    if tol < 0 or first < 1:
        raise ValueError(f"tol must be >= 0 and first >= 1, got tol={tol}, first={first}")
    n = min(first, pred.shape[1])
    window = slice(0, min(n + tol, pred.shape[1]))
    hit, backed = near(pred[:, window], tol)[:, :n], near(real[:, window], tol)[:, :n]
    r, p = real[:, :n], pred[:, :n]
    return {
        "reproduced": float(hit[r].mean()) if r.any() else float("nan"),
        "false_rate": float((~backed[p]).mean()) if p.any() else float("nan"),
        "real_events": int(r.sum()), "model_events": int(p.sum()), "false_events": int((~backed[p]).sum()),
        "steps": int(r.size), "tol": tol,
    }
