"""State probes: read a game's state (paddle, ball, bricks, score) back from 64x64 frames, real or generated.

A probe turns frames into numbers so that a world model's rollout can be compared with the real game on
what matters to a player rather than on pixels alone. `probe_breakout(frames)` reads Breakout:

    paddle_x     float  paddle centre column; NaN when no paddle is found
    ball_x/y     float  ball centre; NaN when no ball is visible
    clutter      float  red mass on the court below the bricks, outside the paddle and the ball, in balls
    bricks_left  int    bricks still standing (the full wall is 6 rows x 18 = 108)
    score        int    the 3-digit score at the top; -1 when unreadable

Positions are in 64x64 pixel-index coordinates: x = 0 is the centre of the leftmost column, y = 0 that of
the top row (a full-resolution position x_160 maps to x_160 * 64 / 160 - 0.5, y_210 to y_210 * 64 / 210 - 0.5).

How it works. `preprocess_frame` shrinks the 210x160 ALE screen with INTER_AREA, which is linear: every
64x64 pixel is the area-weighted mean of the screen pixels under it. The screen's fixed geometry (walls,
brick grid, paddle rows, digit cells, colours; measured on emulator frames: `envs.breakout`) is
rendered at full resolution and shrunk by `preprocess_frame` itself, so the probe knows exactly what each
object looks like at 64x64:
  - bricks: the brick band is the walls plus a linear mix of 108 brick images; least squares (one matrix
    product with a precomputed pseudo-inverse) gives each brick's presence, rounded at 0.5;
  - paddle and ball: after subtracting walls and the fitted bricks, what is left is projected on their
    colour (200, 72, 72), giving each pixel's covered fraction. The paddle is the nearest (least squares)
    of the rendered paddles at every screen position, 16 or 8 px wide, clipped by the walls; found when
    the frame holds at least half of it. It is then cleared from its rows (with PADDLE_MARGIN columns each
    side, so that the smear around a generated paddle is not read as a ball) and the ball is the heaviest
    4x3 window of the play area; area averaging keeps the centroid of the mass, so the window's centroid
    is the ball's centre. It needs MIN_BALL_MASS (0.35) of a ball's mass, so a ball half hidden in a wall
    still counts. The red (R - max(G, B), a gray haze is not red) on the open court between the bricks
    and the paddle rows, beyond its heaviest ball-sized window, is the frame's `clutter`, in balls: a
    real frame has none (0 on every emulator frame measured), a generated court strewn with red speckle
    has plenty, and the probe still reads its heaviest blob as the ball, so clutter is the figure that
    tells such a court from a clean one;
  - score: each of the 3 digit slots is matched against the 10 glyphs rendered in that slot (nearest
    template in the slot's own columns; slots share no column at 64 px). A slot whose nearest template
    is farther than half the smallest distance between two of its templates is unreadable (a reading is
    then unambiguous by construction), and so is the score.

Measured accuracy at 64x64 against the emulator (`python -m envs.probe`: 3,915 frames, 3 episodes of the
scripted tracker with 5% noise and 1 of the behaviour policy, seeds 100-103, frameskip 4; truth from RAM
and from the 210x160 screen, see `breakout_truth`), about 9,000 frames/s on one CPU core:
  - paddle_x: found in 100% of frames; mean abs error 0.0003 px, max 0.4 px (a ball touching the paddle),
    against RAM's paddle clipped to the play area;
  - ball: found in 96.6% of the frames where RAM has a ball in play and 99.1% of those where some of it is
    drawn (misses: behind a brick, inside a wall, beside the paddle in its rows); 0 false detections in
    frames without a ball; position mean abs error 0.07 px (x), 0.05 px (y), max 0.5 px;
  - bricks_left: exact on every frame (against counting bricks on the 210x160 screen);
  - score: exact on 99.1% of frames against RAM's BCD score (100 * bcd(ram[76]) + bcd(ram[77])) and on 100%
    allowing the screen one agent step of lag (it shows a brick broken in a step's last emulator frame one
    step later, see `score_matches`); never unreadable;
  - clutter: 0.0 on every frame.
On generated frames the probe reads whatever is drawn: a faint ball counts only if it holds a third of a
ball's mass, and a red/orange blob where no brick belongs can read as a ball (see clutter).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from envs.breakout import (BALL_COLOUR, BALL_H, BALL_W, BALL_X_OFFSET, BALL_Y_OFFSET, BRICK_COLOURS, BRICK_COLUMNS, BRICK_H,
                           BRICK_LEFT, BRICK_TOP, BRICK_W, CELL_H, CELL_W, DIGIT_TOP, GLYPHS, GRAY, PADDLE_H, PADDLE_TOP, PADDLE_W,
                           PADDLE_X_OFFSET, PLAY_LEFT, PLAY_RIGHT, PLAY_TOP, RAM_BALL_X, RAM_BALL_Y, RAM_PADDLE_X, RAM_SCORE_BCD,
                           RAM_SCORE_HUNDREDS, SCORE_SLOTS_X, SCREEN_H, SCREEN_W, SHORT_PADDLE_W, WALLS)
from envs.games import game_frame, game_ram, make_game, preprocess_frame, resolve_env_id
from envs.policies import BreakoutTracker, make_behaviour_policy

SIZE = 64  # the probes read 64x64 frames (the project's frame size)
BALL_WINDOW = (4, 3)  # rows, columns: holds a ball's whole footprint at 64 px (<= 3 rows, <= 2 columns)
PADDLE_MARGIN = 1  # 64-px columns beside the paddle where no ball is looked for in the paddle rows
MIN_BALL_MASS = 0.35  # of one ball: a ball half hidden in a wall still counts
CHUNK = 256  # frames per pass: keeps the float copies in cache
NOISE_FLOOR = 0.05  # per-pixel covered fraction below which a pixel adds no ball/paddle mass


def to_64(y: float | np.ndarray, x: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map continuous screen coordinates (y down 0..210, x across 0..160) to 64x64 pixel-index coordinates."""
    return np.asarray(y) * SIZE / SCREEN_H - 0.5, np.asarray(x) * SIZE / SCREEN_W - 0.5


def _shrink(mask: np.ndarray) -> np.ndarray:
    """Covered fraction (64, 64) float32 of a boolean screen mask (210, 160), through preprocess_frame."""
    img = np.repeat(mask[:, :, None].astype(np.uint8) * 255, 3, axis=2)  # 255: rounding error < 0.2%
    return preprocess_frame(img, (SIZE, SIZE))[:, :, 0].astype(np.float32) / 255.0


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((SCREEN_H, SCREEN_W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _glyph_mask(digit: int, x: int) -> np.ndarray:
    m = np.zeros((SCREEN_H, SCREEN_W), dtype=bool)
    for r, row in enumerate(GLYPHS[digit]):
        for c, cell in enumerate(row):
            if cell == "#":
                m[DIGIT_TOP + r * CELL_H:DIGIT_TOP + (r + 1) * CELL_H, x + c * CELL_W:x + (c + 1) * CELL_W] = True
    return m


def _span(lo: float, hi: float, scale: float) -> slice:
    """64-px rows/columns touched by screen interval [lo, hi)."""
    return slice(int(np.floor(lo * scale)), int(np.ceil(hi * scale)))


@dataclass(frozen=True)
class _BreakoutModel:
    """Breakout's fixed screen rendered at 64x64: walls, brick images, glyph templates and the regions."""

    walls: np.ndarray  # (64, 64, 3) float32
    brick_rows: slice
    brick_pinv: np.ndarray  # (P, 108) least-squares presence from the band, P = band pixels x 3
    brick_basis: np.ndarray  # (108, P)
    ball_rows: slice
    paddle_rows: slice
    cols: slice  # play-area columns
    paddles: np.ndarray  # (K, paddle rows, 64) covered fraction of every paddle position and width
    paddle_centres: np.ndarray  # (K,) their centres, 64-px columns
    paddle_half_widths: np.ndarray  # (K,) half their visible widths, 64-px columns
    score_rows: slice
    slot_cols: tuple[slice, ...]
    templates: tuple[np.ndarray, ...]  # per slot (10, rows, cols) float32 gray level
    max_slot_dist: tuple[float, ...]  # per slot: half the smallest distance between two templates


@functools.cache
def _breakout_model() -> _BreakoutModel:
    sy, sx = SIZE / SCREEN_H, SIZE / SCREEN_W
    colour = lambda c: np.asarray(c, dtype=np.float32)  # noqa: E731
    walls = sum(_shrink(_rect(y0, y1, x0, x1))[:, :, None] * colour(c) for y0, y1, x0, x1, c in WALLS)
    brick_rows = _span(BRICK_TOP, BRICK_TOP + len(BRICK_COLOURS) * BRICK_H, sy)
    basis = []
    for r, c in enumerate(BRICK_COLOURS):
        for j in range(BRICK_COLUMNS):
            y0, x0 = BRICK_TOP + r * BRICK_H, BRICK_LEFT + j * BRICK_W
            img = _shrink(_rect(y0, y0 + BRICK_H, x0, x0 + BRICK_W))[:, :, None] * colour(c)  # (64, 64, 3)
            basis.append(img[brick_rows].reshape(-1))
    basis = np.stack(basis)  # (108, P)
    score_rows = _span(DIGIT_TOP, DIGIT_TOP + len(GLYPHS[0]) * CELL_H, sy)
    slot_cols, templates, max_dist = [], [], []
    for x in SCORE_SLOTS_X:
        cols = _span(x, x + 3 * CELL_W, sx)
        t = np.stack([_shrink(_glyph_mask(d, x))[score_rows, cols] * GRAY[0] for d in range(10)])  # (10, h, w)
        d = np.sqrt(((t[:, None] - t[None]) ** 2).sum((-1, -2)))  # (10, 10)
        slot_cols.append(cols)
        templates.append(t)
        max_dist.append(float(d[~np.eye(10, dtype=bool)].min() / 2))
    if len({(s.start, s.stop) for s in slot_cols}) != len(slot_cols) or any(a.stop > b.start for a, b in zip(slot_cols, slot_cols[1:])):
        raise AssertionError("score digit slots must not share 64-px columns")
    paddle_rows = _span(PADDLE_TOP, PADDLE_TOP + PADDLE_H, sy)
    paddles, centres, halves = [], [], []
    for width in (PADDLE_W, SHORT_PADDLE_W):
        for left in range(PLAY_LEFT, PLAY_RIGHT - SHORT_PADDLE_W + 1):
            x0, x1 = left, min(left + width, PLAY_RIGHT)  # the wall hides what passes it
            paddles.append(_shrink(_rect(PADDLE_TOP, PADDLE_TOP + PADDLE_H, x0, x1))[paddle_rows])
            centres.append(to_64(0, (x0 + x1) / 2)[1])
            halves.append((x1 - x0) / 2 * sx)
    return _BreakoutModel(
        walls=walls.astype(np.float32), brick_rows=brick_rows,
        brick_pinv=np.linalg.pinv(basis.T.astype(np.float64)).T.astype(np.float32), brick_basis=basis,
        ball_rows=_span(PLAY_TOP, SCREEN_H, sy), paddle_rows=paddle_rows, cols=_span(PLAY_LEFT, PLAY_RIGHT, sx),
        paddles=np.stack(paddles), paddle_centres=np.asarray(centres, dtype=np.float64),
        paddle_half_widths=np.asarray(halves, dtype=np.float64),
        score_rows=score_rows, slot_cols=tuple(slot_cols), templates=tuple(templates), max_slot_dist=tuple(max_dist),
    )


def _window_centroid(mass: np.ndarray, window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The heaviest (h, w) window of mass (N, H, W): its mass (N,) and the centroid (N,), (N,) inside it."""
    N, H, W = mass.shape
    h, w = window
    c = np.zeros((N, H + 1, W + 1), dtype=mass.dtype)
    c[:, 1:, 1:] = mass.cumsum(1).cumsum(2)
    box = c[:, h:, w:] - c[:, :-h, w:] - c[:, h:, :-w] + c[:, :-h, :-w]  # (N, H-h+1, W-w+1) window sums
    flat = box.reshape(N, -1).argmax(1)
    y0, x0 = np.divmod(flat, box.shape[2])
    rows = y0[:, None] + np.arange(h)  # (N, h)
    cols = x0[:, None] + np.arange(w)  # (N, w)
    win = mass[np.arange(N)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, h, w)
    total = win.sum((1, 2))
    safe = np.where(total > 0, total, 1.0)
    cy = (win.sum(2) * rows).sum(1) / safe
    cx = (win.sum(1) * cols).sum(1) / safe
    return total, cy, cx


def probe_breakout(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Breakout's state in frames (..., 64, 64, 3) uint8 -> {paddle_x, ball_x, ball_y: float (...), NaN when
    not found; bricks_left: int (...); score: int (...), -1 when unreadable}. See the module docstring."""
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[-3:] != (SIZE, SIZE, 3) or frames.dtype != np.uint8:
        raise ValueError(f"probe_breakout reads uint8 frames of shape (..., {SIZE}, {SIZE}, 3), got {frames.dtype} {frames.shape}")
    lead = frames.shape[:-3]
    flat = frames.reshape(-1, SIZE, SIZE, 3)
    parts = [_probe_breakout(flat[i:i + CHUNK]) for i in range(0, len(flat), CHUNK)]
    if not parts:
        return {k: np.zeros(lead, dtype=dt) for k, dt in (("paddle_x", np.float64), ("ball_x", np.float64), ("ball_y", np.float64), ("bricks_left", np.int64), ("score", np.int64), ("clutter", np.float64))}
    return {k: np.concatenate([p[k] for p in parts]).reshape(lead) for k in parts[0]}


def _probe_breakout(frames: np.ndarray) -> dict[str, np.ndarray]:
    m = _breakout_model()
    x = frames.astype(np.float32) - m.walls  # (N, 64, 64, 3) minus the walls
    N = len(x)

    band = x[:, m.brick_rows].reshape(N, -1)  # (N, P)
    present = band @ m.brick_pinv > 0.5  # (N, 108)
    x[:, m.brick_rows] -= (present.astype(np.float32) @ m.brick_basis).reshape(N, -1, SIZE, 3)

    c = np.asarray(BALL_COLOUR, dtype=np.float32)
    cover = x @ c / (c @ c)  # (N, 64, 64): fraction of each pixel covered by ball/paddle red
    cover = np.where(cover > NOISE_FLOOR, cover, 0.0)
    unit = BALL_W * BALL_H * (SIZE / SCREEN_H) * (SIZE / SCREEN_W)  # one ball's covered fraction summed

    # paddle: the nearest rendered paddle (least squares over positions and both widths)
    rows = cover[:, m.paddle_rows]  # (N, r, 64)
    err = (m.paddles**2).sum((1, 2))[None] - 2 * np.einsum("nrw,krw->nk", rows, m.paddles)  # (N, K) + const
    best = err.argmin(1)
    fit = m.paddles[best]  # (N, r, 64)
    amount = (rows * fit).sum((1, 2)) / (fit * fit).sum((1, 2))  # 1 when the paddle is all there
    found = amount >= 0.5
    paddle_x = np.where(found, m.paddle_centres[best], np.nan)
    # Important: a generated paddle never matches a rendered one exactly, and what is left beside it must not
    # read as a ball: the paddle rows are cleared from PADDLE_MARGIN columns left of the paddle to as many right.
    span = np.abs(np.arange(SIZE)[None] - m.paddle_centres[best][:, None]) <= m.paddle_half_widths[best][:, None] + PADDLE_MARGIN  # (N, 64)
    cover[:, m.paddle_rows] *= ~(found[:, None] & span)[:, None, :]

    ball = cover[:, m.ball_rows, m.cols] / unit
    ball_mass, by, bx = _window_centroid(ball, BALL_WINDOW)
    seen = ball_mass >= MIN_BALL_MASS
    # clutter: red on the open court, from below the bricks to above the paddle rows, beyond its heaviest
    # ball-sized window. Red is measured as R - max(G, B) over the ball's (a gray haze is not red).
    court = frames[:, m.brick_rows.stop:m.paddle_rows.start, m.cols].astype(np.float32)  # (N, rows, cols, 3)
    red = (court[..., 0] - court[..., 1:].max(-1)) / (c[0] - c[1:].max())
    red = np.where(red > NOISE_FLOOR, red, 0.0) / unit  # (N, rows, cols) in balls
    in_window, _, _ = _window_centroid(red, BALL_WINDOW)
    clutter = red.sum((1, 2)) - in_window
    ball_y = np.where(seen, by + m.ball_rows.start, np.nan)
    ball_x = np.where(seen, bx + m.cols.start, np.nan)

    gray = x[:, m.score_rows].mean(-1)  # (N, h, 64): the digits are gray, the background black
    score = np.zeros(N, dtype=np.int64)
    readable = np.ones(N, dtype=bool)
    for cols, t, limit, place in zip(m.slot_cols, m.templates, m.max_slot_dist, (100, 10, 1)):
        d = np.sqrt(((gray[:, None, :, cols] - t[None]) ** 2).sum((-1, -2)))  # (N, 10)
        score += place * d.argmin(1)
        readable &= d.min(1) < limit

    return {
        "paddle_x": paddle_x.astype(np.float64), "ball_x": ball_x.astype(np.float64), "ball_y": ball_y.astype(np.float64),
        "bricks_left": present.sum(1).astype(np.int64), "score": np.where(readable, score, -1), "clutter": clutter.astype(np.float64),
    }


PROBES: dict[str, Callable[[np.ndarray], dict[str, np.ndarray]]] = {"Breakout": probe_breakout}


def probe_for(game_name: str) -> Callable[[np.ndarray], dict[str, np.ndarray]] | None:
    """The probe of a game ("Breakout", "breakout", "ALE/Breakout-v5"), or None if there is none."""
    if game_name in PROBES:
        return PROBES[game_name]
    try:
        env_id = resolve_env_id(game_name)
    except ValueError:
        return None
    return next((fn for name, fn in PROBES.items() if resolve_env_id(name) == env_id), None)


# ----- ground truth from the emulator (tests and the accuracy measurement) -----
def bcd(byte: np.ndarray) -> np.ndarray:
    byte = np.asarray(byte, dtype=np.int64)
    return 10 * (byte >> 4) + (byte & 15)


def breakout_truth(screens: np.ndarray, rams: np.ndarray) -> dict[str, np.ndarray]:
    """What the probe should read, from the 210x160 screens (N, 210, 160, 3) and RAM (N, 128): the keys of
    probe_breakout in 64-px coordinates, plus `ball_in_play` (RAM has a ball) and `ball_drawn` (some of its
    pixels show in the play area, off the paddle). The paddle is RAM's 16-px paddle clipped to the play area;
    bricks are counted on the screen; the score is RAM's BCD score."""
    rams = np.asarray(rams).astype(np.int64)
    N = len(rams)
    left = rams[:, RAM_PADDLE_X] - PADDLE_X_OFFSET
    lo, hi = np.maximum(left, PLAY_LEFT), np.minimum(left + PADDLE_W, PLAY_RIGHT)
    _, paddle_x = to_64(0, (lo + hi) / 2)
    in_play = rams[:, RAM_BALL_Y] != 0
    top, bx = rams[:, RAM_BALL_Y] + BALL_Y_OFFSET, rams[:, RAM_BALL_X] - BALL_X_OFFSET
    ball_y, ball_x = to_64(top + BALL_H / 2, bx + BALL_W / 2)
    is_red = (screens == np.asarray(BALL_COLOUR, dtype=np.uint8)).all(-1)  # (N, 210, 160)
    is_red[:, PADDLE_TOP:PADDLE_TOP + PADDLE_H] &= ~((np.arange(SCREEN_W) >= lo[:, None]) & (np.arange(SCREEN_W) < hi[:, None]))[:, None]
    drawn = np.zeros(N, dtype=bool)  # some ball pixel shows in the play area, off the paddle
    for i in np.flatnonzero(in_play):
        y0, x0 = max(top[i], PLAY_TOP), max(bx[i], PLAY_LEFT)
        drawn[i] = is_red[i, y0:top[i] + BALL_H, x0:min(bx[i] + BALL_W, PLAY_RIGHT)].any()
    bricks = np.zeros(N, dtype=np.int64)
    for r, c in enumerate(BRICK_COLOURS):
        y0 = BRICK_TOP + r * BRICK_H
        band = (screens[:, y0:y0 + BRICK_H, BRICK_LEFT:BRICK_LEFT + BRICK_COLUMNS * BRICK_W] == np.asarray(c, dtype=np.uint8)).all(-1)
        per_brick = band.reshape(N, BRICK_H, BRICK_COLUMNS, BRICK_W).sum((1, 3))  # (N, 18) lit pixels per brick
        bricks += (per_brick * 2 > BRICK_H * BRICK_W).sum(1)
    return {
        "paddle_x": paddle_x.astype(np.float64),
        "ball_x": np.where(in_play, ball_x, np.nan), "ball_y": np.where(in_play, ball_y, np.nan),
        "ball_in_play": in_play, "ball_drawn": drawn,
        "bricks_left": bricks,
        "score": 100 * bcd(rams[:, RAM_SCORE_HUNDREDS]) + bcd(rams[:, RAM_SCORE_BCD]),
    }


def score_matches(read: np.ndarray, ram_score: np.ndarray) -> np.ndarray:
    """Whether each read score equals RAM's score at that step or the step before (N,) bool. RAM counts a
    broken brick at once, but when it breaks after the score is drawn in a step's last emulator frame the
    screen shows it one agent step later. `ram_score` must hold consecutive steps."""
    prev = np.concatenate([ram_score[:1], ram_score[:-1]])
    return (read == ram_score) | (read == prev)


def record_breakout(seed: int, steps: int, scripted: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Play Breakout (frameskip 4, no sticky actions) from `seed` for up to `steps` steps under the scripted
    tracker (5% noise) or the behaviour policy: screens (N, 210, 160, 3), 64x64 frames (N, 64, 64, 3), RAM (N, 128)."""
    env = make_game("Breakout", render_mode="rgb_array")
    rng = np.random.default_rng(seed)
    policy = BreakoutTracker(rng) if scripted else make_behaviour_policy("Breakout", env.action_space.n, rng)
    obs, _ = env.reset(seed=seed)
    policy.reset()
    screens, rams = [game_frame(env, obs)], [game_ram(env)]
    for _ in range(steps - 1):
        obs, _, terminated, truncated, _ = env.step(policy(obs, rams[-1]))
        screens.append(game_frame(env, obs))
        rams.append(game_ram(env))
        if terminated or truncated:
            break
    env.close()
    screens = np.stack(screens)
    return screens, np.stack([preprocess_frame(s, (SIZE, SIZE)) for s in screens]), np.stack(rams)


def probe_accuracy(frames: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """How well probe_breakout reads frames (N, 64, 64, 3) against breakout_truth."""
    p = probe_breakout(frames)
    drawn, in_play = truth["ball_drawn"], truth["ball_in_play"]
    seen = ~np.isnan(p["ball_x"])
    both = seen & in_play
    paddle_err = np.abs(p["paddle_x"] - truth["paddle_x"])
    return {
        "frames": len(frames),
        "paddle_found": float(np.mean(~np.isnan(p["paddle_x"]))),
        "paddle_abs_err_mean": float(np.nanmean(paddle_err)), "paddle_abs_err_max": float(np.nanmax(paddle_err)),
        "ball_found_when_in_play": float(seen[in_play].mean()), "ball_found_when_drawn": float(seen[drawn].mean()),
        "ball_false_detections": int((seen & ~in_play).sum()),
        "ball_x_abs_err_mean": float(np.abs(p["ball_x"] - truth["ball_x"])[both].mean()),
        "ball_y_abs_err_mean": float(np.abs(p["ball_y"] - truth["ball_y"])[both].mean()),
        "ball_abs_err_max": float(np.maximum(np.abs(p["ball_x"] - truth["ball_x"]), np.abs(p["ball_y"] - truth["ball_y"]))[both & drawn].max()),
        "bricks_exact": float(np.mean(p["bricks_left"] == truth["bricks_left"])),
        "bricks_abs_err_max": int(np.abs(p["bricks_left"] - truth["bricks_left"]).max()),
        "score_exact": float(np.mean(p["score"] == truth["score"])),
        "score_exact_or_one_step_late": float(np.mean(score_matches(p["score"], truth["score"]))),
        "score_unreadable": float(np.mean(p["score"] < 0)),
        "clutter_max": float(p["clutter"].max()),
    }


if __name__ == "__main__":
    import json
    import time

    parts = [record_breakout(100 + k, 1500, scripted=k < 3) for k in range(4)]
    screens, frames, rams = (np.concatenate(a) for a in zip(*parts))
    t0 = time.perf_counter()
    probe_breakout(frames)
    speed = len(frames) / (time.perf_counter() - t0)
    print(json.dumps({**probe_accuracy(frames, breakout_truth(screens, rams)), "frames_per_s": round(speed)}, indent=2))
