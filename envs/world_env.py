"""The world model as a Gymnasium environment: `step(action)` generates the next frame chunk from the KV cache.

Also the pieces the batched `envs.vector_env.WorldModelVectorEnv` shares with it: loading a model folder with
its start contexts, drawing a start context, checking a given context, the frame stack; and `start_display`,
the no-display check that the player (`play.py`) shares with the human render mode.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from worldmodel.device import resolve_device
from worldmodel.registration import ASSETS
from worldmodel.runtime import WorldModel, check_context_frames, load_start_frames

DEFAULT_MODEL = ASSETS / "breakout"
EMULATOR_HZ = 60  # Atari frames per second; one agent step is `frameskip` of them
DEFAULT_FRAMESKIP = 4  # for model folders whose config.json does not say
WINDOW_SCALE = 8  # render_mode="human": window pixels per model pixel
NOISE_SEED_BOUND = 2**63  # noise seeds are drawn from [0, 2**63) by the env's np_random
HEADLESS_DRIVERS = ("offscreen", "dummy")  # SDL video drivers that show nothing
IMPORT_PID = os.getpid()  # the process that imported this module; an env built under another pid is in a fork() of it


class WorldModelEnv(gym.Env):
    """A game played inside a diffusion world model: every frame, reward and episode end comes from the model.

    ## Description

    An action-conditioned causal video diffusion transformer, trained on recorded play of a real game (the
    shipped model: Atari Breakout from the Arcade Learning Environment), generates the next chunk of frames
    from a KV cache of the frames so far and the action taken. Small heads on the model's features of the
    generated chunk predict the reward and whether the episode ended. One `step` is one agent step of the
    real game (4 emulator frames at 60 Hz, so 15 steps per second is real time); every shipped model makes
    one frame per step (`frames_per_chunk` 1).

    ## Action Space

    `Discrete(n)`, the real game's action set; `get_action_meanings()` names them. The shipped Breakout:

    | Num | Action |
    |-----|--------|
    | 0   | NOOP   |
    | 1   | FIRE   |
    | 2   | RIGHT  |
    | 3   | LEFT   |

    The action holds for the whole generated chunk.

    ## Observation Space

    `Box(0, 255, (H, W, 3), uint8)`: the newest generated RGB frame (64x64 for the shipped model). With
    `frame_stack=k > 1`: `Box(0, 255, (k, H, W, 3), uint8)`, the k newest frames, newest last. The whole
    generated chunk, (F, H, W, 3) uint8, is in `info["frames"]`.

    ## Rewards

    The reward head's point prediction, summed over the chunk's frames: the predicted reward value where a
    reward is more likely than not, else 0 (Breakout: 1, 4 or 7 per brick; most steps pay 0).
    `info["reward_prob"]` is the predicted probability that the step paid a reward.

    ## Starting State

    A real start context: `reset` draws one of the model folder's recorded contexts (`start_frames.npz`,
    frames (K, T, H, W, 3) from the real game with the actions that led to them) with `self.np_random`, keeps
    its last `context` frames and runs them through the model. The first observation is the context's last
    frame (the frame stack is padded with the oldest frame when the context is shorter than the stack).
    `reset(options={"frames": (T, H, W, 3) uint8, "actions": (T,) int})` starts from a given context instead
    (T a whole number of chunks). The model's noise is seeded from `self.np_random` at every reset, so the
    same seed and the same actions give exactly the same frames.

    ## Episode End

    Termination: the episode-end head's probability exceeds `end_threshold` (`info["end_prob"]`; Breakout:
    the last life lost). Truncation: after `max_episode_steps` steps (the TimeLimit wrapper `gymnasium.make`
    adds; 2000 for the registered ids, set it with `gymnasium.make(id, max_episode_steps=N)`).

    ## Arguments

    ```python
    import gymnasium as gym
    import worldmodel  # registers the ids

    env = gym.make("worldmodel/Breakout-v0", render_mode="rgb_array", frame_stack=4)
    ```

    - `model`: world-model folder (default: the shipped `assets/breakout`).
    - `steps`, `guidance`: denoising steps per chunk and action guidance scale (None: the model's own).
    - `context_noise`: the level in [0, 1) every chunk enters the model's context at, noised to it: the real
      start frames and each generated chunk (GameNGen's context noise, for models trained with it; None: the
      model's own, 0 unless its config sets it).
    - `gate`: the change gate's threshold for models trained with one (`train.teacher --change-gate`): a latent
      cell whose probability of changing is below it stays the previous frame's; 0 switches the gate off (None:
      the model's own, 0.5).
    - `requantize`: True makes each generated chunk enter the model's context as the uint8 frames it shows,
      encoded again like the real start frames; False commits the generated latents themselves (None: the
      model's own; the shipped model's config sets True).
    - `frame_stack`: frames per observation (1: (H, W, 3); k > 1: (k, H, W, 3), newest last).
    - `render_mode`: None, "rgb_array" (`render()` returns the newest frame) or "human" (a pygame window,
      scaled up 8x nearest-neighbour, at `metadata["render_fps"]`).
    - `device`: torch device of the model ("cpu"; "cuda", "cuda:N", "mps", or "auto": CUDA when torch sees a GPU).
      A device this torch build cannot use is refused with a ValueError that says why.
    - `dtype`: precision of the model ("float32", or "bfloat16" / "float16"; see `WorldModel.load`).
    - `context`: start frames to use from each shipped start context (None: all of them).
    - `end_threshold`: episode-end probability above which the episode terminates (0.5).

    ## Version History

    - v0: first version.
    """

    metadata = {"render_modes": ["human", "rgb_array"], "render_fps": EMULATOR_HZ // DEFAULT_FRAMESKIP}

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, steps: int | None = None, guidance: float | None = None,
                 frame_stack: int = 1, render_mode: str | None = None, device: str = "cpu", context: int | None = None,
                 end_threshold: float = 0.5, dtype: str = "float32", context_noise: float | None = None, gate: float | None = None,
                 requantize: bool | None = None) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        check_end_threshold(end_threshold)
        self.model_path = Path(model)
        self.wm, self.start_frames, self.start_actions = load_world_model(self.model_path, steps=steps, guidance=guidance, device=device, batch=1, context=context, dtype=dtype,
                                                                          context_noise=context_noise, gate=gate, requantize=requantize)
        self.frame_stack = check_frame_stack(frame_stack)
        self.render_mode = render_mode
        self.end_threshold = end_threshold
        self.metadata = {**self.metadata, "render_fps": frame_rate(self.wm.info)}
        self.action_space = gym.spaces.Discrete(self.wm.num_actions)
        self.observation_space = observation_space(self.wm.frame_shape, frame_stack)
        self._stack: np.ndarray | None = None  # (frame_stack, H, W, 3), newest last; None before reset
        self._closed = False
        self._window = self._clock = None

    def get_action_meanings(self) -> list[str]:
        return list(self.wm.info["action_meanings"])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._check_open()
        frames, actions, noise_seed = draw_start(self.np_random, self.start_frames, self.start_actions)
        if options:
            frames, actions = check_context(options, (), self.wm)
        self.wm.reset(frames, actions, seed=noise_seed)
        self._stack = start_stack(frames, self.frame_stack)
        if self.render_mode == "human":
            self.render()
        return self._obs(), self._info(frames[len(frames) - self.wm.frames_per_chunk:])

    def step(self, action: int | np.integer) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._check_open()
        if self._stack is None:
            raise RuntimeError("WorldModelEnv: call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} ({type(action).__name__}, shape {np.shape(action)}) is not in the action space "
                             f"{self.action_space}: want one integer in [0, {self.action_space.n - 1}], {dict(enumerate(self.get_action_meanings()))}")
        chunk = self.wm.step(int(action))  # (F, H, W, 3) uint8
        self._stack = push_frames(self._stack, chunk)
        info = self._info(chunk)
        if self.render_mode == "human":
            self.render()
        return self._obs(), float(self.wm.reward[0]), bool(info["end_prob"] > self.end_threshold), False, info

    def render(self) -> np.ndarray | None:
        if self._stack is None or self.render_mode is None:
            return None
        frame = self._stack[-1]
        if self.render_mode == "rgb_array":
            return frame.copy()
        self._draw(frame)
        return None

    def close(self) -> None:
        if self._window is not None:
            import pygame

            pygame.display.quit()
            self._window = self._clock = None
        if not self._closed:
            self.wm.close()
        self._closed, self._stack = True, None

    # ----- internals -----
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("WorldModelEnv is closed (close() freed the model); make a new one")

    def _obs(self) -> np.ndarray:
        return (self._stack[-1] if self.frame_stack == 1 else self._stack).copy()

    def _info(self, frames: np.ndarray) -> dict[str, Any]:
        return {"frames": frames.copy(), "reward_prob": float(self.wm.reward_prob[0]), "end_prob": float(self.wm.end_prob[0])}

    def _draw(self, frame: np.ndarray) -> None:
        import pygame  # only the human render mode needs it

        if self._window is None:
            H, W, _ = frame.shape
            try:
                start_display(pygame)
                self._window = pygame.display.set_mode((W * WINDOW_SCALE, H * WINDOW_SCALE))
            except pygame.error as e:
                pygame.display.quit()
                raise RuntimeError(f"render_mode='human' needs a display ({e}); use render_mode='rgb_array', or SDL_VIDEODRIVER=dummy") from None
            pygame.display.set_caption(f"world model: {self.wm.info['game']}")
            self._clock = pygame.time.Clock()
        surface = pygame.surfarray.make_surface(frame.transpose(1, 0, 2))  # pygame surfaces are (W, H)
        self._window.blit(pygame.transform.scale(surface, self._window.get_size()), (0, 0))  # nearest-neighbour
        pygame.event.pump()
        pygame.display.flip()
        self._clock.tick(self.metadata["render_fps"])


def start_display(pygame) -> None:
    """Start SDL's video (the env's human render mode and the player's window); pygame.error when there is no
    display. Important: with no display SDL falls back to an invisible driver and "works", showing nothing; an
    invisible driver is fine only when asked for (SDL_VIDEODRIVER=dummy)."""
    pygame.display.init()
    driver = pygame.display.get_driver()
    if driver in HEADLESS_DRIVERS and os.environ.get("SDL_VIDEODRIVER") not in HEADLESS_DRIVERS:
        raise pygame.error(f"SDL found no display and fell back to its {driver!r} driver; is DISPLAY or WAYLAND_DISPLAY set?")


# ----- shared with the vector env -----
def load_world_model(model: Path, *, steps: int | None, guidance: float | None, device: str, batch: int, context: int | None, dtype: str = "float32",
                     context_noise: float | None = None, gate: float | None = None, requantize: bool | None = None) -> tuple[WorldModel, np.ndarray, np.ndarray]:
    """The runtime for `batch` worlds and the folder's start contexts cut to their last `context` frames:
    frames (K, context, H, W, 3) uint8, actions (K, context). Refuses a device this torch cannot use (ValueError)."""
    dev = resolve_device(device)
    if os.getpid() != IMPORT_PID:
        # important: a fork() child (AsyncVectorEnv's workers under Linux's default start method, forked after the
        # parent built an env) inherits torch's OpenMP thread pool without its threads, and its first parallel op
        # hangs forever. One thread never enters the pool (PyTorch's DataLoader workers do the same).
        torch.set_num_threads(1)
    wm = WorldModel.load(model, device=dev, steps=steps, guidance=guidance, batch=batch, dtype=dtype, context_noise=context_noise, gate=gate,
                         requantize=requantize)
    frames, actions = load_start_frames(model / "start_frames.npz")
    T, Fc = frames.shape[1], wm.frames_per_chunk
    if frames.shape[2:] != wm.frame_shape:
        raise ValueError(f"{str(model)!r}: start frames are {frames.shape[2:]}, the model makes {wm.frame_shape}")
    if context is None:
        context = T
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or not Fc <= context <= T or context % Fc:
        raise ValueError(f"context must be a whole number of {Fc}-frame chunks between {Fc} and the {T} start frames the model ships, got {context!r}")
    return wm, frames[:, T - context:], actions[:, T - context:]


def draw_start(rng: np.random.Generator, frames: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """One start context (T, H, W, 3), (T,) of the K shipped ones and a noise seed, drawn from `rng` in that
    order (the single and the vector env draw alike, which keeps their worlds equal under equal seeds)."""
    k = int(rng.integers(len(frames)))
    return frames[k], actions[k], int(rng.integers(NOISE_SEED_BOUND))


def check_context(options: dict[str, Any], lead: tuple[int, ...], wm: WorldModel) -> tuple[np.ndarray, np.ndarray]:
    """reset(options={"frames", "actions"}) -> frames (*lead, T, H, W, 3) uint8 and actions (*lead, T) int64."""
    unknown = set(options) - {"frames", "actions"}
    if unknown or not {"frames", "actions"} <= set(options):
        raise ValueError(f"reset options take exactly 'frames' and 'actions' (a start context), got {sorted(options)}")
    frames = check_context_frames(options["frames"], lead, wm.frame_shape, wm.frames_per_chunk, what="options['frames']")
    actions, n = np.asarray(options["actions"]), len(lead)
    if actions.shape != frames.shape[:n + 1] or not np.issubdtype(actions.dtype, np.integer):
        raise ValueError(f"options['actions'] must be integers of shape {frames.shape[:n + 1]} (the actions that led to the frames), got {actions.dtype} {actions.shape}")
    if actions.size and (actions.min() < 0 or actions.max() >= wm.num_actions):
        raise ValueError(f"options['actions'] must lie in [0, {wm.num_actions - 1}], got values {actions.min()}..{actions.max()}")
    return frames, actions.astype(np.int64)


def check_frame_stack(frame_stack: int) -> int:
    if isinstance(frame_stack, bool) or not isinstance(frame_stack, (int, np.integer)) or frame_stack < 1:
        raise ValueError(f"frame_stack must be an integer >= 1, got {frame_stack!r}")
    return int(frame_stack)


def check_end_threshold(end_threshold: float) -> None:
    if not 0.0 <= end_threshold <= 1.0:
        raise ValueError(f"end_threshold is a probability in [0, 1], got {end_threshold}")


def frame_rate(info: dict[str, Any]) -> float:
    """Agent steps per second of real time: 60 Hz over the model's frameskip (Atari: 4 -> 15)."""
    return EMULATOR_HZ / info.get("frameskip", DEFAULT_FRAMESKIP)


def observation_space(frame_shape: tuple[int, int, int], frame_stack: int) -> gym.spaces.Box:
    shape = frame_shape if frame_stack == 1 else (frame_stack, *frame_shape)
    return gym.spaces.Box(0, 255, shape, np.uint8)


def start_stack(frames: np.ndarray, size: int) -> np.ndarray:
    """The frame stack at reset: the last `size` context frames (..., T, H, W, 3) -> (..., size, H, W, 3),
    padded at the front with the oldest frame when T < size."""
    T = frames.shape[-4]
    if T >= size:
        return frames[..., T - size:, :, :, :].copy()
    return np.concatenate([np.repeat(frames[..., :1, :, :, :], size - T, axis=-4), frames], axis=-4)


def push_frames(stack: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Append a chunk (..., F, H, W, 3) to a stack (..., S, H, W, 3), keeping the newest S frames."""
    S = stack.shape[-4]
    return np.concatenate([stack, chunk], axis=-4)[..., -S:, :, :, :]
