"""Record rollouts of a world model, or of the real game, to video + arrays + metadata (`envs.recording`).

    python -m envs.record --env worldmodel/Breakout-v0 --policy random --episodes 2 --max-steps 300 --out rec
    python -m envs.record --env real:Breakout --policy scripted --episodes 1 --out rec
    python -m envs.record --env worldmodel/Breakout-v0 --policy actions:rec/episode_0000.npz --out replay

`--env` takes a registered world-model id (`worldmodel/Breakout-v0`, ...) or `real:<Game>`: the real
emulator (`envs.games.make_game`) with frames preprocessed as the training data is (resized to the model's
frame size). Policies: `random` (envs.policies.PersistentRandom: uniform random actions that persist),
`scripted` (envs.policies.BreakoutTracker; real Breakout only, as it reads the ball and paddle from the
emulator's RAM, which a world model does not have), `actions:FILE` (replay a saved action list: .npy, .txt
of whitespace- or comma-separated integers, .json list (or {"actions": [...]}), or a recording's .npz, whose
-1 start rows are skipped; every episode replays it from the start and stops when it runs out).
Episode k goes to OUT/episode_{k:04d}.mp4/.npz/.json and is reset with seed SEED + k. An OUT that already
holds episodes (an earlier run) is refused rather than partly overwritten: pick another --out, or delete them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

from worldmodel import cli

REAL_PREFIX = "real:"
NPY_MAGIC = b"\x93NUMPY"  # how every .npy file starts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m envs.record", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                                epilog="See the module docstring (python -m pydoc envs.record) for the policies and the layout.")
    p.add_argument("--env", default="worldmodel/Breakout-v0", help="a registered world-model id, or real:<Game> for the real emulator")
    p.add_argument("--model", default=None, help="world-model folder (overrides the id's; for real:<Game>, sets the frame size)")
    p.add_argument("--policy", default="random", help="random | scripted | actions:FILE")
    p.add_argument("--episodes", type=int, default=1, help="episodes to record")
    p.add_argument("--max-steps", type=int, default=1000, help="steps per episode at most (the time limit)")
    p.add_argument("--seed", type=cli.seed, default=0, help="episode k is reset with seed SEED + k (the policy is seeded SEED)")
    p.add_argument("--out", default="recordings", help="output folder (new, or one without episodes: an earlier run is not overwritten)")
    p.add_argument("--fps", type=float, default=15.0, help="video frame rate (15: Atari real time)")
    p.add_argument("--scale", type=int, default=4, help="video pixels per frame pixel")
    p.add_argument("--device", default="cpu", help="torch device of the world model (cpu, cuda, cuda:N, mps or auto; real:<Game> uses none)")
    args = p.parse_args(argv)
    if args.episodes < 1 or args.max_steps < 1 or args.fps <= 0 or args.scale < 1:
        p.error("--episodes and --max-steps must be >= 1, --fps > 0 and --scale >= 1")
    if args.policy not in ("random", "scripted") and not args.policy.startswith("actions:"):
        p.error(f"--policy must be random, scripted or actions:FILE, got {args.policy!r}")
    args.device = cli.check_device(p, args.device)
    from envs.recording import existing_episodes

    earlier = existing_episodes(args.out)
    if earlier:
        held = earlier[0].name if len(earlier) == 1 else f"{earlier[0].name} ... {earlier[-1].name}"
        p.error(f"--out {args.out} already holds {len(earlier)} episode{'s' if len(earlier) > 1 else ''} of an earlier run ({held} .mp4/.npz/.json), "
                "which this run would overwrite in part; choose another --out folder, or delete those files first")
    return args


def make_env(args: argparse.Namespace) -> tuple[gym.Env, dict]:
    """The env (time-limited to --max-steps) and what to note in every recording's metadata."""
    from envs.world_env import DEFAULT_MODEL

    if args.env.startswith(REAL_PREFIX):
        from envs.games import FrameObservation, make_game

        model = Path(args.model) if args.model else DEFAULT_MODEL
        info = json.loads((model / "config.json").read_text()) if (model / "config.json").is_file() else None
        if not isinstance(info, dict) or "frame_size" not in info:
            raise ValueError(f"{str(model)!r} is not a world-model folder (no config.json with frame_size) to take the frame size from")
        game = args.env[len(REAL_PREFIX):]
        env = FrameObservation(make_game(game, frameskip=info.get("frameskip", 4)), tuple(info["frame_size"]))
        return gym.wrappers.TimeLimit(env, args.max_steps), {"game": game, "real": True, "frame_size": info["frame_size"]}
    from worldmodel.registration import register_envs, registered_ids

    register_envs()
    ids = registered_ids()
    if args.env not in ids:
        raise ValueError(f"unknown env {args.env!r}; registered world-model ids: {', '.join(ids) or 'none'}; or real:<Game> (e.g. real:Breakout)")
    env = gym.make(args.env, max_episode_steps=args.max_steps, device=args.device, **({"model": args.model} if args.model else {}))
    return env, {"game": env.unwrapped.wm.info["game"], "real": False}


def load_actions(spec: str, num_actions: int) -> np.ndarray:
    """actions:FILE -> the action list (n,) int64, checked against the env's action count."""
    from envs.recording import load_recording

    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"action file {spec!r} does not exist")
    try:
        if path.suffix == ".npz":
            actions = load_recording(path).actions
            actions = actions[actions >= 0]  # skip the start rows
        elif path.suffix == ".npy":
            with open(path, "rb") as f:
                if f.read(len(NPY_MAGIC)) != NPY_MAGIC:  # else numpy calls it pickled data
                    raise ValueError(f"{spec!r} is not a .npy array file (np.save writes one; an action list as text goes in a .txt file)")
            actions = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "actions" not in data:
                raise ValueError(f"a JSON object needs an 'actions' list, this one has {sorted(data)}")
            actions = np.asarray(data["actions"] if isinstance(data, dict) else data)
        elif path.suffix == ".txt":
            actions = np.asarray(path.read_text().replace(",", " ").split(), dtype=np.int64)
        else:
            raise ValueError("want .npy, .txt, .json or a recording's .npz")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read actions from {spec!r}: {e}") from None
    if actions.ndim != 1 or len(actions) == 0 or not np.issubdtype(actions.dtype, np.integer):
        raise ValueError(f"action file {spec!r} must hold a non-empty list of integers, got {actions.dtype} of shape {actions.shape}")
    if actions.min() < 0 or actions.max() >= num_actions:
        raise ValueError(f"action file {spec!r} holds actions {actions.min()}..{actions.max()}; this env takes 0..{num_actions - 1}")
    return actions.astype(np.int64)


class Replay:
    """Replays a saved action list, from the start each episode; None once it runs out."""

    def __init__(self, actions: np.ndarray, source: str) -> None:
        self.actions, self.t = actions, 0
        self.description = f"replay of {len(actions)} actions from {source}"

    def reset(self) -> None:
        self.t = 0

    def __call__(self, obs: np.ndarray, ram: np.ndarray | None) -> int | None:
        if self.t >= len(self.actions):
            return None
        self.t += 1
        return int(self.actions[self.t - 1])


def make_policy(args: argparse.Namespace, env: gym.Env, real: bool, game: str):
    """An envs.policies-style policy: reset() per episode, (obs, ram) -> action (None: the replay ran out)."""
    from envs.games import resolve_env_id
    from envs.breakout import BREAKOUT_ACTIONS
    from envs.policies import BreakoutTracker, PersistentRandom

    n = int(env.action_space.n)
    rng = np.random.default_rng(args.seed)
    if args.policy == "random":
        return PersistentRandom(n, rng)
    if args.policy == "scripted":
        if not real:
            raise ValueError("--policy scripted (BreakoutTracker) reads the ball and paddle from the emulator's RAM, which a world model does not have; use --policy random or actions:FILE, or --env real:Breakout")
        if resolve_env_id(game) != "ALE/Breakout-v5" or n != len(BREAKOUT_ACTIONS):
            raise ValueError(f"--policy scripted exists for Breakout only (envs.policies.BreakoutTracker), not {game!r}")
        return BreakoutTracker(rng)
    source = args.policy[len("actions:"):]
    return Replay(load_actions(source, n), source)


def record(args: argparse.Namespace) -> list[dict]:
    """Record --episodes episodes; returns one summary per episode (path, steps, return, how it ended)."""
    from envs.games import game_ram
    from envs.recording import RecordRollouts

    env, meta = make_env(args)
    try:
        policy = make_policy(args, env, meta["real"], meta["game"])
        env = RecordRollouts(env, args.out, fps=args.fps, scale=args.scale, meta={**meta, "policy": policy.description, "max_steps": args.max_steps, "command": "python -m envs.record " + " ".join(sys.argv[1:])})
        summary = []
        for k in range(args.episodes):
            obs, _ = env.reset(seed=args.seed + k)
            policy.reset()
            steps, ret, end = 0, 0.0, "the action list running out"
            while (action := policy(obs, game_ram(env) if meta["real"] else None)) is not None:
                obs, reward, terminated, truncated, _ = env.step(action)
                steps, ret = steps + 1, ret + float(reward)
                if terminated or truncated:
                    end = "termination" if terminated else "the time limit"
                    break
            env.end_episode()
            summary.append({"path": str(env.paths[-1]), "steps": steps, "return": ret, "end": end})
    finally:
        env.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from worldmodel.checkpoint import CheckpointError

    try:
        summary = record(args)
    except (CheckpointError, ValueError, OSError, FloatingPointError) as e:  # FloatingPointError: worldmodel.runtime.NonFiniteError
        sys.exit(f"error: {e}")
    for s in summary:
        print(f"{s['path']}.mp4/.npz/.json: {s['steps']} steps, return {s['return']:.1f}, ended by {s['end']}")
    total = sum(s["steps"] for s in summary)
    print(f"recorded {len(summary)} episode(s), {total} steps, of {args.env} under --policy {args.policy} in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
