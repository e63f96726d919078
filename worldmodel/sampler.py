"""Autoregressive generation with the KV cache: denoise a chunk in N steps, then re-cache it at s=0 (or noised
to a context-noise level, see `recache`).

Two step rules along a decreasing list of levels (see `SamplingConfig.solver`):
- "euler": x <- x + (s_next - s) v, the probability-flow ODE (the teacher);
- "consistency": x0 = x - s v, then x <- (1 - s_next) x0 + s_next eps_fresh (consistency / DMD students).

One generation path for play and training: the runtime calls these functions under torch.no_grad, and the
Self Forcing rollout (`train.dmd.rollout`) calls the same ones with gradients on and an exit step. So the
functions follow the caller's grad mode and never switch gradients off themselves, except for the steps
before an exit step.
"""
from __future__ import annotations

import contextlib
from typing import Sequence, Union

import torch

from .cache import KVCache
from .dit import CausalDiT, Heads
from .flow import add_noise, euler_step, guided, x0_from_velocity


def guided_velocity(model: CausalDiT, x: torch.Tensor, s: float, actions: torch.Tensor, cache: KVCache, guidance: float, gate: bool = False) -> torch.Tensor:
    """Velocity for chunk x (B, F, C, h, w) at level s, with action guidance when guidance != 1; `gate`: the
    last step, where a network with a change gate keeps the previous frame's unchanged cells."""
    level = torch.full(actions.shape, s, device=x.device, dtype=torch.float32)  # (B, F) per frame; levels stay float32
    v, _ = model.forward_cached(x, level, actions, cache, gate=gate)
    if guidance != 1.0:
        v_null, _ = model.forward_cached(x, level, torch.full_like(actions, model.null_action), cache, gate=gate)
        v = guided(v.float(), v_null.float(), guidance).to(x.dtype)
    return v


Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn_worlds(shape: tuple[int, ...], generator: Generators, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` (B, ...); a sequence of B generators gives world b its own stream
    (so a world's samples do not depend on the batch it runs in)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"need one generator per world ({shape[0]}), got {len(generator)}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def solver_step(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float, solver: str, generator: Generators = None) -> torch.Tensor:
    """One step from level s to s_next, computed in float32 and returned in x's dtype."""
    xf, vf = x.float(), v.float()
    if solver == "euler":
        out = euler_step(xf, vf, s, s_next)
    elif solver == "consistency":
        x0 = x0_from_velocity(xf, vf, torch.full(x.shape[:2], s, device=x.device))
        if s_next == 0:
            out = x0
        else:
            eps = randn_worlds(tuple(x.shape), generator, x.device)
            out = add_noise(x0, eps, torch.full(x.shape[:2], s_next, device=x.device))
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return out.to(x.dtype)


def denoise(model: CausalDiT, cache: KVCache, actions: torch.Tensor, noise: torch.Tensor, levels: list[float], guidance: float = 1.0, solver: str = "euler",
            generator: Generators = None, exit_step: int | None = None) -> torch.Tensor:
    """Denoise one chunk from `noise` (B, F, C, h, w) along `levels` (1 -> 0); the cache is read, not extended.

    `exit_step` k (Self Forcing): steps 0..k-1 run as usual but without gradient, then step k goes straight
    to level 0, so the chunk returned is step k's clean prediction x - s_k v and only that step carries a
    gradient (when the caller's grad mode has one). k = len(levels) - 2 is the whole list, as played.
    """
    steps = list(zip(levels[:-1], levels[1:]))
    if exit_step is not None:
        if not 0 <= exit_step < len(steps):
            raise ValueError(f"exit_step must index one of the {len(steps)} steps of levels {levels}, got {exit_step}")
        if levels[-1] != 0:
            raise ValueError(f"an exit step returns a clean prediction: levels must end at 0, got {levels}")
        steps = steps[:exit_step] + [(levels[exit_step], 0.0)]
    x = noise
    for k, (s, s_next) in enumerate(steps):
        truncated = exit_step is not None and k < exit_step  # Self Forcing: no gradient through the chain before the exit
        with torch.no_grad() if truncated else contextlib.nullcontext():
            last = k == len(steps) - 1  # its clean prediction is the chunk: the change gate acts here
            x = solver_step(x, guided_velocity(model, x, s, actions, cache, guidance, gate=last), s, s_next, solver, generator)
    return x


def generate_chunk(model: CausalDiT, cache: KVCache, actions: torch.Tensor, noise: torch.Tensor, levels: list[float], guidance: float = 1.0, solver: str = "euler",
                   generator: Generators = None, context_noise: float = 0.0) -> tuple[torch.Tensor, Heads]:
    """Denoise one chunk, then commit it to the cache (noised to `context_noise`, see `recache`; `generator`
    draws that noise too). Returns the clean chunk and the heads of its re-cache pass."""
    x0 = denoise(model, cache, actions, noise, levels, guidance, solver, generator)
    return recache(model, cache, x0, actions, level=context_noise, generator=generator)


def recache(model: CausalDiT, cache: KVCache, x0: torch.Tensor, actions: torch.Tensor, worlds: torch.Tensor | None = None,
            level: float = 0.0, generator: Generators = None) -> tuple[torch.Tensor, Heads]:
    """Write a finished chunk x0 (B, F, C, h, w) into the cache: run it at s=0 (important: x0 must be the clean
    chunk, never a partly denoised one). `worlds` (B,) bool: commit only those worlds (the others' caches are
    left as they were).

    `level` > 0 commits the chunk noised to that level, (1 - level) x0 + level eps with eps drawn by
    `generator`, at s = level: GameNGen's context noise at play time, for models trained with context noise
    (the teacher's --ctx-noise). Returns x0 itself and the heads of the commit pass."""
    if not 0 <= level < 1:
        raise ValueError(f"the context-noise level must lie in [0, 1), got {level}")
    s = torch.full(actions.shape, float(level), device=x0.device, dtype=torch.float32)
    x = x0
    if level > 0:
        if worlds is not None and isinstance(generator, (list, tuple)):  # draw only from the committed worlds' streams
            idx = worlds.nonzero().flatten().tolist()
            eps = torch.zeros(x0.shape, device=x0.device)
            if idx:
                eps[idx] = randn_worlds((len(idx), *x0.shape[1:]), [generator[i] for i in idx], x0.device)
        else:
            eps = randn_worlds(tuple(x0.shape), generator, x0.device)
        x = add_noise(x0.float(), eps, s).to(x0.dtype)  # mixed in float32, as the solver steps are
    _, heads = model.forward_cached(x, s, actions, cache, commit=True if worlds is None else worlds)
    return x0, heads
