"""The real clips that `train.evaluate` holds models against: windows of held-out dataset episodes, or
episodes recorded now from the emulator under one of POLICIES, which can then be replayed under other actions.

Alignment as in the dataset (docs/data_format.md): row i's action produced frame i, and its reward and
episode end came with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from envs.breakout import BREAKOUT_ACTIONS
from envs.games import game_frame, make_game, preprocess_frame, resolve_env_id
from envs.policies import BreakoutTracker, PersistentRandom, Policy, make_behaviour_policy
from train.collect import record_episode
from train.dataset import episodes, list_shards, load_shard

MAX_WARMUP = 100  # recorded clips start after 0..MAX_WARMUP steps of play
WARMUP_STREAM, RANDOM_ACTIONS_STREAM = 1, 2  # rng streams [seed, stream], apart from the policy's (seed)
POLICIES = ("behaviour", "scripted", "random")  # what plays the recorded clips (see clip_policy)


def heldout_clips(data: Path, n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n clips of `length` consecutive steps, each from a different held-out episode, start chosen by seed:
    frames (n, length, H, W, 3) uint8, actions (n, length) int64, rewards (n, length) float32 and
    terminated (n, length) bool, aligned as in the dataset (row i's action, reward and end came with frame i)."""
    rng = np.random.default_rng(seed)
    keys = ("frames", "actions", "rewards", "terminated")
    clips: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for shard in list_shards(data, "heldout"):
        arr = load_shard(shard)
        for s, e in episodes(arr):
            if e - s < length:
                continue
            o = s + int(rng.integers(0, e - s - length + 1))
            for k in keys:
                clips[k].append(arr[k][o:o + length])
            if len(clips["frames"]) == n:
                break
        if len(clips["frames"]) == n:
            break
    if not clips["frames"]:
        raise ValueError(f"no held-out episode in {data} is {length} steps long (context + horizon); lower --horizon or record longer episodes")
    f, a, r, t = (np.stack(clips[k]) for k in keys)
    return f, a.astype(np.int64), r.astype(np.float32), t.astype(bool)


@dataclass
class Recorded:
    """Clips recorded from the emulator, and what replays them: clip k's first frame is reached from
    `env.reset(seed=seeds[k])` by the actions `lead_ins[k]` (the warm-up)."""

    frames: np.ndarray  # (E, T, H, W, 3) uint8
    actions: np.ndarray  # (E, T) int64
    rewards: np.ndarray  # (E, T) float32
    terminated: np.ndarray  # (E, T) bool
    seeds: list[int]
    lead_ins: list[np.ndarray]
    skipped: dict[int, int]  # seed -> its episode's length, for episodes shorter than a clip


def _make_env(game: str, frameskip: int):
    return make_game(game, frameskip=frameskip, repeat_action_probability=0.0, render_mode="rgb_array")


def clip_policy(name: str, game: str, num_actions: int, rng: np.random.Generator) -> Policy:
    """The policy that plays recorded clips: 'behaviour' (train.collect's mix of random and scripted play),
    'scripted' (the ball-keeping BreakoutTracker; Breakout only) or 'random' (PersistentRandom: uniform random
    actions that persist). All its randomness comes from rng."""
    if name == "behaviour":
        return make_behaviour_policy(game, num_actions, rng)
    if name == "random":
        return PersistentRandom(num_actions, rng)
    if name == "scripted":
        if resolve_env_id(game) != "ALE/Breakout-v5" or num_actions != len(BREAKOUT_ACTIONS):
            raise ValueError(f"--policy scripted is the Breakout tracker (Breakout's {len(BREAKOUT_ACTIONS)} actions); {game} has {num_actions} actions: use behaviour or random")
        return BreakoutTracker(rng)
    raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {name!r}")


def record_clips(game: str, seeds: Sequence[int], length: int, *, size: tuple[int, int], frameskip: int, policy: str = "behaviour") -> Recorded:
    """One clip of `length` steps per seed, recorded as train.collect records (no sticky actions, the same
    preprocessing) under `policy` (see clip_policy) seeded by s. Episodes shorter than a clip are skipped
    (listed in `skipped`)."""
    env = _make_env(game, frameskip)
    parts, kept, lead_ins, skipped = [], [], [], {}
    try:
        for s in seeds:
            player = clip_policy(policy, game, env.action_space.n, np.random.default_rng(s))
            ep = record_episode(env, player, env_seed=int(s), size=size, max_episode_steps=MAX_WARMUP + length - 1, episode_id=int(s))
            rows = len(ep["frames"])
            if rows < length:
                skipped[int(s)] = rows
                continue
            o = int(np.random.default_rng([int(s), WARMUP_STREAM]).integers(0, min(MAX_WARMUP, rows - length) + 1))
            parts.append({k: ep[k][o:o + length] for k in ("frames", "actions", "rewards", "terminated")})
            kept.append(int(s))
            lead_ins.append(ep["actions"][1:o + 1].copy())
    finally:
        env.close()
    if not parts:
        raise ValueError(f"every recorded episode ended before {length} steps (context + horizon): lengths {skipped}; lower --horizon or use other seeds")
    f, a, r, t = (np.stack([p[k] for p in parts]) for k in ("frames", "actions", "rewards", "terminated"))
    return Recorded(f, a.astype(np.int64), r.astype(np.float32), t.astype(bool), kept, lead_ins, skipped)


def replay_emulator(game: str, rec: Recorded, context: int, actions: np.ndarray, *, size: tuple[int, int], frameskip: int) -> np.ndarray:
    """The real game's frames (E, H, ...) when clip k's context is followed by actions[k] (H,) instead of its
    recorded actions: the emulator is replayed from the same seed (ALE with no sticky actions and the same
    seed and actions is deterministic; checked on the last context frame). Frames after a game over repeat."""
    env = _make_env(game, frameskip)
    out = np.zeros((len(rec.seeds), actions.shape[1], *rec.frames.shape[2:]), dtype=np.uint8)
    try:
        for k, (seed, lead) in enumerate(zip(rec.seeds, rec.lead_ins)):
            obs, _ = env.reset(seed=seed)
            for a in [*lead, *rec.actions[k, 1:context]]:
                obs, *_ = env.step(int(a))
            if not np.array_equal(preprocess_frame(game_frame(env, obs), size), rec.frames[k, context - 1]):
                raise ValueError(f"replaying seed {seed} in the emulator does not reproduce its recorded context frame: {game} is not deterministic given its seed and actions")
            for i, a in enumerate(actions[k]):
                obs, _, terminated, _, _ = env.step(int(a))
                out[k, i] = preprocess_frame(game_frame(env, obs), size)
                if terminated:
                    out[k, i + 1:] = out[k, i]
                    break
    finally:
        env.close()
    return out


def random_actions(episodes: int, horizon: int, num_actions: int, seed: int) -> np.ndarray:
    """Uniform random actions (episodes, horizon) int64: the controllability test's other action sequence."""
    return np.random.default_rng([seed, RANDOM_ACTIONS_STREAM]).integers(0, num_actions, (episodes, horizon)).astype(np.int64)
