"""The real game: make an ALE (or any pixel, discrete-action Gymnasium) env and turn its screens into frames.

Frame rate (a design decision, used by every stage): one agent step is `frameskip` (default 4) emulator
frames, and the dataset holds ONE frame per agent step, the last emulator frame, the one the agent
observes. The world model treats one agent step as one chunk of one frame. Why:
  - Agents (DQN-style, frameskip 4) and a person at the keyboard act and look at 60/4 = 15 Hz; that is
    real time for this project (DESIGN.md).
  - Generating the 3 in-between emulator frames would cost 4x the compute for frames nobody acts on.
  - At 64x64 the Breakout ball moves a few pixels per agent step (measured: median 2.4 px across, 1.8 px
    up/down, at most 4.3), so motion stays smooth at this rate; nothing is lost for learning dynamics.
"""
from __future__ import annotations

import difflib
import re

import ale_py
import cv2
import gymnasium as gym
import numpy as np

gym.register_envs(ale_py)

ALE_VERSION_SUFFIX = "-v5"
ALE_NAMESPACE = "ALE/"
RAM_SIZE = 128  # bytes of Atari 2600 RAM
NUM_SUGGESTIONS = 3


def ale_game_names() -> dict[str, str]:
    """Every ALE game Gymnasium can make, as {lowercase name without separators: 'CamelCaseName'}."""
    names = {}
    for env_id in gym.registry:
        match = re.fullmatch(r"ALE/(\w+)-v5", env_id)
        if match:
            names[_normalise(match.group(1))] = match.group(1)
    return names


def _normalise(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _ale_name(name: str) -> str | None:
    """'Breakout', 'breakout', 'ALE/Breakout-v5', 'air_raid' -> the CamelCase ALE name; None if not ALE."""
    bare = name
    if bare.upper().startswith(ALE_NAMESPACE.upper()):
        bare = bare[len(ALE_NAMESPACE):]
    bare = re.sub(r"-v\d+$", "", bare)
    return ale_game_names().get(_normalise(bare))


def resolve_env_id(name: str) -> str:
    """The Gymnasium id that `make_game(name)` makes: a registered id as given ("CartPole-v1", "Pong-v4"),
    else `ALE/<Name>-v5` for an ALE game name in any case ("breakout", "ALE/breakout-v5", "air_raid")."""
    if name in gym.registry:
        return name
    ale = _ale_name(name)
    if ale is not None:
        return f"{ALE_NAMESPACE}{ale}{ALE_VERSION_SUFFIX}"
    games = sorted(ale_game_names().values())
    close = difflib.get_close_matches(name, games, n=NUM_SUGGESTIONS, cutoff=0.5)
    if not close:  # also try case-insensitively ('breakoutt' -> 'Breakout')
        lower = {g.lower(): g for g in games}
        close = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=NUM_SUGGESTIONS, cutoff=0.5)]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown game {name!r}: it is neither an ALE game nor a registered Gymnasium env id.{hint} "
        f"ALE games: {', '.join(games[:8])}, ... ({len(games)} in all)."
    )


def is_ale(env: gym.Env) -> bool:
    return hasattr(env.unwrapped, "ale")


def make_game(
    name: str,
    *,
    frameskip: int = 4,
    repeat_action_probability: float = 0.0,
    seed: int | None = None,
    render_mode: str | None = None,
) -> gym.Env:
    """Make the real game `name`: an ALE game ("Breakout", "pong", "ALE/Breakout-v5") or a Gymnasium id.

    ALE games resolve to `ALE/<Name>-v5` with the given frameskip and sticky-action probability. Sticky
    actions default to 0.0 (v5's own default is 0.25) so that the action recorded in the dataset is the
    action the emulator executed: with sticky actions the emulator sometimes repeats the previous action
    instead, and the world model would learn that the keys only work three times out of four.
    Other envs must have a Discrete action space and RGB frames, either as observations (Box (H, W, 3)
    uint8) or from `render()` with render_mode="rgb_array"; `frameskip` > 1 repeats each action that many
    times for them (summing rewards), and sticky actions are ALE-only.
    `seed` seeds the first reset (the Gymnasium convention) and the action space.
    """
    if frameskip < 1:
        raise ValueError(f"frameskip must be >= 1 emulator frames per agent step, got {frameskip}")
    if not 0.0 <= repeat_action_probability <= 1.0:
        raise ValueError(f"repeat_action_probability must be in [0, 1], got {repeat_action_probability}")
    env_id = resolve_env_id(name)
    if "ale_py" in str(gym.spec(env_id).entry_point):  # ALE/*-v5 and the legacy ALE ids (Breakout-v4, ...)
        env = gym.make(env_id, frameskip=frameskip, repeat_action_probability=repeat_action_probability,
                       render_mode=render_mode)
    else:
        if repeat_action_probability != 0.0:
            raise ValueError(f"sticky actions (repeat_action_probability) are an ALE feature; {env_id} is not ALE")
        env = gym.make(env_id, render_mode=render_mode)
        if frameskip > 1:
            env = RepeatAction(env, frameskip)
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise ValueError(f"{env_id} has action space {env.action_space}; the world model needs a Discrete one")
    if not has_rgb_observations(env) and render_mode != "rgb_array":
        env.close()
        raise ValueError(
            f"{env_id} observations are {env.observation_space}, not RGB frames (Box (H, W, 3) uint8); "
            f"pass render_mode='rgb_array' to take frames from env.render()"
        )
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


class RepeatAction(gym.Wrapper):
    """Frameskip for non-ALE envs: repeat each action `repeat` times, sum the rewards, stop at an episode end."""

    def __init__(self, env: gym.Env, repeat: int) -> None:
        super().__init__(env)
        self.repeat = repeat

    def step(self, action):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


def has_rgb_observations(env: gym.Env) -> bool:
    space = env.observation_space
    return (isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.shape[2] == 3
            and space.dtype == np.uint8)


def game_frame(env: gym.Env, obs) -> np.ndarray:
    """The RGB screen (H, W, 3) uint8 for observation `obs`: the observation itself, or env.render()."""
    return obs if has_rgb_observations(env) else env.render()


def preprocess_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB screen (h, w, 3) uint8 to `size` = (H, W) with area averaging -> (H, W, 3) uint8.

    INTER_AREA averages every source pixel into the target, so small objects fade rather than vanish.
    Measured on Breakout at 64x64: the 2x4-pixel ball (RGB 200, 72, 72 at 160x210) keeps a brightest
    pixel of red 49-160 of 255 (median 106; green/blue 18-58) over 2,127 in-play frames, on a black (0)
    background: faint where it straddles four target pixels, but always distinguishable.
    """
    if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8):
        got = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"preprocess_frame expects an RGB frame of shape (h, w, 3) and dtype uint8, got {got}")
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive (H, W), got {size}")
    if frame.shape[:2] == (height, width):
        return frame.copy()
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)  # cv2 takes (W, H)


class FrameObservation(gym.ObservationWrapper):
    """Observations as the training data holds them: the RGB screen (`game_frame`) resized to `size` = (H, W)
    by `preprocess_frame`, Box(0, 255, (H, W, 3), uint8). For comparing and recording the real game beside
    a world model."""

    def __init__(self, env: gym.Env, size: tuple[int, int]) -> None:
        super().__init__(env)
        self.size = (int(size[0]), int(size[1]))
        self.observation_space = gym.spaces.Box(0, 255, (*self.size, 3), np.uint8)

    def observation(self, observation) -> np.ndarray:
        return preprocess_frame(game_frame(self.env, observation), self.size)


def action_meanings(env: gym.Env) -> list[str]:
    """Names of the actions: ALE's get_action_meanings() (e.g. NOOP, FIRE, RIGHT, LEFT), else A0, A1, ..."""
    if is_ale(env):
        return list(env.unwrapped.get_action_meanings())
    return [f"A{i}" for i in range(env.action_space.n)]


def game_ram(env: gym.Env) -> np.ndarray | None:
    """The Atari's 128 bytes of RAM (128,) uint8 for ALE games, None for others."""
    if not is_ale(env):
        return None
    return np.asarray(env.unwrapped.ale.getRAM(), dtype=np.uint8).copy()
