"""Flow-matching maths (rectified flow): x_s = (1 - s) x0 + s eps, the network predicts v = eps - x0.

s = 0 is data, s = 1 is noise. Everything here runs in float32 or wider, whatever the model's dtype.
"""
from __future__ import annotations

import torch


def expand(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-frame levels (B, T) -> broadcastable to latents (B, T, C, h, w)."""
    return s.reshape(*s.shape, *([1] * (x.dim() - s.dim())))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = expand(s, x0)
    return (1 - s) * x0 + s * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Training target of the network."""
    return eps - x0


def x0_from_velocity(x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x_s - expand(s, x_s) * v


def sample_levels(shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu", mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training noise levels from a logit-normal distribution (SD3), one per element of `shape`."""
    z = torch.randn(shape, generator=generator, device=device) * std + mean
    return torch.sigmoid(z)


def shift_levels(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift s' = shift s / (1 + (shift - 1) s); shift > 1 spends more steps at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def sampling_levels(steps: int, shift: float = 1.0) -> list[float]:
    """Decreasing list of `steps + 1` levels from 1 (noise) to 0 (data)."""
    if steps < 1:
        raise ValueError(f"need at least 1 denoising step, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return [float(v) for v in shift_levels(s, shift)]


def euler_step(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    return x + (s_next - s) * v


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on the action: v_u + scale (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)
