"""Rotary positions in (time, row, col) and the one attention entry point that picks a backend.

Backends, chosen per call by `attention()`:
- flash-attn (`flash_attn_func`), when installed, on CUDA, in fp16/bf16, with no mask (cached play with
  every slot filled);
- flex attention on CUDA when a block-sparse mask is given (teacher-forcing pack);
- torch's scaled-dot-product attention otherwise (CPU, boolean masks);
- "math": plain softmax(q k^T) v, the only path that `torch.func.jvp` differentiates forward on every
  device (used by continuous-time consistency distillation). Select it with `attention_backend("math")`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

try:  # optional GPU extra
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None

_FORCED_BACKEND: str | None = None


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Force a backend ("sdpa", "math", "flex", "flash") inside the block; None restores automatic choice."""
    global _FORCED_BACKEND
    if name not in (None, "sdpa", "math", "flex", "flash"):
        raise ValueError(f"unknown attention backend {name!r}")
    prev, _FORCED_BACKEND = _FORCED_BACKEND, name
    try:
        yield
    finally:
        _FORCED_BACKEND = prev


_FLEX = None


def _flex():
    """flex_attention, compiled once on CUDA (eager flex materialises the full score matrix)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention
    return _FLEX


def _math_attention(q, k, v, mask, scale):
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(dim=-1) @ v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_mask=None,
) -> torch.Tensor:
    """q (B, H, Lq, E), k/v (B, H, Lk, E[v]); mask bool broadcastable to (B, H, Lq, Lk), True = attend."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = _FORCED_BACKEND
    if backend is None:
        if q.is_cuda and mask is None and block_mask is None and flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1]:
            backend = "flash"
        elif q.is_cuda and block_mask is not None:
            backend = "flex"
        else:
            backend = "sdpa"
    if backend == "math":
        return _math_attention(q, k, v, mask, scale)
    if backend == "flash":
        if flash_attn_func is None:
            raise RuntimeError("attention backend 'flash' requested but flash-attn is not installed (pip install '.[gpu]')")
        # flash-attn wants (B, L, H, E)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    if backend == "flex":
        return _flex()(q, k, v, block_mask=block_mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class Rotary(torch.nn.Module):
    """3-axis rotary embedding: head-dim pairs split between time, row and column.

    Positions are given per token as (time, row, col) integers; `cos_sin` returns tensors that broadcast
    against (B, H, L, E). Keys are cached unrotated and rotated at read time (see `worldmodel.cache`).
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        pairs = head_dim // 2
        n_sp = pairs // 3  # pairs per spatial axis
        n_t = pairs - 2 * n_sp  # the rest for time
        freqs = []
        for n in (n_t, n_sp, n_sp):
            freqs.append(theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1)))
        self.split = (n_t, n_sp, n_sp)
        self.register_buffer("inv_freq", torch.cat(freqs).float(), persistent=False)  # (pairs,)

    def cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (..., L, 3) -> cos, sin of shape (..., L, head_dim)."""
        n_t, n_y, n_x = self.split
        axis = torch.cat([pos[..., 0:1].expand(*pos.shape[:-1], n_t), pos[..., 1:2].expand(*pos.shape[:-1], n_y), pos[..., 2:3].expand(*pos.shape[:-1], n_x)], dim=-1)
        ang = axis.float() * self.inv_freq  # (..., L, pairs)
        ang = torch.cat([ang, ang], dim=-1)  # (..., L, head_dim), rotate-half layout
        return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, E); cos/sin broadcastable to it. Rotate-half convention."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # rotate in float32 or wider, then come back
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (xf * cos.to(xf.dtype) + rot * sin.to(xf.dtype)).to(x.dtype)
