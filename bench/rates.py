"""Rewards and episode ends under random play: the world model's env against the real game, same policy.

    python -m bench.rates                                   # 8 worlds x 600 steps on the shipped model
    python -m bench.rates --model assets/breakout_teacher --worlds 8 --steps 600 --out rates.json

World i of the model (`WorldModelVectorEnv`, reset with seed `--seed` + i, next-step autoreset) and real game
i (the emulator the data came from, `envs.games.make_game`, at the model's frameskip, reset with the same
seed, reset again after each episode end) are each played for `--steps` agent steps by their own
persistent random policy (`envs.policies.PersistentRandom`, the data's random player), seeded `--seed` + i
on both sides, so both see the same kind of play (the same actions until the first episode end on either
side; the games themselves diverge at once). An episode end is the
env's `terminated` (the real game's game over, the model's end head above `--end-threshold`); the model's
autoreset steps, whose actions are ignored, are not counted as played.

Printed and written to `--out` (JSON), per side: steps played, reward events (steps paying a nonzero
reward), the reward summed, episode ends, and each per 1,000 steps; then the model/real ratio of each rate
and whether it lies within `--factor` (2) of 1 either way. A rate the real game has at zero gives no ratio
(null), which is reported, never a division by zero.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import model_info
from worldmodel import cli

MEASURES = ("reward_events", "reward_sum", "episode_ends")


def tally(steps: int, rewards: list[float], ends: int) -> dict[str, Any]:
    """Counts and per-1,000-step rates of one side."""
    counts = {"reward_events": int(sum(r != 0 for r in rewards)), "reward_sum": float(sum(rewards)), "episode_ends": int(ends)}
    return {"steps": steps, **counts, **{f"{k}_per_1k": 1000.0 * v / steps if steps else math.nan for k, v in counts.items()}}


def play_model(model: Path, worlds: int, steps: int, seed: int, end_threshold: float, denoise_steps: int | None,
               requantize: bool | None = None) -> dict[str, Any]:
    from envs.policies import PersistentRandom
    from envs.vector_env import WorldModelVectorEnv

    env = WorldModelVectorEnv(worlds, model=model, steps=denoise_steps, end_threshold=end_threshold, requantize=requantize)
    policies = [PersistentRandom(int(env.single_action_space.n), np.random.default_rng(seed + i)) for i in range(worlds)]
    obs, _ = env.reset(seed=seed)
    rewards: list[float] = []
    played = np.zeros(worlds, dtype=np.int64)
    ends = 0
    resetting = np.zeros(worlds, dtype=bool)  # next-step autoreset: this step of the world is its reset
    t0 = time.perf_counter()
    while (played < steps).any():  # worlds done early keep stepping in the batch; their steps are not counted
        # a resetting world's action is ignored: its policy is not asked, so its stream stays the real side's
        actions = np.array([0 if resetting[i] else p(obs[i], None) for i, p in enumerate(policies)])
        obs, reward, terminated, truncated, _ = env.step(actions)
        for i in range(worlds):
            if resetting[i]:
                policies[i].reset()
            elif played[i] < steps:
                played[i] += 1
                rewards.append(float(reward[i]))
                ends += bool(terminated[i])
        resetting = terminated | truncated
    wall = time.perf_counter() - t0
    env.close()
    return {**tally(int(played.sum()), rewards, ends), "wall_s": wall}


def play_real(game: str, frameskip: int, worlds: int, steps: int, seed: int) -> dict[str, Any]:
    from envs.games import make_game
    from envs.policies import PersistentRandom

    rewards: list[float] = []
    ends = 0
    t0 = time.perf_counter()
    for i in range(worlds):
        env = make_game(game, frameskip=frameskip)
        policy = PersistentRandom(int(env.action_space.n), np.random.default_rng(seed + i))
        obs, _ = env.reset(seed=seed + i)
        for _ in range(steps):
            obs, reward, terminated, truncated, _ = env.step(policy(obs, None))
            rewards.append(float(reward))
            ends += bool(terminated)
            if terminated or truncated:
                obs, _ = env.reset()
                policy.reset()
        env.close()
    return {**tally(worlds * steps, rewards, ends), "wall_s": time.perf_counter() - t0}


def compare(model: dict[str, Any], real: dict[str, Any], factor: float) -> dict[str, Any]:
    out = {}
    for k in MEASURES:
        m, r = model[f"{k}_per_1k"], real[f"{k}_per_1k"]
        ratio = m / r if r else None
        out[k] = {"ratio": ratio, "within_factor": None if ratio is None else (1 / factor <= ratio <= factor)}
    return out


def main(argv: list[str] | None = None) -> int:
    from envs.world_env import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m bench.rates", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="world-model folder")
    p.add_argument("--worlds", type=int, default=8, help="worlds played side by side (and real games, one after the other)")
    p.add_argument("--steps", type=int, default=600, help="agent steps per world")
    p.add_argument("--seed", type=cli.seed, default=0, help="world i and real game i are seeded seed + i (policy, start context, noise, emulator)")
    p.add_argument("--end-threshold", type=float, default=0.5, help="the model's episode-end probability above which an episode ends")
    p.add_argument("--denoise-steps", type=int, default=None, help="denoising steps per chunk (default: the model's)")
    p.add_argument("--requantize", action=argparse.BooleanOptionalAction, default=None, help="each generated chunk enters the context as the frames shown, encoded again like real ones "
                   "(--no-requantize: the generated latents themselves; default: the model's)")
    p.add_argument("--factor", type=float, default=2.0, help="a rate is matched when model/real lies within this factor of 1")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.worlds < 1 or args.steps < 1:
        p.error(f"--worlds and --steps must be >= 1, got {args.worlds} and {args.steps}")
    if args.denoise_steps is not None and args.denoise_steps < 1:
        p.error(f"--denoise-steps must be >= 1, got {args.denoise_steps}")
    if not (math.isfinite(args.factor) and args.factor >= 1):
        p.error(f"--factor must be a number >= 1, got {args.factor}")
    if not 0 < args.end_threshold <= 1:
        p.error(f"--end-threshold must lie in (0, 1], got {args.end_threshold}")
    model = Path(args.model).expanduser()
    info = model_info(p, "--model", model)
    game, frameskip = str(info.get("game", "")), int(info.get("frameskip", 4))
    from envs.games import make_game

    try:
        env = make_game(game, frameskip=frameskip)
        real_actions = int(env.action_space.n)
        env.close()
    except (ValueError, KeyError) as e:  # gymnasium's errors for an unknown id are ValueError subclasses or KeyError
        p.error(f"--model: its game {game!r} cannot be played for real: {e}")
    if real_actions != len(info.get("action_meanings", [])):
        p.error(f"--model: the model has {len(info.get('action_meanings', []))} actions, the real {game} {real_actions}")

    print(f"{args.worlds} worlds x {args.steps} steps of persistent random play, seed {args.seed}: {model} against the real {game} (frameskip {frameskip})", flush=True)
    from worldmodel.checkpoint import CheckpointError
    from worldmodel.runtime import NonFiniteError

    real = play_real(game, frameskip, args.worlds, args.steps, args.seed)
    try:
        wm = play_model(model, args.worlds, args.steps, args.seed, args.end_threshold, args.denoise_steps, args.requantize)
    except (ValueError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmp = compare(wm, real, args.factor)
    print(f"{'':14}{'steps':>8}{'reward events':>15}{'reward':>9}{'ends':>6}{'events/1k':>11}{'reward/1k':>11}{'ends/1k':>9}")
    for name, r in (("world model", wm), (f"real {game}", real)):
        print(f"{name:<14}{r['steps']:>8}{r['reward_events']:>15}{r['reward_sum']:>9.0f}{r['episode_ends']:>6}"
              f"{r['reward_events_per_1k']:>11.2f}{r['reward_sum_per_1k']:>11.2f}{r['episode_ends_per_1k']:>9.2f}")
    for k, c in cmp.items():
        verdict = "no real event, no ratio" if c["ratio"] is None else f"{c['ratio']:.3f} ({'within' if c['within_factor'] else 'outside'} a factor of {args.factor:g})"
        print(f"model/real {k.replace('_', ' ')}: {verdict}")
    if args.out:
        report = {"config": {**vars(args), "model": str(model), "game": game, "frameskip": frameskip}, "model": wm, "real": real, "ratio": cmp}
        Path(args.out).write_text(json.dumps(cli.jsonable(report), indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
