"""The runtime: model, tokenizer and KV cache in one object. `reset(context)`, then `step(action) -> frames`.

A world-model folder (what training exports and `assets/` ships):
    config.json         game, action meanings, frame size, sampling defaults
    dit/                the causal DiT (a `worldmodel.checkpoint` folder)
    tokenizer/          the frame tokenizer
    start_frames.npz    real start contexts: frames (K, T, H, W, 3) uint8, actions (K, T) int64
    README.md           model card: data, steps, hardware, wall time, the command that made it
`train.export.export_world_model` writes one; `WorldModel.load` and `load_start_frames` read it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .checkpoint import CheckpointError, read_config
from .config import SamplingConfig, from_dict
from .device import resolve_dtype
from .dit import CausalDiT, Heads, load_dit
from .flow import sampling_levels
from .sampler import denoise, randn_worlds, recache
from .tokenizer import FrameTokenizer

MODEL_FORMAT_VERSION = 1


class NonFiniteError(FloatingPointError):
    """A generated chunk or head turned NaN or infinite. Raised instead of returning black frames or NaN rewards."""


def load_start_frames(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Real start contexts shipped with a model: frames (K, T, H, W, 3) uint8, actions (K, T) int64."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no start frames at {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            frames, actions = z["frames"], z["actions"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"start frames {str(path)!r} are corrupt: {e}") from None
    if frames.ndim != 5 or frames.dtype != np.uint8 or actions.shape != frames.shape[:2]:
        raise CheckpointError(f"start frames {str(path)!r} must hold frames (K, T, H, W, 3) uint8 and actions (K, T); got {frames.dtype} {frames.shape} and {actions.shape}")
    return frames, actions


def check_context_frames(frames: np.ndarray, lead: tuple[int, ...], frame_shape: tuple[int, int, int], frames_per_chunk: int, what: str = "context frames") -> np.ndarray:
    """Context frames (*lead, T, H, W, 3) uint8 with T a whole number (>= 1) of chunks, or a ValueError naming
    the rule (`what`: how the message calls them)."""
    frames, n, Fc = np.asarray(frames), len(lead), frames_per_chunk
    want = f"uint8 of shape ({', '.join(map(str, (*lead, 'T', *frame_shape)))}) with T a whole number (>= 1) of {Fc}-frame chunks"
    if frames.dtype != np.uint8 or frames.ndim != n + 4 or frames.shape[:n] != tuple(lead) or frames.shape[n + 1:] != tuple(frame_shape):
        raise ValueError(f"{what} must be {want}, got {frames.dtype} {frames.shape}")
    T = frames.shape[n]
    if T < Fc or T % Fc:
        raise ValueError(f"{what} must be {want}, got T = {T}")
    return frames


class WorldModel:
    """Holds the DiT, the tokenizer and a KV cache for `batch` worlds."""

    def __init__(self, dit: CausalDiT, tokenizer: FrameTokenizer, info: dict[str, Any], *, steps: int | None = None, guidance: float | None = None, batch: int = 1,
                 context_noise: float | None = None, gate: float | None = None, requantize: bool | None = None) -> None:
        if tuple(tokenizer.cfg.latent_size) != tuple(dit.cfg.latent_size) or tokenizer.cfg.channels != dit.cfg.in_channels:
            raise ValueError(f"tokenizer latents {tokenizer.cfg.channels}x{tokenizer.cfg.latent_size} do not match the DiT's {dit.cfg.in_channels}x{dit.cfg.latent_size}")
        self.dit, self.tokenizer, self.info = dit, tokenizer, info
        try:
            sampling = from_dict(SamplingConfig, info["sampling"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the world model's sampling settings (config.json 'sampling') are missing or invalid: {e!r}") from None
        overrides = {k: v for k, v in (("steps", steps), ("guidance", guidance), ("context_noise", context_noise), ("gate", gate), ("requantize", requantize)) if v is not None}
        self.sampling = dataclasses.replace(sampling, **overrides)  # validates the overrides too
        dit.gate_threshold = self.sampling.gate  # the change gate, for networks that have one
        self.steps, self.guidance = self.sampling.steps, self.sampling.guidance
        self.levels = sampling_levels(self.steps, self.sampling.shift)
        self.batch = batch
        self.cache = dit.new_cache(batch)
        self.device = next(dit.parameters()).device
        self.dtype = next(dit.parameters()).dtype
        # One noise stream per world, so a world's samples do not depend on the batch it runs in: world b of a
        # batch seeded s equals a batch-1 runtime seeded s + b (the vector env relies on this).
        self.generators = [torch.Generator(device=self.device) for _ in range(batch)]
        self.heads: Heads | None = None
        # optional hook: called with "denoise", "recache", "decode" around each phase of a step, it returns the
        # context manager that times it (bench.timer.PhaseTimer); None on the hot path
        self.timer: Callable[[str], contextlib.AbstractContextManager] | None = None
        self._started = False

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", steps: int | None = None, guidance: float | None = None, batch: int = 1, dtype: str | torch.dtype | None = None,
             context_noise: float | None = None, gate: float | None = None, requantize: bool | None = None) -> "WorldModel":
        """Load a world-model folder for inference. `dtype` ("float32", the default, or "bfloat16" / "float16")
        is the precision of the DiT, its KV cache and the tokenizer's VAE; noise levels, rotary phases, solver
        updates and heads stay float32. `steps`, `guidance`, `context_noise`, `gate`, `requantize` override the model's
        sampling settings (SamplingConfig)."""
        dt = resolve_dtype(dtype)
        path = Path(path)
        info = read_config(path)
        if info.get("kind") != "world_model":
            raise CheckpointError(f"{str(path)!r} is not a world-model folder (config.json kind is {info.get('kind')!r}, want 'world_model')")
        if info.get("format_version") != MODEL_FORMAT_VERSION:
            raise CheckpointError(f"{str(path)!r} has format_version {info.get('format_version')!r}; this code reads {MODEL_FORMAT_VERSION}")
        dit = load_dit(path / "dit", device).to(dt)
        tok = FrameTokenizer.load(path / "tokenizer", device=device).eval().prepare_inference(dt)
        meanings = info.get("action_meanings")
        if not isinstance(meanings, list) or len(meanings) != dit.cfg.num_actions:
            raise CheckpointError(f"{str(path)!r}: config.json names {meanings!r} as actions but the DiT has {dit.cfg.num_actions}")
        return cls(dit, tok, info, steps=steps, guidance=guidance, batch=batch, context_noise=context_noise, gate=gate, requantize=requantize)

    # ----- properties -----
    @property
    def num_actions(self) -> int:
        return self.dit.cfg.num_actions

    @property
    def frames_per_chunk(self) -> int:
        return self.dit.cfg.frames_per_chunk

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (*self.tokenizer.cfg.frame_size, 3)

    @property
    def gate(self) -> float | None:
        """The change gate's threshold in use (0: off), or None for a network without a gate (for reports)."""
        return self.sampling.gate if self.dit.cfg.change_gate else None

    def _check_actions(self, actions: np.ndarray | torch.Tensor | Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        a = torch.as_tensor(np.asarray(actions))
        if a.dtype.is_floating_point or a.dtype == torch.bool:
            raise TypeError(f"actions must be integers, got dtype {a.dtype}")
        if tuple(a.shape) != shape:
            raise ValueError(f"expected actions of shape {shape}, got {tuple(a.shape)}")
        if a.numel() and (int(a.min()) < 0 or int(a.max()) >= self.num_actions):
            raise ValueError(f"actions must lie in [0, {self.num_actions - 1}], got {a.flatten().tolist()[:8]}")
        return a.long().to(self.device)

    # ----- play -----
    def _check_frames(self, frames: np.ndarray, actions) -> tuple[np.ndarray, torch.Tensor]:
        frames = np.asarray(frames)
        if frames.ndim == 4 and self.batch == 1:
            frames = frames[None]
            actions = np.asarray(actions)[None]
        frames = check_context_frames(frames, (self.batch,), self.frame_shape, self.frames_per_chunk)
        return frames, self._check_actions(actions, frames.shape[:2])

    @torch.no_grad()
    def reset(self, frames: np.ndarray, actions: np.ndarray | Sequence[int], seed: int | Sequence[int] | None = None) -> None:
        """Start every world from real context: frames (B, T, H, W, 3) uint8 (or (T, H, W, 3) when batch is 1)
        and the actions that led to them, (B, T) (or (T,)). T must be a whole number of chunks.
        `seed`: an int seeds world b's noise with seed + b; a sequence gives one seed per world."""
        frames, a = self._check_frames(frames, actions)  # validate before touching the cache
        if seed is not None:
            self._seed(range(self.batch), [seed + b for b in range(self.batch)] if isinstance(seed, (int, np.integer)) else seed)
        self.cache.reset()
        self._observe(frames, a)
        self._started = True

    @torch.no_grad()
    def observe(self, frames: np.ndarray, actions: np.ndarray | Sequence[int]) -> None:
        """Append real frames (and the actions that led to them) to every world's context."""
        if not self._started:
            raise RuntimeError("call reset(context frames, actions) before observe()")
        self._observe(*self._check_frames(frames, actions))

    @torch.no_grad()
    def reset_worlds(self, worlds: Sequence[int] | np.ndarray, frames: np.ndarray, actions: np.ndarray, seeds: Sequence[int] | None = None) -> None:
        """Restart only the given worlds from real context (frames (k, T, H, W, 3) uint8, actions (k, T)), and
        reseed their noise with `seeds` (k,) if given; the other worlds keep their context and noise streams.
        Used by the vector env's autoreset."""
        if not self._started:
            raise RuntimeError("call reset(context frames, actions) before reset_worlds()")
        idx = np.asarray(worlds, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self.batch or len(set(idx.tolist())) != idx.size:
            raise ValueError(f"worlds must be distinct indices in [0, {self.batch - 1}], got {idx.tolist()}")
        frames = check_context_frames(frames, (idx.size,), self.frame_shape, self.frames_per_chunk)
        T = frames.shape[1]
        a = self._check_actions(actions, frames.shape[:2])
        if seeds is not None:
            self._seed(idx.tolist(), seeds)
        full = np.zeros((self.batch, *frames.shape[1:]), dtype=np.uint8)  # rows of the other worlds are run but not committed
        full[idx] = frames
        full_a = torch.zeros(self.batch, T, dtype=torch.long, device=self.device)
        full_a[torch.from_numpy(idx).to(self.device)] = a
        mask = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        mask[torch.from_numpy(idx).to(self.device)] = True
        self.cache.reset(torch.from_numpy(idx))
        old = self.heads
        self._observe(full, full_a, mask)
        if old is not None:  # keep the other worlds' heads of their last step
            m = mask[:, None]
            self.heads = Heads(*(torch.where(m, new, prev) for new, prev in ((self.heads.reward_logit, old.reward_logit), (self.heads.reward_value, old.reward_value), (self.heads.end_logit, old.end_logit))))

    def _seed(self, worlds: Sequence[int], seeds: Sequence[int]) -> None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(worlds):
            raise ValueError(f"need one seed per world ({len(worlds)}), got {len(seeds)}")
        for b, s in zip(worlds, seeds):
            self.generators[b].manual_seed(s)

    def _observe(self, frames: np.ndarray, a: torch.Tensor, worlds: torch.Tensor | None = None) -> None:
        B, T, H, W, _ = frames.shape
        Fc = self.frames_per_chunk
        lat = self.tokenizer.encode(torch.from_numpy(frames.reshape(B * T, H, W, 3)).to(self.device))
        lat = lat.reshape(B, T, *lat.shape[1:]).to(self.dtype)  # (B, T, C, h, w)
        for i in range(T // Fc):
            _, self.heads = recache(self.dit, self.cache, lat[:, i * Fc:(i + 1) * Fc], a[:, i * Fc:(i + 1) * Fc], worlds, self.sampling.context_noise, self.generators)

    def _denoise(self, actions) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._started:
            raise RuntimeError("call reset(context frames, actions) before step()")
        Fc = self.frames_per_chunk
        a = self._check_actions(actions, (self.batch,))[:, None].expand(self.batch, Fc)  # the action holds for the whole chunk
        cfg = self.dit.cfg
        x = randn_worlds((self.batch, Fc, cfg.in_channels, *cfg.latent_size), self.generators, self.device).to(self.dtype)  # (B, F, C, h, w); float32 draws, so every dtype sees the same noise
        return denoise(self.dit, self.cache, a, x, self.levels, self.guidance, self.sampling.solver, self.generators), a

    def _check_finite(self, **parts: torch.Tensor) -> None:
        """NonFiniteError naming the part and the worlds where a tensor (B, ...) of `parts` holds NaN or inf."""
        ok = torch.stack([torch.isfinite(x.flatten(1)).all(1) for x in parts.values()])  # (parts, B)
        if bool(ok.all()):  # the step's one sync with the host before the decode
            return
        what, flags = next((w, f) for w, f in zip(parts, ok) if not bool(f.all()))
        worlds = (~flags).nonzero().flatten().tolist()
        raise NonFiniteError(f"the {what.replace('_', ' ')} of world(s) {worlds[:8]} turned NaN or infinite (denoising steps {self.steps}, guidance {self.guidance}, "
                             f"dtype {self.dtype}); the weights or the sampling settings are broken. Reset the worlds before stepping again.")

    def _decode(self, x0: torch.Tensor) -> np.ndarray:
        frames = self.tokenizer.decode(x0.flatten(0, 1).float())  # (B*F, H, W, 3) uint8
        return frames.reshape(self.batch, self.frames_per_chunk, *self.frame_shape).cpu().numpy()

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    @torch.no_grad()
    def step_batch(self, actions: np.ndarray | Sequence[int]) -> np.ndarray:
        """One action per world -> the next chunk of every world, uint8 (B, F, H, W, 3)."""
        with self._phase("denoise"):
            x0, a = self._denoise(actions)
        if not self.sampling.requantize:
            with self._phase("recache"):
                _, self.heads = recache(self.dit, self.cache, x0, a, level=self.sampling.context_noise, generator=self.generators)
                h = self.heads
                self._check_finite(generated_chunk=x0, reward_and_end_heads=torch.cat([h.reward_logit, h.reward_value, h.end_logit], 1))
            with self._phase("decode"):
                return self._decode(x0)
        # the context is the frames as shown: decode, then encode them again as real frames are (observe())
        self._check_finite(generated_chunk=x0)  # before the decode, which would turn NaN into some colour
        with self._phase("decode"):
            shown = self.tokenizer.decode(x0.flatten(0, 1).float())  # (B*F, H, W, 3) uint8
        with self._phase("recache"):
            lat = self.tokenizer.encode(shown).reshape(x0.shape).to(self.dtype)
            _, self.heads = recache(self.dit, self.cache, lat, a, level=self.sampling.context_noise, generator=self.generators)
            h = self.heads
            self._check_finite(reward_and_end_heads=torch.cat([h.reward_logit, h.reward_value, h.end_logit], 1))
        return shown.reshape(self.batch, self.frames_per_chunk, *self.frame_shape).cpu().numpy()

    @torch.no_grad()
    def predict_batch(self, actions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Like step_batch, but the generated chunk is not added to the context (teacher-forced evaluation:
        follow with observe() of the real frames)."""
        with self._phase("denoise"):
            x0, _ = self._denoise(actions)
            self._check_finite(generated_chunk=x0)
        with self._phase("decode"):
            return self._decode(x0)

    def step(self, action: int) -> np.ndarray:
        """Single world: action -> the next chunk's frames, uint8 (F, H, W, 3)."""
        if self.batch != 1:
            raise ValueError(f"step() drives one world; this runtime holds {self.batch}: use step_batch()")
        return self.step_batch([action])[0]

    @property
    def reward(self) -> np.ndarray:
        """Predicted reward of the last step, summed over the chunk's frames, (B,)."""
        return self._heads().reward.sum(1).cpu().numpy()

    @property
    def reward_prob(self) -> np.ndarray:
        """Predicted probability that the last step paid a nonzero reward (in any frame of the chunk), (B,)."""
        return torch.sigmoid(self._heads().reward_logit).max(1).values.cpu().numpy()

    @property
    def end_prob(self) -> np.ndarray:
        """Predicted probability that the episode ended within the last chunk, (B,)."""
        return self._heads().end_prob.max(1).values.cpu().numpy()

    def _heads(self) -> Heads:
        if self.heads is None:
            raise RuntimeError("call reset() first")
        return self.heads

    def close(self) -> None:
        """Drop the model and cache (frees their memory)."""
        self.dit = self.tokenizer = self.cache = None  # type: ignore[assignment]
        self._started = False
