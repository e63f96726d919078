"""The player's adapter: one `WorldModelEnv` made playable by a person or a script.

It keeps what the window shows and the headless run reports: the newest frame, the step and the score (the
sum of the model's predicted rewards) of the episode, the per-step latency and the step rate actually
achieved. It records (R in the window) in `envs.recording`'s format, and takes its actions from a policy
(a replayed action list, a random player) while that has one, else from the keys. A predicted episode end
(the env's `terminated`) starts a new episode from a real start frame, as the real game would.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import time
from pathlib import Path
from typing import Any

import numpy as np

from envs.policies import Policy
from envs.recording import START_ACTION, RolloutRecorder
from envs.world_env import WorldModelEnv

LATENCY_HISTORY = 10_000  # steps kept for the latency percentiles (a headless run's whole length, usually)
RATE_WINDOW_S = 2.0  # the achieved step rate is measured over the steps of the last this many seconds...
RATE_WINDOW_STEPS = 3  # ...or of the last this many steps' latencies, when steps are slower than that


@dataclasses.dataclass
class Step:
    """What one step did: the action taken, its reward, and whether it ended the episode."""

    action: int
    reward: float
    ended: bool


class PlayAdapter:
    """Drives one world-model env for the player: reset/step, score, recording, replay, timing."""

    def __init__(self, env: WorldModelEnv, *, fps: float, record_dir: str | Path = "recordings", policy: Policy | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        if fps <= 0:
            raise ValueError(f"fps (agent steps per second) must be positive, got {fps}")
        self.env, self.fps, self.policy = env, float(fps), policy
        self.record_dir = Path(record_dir)
        self.meta = dict(meta or {})  # added to every recording's metadata
        self.meanings = env.get_action_meanings()
        self.game = str(env.wm.info["game"])
        self.frame: np.ndarray | None = None  # (H, W, 3) uint8, the newest frame; None before reset
        self.steps = 0  # steps of this episode
        self.total_steps = 0  # steps since the adapter was made
        self.episodes = 0  # episodes started
        self.score = 0.0  # sum of predicted rewards this episode
        self.policy_done = policy is None  # the policy ran out (or there is none): the keys act
        self.last_step: Step | None = None
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_HISTORY)  # seconds per env.step
        self._times: collections.deque[float] = collections.deque(maxlen=LATENCY_HISTORY)  # perf_counter() at each step's end
        self._recorder: RolloutRecorder | None = None
        self.recorded_steps = 0  # steps in the recording in progress

    # ----- play -----
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start over: a new episode from a real start frame (`seed`: the env's seed; None continues its random
        stream), and the policy from its start (a replay from its first action)."""
        if self.policy is not None:
            self.policy.reset()
        self.policy_done = self.policy is None
        return self._new_episode(seed)

    def _new_episode(self, seed: int | None = None) -> np.ndarray:
        _, info = self.env.reset(seed=seed)
        self.frame = info["frames"][-1]
        self.steps, self.score = 0, 0.0
        self.episodes += 1
        if self._recorder is not None:
            self._recorder.add(self.frame, START_ACTION)
        return self.frame

    def next_action(self, keys_action: int | None = None) -> int | None:
        """The policy's action while it has one (a replay runs out), else `keys_action` (the held keys')."""
        if not self.policy_done:
            action = self.policy(self.frame, None)  # no RAM: a world model has none
            if action is not None:
                return int(action)
            self.policy_done = True
        return keys_action

    def step(self, action: int) -> Step:
        """One env step. An episode the model ends (or a time limit) goes on from a new real start frame; the
        policy goes on too (a replay is one pass through its actions, however many episodes that spans)."""
        if self.frame is None:
            raise RuntimeError("PlayAdapter: call reset() before step()")
        t0 = time.perf_counter()
        _, reward, terminated, truncated, info = self.env.step(action)
        t1 = time.perf_counter()
        self.latencies.append(t1 - t0)
        self._times.append(t1)
        self.frame = info["frames"][-1]
        self.steps, self.total_steps, self.score = self.steps + 1, self.total_steps + 1, self.score + reward
        if self._recorder is not None:
            self._recorder.add(info["frames"], int(action), reward, terminated, truncated)
            self.recorded_steps += 1
        if terminated or truncated:
            self._new_episode()
        self.last_step = Step(int(action), float(reward), bool(terminated or truncated))
        return self.last_step

    # ----- recording -----
    @property
    def recording(self) -> bool:
        return self._recorder is not None

    def start_recording(self) -> Path:
        """Record from the current frame on; returns the path stem the files will have."""
        if self._recorder is not None:
            return self._recorder.path
        if self.frame is None:
            raise RuntimeError("PlayAdapter: call reset() before recording")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path, k = self.record_dir / f"{self.game.lower()}_{stamp}", 1
        while path.with_suffix(".npz").exists():
            path, k = self.record_dir / f"{self.game.lower()}_{stamp}_{k}", k + 1
        self._recorder = RolloutRecorder(path, fps=self.fps, meta={"game": self.game, **self.meta})
        self._recorder.add(self.frame, START_ACTION)
        self.recorded_steps = 0
        return path

    def stop_recording(self) -> Path | None:
        """Write the recording (PATH.mp4, .npz, .json); returns PATH, or None when none was running."""
        recorder, self._recorder = self._recorder, None
        return None if recorder is None else recorder.close()

    # ----- timing -----
    def rate(self) -> float | None:
        """Steps per second achieved lately: over the last RATE_WINDOW_S seconds, or the last RATE_WINDOW_STEPS
        steps' latencies when longer (None: too few recent steps to tell, e.g. while paused)."""
        if not self._times:
            return None
        since = time.perf_counter() - max(RATE_WINDOW_S, RATE_WINDOW_STEPS * self.latencies[-1])
        n, first = 0, self._times[-1]
        for t in reversed(self._times):  # newest first; stop at the first step outside the window
            if t < since:
                break
            n, first = n + 1, t
        if n < 2 or self._times[-1] <= first:
            return None
        return (n - 1) / (self._times[-1] - first)

    def latency_ms(self, q: float | None = None) -> float:
        """The last step's latency in ms, or the q-quantile (0.5: the median) of the recent ones."""
        if not self.latencies:
            return 0.0
        return 1000 * (self.latencies[-1] if q is None else float(np.quantile(self.latencies, q)))

    def close(self) -> Path | None:
        """Write a recording in progress, free the model; returns the recording's path, if one was written."""
        path = self.stop_recording()
        self.env.close()
        return path
