"""Stage 0: record the real game under the behaviour policy into a sharded dataset (train/dataset.py).

    python -m train.collect --game Breakout --out data/breakout --steps 200000 --heldout-steps 20000

Deterministic: shard k of a split holds episodes seeded only by (seed, split, k) (the env is reset with a
seed at the shard's first episode, each episode's policy rng comes from (seed, split, k, episode)), so
the same command writes byte-identical arrays, and a killed run resumes by recording the missing shards.
Each split records whole episodes until its step budget is reached (the last shard may hold fewer
episodes; a split overshoots its budget by less than one episode).

A run locks its --out folder (`.collect.lock`, which names the holder), so a second run there stops at once.
Shards already on disk are read back before they are reused: one that does not read, or does not hold what
meta.json says, is reported, kept as `shard_k.npz.corrupt` and recorded again (identical, by the seeding).
"""
from __future__ import annotations

import argparse
import fcntl
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from envs.games import (ALE_NAMESPACE, action_meanings, game_frame, game_ram, make_game, preprocess_frame,
                        resolve_env_id)
from envs.policies import Policy, make_behaviour_policy
from train.dataset import (FORMAT_VERSION, SPLITS, TMP_SUFFIX, ShardWriter, episodes, list_shards, load_shard,
                           read_meta, shard_name, split_dir, write_meta)
from worldmodel import cli

FRAMES_PER_STEP = 1  # one stored frame per agent step: see envs/games.py for why
SPLIT_SEED_KEYS = {"train": 0, "heldout": 1}  # disjoint seed streams for the two splits
SHARD_KEYS = ("frames", "actions", "rewards", "terminated", "truncated", "first", "episode")  # + "ram" (ALE games)
LOCK_FILE = ".collect.lock"  # in --out: held (flock) by the run writing there, names it
HELDOUT_FRACTION, MAX_DEFAULT_HELDOUT_STEPS = 0.1, 20_000  # the default --heldout-steps: 10% of --steps, capped


class OutFolderError(RuntimeError):
    """--out cannot be written, or another train.collect is writing it; one line, exit status 2."""


def lock_out(out: Path) -> IO[str]:
    """Create `out` and lock it for as long as the returned file stays open (non-blocking: a folder another
    run holds is an OutFolderError naming that run). Two runs on one folder would race on the shard renames."""
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_FILE, "a+")
    except OSError as err:
        raise OutFolderError(f"--out {out} cannot be created or written ({err.strerror}: {err.filename})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        f.seek(0)
        holder = f.read().strip() or "it has not written its name yet"
        f.close()
        if isinstance(err, BlockingIOError):
            raise OutFolderError(f"--out {out} is being written by another train.collect ({holder}); wait for it to "
                                 f"finish, or use another --out") from None
        raise OutFolderError(f"--out {out}: cannot lock {out / LOCK_FILE} ({err.strerror})") from None
    f.seek(0)
    f.truncate()  # the last holder's name
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


@dataclass
class CollectConfig:
    game: str
    out: Path
    steps: int
    heldout_steps: int = 0
    seed: int = 0
    size: int = 64
    episodes_per_shard: int = 8
    max_episode_steps: int = 3000
    frameskip: int = 4
    sticky: float = 0.0

    def budget(self, split: str) -> int:
        return {"train": self.steps, "heldout": self.heldout_steps}[split]


def shard_env_seed(seed: int, split: str, shard_index: int) -> int:
    """The env reset seed of a shard's first episode (later episodes continue the env's RNG)."""
    return int(np.random.SeedSequence([seed, SPLIT_SEED_KEYS[split], shard_index]).generate_state(1)[0])


def episode_rng(seed: int, split: str, shard_index: int, episode_in_shard: int) -> np.random.Generator:
    """The behaviour policy's rng for one episode, a function of its place in the dataset only."""
    return np.random.default_rng([seed, SPLIT_SEED_KEYS[split], shard_index, episode_in_shard])


def record_episode(env: gym.Env, policy: Policy, *, env_seed: int | None, size: tuple[int, int],
                   max_episode_steps: int, episode_id: int) -> dict[str, np.ndarray]:
    """Play one episode; row 0 is the reset screen (action 0), row i the screen after action i."""
    obs, _ = env.reset(seed=env_seed)
    policy.reset()
    ram = game_ram(env)
    frames, rams = [preprocess_frame(game_frame(env, obs), size)], [ram]
    actions, rewards, terminated, truncated = [0], [0.0], [False], [False]
    for step in range(max_episode_steps):
        action = policy(obs, ram)
        obs, reward, term, trunc, _ = env.step(action)
        ram = game_ram(env)
        frames.append(preprocess_frame(game_frame(env, obs), size))
        rams.append(ram)
        actions.append(action)
        rewards.append(float(reward))
        terminated.append(bool(term))
        truncated.append(bool(trunc) or step + 1 == max_episode_steps)
        if terminated[-1] or truncated[-1]:
            break
    num_rows = len(frames)
    first = np.zeros(num_rows, dtype=bool)
    first[0] = True
    arrays = {
        "frames": np.stack(frames),  # (N, H, W, 3) uint8
        "actions": np.asarray(actions, dtype=np.int64),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminated": np.asarray(terminated, dtype=bool),
        "truncated": np.asarray(truncated, dtype=bool),
        "first": first,
        "episode": np.full(num_rows, episode_id, dtype=np.int64),
    }
    if ram is not None:
        arrays["ram"] = np.stack(rams)  # (N, 128) uint8
    return arrays


def record_shard(env: gym.Env, cfg: CollectConfig, split: str, index: int, steps_left: int, path: Path,
                 bar: tqdm) -> dict:
    """Record shard `index` of `split` (stopping early once `steps_left` rows are recorded) and write it."""
    writer = ShardWriter(path)
    total_return = 0.0
    for episode_in_shard in range(cfg.episodes_per_shard):
        # Seeding the env once per shard: an ALE reset with a seed reloads the ROM (~0.1 s), too slow per episode.
        env_seed = shard_env_seed(cfg.seed, split, index) if episode_in_shard == 0 else None
        rng = episode_rng(cfg.seed, split, index, episode_in_shard)
        policy = make_behaviour_policy(cfg.game, env.action_space.n, rng)
        arrays = record_episode(env, policy, env_seed=env_seed, size=(cfg.size, cfg.size),
                                max_episode_steps=cfg.max_episode_steps,
                                episode_id=index * cfg.episodes_per_shard + episode_in_shard)
        writer.add_episode(arrays)
        total_return += float(arrays["rewards"].sum())
        bar.update(len(arrays["actions"]))
        if writer.num_steps >= steps_left:
            break
    info = {"file": path.name, "steps": writer.num_steps, "episodes": writer.num_episodes, "return": total_return}
    writer.close()
    return info


def summarize_shard(path: Path) -> dict:
    """Step, episode and return counts of a shard already on disk (resuming without its meta entry)."""
    shard = load_shard(path)
    return {"file": path.name, "steps": len(shard["actions"]), "episodes": len(episodes(shard)),
            "return": float(shard["rewards"].sum())}


def shard_problem(path: Path, settings: dict, steps: int | None) -> str | None:
    """Why a shard on disk cannot be kept, or None: it must read back whole (zip CRCs checked), hold the arrays
    record_episode writes, all of one length, with the dataset's frame size, start at an episode's first row,
    and hold the rows meta.json recorded for it (`steps`; None when meta.json does not list it)."""
    try:
        shard = load_shard(path)
        episodes(shard)  # raises when the first row is not an episode's first
    except ValueError as err:
        return f"{type(err.__cause__).__name__}: {err.__cause__}" if err.__cause__ else str(err)
    expected = set(SHARD_KEYS) | ({"ram"} if settings["has_ram"] else set())
    if set(shard) != expected:
        return f"it holds the arrays {sorted(shard)}, not {sorted(expected)}"
    rows = len(shard["actions"])
    frames = shard["frames"]
    if frames.dtype != np.uint8 or frames.shape != (rows, *settings["frame_size"], 3):
        return f"its frames are {frames.dtype} {frames.shape}, not uint8 {(rows, *settings['frame_size'], 3)}"
    if steps is not None and rows != steps:
        return f"it holds {rows} rows where meta.json recorded {steps}"
    return None


def set_aside_bad_shards(out: Path, settings: dict, meta: dict | None) -> None:
    """Check every shard on disk; a bad one is renamed `shard_k.npz.corrupt` (kept, not deleted) and reported,
    so the run records it again: shard k depends only on (seed, split, k), so the new one is the one intended."""
    for split in SPLITS:
        if not split_dir(out, split).is_dir():
            continue
        recorded = {} if meta is None else {i["file"]: i["steps"] for i in meta["splits"][split]["shards"]}
        for path in list_shards(out, split):
            problem = shard_problem(path, settings, recorded.get(path.name))
            if problem is None:
                continue
            aside, n = path.with_name(path.name + ".corrupt"), 1
            while aside.exists():
                aside, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
            os.replace(path, aside)
            print(f"warning: {split}/{path.name} cannot be used ({problem}); kept it as {split}/{aside.name} and "
                  f"recording it again", file=sys.stderr)


def split_summary(shards: list[dict], budget: int) -> dict:
    steps = sum(s["steps"] for s in shards)
    return {"shards": shards, "steps": steps, "episodes": sum(s["episodes"] for s in shards),
            "return": sum(s["return"] for s in shards), "target_steps": budget, "complete": steps >= budget}


def dataset_settings(cfg: CollectConfig, env: gym.Env, policy_description: str) -> dict:
    """Everything in meta.json that the arguments decide; a resumed run must match it exactly."""
    env_id = resolve_env_id(cfg.game)
    is_ale = env_id.startswith(ALE_NAMESPACE)
    return {
        "format_version": FORMAT_VERSION,
        "game": env_id[len(ALE_NAMESPACE):].rsplit("-", 1)[0] if is_ale else env_id,
        "env_id": env_id,
        "action_meanings": action_meanings(env),
        "num_actions": int(env.action_space.n),
        "frame_size": [cfg.size, cfg.size],
        "frameskip": cfg.frameskip,
        "repeat_action_probability": cfg.sticky,
        "frames_per_step": FRAMES_PER_STEP,
        "seed": cfg.seed,
        "policy": policy_description,
        "max_episode_steps": cfg.max_episode_steps,
        "episodes_per_shard": cfg.episodes_per_shard,
        "has_ram": game_ram(env) is not None,
        "target_steps": {split: cfg.budget(split) for split in SPLITS},
    }


def check_resume(meta: dict, settings: dict, out: Path) -> None:
    mismatches = [f"{k}: dataset has {meta.get(k)!r}, arguments give {v!r}" for k, v in settings.items()
                  if meta.get(k) != v]
    if mismatches:
        raise SystemExit(f"error: {out} holds a dataset recorded with other settings, so it cannot be resumed:\n  "
                         + "\n  ".join(mismatches) + "\nuse another --out, or the original arguments")


def collect(cfg: CollectConfig) -> dict:
    """Record (or finish recording) the dataset of `cfg` under the lock of its folder; returns the final
    meta.json contents."""
    with lock_out(cfg.out):
        return record_dataset(cfg)


def record_dataset(cfg: CollectConfig) -> dict:
    env = make_game(cfg.game, frameskip=cfg.frameskip, repeat_action_probability=cfg.sticky,
                    render_mode="rgb_array")
    settings = dataset_settings(cfg, env, make_behaviour_policy(cfg.game, env.action_space.n,
                                                                np.random.default_rng(0)).description)
    old_meta = None
    if (cfg.out / "meta.json").exists():
        try:
            old_meta = read_meta(cfg.out)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
        check_resume(old_meta, settings, cfg.out)
    set_aside_bad_shards(cfg.out, settings, old_meta)
    if old_meta is not None:
        if all(old_meta["splits"][s]["complete"] and all((split_dir(cfg.out, s) / i["file"]).is_file()
                                                         for i in old_meta["splits"][s]["shards"]) for s in SPLITS):
            print(f"dataset at {cfg.out} is already complete; nothing to do")
            return old_meta
    meta = {**settings, "splits": {s: split_summary([], cfg.budget(s)) for s in SPLITS}}
    for split in SPLITS:
        split_dir(cfg.out, split).mkdir(parents=True, exist_ok=True)
        for stale in split_dir(cfg.out, split).glob("*" + TMP_SUFFIX):
            stale.unlink()  # a half-written shard from a killed run
    write_meta(cfg.out, meta)

    start, recorded = time.time(), 0
    with tqdm(total=sum(cfg.budget(s) for s in SPLITS), unit="step", desc="collect") as bar:
        for split in SPLITS:
            known = {} if old_meta is None else {i["file"]: i for i in old_meta["splits"][split]["shards"]}
            shards: list[dict] = []
            while sum(s["steps"] for s in shards) < cfg.budget(split):
                path = split_dir(cfg.out, split) / shard_name(len(shards))
                if path.is_file():
                    info = known.get(path.name) or summarize_shard(path)
                    bar.update(info["steps"])
                else:
                    steps_left = cfg.budget(split) - sum(s["steps"] for s in shards)
                    info = record_shard(env, cfg, split, len(shards), steps_left, path, bar)
                    recorded += info["steps"]
                shards.append(info)
                meta["splits"][split] = split_summary(shards, cfg.budget(split))
                write_meta(cfg.out, meta)
    env.close()
    print_summary(cfg.out, meta, recorded, time.time() - start)
    return meta


def print_summary(out: Path, meta: dict, recorded: int, seconds: float) -> None:
    size = sum(p.stat().st_size for p in out.rglob("*.npz"))
    print(f"dataset {out}: {meta['game']} at {meta['frame_size'][0]}x{meta['frame_size'][1]}, "
          f"{size / 2**20:.1f} MiB on disk")
    for split in SPLITS:
        s = meta["splits"][split]
        mean_return = s["return"] / s["episodes"] if s["episodes"] else float("nan")
        print(f"  {split:8s} {s['steps']:>9,d} steps  {s['episodes']:>6,d} episodes  "
              f"mean return {mean_return:7.2f}  {len(s['shards']):>4d} shards")
    print(f"recorded {recorded:,d} steps in {seconds:.1f} s ({recorded / max(seconds, 1e-9):,.0f} steps/s)")


def parse_args(argv: list[str] | None) -> CollectConfig:
    parser = argparse.ArgumentParser(prog="python -m train.collect", description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--game", default="Breakout", help="ALE game (Breakout, Pong, ...) or a Gymnasium env id")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory (created; resumed if it exists)")
    parser.add_argument("--steps", type=int, default=200_000, help="train split budget in agent steps (rows)")
    parser.add_argument("--heldout-steps", type=int, default=None,
                        help=f"held-out split budget in agent steps (default: {100 * HELDOUT_FRACTION:.0f}%% of --steps, at most {MAX_DEFAULT_HELDOUT_STEPS:,d})")
    parser.add_argument("--seed", type=cli.seed, default=0)
    parser.add_argument("--size", type=int, default=64, help="frames are resized to SIZE x SIZE")
    parser.add_argument("--episodes-per-shard", type=int, default=8)
    parser.add_argument("--max-episode-steps", type=int, default=3000, help="time limit: episodes are truncated here")
    parser.add_argument("--frameskip", type=int, default=4, help="emulator frames per agent step")
    parser.add_argument("--sticky", type=float, default=0.0, help="ALE repeat_action_probability (keep 0.0)")
    args = parser.parse_args(argv)
    for name in ("steps", "size", "episodes_per_shard", "max_episode_steps", "frameskip"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.heldout_steps is None:
        args.heldout_steps = min(MAX_DEFAULT_HELDOUT_STEPS, math.ceil(HELDOUT_FRACTION * args.steps))
    if args.heldout_steps < 0:
        parser.error(f"--heldout-steps must be >= 0, got {args.heldout_steps}")
    if not 0.0 <= args.sticky <= 1.0:
        parser.error(f"--sticky is a probability in [0, 1], got {args.sticky}")
    try:
        resolve_env_id(args.game)
    except ValueError as err:
        parser.error(str(err))
    return CollectConfig(game=args.game, out=args.out, steps=args.steps, heldout_steps=args.heldout_steps,
                         seed=args.seed, size=args.size, episodes_per_shard=args.episodes_per_shard,
                         max_episode_steps=args.max_episode_steps, frameskip=args.frameskip, sticky=args.sticky)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        collect(cfg)
    except OutFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as err:  # e.g. a game without RGB frames or Discrete actions
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
