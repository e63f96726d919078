"""N worlds of one world model stepped in one batched forward pass (`WorldModel(batch=N).step_batch`).

Autoreset: Gymnasium's next-step mode. A world that terminated or was truncated at step t is reset at step
t + 1: its action there is ignored, its reward is 0, terminated/truncated are False and its observation is
its new start frame. The other worlds step as usual; a reset restarts only that world's context
(`WorldModel.reset_worlds`).

Seeding: world i keeps its own `np.random.Generator`; `reset(seed=s)` seeds world i with s + i (a list
gives one seed per world), and each (auto)reset draws that world's start context and noise seed from it
exactly as `WorldModelEnv.reset` does. So world i follows the same frames as a `WorldModelEnv` reset with
seed s + i, given the same actions, and reset again with no seed after each episode end (up to float
rounding of batched against single forwards: a frame value may differ by a grey level, see the README).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.world_env import (DEFAULT_MODEL, check_context, check_end_threshold, check_frame_stack, draw_start, frame_rate,
                            load_world_model, observation_space, push_frames, start_stack)


class WorldModelVectorEnv(VectorEnv):
    """`num_envs` worlds of `WorldModelEnv` in one batched model; arguments as `WorldModelEnv`, plus
    `max_episode_steps` (per world; None: no time limit) since a vector env has no TimeLimit wrapper."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, model: str | os.PathLike = DEFAULT_MODEL, steps: int | None = None,
                 guidance: float | None = None, frame_stack: int = 1, render_mode: str | None = None, device: str = "cpu",
                 context: int | None = None, max_episode_steps: int | None = None, end_threshold: float = 0.5, dtype: str = "float32",
                 context_noise: float | None = None, gate: float | None = None, requantize: bool | None = None) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"the vector env renders only to 'rgb_array' (or None), got render_mode={render_mode!r}")
        if max_episode_steps is not None and (isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer)) or max_episode_steps < 1):
            raise ValueError(f"max_episode_steps must be an integer >= 1 or None, got {max_episode_steps!r}")
        check_end_threshold(end_threshold)
        self.num_envs = int(num_envs)
        self.model_path = Path(model)
        self.wm, self.start_frames, self.start_actions = load_world_model(self.model_path, steps=steps, guidance=guidance, device=device, batch=self.num_envs, context=context, dtype=dtype,
                                                                          context_noise=context_noise, gate=gate, requantize=requantize)
        self.frame_stack = check_frame_stack(frame_stack)
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        self.end_threshold = end_threshold
        self.metadata = {**self.metadata, "render_fps": frame_rate(self.wm.info)}
        self.single_action_space = gym.spaces.Discrete(self.wm.num_actions)
        self.action_space = gym.spaces.MultiDiscrete([self.wm.num_actions] * self.num_envs)
        self.single_observation_space = observation_space(self.wm.frame_shape, self.frame_stack)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._rngs: list[np.random.Generator] | None = None  # one per world
        self._stack: np.ndarray | None = None  # (N, frame_stack, H, W, 3), newest last; None before reset
        self._elapsed = np.zeros(self.num_envs, dtype=np.int64)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        self._closed = False

    def get_action_meanings(self) -> list[str]:
        return list(self.wm.info["action_meanings"])

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every world. `seed`: int s seeds world i with s + i; a list gives one per world (None entries
        draw fresh entropy); None continues each world's generator. `options={"frames": (N, T, H, W, 3) uint8,
        "actions": (N, T)}` starts every world from a given context (the noise is still seeded per world)."""
        if self._closed:
            raise RuntimeError("WorldModelVectorEnv is closed (close() freed the model); make a new one")
        self._seed(seed)
        draws = [draw_start(rng, self.start_frames, self.start_actions) for rng in self._rngs]
        if options:
            frames, actions = check_context(options, (self.num_envs,), self.wm)
        else:
            frames, actions = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])
        self.wm.reset(frames, actions, seed=[d[2] for d in draws])
        self._stack = start_stack(frames, self.frame_stack)
        self._elapsed[:] = 0
        self._autoreset[:] = False
        Fc = self.wm.frames_per_chunk
        return self._obs(), self._info(frames[:, frames.shape[1] - Fc:])

    def step(self, actions: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._closed:
            raise RuntimeError("WorldModelVectorEnv is closed (close() freed the model); make a new one")
        if self._stack is None:
            raise RuntimeError("WorldModelVectorEnv: call reset() before step()")
        actions = np.asarray(actions)
        if not self.action_space.contains(actions):
            raise ValueError(f"actions must be integers of shape ({self.num_envs},) in [0, {self.wm.num_actions - 1}] "
                             f"(action space {self.action_space}), got {actions.dtype} {actions.shape}: {actions.tolist()}")
        restart = np.flatnonzero(self._autoreset)
        actions = np.where(self._autoreset, 0, actions)  # the restarting worlds' actions are ignored
        chunks = self.wm.step_batch(actions)  # (N, F, H, W, 3); restarting worlds step too, then are reset below
        rewards = self.wm.reward.astype(np.float64)
        terminated = self.wm.end_prob > self.end_threshold
        self._elapsed += 1
        truncated = self._elapsed >= self.max_episode_steps if self.max_episode_steps is not None else np.zeros(self.num_envs, dtype=bool)
        self._stack = push_frames(self._stack, chunks)
        if restart.size:
            draws = [draw_start(self._rngs[i], self.start_frames, self.start_actions) for i in restart]
            frames, acts = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])
            self.wm.reset_worlds(restart, frames, acts, seeds=[d[2] for d in draws])
            self._stack[restart] = start_stack(frames, self.frame_stack)
            chunks[restart] = frames[:, frames.shape[1] - self.wm.frames_per_chunk:]
            rewards[restart] = 0.0
            terminated[restart] = truncated[restart] = False
            self._elapsed[restart] = 0
        self._autoreset = terminated | truncated
        return self._obs(), rewards, terminated, truncated, self._info(chunks)

    def render(self) -> tuple[np.ndarray, ...] | None:
        """render_mode "rgb_array": the newest frame of every world, a tuple of N (H, W, 3) uint8."""
        if self.render_mode is None or self._stack is None:
            return None
        return tuple(self._stack[:, -1].copy())

    def close_extras(self, **kwargs: Any) -> None:
        if not self._closed:
            self.wm.close()
        self._closed, self._stack = True, None

    # ----- internals -----
    def _seed(self, seed: int | Sequence[int | None] | None) -> None:
        if seed is None:
            if self._rngs is None:
                self._rngs = [seeding.np_random()[0] for _ in range(self.num_envs)]
            return
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        elif isinstance(seed, Sequence) and len(seed) == self.num_envs:
            seeds = list(seed)
        else:
            raise ValueError(f"seed must be an int, None, or a list of {self.num_envs} seeds (one per world), got {seed!r}")
        self._rngs = [seeding.np_random(s)[0] for s in seeds]

    def _obs(self) -> np.ndarray:
        return (self._stack[:, -1] if self.frame_stack == 1 else self._stack).copy()

    def _info(self, frames: np.ndarray) -> dict[str, Any]:
        """Batched infos with Gymnasium's `_key` masks (every world has every key)."""
        info = {"frames": frames.copy(), "reward_prob": self.wm.reward_prob.astype(np.float64), "end_prob": self.wm.end_prob.astype(np.float64)}
        return {**info, **{f"_{k}": np.ones(self.num_envs, dtype=bool) for k in info}}
