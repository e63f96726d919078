"""Write tests/reference/frames.npz: what the shipped models generate for fixed seeds and actions.

Run once before a refactor that must not change behaviour (`python -m tests.make_reference_frames`);
tests/test_reference_frames.py then checks that the code still generates these frames."""
from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np

import worldmodel  # noqa: F401  registers the ids

OUT = Path(__file__).resolve().parent / "reference" / "frames.npz"
IDS = {"student": "worldmodel/Breakout-v0", "teacher": "worldmodel/Breakout-teacher-v0"}
STEPS = 12
SEED = 7
ACTIONS = np.array([1, 2, 2, 2, 3, 3, 0, 1, 2, 3, 3, 0])  # FIRE, then right and left: the paddle must move


def rollout(env_id: str) -> dict[str, np.ndarray]:
    env = gym.make(env_id)
    obs, _ = env.reset(seed=SEED)
    frames, rewards, ends = [obs], [], []
    for a in ACTIONS[:STEPS]:
        obs, r, term, trunc, _ = env.step(int(a))
        frames.append(obs)
        rewards.append(r)
        ends.append(term or trunc)
    env.close()
    return {"frames": np.stack(frames), "rewards": np.asarray(rewards, np.float64), "ends": np.asarray(ends)}


def main() -> None:
    arrays = {}
    for name, env_id in IDS.items():
        for k, v in rollout(env_id).items():
            arrays[f"{name}_{k}"] = v
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, actions=ACTIONS, seed=SEED, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
