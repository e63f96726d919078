"""Autoregressive generation with the KV cache: denoise a chunk in N Euler steps, then re-cache it at t=0."""
from __future__ import annotations

import torch

from .cache import KVCache
from .dit import CausalDiT, Heads
from .flow import euler_step, guided


def velocity(model: CausalDiT, x: torch.Tensor, s: float, actions: torch.Tensor, cache: KVCache, guidance: float) -> torch.Tensor:
    """Velocity for chunk x (B, F, C, h, w) at level s, with action guidance when guidance != 1."""
    t = torch.full(actions.shape, s, device=x.device, dtype=torch.float32)  # levels stay float32
    v, _ = model.forward_cached(x, t, actions, cache)
    if guidance != 1.0:
        v_null, _ = model.forward_cached(x, t, torch.full_like(actions, model.null_action), cache)
        v = guided(v.float(), v_null.float(), guidance).to(x.dtype)
    return v


@torch.no_grad()
def denoise(model: CausalDiT, cache: KVCache, actions: torch.Tensor, noise: torch.Tensor, levels: list[float], guidance: float = 1.0) -> torch.Tensor:
    """Denoise one chunk from `noise` (B, F, C, h, w) along `levels` (1 -> 0); the cache is read, not extended."""
    x = noise
    for s, s_next in zip(levels[:-1], levels[1:]):
        v = velocity(model, x, s, actions, cache, guidance)
        x = euler_step(x.float(), v.float(), s, s_next).to(noise.dtype)
    return x


@torch.no_grad()
def generate_chunk(model: CausalDiT, cache: KVCache, actions: torch.Tensor, noise: torch.Tensor, levels: list[float], guidance: float = 1.0) -> tuple[torch.Tensor, Heads]:
    """Denoise one chunk, then commit it to the cache. Returns the clean chunk and the heads of its re-cache pass."""
    return recache(model, cache, denoise(model, cache, actions, noise, levels, guidance), actions)


@torch.no_grad()
def recache(model: CausalDiT, cache: KVCache, x0: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, Heads]:
    """Run a clean chunk at t=0 and write its keys/values into the cache (important: t must be 0)."""
    t = torch.zeros(actions.shape, device=x0.device, dtype=torch.float32)
    _, heads = model.forward_cached(x0, t, actions, cache, commit=True)
    return x0, heads
