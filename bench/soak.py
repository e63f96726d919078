"""Long play without resets: does the KV cache stay bounded and do the frames still look like the game?

    python -m bench.soak                                    # 10,000 steps on the shipped model
    python -m bench.soak --steps 300 --every 100 --out /tmp/soak.json
    python -m bench.soak --model student=assets/breakout --model teacher=assets/breakout_teacher --plot soak.png
    python -m bench.soak --policy serve --real-game          # a player that serves, against the real game under it

For each `--model` (NAME=PATH, or a plain PATH named after its folder), one after the other: load the model,
start one world from the real start context `--start` of its start_frames.npz (noise seeded `--seed`), then
take `--steps` steps under a seeded persistent random policy (`--policy serve`: the same, plus FIRE once no
ball has been seen for 8 steps, `envs.policies.Serving`) without ever resetting. The model's own episode
ends (end_prob > 0.5) are counted but ignored: the point is the cache and the frames over a long run.

Every frame is read by the game's state probe (envs.probe) and folded into per-interval aggregates (nothing
is kept per frame, so the harness itself runs in constant memory). A row is written every `--every` steps,
at step 1000 (when steps >= 1000) and at the last step:
    rss_mib            resident set size after gc.collect() (/proc/self/status VmRSS; see rss_source)
    max_position       cache.max_position() now (it must stay <= (S + W + 1) * frames_per_chunk - 1)
    cache_bytes        cache.nbytes() (must not change)
    steps_per_s        wall clock over the interval (model step, probe and bookkeeping)
    paddle / ball / score   rates of frames with a paddle found, a ball seen, a readable score
    bricks             mean bricks_left
    flicker            mean absolute frame-to-frame pixel change (0..255)
    pixel_std          mean per-frame pixel std (a collapsed, flat frame has ~0)
    layout_ok          rate of frames with a paddle AND a readable score AND bricks_left >= 1
    clutter            mean stray red on the open court, in balls (the probe's `clutter`; a real frame has 0):
                       a court strewn with blobs keeps its layout and "sees" a ball in every frame, and this
                       is the figure that tells it from a clean one (NaN for probes without it)
    clean              rate of frames whose court is clean: clutter below CLEAN_CLUTTER (one ball's worth)
    ball_clean         rate of frames with a ball seen on a clean court: the ball rate that blobs cannot fake
                       (probes without clutter: the ball rate)
    collapsed          frames with pixel std < 5% of the start context's mean, or whose layout is not ok
    ends               steps with end_prob > 0.5
The summary per model: RSS at step 1000 and at the end and their difference, the largest max_position
over every step against its bound, whether the cache bytes stayed constant, the first row (its step) whose
interval layout-ok rate fell below 0.5 (null if none), the rates over the whole run, the end_prob > 0.5
count, wall time and steps/s. The same probe rates on all frames of the model's real start contexts are the
reference row "real (start frames)". With `--real-game`, the real game is played by the same policy and seed
for as many steps (reset at each episode end, which the model never is) and its rates are the row "real
game, same policy"; the summary gives the model's paddle and ball rates as shares of it
(`paddle_rate_vs_real_game`, `ball_rate_vs_real_game`, `ball_clean_rate_vs_real_game`). Prints a table per model and a comparison table, writes JSON
(`--out`) and, with `--plot`, a 2x2 figure (RSS, layout-ok rate, paddle-found rate, flicker over steps).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import model_info
from bench.memory import maxrss_mib, status_mib
from worldmodel import cli

REPORT_STEP = 1000  # always a row here (when steps >= 1000): the summary's "RSS at 1k"
PROBE_BATCH = 64  # frames probed at once: ~6x cheaper per frame than one by one (measured fastest at 32-64), ~3 MiB of temporaries
COLLAPSE_STD_FRACTION = 0.05  # a frame whose pixel std is below this fraction of the start context's is flat
LAYOUT_BREAK_RATE = 0.5  # the summary names the first row whose interval layout-ok rate falls below this
END_THRESHOLD = 0.5
CLEAN_CLUTTER = 1.0  # a court is clean below one ball's worth of stray red (every real frame has 0)
REAL = "real (start frames)"


# ----- memory -----
@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def rss_mib() -> tuple[float, str]:
    """Current resident set size in MiB after a full garbage collection, and where it was read from.

    With glibc, free heap pages are handed back to the OS first (malloc_trim(0)): otherwise memory freed
    earlier stays resident, and a leak can fill it for a long while without RSS moving (seen in a test
    process: a 9.4 MiB leak showed as +4.8 MiB). After trimming, RSS is live memory plus fragmentation."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    rss = status_mib("VmRSS")
    if rss is not None:
        return rss, "/proc/self/status VmRSS" + (" after malloc_trim(0)" if trim is not None else "")
    return maxrss_mib(), "resource.getrusage ru_maxrss: PEAK resident size, not current (/proc/self/status is absent), so it can only grow"


# ----- frame statistics -----
def frame_stats(probe: Callable[[np.ndarray], dict[str, np.ndarray]], frames: np.ndarray, prev: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-frame readings of frames (N, H, W, 3) uint8; `prev` is the frame before frames[0] (None: the first
    frame has no flicker value, NaN)."""
    p = probe(frames)
    paddle = ~np.isnan(p["paddle_x"])
    score = p["score"] >= 0
    f = frames.astype(np.float32)
    if prev is None:
        flicker = np.concatenate([[np.nan], np.abs(np.diff(f, axis=0)).mean((1, 2, 3))])
    else:
        flicker = np.abs(np.diff(np.concatenate([prev[None].astype(np.float32), f]), axis=0)).mean((1, 2, 3))
    if "clutter" in p:
        clutter, clean = p["clutter"], p["clutter"] < CLEAN_CLUTTER
    else:
        clutter, clean = np.full(len(f), np.nan), np.ones(len(f), bool)
    ball = ~np.isnan(p["ball_x"])
    return {"paddle": paddle, "ball": ball, "score": score, "bricks": p["bricks_left"].astype(np.float64),
            "flicker": flicker, "std": f.reshape(len(f), -1).std(1), "layout": paddle & score & (p["bricks_left"] >= 1),
            "clutter": clutter, "clean": clean, "ball_clean": ball & clean}


class Aggregate:
    """Running sums of frame_stats over an interval (or a whole run): constant memory however long."""

    SUMMED = ("paddle", "ball", "score", "bricks", "std", "layout", "clutter", "clean", "ball_clean")  # summed as they are

    def __init__(self, collapse_std: float) -> None:
        self.collapse_std = collapse_std
        self.frames = self.flicker_n = self.steps = self.ends = 0
        self.sums = dict.fromkeys((*self.SUMMED, "flicker", "collapsed"), 0.0)

    def add(self, s: dict[str, np.ndarray]) -> None:
        self.frames += len(s["std"])
        for k in self.SUMMED:
            self.sums[k] += float(s[k].sum())
        ok = ~np.isnan(s["flicker"])
        self.sums["flicker"] += float(s["flicker"][ok].sum())
        self.flicker_n += int(ok.sum())
        self.sums["collapsed"] += float(((s["std"] < self.collapse_std) | ~s["layout"]).sum())

    def result(self) -> dict[str, Any]:
        n = max(self.frames, 1)
        return {"frames": self.frames, "paddle_rate": self.sums["paddle"] / n, "ball_rate": self.sums["ball"] / n,
                "score_rate": self.sums["score"] / n, "bricks_mean": self.sums["bricks"] / n,
                "flicker": self.sums["flicker"] / self.flicker_n if self.flicker_n else math.nan,
                "pixel_std": self.sums["std"] / n, "layout_ok_rate": self.sums["layout"] / n, "collapsed": int(self.sums["collapsed"]),
                "clutter": self.sums["clutter"] / n, "clean_rate": self.sums["clean"] / n, "ball_clean_rate": self.sums["ball_clean"] / n}


def real_reference(probe, frames: np.ndarray, collapse_std: float) -> dict[str, Any]:
    """The probe rates on all frames of all real start contexts (K, T, H, W, 3); flicker within each context."""
    agg = Aggregate(collapse_std)
    for ctx in frames:
        agg.add(frame_stats(probe, ctx, None))
    return agg.result()


POLICIES = ("random", "serve")


def make_policy(kind: str, num_actions: int, seed: int, probe) -> Any:
    """The soak's player: "random", the data's persistent random policy; "serve", the same that also FIREs
    once no ball has been seen for a while (`envs.policies.Serving`)."""
    from envs.breakout import FIRE
    from envs.policies import PersistentRandom, Serving

    if kind not in POLICIES:
        raise ValueError(f"unknown soak policy {kind!r}; choose one of {POLICIES}")
    inner = PersistentRandom(num_actions, np.random.default_rng(seed))
    return inner if kind == "random" else Serving(inner, probe, fire=FIRE)


def real_game_reference(game: str, frameskip: int, size: tuple[int, int], steps: int, seed: int, kind: str, probe,
                        collapse_std: float) -> dict[str, Any]:
    """The probe rates of the real game played by the same policy (seed, kind) for as many steps, on frames
    preprocessed as the data's; the game is reset at each episode end (counted), as the model never is."""
    from envs.games import game_frame, make_game, preprocess_frame

    env = make_game(game, frameskip=frameskip)
    policy = make_policy(kind, int(env.action_space.n), seed, probe)
    # flicker across an episode end compares the last frame with the reset screen: one spike per episode
    obs, _ = env.reset(seed=seed)
    frame = preprocess_frame(game_frame(env, obs), size)
    agg, buffer, prev, episodes = Aggregate(collapse_std), [], None, 0
    t0 = time.perf_counter()
    for step in range(steps):
        obs, _, terminated, truncated, _ = env.step(policy(frame, None))
        frame = preprocess_frame(game_frame(env, obs), size)
        buffer.append(frame)
        if terminated or truncated:
            episodes += 1
            obs, _ = env.reset()
            policy.reset()
            frame = preprocess_frame(game_frame(env, obs), size)
        if len(buffer) >= PROBE_BATCH or step == steps - 1:
            chunk = np.stack(buffer)
            agg.add(frame_stats(probe, chunk, prev))
            prev, buffer = chunk[-1], []
    env.close()
    return {**agg.result(), "steps": steps, "episodes_ended": episodes, "policy": policy.description, "wall_s": time.perf_counter() - t0}


def report_steps(steps: int, every: int) -> list[int]:
    return sorted({*range(every, steps + 1, every), *([REPORT_STEP] if steps >= REPORT_STEP else []), steps})


# ----- the soak -----
def soak(model_path: str | os.PathLike, steps: int, every: int, start: int, seed: int, denoise_steps: int | None = None,
         on_row: Callable[[dict[str, Any]], None] | None = None, policy_kind: str = "random", real_game: bool = False, gate: float | None = None,
         requantize: bool | None = None) -> dict[str, Any]:
    """Play one world of the model at `model_path` for `steps` steps from start context `start` without
    resetting, under `policy_kind` ("random" or "serve"); a row every `every` steps (and at step 1000 and the
    last step). `on_row(row)` is called as each row is made. `gate`: the change gate's threshold, `requantize` SamplingConfig's (None: the
    model's). With `real_game`, the real game is played by the same policy for as many steps too ("real_game").
    Returns {config, cache, real, rows, summary} (see the module docstring)."""
    import torch

    from envs.breakout import FIRE
    from envs.probe import probe_for
    from worldmodel.runtime import WorldModel, load_start_frames

    if steps < 1 or every < 1:
        raise ValueError(f"steps and every must be >= 1, got steps={steps}, every={every}")
    if policy_kind not in POLICIES:
        raise ValueError(f"unknown soak policy {policy_kind!r}; choose one of {POLICIES}")
    model_path = Path(model_path)
    t_load = time.perf_counter()
    wm = WorldModel.load(model_path, steps=denoise_steps, gate=gate, requantize=requantize)
    load_s = time.perf_counter() - t_load
    probe = probe_for(wm.info.get("game", ""))
    if probe is None:
        wm.close()
        raise ValueError(f"{str(model_path)!r}: no state probe for game {wm.info.get('game')!r}")
    frames, actions = load_start_frames(model_path / "start_frames.npz")
    if not 0 <= start < len(frames):
        wm.close()
        raise ValueError(f"start {start} is out of range: {model_path / 'start_frames.npz'} holds {len(frames)} start contexts (0..{len(frames) - 1})")
    context, context_actions = frames[start].copy(), actions[start].copy()
    context_std = float(context.reshape(len(context), -1).astype(np.float32).std(1).mean())
    collapse_std = COLLAPSE_STD_FRACTION * context_std
    real = real_reference(probe, frames, collapse_std)
    del frames, actions  # only the chosen context is kept from here on

    cache, F = wm.cache, wm.frames_per_chunk
    bound = (cache.S + cache.W + 1) * F - 1
    if policy_kind == "serve" and (wm.info.get("action_meanings") or [None, None])[FIRE] != "FIRE":
        wm.close()
        raise ValueError(f"--policy serve presses action {FIRE} as FIRE, but {str(model_path)!r} names its actions {wm.info.get('action_meanings')}")
    policy = make_policy(policy_kind, wm.num_actions, seed, probe)
    wm.reset(context, context_actions, seed=seed)
    bytes0 = cache.nbytes()
    rss0, rss_source = rss_mib()

    rows: list[dict[str, Any]] = []
    run_agg, agg = Aggregate(collapse_std), Aggregate(collapse_std)
    buffer: list[np.ndarray] = []  # at most PROBE_BATCH frames waiting for the probe
    buffered = 0
    prev = context[-1]  # flicker of the first generated frame is against the last real one
    obs = context[-1]
    max_pos = cache.max_position()
    ends, gen_s, interval_gen_s = 0, 0.0, 0.0
    rows_at = report_steps(steps, every)
    # the newest frame at each row, allocated and touched up front so that filling it does not show as growth
    snapshots = np.zeros((len(rows_at), *context.shape[1:]), dtype=np.uint8)
    snapshots.fill(0)
    next_row = 0
    t_run = t_interval = time.perf_counter()
    last_row_step = 0

    def flush() -> None:
        nonlocal buffer, buffered, prev
        if not buffer:
            return
        chunk = np.concatenate(buffer)
        s = frame_stats(probe, chunk, prev)
        agg.add(s)
        run_agg.add(s)
        prev = chunk[-1].copy()
        buffer, buffered = [], 0

    for step in range(1, steps + 1):
        action = policy(obs, None)
        t0 = time.perf_counter()
        chunk = wm.step(action)  # (F, H, W, 3) uint8
        dt = time.perf_counter() - t0
        gen_s += dt
        interval_gen_s += dt
        obs = chunk[-1]
        end = bool(wm.end_prob[0] > END_THRESHOLD)
        agg.ends += end
        ends += end
        max_pos = max(max_pos, cache.max_position())
        buffer.append(chunk)
        buffered += len(chunk)
        if buffered >= PROBE_BATCH:
            flush()
        if step == rows_at[next_row]:
            flush()
            n = step - last_row_step
            wall = time.perf_counter() - t_interval
            rss, _ = rss_mib()
            row = {"step": step, "rss_mib": rss, "max_position": cache.max_position(), "cache_bytes": cache.nbytes(),
                   "steps_per_s": n / wall, "gen_steps_per_s": n / interval_gen_s if interval_gen_s > 0 else math.inf,
                   **agg.result(), "ends": agg.ends}
            rows.append(row)
            snapshots[len(rows) - 1] = obs
            if on_row is not None:
                on_row(row)
            agg = Aggregate(collapse_std)
            interval_gen_s, last_row_step, next_row = 0.0, step, next_row + 1
            t_interval = time.perf_counter()
    total_s = time.perf_counter() - t_run

    at_1k = next((r for r in rows if r["step"] == REPORT_STEP), None)
    broke = next((r["step"] for r in rows if r["layout_ok_rate"] < LAYOUT_BREAK_RATE), None)
    overall = run_agg.result()
    summary = {
        "steps": steps, "rss_start_mib": rss0, "rss_1k_mib": at_1k["rss_mib"] if at_1k else None, "rss_end_mib": rows[-1]["rss_mib"],
        "rss_growth_1k_to_end_mib": rows[-1]["rss_mib"] - at_1k["rss_mib"] if at_1k else None,
        "max_position": max_pos, "max_position_bound": bound, "max_position_within_bound": max_pos <= bound,
        "cache_bytes": bytes0, "cache_bytes_constant": all(r["cache_bytes"] == bytes0 for r in rows) and cache.nbytes() == bytes0,
        "first_layout_break_step": broke, **{f"overall_{k}": v for k, v in overall.items()},
        "end_count": int(ends), "wall_s": total_s, "steps_per_s": steps / total_s, "gen_steps_per_s": steps / gen_s if gen_s > 0 else math.inf,
        "load_s": load_s,
    }
    result = {
        "config": {"model": str(model_path), "steps": steps, "every": every, "start": start, "seed": seed, "denoise_steps": wm.steps,
                   "denoise_steps_override": denoise_steps, "gate": wm.gate, "requantize": wm.sampling.requantize, "policy": policy.description, "game": wm.info.get("game")},
        "cache": {"sink_chunks": cache.S, "window_chunks": cache.W, "frames_per_chunk": F, "max_position_bound": bound,
                  "chunks_played": int(cache.n_chunks.max())},
        "start_context_pixel_std": context_std, "collapse_std_threshold": collapse_std, "rss_source": rss_source,
        "torch": torch.__version__, "real": real, "rows": rows, "summary": summary,
        "snapshots": snapshots,  # (rows, H, W, 3) uint8; not written to JSON
    }
    if real_game:
        ref = real_game_reference(str(wm.info.get("game")), int(wm.info.get("frameskip", 4)), tuple(wm.frame_shape[:2]), steps, seed, policy_kind, probe, collapse_std)
        result["real_game"] = ref
        for k in ("paddle_rate", "ball_rate", "ball_clean_rate"):  # the issue's long-play figures: the model's rates as a share of the real game's
            summary[f"{k}_vs_real_game"] = overall[k] / ref[k] if ref[k] else None
    wm.close()
    del wm, cache
    gc.collect()
    return result


# ----- output -----
ROW_HEAD = (f"{'step':>7} {'RSS MiB':>8} {'maxpos':>6} {'cache KiB':>9} {'steps/s':>8} {'paddle':>6} {'ball':>5} {'score':>5} "
            f"{'bricks':>6} {'flicker':>7} {'std':>6} {'layout':>6} {'clutter':>7} {'clean':>5} {'ball@c':>6} {'collapsed':>9} {'ends':>5}")


def fmt_row(r: dict[str, Any]) -> str:
    return (f"{r['step']:>7} {r['rss_mib']:>8.1f} {r['max_position']:>6} {r['cache_bytes'] / 1024:>9.1f} {r['steps_per_s']:>8.1f} "
            f"{r['paddle_rate']:>6.3f} {r['ball_rate']:>5.2f} {r['score_rate']:>5.2f} {r['bricks_mean']:>6.1f} {r['flicker']:>7.2f} "
            f"{r['pixel_std']:>6.1f} {r['layout_ok_rate']:>6.3f} {r['clutter']:>7.1f} {r['clean_rate']:>5.2f} {r['ball_clean_rate']:>6.2f} {r['collapsed']:>9} {r['ends']:>5}")


def _num(v: Any, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{spec}}"


COMPARE_HEAD = (f"{'model':<22} {'steps':>6} {'steps/s':>8} {'RSS 1k':>7} {'RSS end':>7} {'dRSS':>6} {'maxpos/bound':>12} {'cache const':>11} "
                f"{'layout':>6} {'paddle':>6} {'ball':>5} {'score':>5} {'bricks':>6} {'flicker':>7} {'std':>6} {'clutter':>7} {'clean':>5} {'ball@c':>6} {'break@':>6} {'ends':>5}")


def fmt_compare(name: str, s: dict[str, Any] | None, probe_rates: dict[str, Any], width: int = 22) -> str:
    p = probe_rates
    rates = (f"{p['layout_ok_rate']:>6.3f} {p['paddle_rate']:>6.3f} {p['ball_rate']:>5.2f} {p['score_rate']:>5.2f} "
             f"{p['bricks_mean']:>6.1f} {p['flicker']:>7.2f} {p['pixel_std']:>6.1f} {p['clutter']:>7.1f} {p['clean_rate']:>5.2f} {p['ball_clean_rate']:>6.2f}")
    if s is None:
        return f"{name:<{width}} {'-':>6} {'-':>8} {'-':>7} {'-':>7} {'-':>6} {'-':>12} {'-':>11} {rates} {'-':>6} {'-':>5}"
    return (f"{name:<{width}} {s['steps']:>6} {s['steps_per_s']:>8.1f} {_num(s['rss_1k_mib'], '7.1f', 7)} {s['rss_end_mib']:>7.1f} "
            f"{_num(s['rss_growth_1k_to_end_mib'], '+6.1f', 6)} {str(s['max_position']) + '/' + str(s['max_position_bound']):>12} "
            f"{str(s['cache_bytes_constant']).lower():>11} {rates} {_num(s['first_layout_break_step'], '6', 6)} {s['end_count']:>5}")


def overall_rates(s: dict[str, Any]) -> dict[str, Any]:
    return {k[len("overall_"):]: v for k, v in s.items() if k.startswith("overall_")}


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("rss_mib", "RSS (MiB)"), ("layout_ok_rate", "layout-ok rate"), ("paddle_rate", "paddle-found rate"), ("flicker", "flicker (mean |frame diff|)"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    distinct_real = len({json.dumps(r["real"], sort_keys=True) for r in results.values()}) > 1
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (name, res) in enumerate(results.items()):
            steps = [r["step"] for r in res["rows"]]
            line, = ax.plot(steps, [r[key] for r in res["rows"]], marker="o", markersize=3, label=name)
            if key in res["real"] and (distinct_real or i == 0):  # the real start frames: a dashed reference
                ax.axhline(res["real"][key], color=line.get_color() if distinct_real else "gray", linestyle="--", linewidth=0.8,
                           label=f"{REAL}, {name}" if distinct_real else REAL)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key in ("layout_ok_rate", "paddle_rate"):
            ax.set_ylim(-0.03, 1.03)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 1].legend(fontsize=8)
    fig.suptitle("soak: long play without resets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- CLI -----
def contact_sheet(results: dict[str, dict[str, Any]], path: str, scale: int = 2) -> None:
    """One line of frames per model (the newest frame at each row, left to right), scaled up nearest-neighbour."""
    import cv2

    lines = []
    width = max(len(r["snapshots"]) for r in results.values())
    for r in results.values():
        snaps = r["snapshots"]
        pad = np.zeros((width - len(snaps), *snaps.shape[1:]), dtype=np.uint8)
        lines.append(np.concatenate(list(np.concatenate([snaps, pad])), axis=1))  # (H, width * W, 3)
    sheet = np.concatenate(lines, axis=0)
    sheet = cv2.resize(sheet, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path!r}")


def parse_model(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if sep and name and os.sep not in name and "/" not in name:
        return name, Path(path)
    return Path(spec).resolve().name, Path(spec)


def check_model(p: argparse.ArgumentParser, name: str, path: Path, start: int) -> None:
    """parser.error (exit 2) unless `path` is a world-model folder with a probe and a start context `start`."""
    from worldmodel.checkpoint import CheckpointError

    if not path.is_dir():
        p.error(f"--model {name}: no model folder at {str(path)!r}")
    info = model_info(p, f"--model {name}", path)
    from envs.probe import probe_for
    from worldmodel.runtime import load_start_frames

    if probe_for(str(info.get("game", ""))) is None:
        p.error(f"--model {name}: no state probe for game {info.get('game')!r}")
    try:
        frames, _ = load_start_frames(path / "start_frames.npz")
    except CheckpointError as e:
        p.error(f"--model {name}: {e}")
    if not 0 <= start < len(frames):
        p.error(f"--start {start} is out of range for --model {name}: {str(path / 'start_frames.npz')!r} holds {len(frames)} start contexts, "
                f"so --start must be in 0..{len(frames) - 1}")


def main(argv: list[str] | None = None) -> int:
    from envs.world_env import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help=f"world-model folder, repeatable; a plain PATH is named after its folder (default: {DEFAULT_MODEL})")
    p.add_argument("--denoise-steps", type=int, default=None, help="denoising steps per chunk (default: the model's)")
    p.add_argument("--gate", type=float, default=None, metavar="P", help="change-gate threshold in [0, 1) for models trained with one (0: off; default: the model's)")
    p.add_argument("--requantize", action=argparse.BooleanOptionalAction, default=None, help="each generated chunk enters the context as the frames shown, encoded again like real ones "
                   "(--no-requantize: the generated latents themselves; default: the model's)")
    p.add_argument("--steps", type=int, default=10000, help="steps to play without resetting")
    p.add_argument("--every", type=int, default=500, help="steps between rows (there is also one at step 1000 and at the end)")
    p.add_argument("--start", type=int, default=0, help="index of the start context in the model's start_frames.npz")
    p.add_argument("--seed", type=cli.seed, default=0, help="seeds the policy and the model's noise")
    p.add_argument("--policy", choices=POLICIES, default="random", help="random: persistent random actions; serve: the same, plus FIRE once no ball has been seen for 8 steps")
    p.add_argument("--real-game", action="store_true", help="also play the real game with the same policy and seed for as many steps (reset at each episode end) "
                   "and compare the rates: the model's paddle and ball rates as a share of the real game's")
    p.add_argument("--out", default="soak.json", help="JSON results file")
    p.add_argument("--plot", default=None, help="PNG of RSS, layout-ok rate, paddle-found rate and flicker over steps")
    p.add_argument("--frames", default=None, help="PNG contact sheet: the newest frame at every row, one line per model")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.every < 1:
        p.error(f"--every must be >= 1, got {args.every}")
    if args.denoise_steps is not None and args.denoise_steps < 1:
        p.error(f"--denoise-steps must be >= 1, got {args.denoise_steps}")
    if args.gate is not None and not 0 <= args.gate < 1:
        p.error(f"--gate must lie in [0, 1) (0: off), got {args.gate}")
    models = [parse_model(s) for s in (args.model or [str(DEFAULT_MODEL)])]
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        p.error(f"--model names must be distinct, got {names} (name them with NAME=PATH)")
    for name, path in models:
        check_model(p, name, path, args.start)

    import torch

    results: dict[str, dict[str, Any]] = {}
    for name, path in models:
        print(f"\n== {name} ({path}): {args.steps} steps from start context {args.start}, seed {args.seed}", flush=True)
        print(ROW_HEAD, flush=True)
        res = soak(path, args.steps, args.every, args.start, args.seed, args.denoise_steps, on_row=lambda r: print(fmt_row(r), flush=True),
                   policy_kind=args.policy, real_game=args.real_game, gate=args.gate,
                   requantize=args.requantize)
        results[name] = res
        s, c = res["summary"], res["cache"]
        if "real_game" in res:
            g, s_ = res["real_game"], res["summary"]
            share = lambda k: "-" if s_[f"{k}_vs_real_game"] is None else f"{s_[f'{k}_vs_real_game']:.2f}"  # noqa: E731
            print(f"   real game, same policy ({g['steps']} steps, {g['episodes_ended']} episode ends): paddle {g['paddle_rate']:.3f}  ball {g['ball_rate']:.2f}  "
                  f"score {g['score_rate']:.2f}; the model's paddle rate is {share('paddle_rate')} of it, its ball rate {share('ball_rate')}, "
                  f"its ball-on-a-clean-court rate {share('ball_clean_rate')} (real {g['ball_clean_rate']:.2f})")
        print(f"   {REAL}: paddle {res['real']['paddle_rate']:.3f}  ball {res['real']['ball_rate']:.2f}  score {res['real']['score_rate']:.2f}  "
              f"layout {res['real']['layout_ok_rate']:.3f}  flicker {res['real']['flicker']:.2f}  std {res['real']['pixel_std']:.1f}")
        print(f"   cache: S={c['sink_chunks']} W={c['window_chunks']} F={c['frames_per_chunk']}, max position {s['max_position']} "
              f"(bound {s['max_position_bound']}), {s['cache_bytes'] / 1024:.1f} KiB, constant: {s['cache_bytes_constant']}; "
              f"{s['wall_s']:.1f} s, {s['steps_per_s']:.1f} steps/s; RSS source: {res['rss_source']}", flush=True)

    distinct_real = len({json.dumps(r["real"], sort_keys=True) for r in results.values()}) > 1  # models with their own start frames
    lines = [(name, res["summary"], overall_rates(res["summary"])) for name, res in results.items()]
    if distinct_real:
        lines += [(f"{REAL}, {name}", None, res["real"]) for name, res in results.items()]
    else:
        lines.append((REAL, None, next(iter(results.values()))["real"]))
    games = [(name, res["real_game"]) for name, res in results.items() if "real_game" in res]
    distinct_games = len({json.dumps(cli.jsonable({k: v for k, v in g.items() if k != "wall_s"}), sort_keys=True) for _, g in games}) > 1
    lines += [("real game, same policy" + (f", {name}" if distinct_games else ""), None, g) for name, g in (games if distinct_games else games[:1])]
    width = max(22, *(len(n) for n, _, _ in lines))
    print("\n== comparison (rates over all frames of the run)")
    print(COMPARE_HEAD.replace(f"{'model':<22}", f"{'model':<{width}}"))
    for name, s, rates in lines:
        print(fmt_compare(name, s, rates, width))

    rss_sources = {r["rss_source"] for r in results.values()}
    report = {"config": {"models": {n: str(pth) for n, pth in models}, "steps": args.steps, "every": args.every, "start": args.start, "seed": args.seed,
                         "denoise_steps": args.denoise_steps, "gate": args.gate, "requantize": args.requantize, "plot": args.plot, "policy": args.policy, "real_game": args.real_game},
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "machine": platform.processor() or platform.machine(), "rss_source": sorted(rss_sources)[0] if len(rss_sources) == 1 else sorted(rss_sources),
              "models": {n: {k: v for k, v in r.items() if k != "snapshots"} for n, r in results.items()}}
    if any(not s.startswith("/proc") for s in rss_sources):
        report["rss_note"] = "no /proc/self/status here: rss_mib is resource.getrusage's peak resident size, which never falls"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cli.jsonable(report), indent=2, allow_nan=False))
    print(f"wrote {out}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.frames:
        contact_sheet(results, args.frames)
        print(f"wrote {args.frames}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
