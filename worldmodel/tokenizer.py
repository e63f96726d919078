"""Stage 1, the frame tokenizer: frames (B, H, W, 3) uint8 <-> latent grids (B, C, h, w).

Two kinds (`TokenizerConfig.kind`):
  "vae"    a small diffusers `AutoencoderKL` trained from scratch (`train/tokenizer.py`). Encoding is
           deterministic (the posterior mean); latents are normalised per channel by the
           `latent_mean` / `latent_std` measured on the training frames after training.
  "patch"  pixels in [-1, 1] cut into p x p patches: (3, H, W) -> (3*p*p, H/p, W/p). No weights, and
           decoding is the exact inverse.

The decoder runs on every env step, so it is kept small. On the hot path wrap calls in
`torch.inference_mode()` (a little faster than the `no_grad` that `encode` / `decode` use themselves;
`no_grad` keeps their outputs usable in later autograd graphs, inference tensors are not).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from worldmodel.checkpoint import CheckpointError, load_into, read_config, save_checkpoint
from worldmodel.config import TokenizerConfig, from_dict, to_dict

CHECKPOINT_KIND = "tokenizer"
PIXEL_MAX = 255.0  # uint8 frames


def frames_to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return frames.permute(0, 3, 1, 2).float().div(PIXEL_MAX / 2).sub(1.0)  # (B, 3, H, W)


def pixels_to_frames(pixels: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded to the nearest level."""
    x = pixels.float().clamp(-1.0, 1.0).add(1.0).mul(PIXEL_MAX / 2).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3)


def build_autoencoder(cfg: TokenizerConfig) -> nn.Module:
    """The diffusers AutoencoderKL for `cfg` (kind "vae"), freshly initialised."""
    from diffusers import AutoencoderKL

    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ValueError(f"every block_out_channels entry must be divisible by norm_num_groups={cfg.norm_num_groups}, got {cfg.block_out_channels}")
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.frame_size[0],
        mid_block_add_attention=False,  # 8x8 grid, convolutions see all of it; attention only costs time
        use_quant_conv=False,  # the 1x1 convs around the latent add nothing before/after a 3x3 conv
        use_post_quant_conv=False,
    )


def pixels_to_patches(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """The patch tokenizer's layout: pixels (B, 3, H, W) -> (B, 3*p*p, H/p, W/p), each cell's channels (3, p, p)."""
    b, _, hh, ww = pixels.shape
    x = pixels.reshape(b, 3, hh // p, p, ww // p, p)  # (B, 3, h, p, w, p)
    x = x.permute(0, 1, 3, 5, 2, 4)  # (B, 3, p, p, h, w)
    return x.reshape(b, 3 * p * p, hh // p, ww // p)  # (B, 3*p*p, h, w)


def patches_to_pixels(raw: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of pixels_to_patches: (B, 3*p*p, h, w) -> pixels (B, 3, h*p, w*p)."""
    b, _, h, w = raw.shape
    x = raw.reshape(b, 3, p, p, h, w)  # (B, 3, p, p, h, w)
    x = x.permute(0, 1, 4, 2, 5, 3)  # (B, 3, h, p, w, p)
    return x.reshape(b, 3, h * p, w * p)  # (B, 3, H, W)


class FrameTokenizer(nn.Module):
    """Frames (B, H, W, 3) uint8 <-> normalised latents (B, C, h, w); see the module docstring."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = build_autoencoder(cfg) if cfg.kind == "vae" else None
        mean, std = self._stats_tensors(cfg.latent_mean, cfg.latent_std)
        # Not saved in model.safetensors: the statistics live in the config (config.json).
        self.register_buffer("latent_mean", mean, persistent=False)  # (1, C, 1, 1)
        self.register_buffer("latent_std", std, persistent=False)  # (1, C, 1, 1)
        self._vae_dtype: torch.dtype | None = None  # set by prepare_inference

    def prepare_inference(self, dtype: torch.dtype = torch.float32) -> "FrameTokenizer":
        """Inference layout for the VAE: weights in channels-last memory (oneDNN's fast convolution path on
        CPU; the same numbers as the default layout) and in `dtype` (bfloat16 halves the work on CPUs with
        native bf16). Inputs are converted on the way in and outputs come back float32; the latent statistics
        stay float32. Not for training."""
        if self.vae is not None:
            # nn.Module.to itself: diffusers' override warns about fp32-only modules, of which this VAE has none
            nn.Module.to(self.vae, dtype=dtype, memory_format=torch.channels_last)
            self._vae_dtype = dtype
        return self

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        if self._vae_dtype is None:
            return x
        return x.to(self._vae_dtype).contiguous(memory_format=torch.channels_last)

    def _from_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._vae_dtype is None else x.float().contiguous()

    # ---- normalisation -------------------------------------------------------------------------------
    def _stats_tensors(self, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg.channels
        if not mean and not std:
            return torch.zeros(1, c, 1, 1), torch.ones(1, c, 1, 1)
        if len(mean) != c or len(std) != c:
            raise ValueError(f"latent_mean/latent_std must have {c} entries (one per latent channel), got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"latent_std entries must be > 0, got {std}")
        return torch.tensor(mean).view(1, c, 1, 1), torch.tensor(std).view(1, c, 1, 1)

    def set_latent_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Set the per-channel normalisation (in the config, so `save` keeps it, and in the buffers)."""
        m, s = self._stats_tensors(tuple(float(v) for v in mean), tuple(float(v) for v in std))
        self.cfg.latent_mean, self.cfg.latent_std = tuple(m.flatten().tolist()), tuple(s.flatten().tolist())
        self.latent_mean.copy_(m)
        self.latent_std.copy_(s)

    @property
    def device(self) -> torch.device:
        return self.latent_mean.device

    # ---- validation ----------------------------------------------------------------------------------
    def _check_frames(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        h, w = self.cfg.frame_size
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if not torch.is_tensor(frames) or frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != (h, w, 3):
            got = f"{tuple(frames.shape)} {frames.dtype}" if hasattr(frames, "shape") else type(frames).__name__
            raise ValueError(f"expected frames of shape (B, {h}, {w}, 3) uint8, got {got}")
        return frames.to(self.device)

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        c, (h, w) = self.cfg.channels, self.cfg.latent_size
        if not torch.is_tensor(latents) or not latents.is_floating_point() or latents.ndim != 4 or tuple(latents.shape[1:]) != (c, h, w):
            got = f"{tuple(latents.shape)} {latents.dtype}" if hasattr(latents, "shape") else type(latents).__name__
            raise ValueError(f"expected latents of shape (B, {c}, {h}, {w}) float, got {got}")
        return latents

    def _check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = self.cfg.frame_size
        if not torch.is_tensor(pixels) or not pixels.is_floating_point() or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, h, w):
            got = f"{tuple(pixels.shape)} {pixels.dtype}" if hasattr(pixels, "shape") else type(pixels).__name__
            raise ValueError(f"expected pixels of shape (B, 3, {h}, {w}) float in [-1, 1], got {got}")
        return pixels

    # ---- raw (unnormalised) latents ------------------------------------------------------------------
    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """float pixels (B, 3, H, W) in [-1, 1] -> raw latents (B, C, h, w) (posterior mean for the VAE)."""
        if self.vae is None:
            return pixels_to_patches(pixels, self.cfg.patch)
        return self._from_vae(self.vae.encode(self._to_vae(pixels)).latent_dist.mean)

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """raw latents (B, C, h, w) -> float pixels (B, 3, H, W), not clamped."""
        if self.vae is None:
            return patches_to_pixels(raw, self.cfg.patch)
        return self._from_vae(self.vae.decode(self._to_vae(raw)).sample)

    # ---- public API ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames (B, H, W, 3) -> normalised latents (B, C, h, w), deterministic."""
        frames = self._check_frames(frames)
        pixels = frames_to_pixels(frames).to(self.latent_mean.dtype)  # (B, 3, H, W)
        return (self.encode_raw(pixels) - self.latent_mean) / self.latent_std

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> float pixels (B, 3, H, W) clamped to [-1, 1]; differentiable."""
        latents = self._check_latents(latents)
        raw = latents * self.latent_std + self.latent_mean
        return self.decode_raw(raw).clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> uint8 frames (B, H, W, 3)."""
        return pixels_to_frames(self.decode_float(latents))

    def forward(self, pixels: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: pixels (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W), KL per frame (B,)).

        The VAE decodes a posterior sample (`sample=True`) and returns its KL to N(0, I), summed over the
        latent; the patch tokenizer is exact and has zero KL.
        """
        pixels = self._check_pixels(pixels)
        if self.vae is None:
            return self.decode_raw(self.encode_raw(pixels)), pixels.new_zeros(pixels.shape[0])
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.sample() if sample else posterior.mean  # (B, C, h, w)
        return self.vae.decode(z).sample, posterior.kl()

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer (config.json + model.safetensors), atomically."""
        return save_checkpoint(path, {"kind": CHECKPOINT_KIND, "config": to_dict(self.cfg)}, {"model": self.state_dict()})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "FrameTokenizer":
        """Rebuild a tokenizer from a folder written by `save`; raises CheckpointError if it is missing or corrupt."""
        meta = read_config(path)
        if meta.get("kind") != CHECKPOINT_KIND or not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"{str(path)!r} is not a tokenizer checkpoint (config.json kind is {meta.get('kind')!r}, expected {CHECKPOINT_KIND!r})")
        try:
            cfg = from_dict(TokenizerConfig, meta["config"])
            tok = cls(cfg)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"tokenizer config in {str(path)!r} is invalid: {e}") from None
        load_into(tok, path)
        return tok.to(device).eval()
