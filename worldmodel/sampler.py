"""Autoregressive generation with the KV cache: denoise a chunk in N steps, then re-cache it at t=0.

Two step rules along a decreasing list of levels (see `SamplingConfig.solver`):
- "euler": x <- x + (s_next - s) v, the probability-flow ODE (the teacher);
- "consistency": x0 = x - s v, then x <- (1 - s_next) x0 + s_next eps_fresh (consistency / DMD students).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .cache import KVCache
from .dit import CausalDiT, Heads
from .flow import add_noise, euler_step, guided, x0_from_velocity


def velocity(model: CausalDiT, x: torch.Tensor, s: float, actions: torch.Tensor, cache: KVCache, guidance: float) -> torch.Tensor:
    """Velocity for chunk x (B, F, C, h, w) at level s, with action guidance when guidance != 1."""
    t = torch.full(actions.shape, s, device=x.device, dtype=torch.float32)  # levels stay float32
    v, _ = model.forward_cached(x, t, actions, cache)
    if guidance != 1.0:
        v_null, _ = model.forward_cached(x, t, torch.full_like(actions, model.null_action), cache)
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


@torch.no_grad()
def denoise(model: CausalDiT, cache: KVCache, actions: torch.Tensor, noise: torch.Tensor, levels: list[float], guidance: float = 1.0, solver: str = "euler", generator: Generators = None) -> torch.Tensor:
    """Denoise one chunk from `noise` (B, F, C, h, w) along `levels` (1 -> 0); the cache is read, not extended."""
    x = noise
    for s, s_next in zip(levels[:-1], levels[1:]):
        x = solver_step(x, velocity(model, x, s, actions, cache, guidance), s, s_next, solver, generator)
    return x


@torch.no_grad()
def generate_chunk(model: CausalDiT, cache: KVCache, actions: torch.Tensor, noise: torch.Tensor, levels: list[float], guidance: float = 1.0, solver: str = "euler", generator: Generators = None) -> tuple[torch.Tensor, Heads]:
    """Denoise one chunk, then commit it to the cache. Returns the clean chunk and the heads of its re-cache pass."""
    return recache(model, cache, denoise(model, cache, actions, noise, levels, guidance, solver, generator), actions)


@torch.no_grad()
def recache(model: CausalDiT, cache: KVCache, x0: torch.Tensor, actions: torch.Tensor, worlds: torch.Tensor | None = None) -> tuple[torch.Tensor, Heads]:
    """Run a clean chunk at t=0 and write its keys/values into the cache (important: t must be 0).
    `worlds` (B,) bool: commit only those worlds (the others' caches are left as they were)."""
    t = torch.zeros(actions.shape, device=x0.device, dtype=torch.float32)
    _, heads = model.forward_cached(x0, t, actions, cache, commit=True if worlds is None else worlds)
    return x0, heads
