"""The action-conditioned causal DiT.

Latent tokens of each frame, frames grouped in chunks, block-causal attention between chunks, rotary
positions in (time, row, col), per-frame adaLN-Zero conditioning on noise level and action, and small
heads that read reward and episode end off the features of a clean chunk.

The network knows nothing of the noise schedule: it maps (latents, per-frame noise level s in [0, 1],
per-frame action) to a velocity; `worldmodel.flow` holds the maths and `worldmodel.sampler` the loop.
Two ways to run it:
- `forward_pack`: the teacher-forcing sequence [clean chunks | noisy chunks] in one pass (training);
- `forward_cached`: one chunk against a `KVCache` (generation; `commit=True` for the re-cache pass of a finished chunk, at s=0 or at a context-noise level).
`save_dit` / `load_dit` write and read it as a `worldmodel.checkpoint` folder with its config.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from .attention import Rotary, apply_rotary, attention
from .cache import KVCache, query_position, token_positions, visible
from .checkpoint import CheckpointError, load_into, read_config, save_checkpoint
from .config import X0_MIN_LEVEL, DiTConfig, from_dict, to_dict
from .flow import expand
from .tokenizer import patches_to_pixels, pixels_to_patches

EVENT_PRIOR = 0.01  # initial probability of the rare-event heads (a reward paid, the episode ended) per frame


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Noise level s in [0, 1] -> sinusoidal features of scale * s (frequencies scale down to scale / 10^4
    radians per unit of s) -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        dtype = torch.promote_types(s.dtype, torch.float32)  # float32 or wider (float64 in gradient checks)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=dtype) / half)
        args = (s.to(dtype) * self.scale)[..., None] * freqs  # (..., half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AttendFn(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation per frame."""

    def __init__(self, cfg: DiTConfig, index: int) -> None:
        super().__init__()
        D, H = cfg.dim, cfg.heads
        self.index, self.heads = index, H
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(D, 3 * D)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """x (B, T, N, D) tokens of T frames; c (B, T, D) per-frame conditioning."""
        B, T, N, D = x.shape
        H = self.heads
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, :, None].chunk(6, dim=-1)  # each (B, T, 1, D)
        h = modulate(self.norm1(x), sh1, sc1).reshape(B, T * N, D)
        q, k, v = self.qkv(h).reshape(B, T * N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, L, E)
        q, k = self.q_norm(q), self.k_norm(k)
        a = attend(self.index, q, k, v)  # (B, H, L, E)
        a = self.proj(a.transpose(1, 2).reshape(B, T, N, D))
        x = x + g1 * a
        x = x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x


class FinalLayer(nn.Module):
    """adaLN, then the map to each token's latents: linear (DiT's), or through `hidden` units (DiTConfig.out_hidden)."""

    def __init__(self, dim: int, out: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh")) if hidden else None
        self.linear = nn.Linear(hidden or dim, out)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)[:, :, None].chunk(2, dim=-1)
        x = modulate(self.norm(x), shift, scale)
        return self.linear(x if self.hidden is None else self.hidden(x))


@dataclass
class Heads:
    """Per-frame predictions of the reward/end heads (raw outputs; see `reward` and `end_prob`)."""

    reward_logit: torch.Tensor  # (B, T) logit of "this step paid a nonzero reward"
    reward_value: torch.Tensor  # (B, T) the reward's value given that it is nonzero
    end_logit: torch.Tensor  # (B, T) logit of "the episode ended at this step"
    # (B, T, 1, h, w) logit, per latent cell of the denoised frames, that the cell changes from the previous
    # frame (DiTConfig.change_gate; None without it). From the pack: the noisy stream's, for its loss.
    change_logit: torch.Tensor | None = None

    @property
    def reward(self) -> torch.Tensor:
        """Point prediction: the value where a reward is more likely than not, else 0."""
        return torch.where(self.reward_logit > 0, self.reward_value, torch.zeros_like(self.reward_value))

    @property
    def end_prob(self) -> torch.Tensor:
        return torch.sigmoid(self.end_logit)


def pack_block_mask(mask: torch.Tensor):
    """A dense (L, L) bool mask as a flex-attention BlockMask (CUDA only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    L = mask.shape[0]
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=mask.device)


class PixelRefiner(nn.Module):
    """Three 3x3 convolutions over each frame's pixels that correct the network's predicted clean frame (or
    change): in, per frame, the prediction, the noisy input, the previous frame (zeros where the network
    reads none) and the level, 10 channels; out, the prediction plus a correction. The last convolution starts
    at zero (the identity). Frame by frame, so it is causal, and the pack and the cache agree through it."""

    def __init__(self, pixel_patch: int, hidden: int) -> None:
        super().__init__()
        self.p = pixel_patch
        self.net = nn.Sequential(nn.Conv2d(10, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, 3, 3, padding=1))

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, 3 p p, h, w) laid out as the patch tokenizer's (3, p, p) cells -> (N, 3, h p, w p)."""
        return patches_to_pixels(x, self.p)

    def to_latents(self, x: torch.Tensor) -> torch.Tensor:
        return pixels_to_patches(x, self.p)

    def forward(self, pred: torch.Tensor, noisy: torch.Tensor, prev: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
        """pred, noisy, prev (B, T, C, h, w) latents, s (B, T) -> the refined prediction (B, T, C, h, w)."""
        B, T = pred.shape[:2]
        flat = lambda x: self.to_pixels(x.flatten(0, 1))  # noqa: E731
        px = flat(pred)
        level = s.reshape(B * T, 1, 1, 1).to(px.dtype).expand(-1, 1, *px.shape[-2:])
        inp = torch.cat([px, flat(noisy), flat(prev) if prev is not None else torch.zeros_like(px), level], dim=1)
        return pred + self.to_latents(self.net(inp)).unflatten(0, (B, T))


class CausalDiT(nn.Module):
    """Action-conditioned block-causal video DiT over latent frames."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, p = cfg.dim, cfg.patch_size
        self.x_embed = nn.Linear(cfg.in_channels * p * p * (1 + cfg.prev_stack if cfg.prev_frame else 1), D)
        self.t_embed = TimestepEmbedder(D, scale=cfg.time_scale)
        self.a_embed = nn.Embedding(cfg.num_actions + 1, D)  # row num_actions: null action (guidance)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.final = FinalLayer(D, cfg.in_channels * p * p, cfg.out_hidden)
        self.heads = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, cfg.head_hidden), nn.SiLU(), nn.Linear(cfg.head_hidden, 3))
        self.refiner = PixelRefiner(cfg.pixel_patch, cfg.refine) if cfg.refine else None
        self.gate = nn.Sequential(nn.LayerNorm(D, eps=1e-6), nn.Linear(D, p * p * cfg.gate_channels)) if cfg.change_gate else None
        # generation keeps the previous frame's cell where the gate's probability of a change is below this
        # (0: the gate is off and every cell is the network's); set by the runtime from SamplingConfig.gate
        self.gate_threshold = 0.5
        self._block_masks: dict = {}  # flex-attention masks of the pack, by (chunks, device)
        self.initialize_weights()

    @property
    def null_action(self) -> int:
        return self.cfg.num_actions

    def initialize_weights(self) -> None:
        """All init in one place: Xavier linears, small embeddings, adaLN-Zero (gates and output at zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.a_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        if self.refiner is not None:  # starts as the identity
            nn.init.zeros_(self.refiner.net[-1].weight)
            nn.init.zeros_(self.refiner.net[-1].bias)
        # Rewards and episode ends are rare events: their logits start at the log-odds of EVENT_PRIOR (as focal-loss
        # detectors start their class logits), so an untrained or briefly trained model neither pays a reward nor
        # ends the episode on every step; a zero bias put both at probability 0.5, which is the end threshold.
        prior_logit = math.log(EVENT_PRIOR / (1 - EVENT_PRIOR))
        with torch.no_grad():
            self.heads[-1].bias[0] = prior_logit  # reward_logit
            self.heads[-1].bias[2] = prior_logit  # end_logit
            if self.gate is not None:  # a cell changes rarely too
                self.gate[-1].bias.fill_(prior_logit)

    # ----- tokens <-> latents -----
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, h, w) -> (B, T, N, C*p*p)."""
        B, T, C, h, w = x.shape
        p = self.cfg.patch_size
        if (C, h, w) != (self.cfg.in_channels, *self.cfg.latent_size):
            raise ValueError(f"expected latents of shape (B, T, {self.cfg.in_channels}, {self.cfg.latent_size[0]}, {self.cfg.latent_size[1]}), got {tuple(x.shape)}")
        x = x.reshape(B, T, C, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)  # (B, T, gh, gw, C, p, p)
        return x.reshape(B, T, (h // p) * (w // p), C * p * p)

    def unpatchify(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """(B, T, N, C*p*p) -> (B, T, C, h, w); C is the latents' channels unless `channels` says otherwise."""
        B, T, N, _ = x.shape
        p, C = self.cfg.patch_size, channels or self.cfg.in_channels
        gh, gw = self.cfg.grid
        x = x.reshape(B, T, gh, gw, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)  # (B, T, C, gh, p, gw, p)
        return x.reshape(B, T, C, gh * p, gw * p)

    def condition(self, s: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """s (B, T) float, actions (B, T) long -> per-frame conditioning (B, T, D)."""
        if actions.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"actions must be an integer tensor, got {actions.dtype}")
        # a compiled forward (train.teacher --compile) skips this message, whose .min() would break its graph; the
        # compiled embedding still stops on an index out of range (inductor's bounds check), with a plainer error
        if actions.numel() and not torch.compiler.is_compiling() and (int(actions.min()) < 0 or int(actions.max()) > self.cfg.num_actions):
            raise ValueError(f"actions must lie in [0, {self.cfg.num_actions - 1}] (or {self.cfg.num_actions} for the null action), got range [{int(actions.min())}, {int(actions.max())}]")
        return self.t_embed(s) + self.a_embed(actions)

    def previous_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Each frame's previous frame in a sequence x (B, T, C, h, w): the last frame of the chunk before its
        own (zeros for the first chunk), (B, T, C, h, w). The KV cache keeps the same at play time."""
        return previous_frames(x, self.cfg.frames_per_chunk)

    def older_frames(self, x: torch.Tensor) -> torch.Tensor | None:
        """The frames before each frame's previous frame that `prev_stack` adds, nearest first, in a sequence
        x (B, T, C, h, w): (B, T, prev_stack - 1, C, h, w), zeros before the sequence; None without a stack."""
        K = self.cfg.prev_stack  # > 1 only with prev_frame (DiTConfig checks)
        if K == 1:
            return None
        return torch.stack([frames_before(x, self.cfg.frames_per_chunk, k) for k in range(2, K + 1)], dim=2)

    def tokens(self, x: torch.Tensor, s: torch.Tensor, prev: torch.Tensor | None, older: torch.Tensor | None = None) -> torch.Tensor:
        """Input tokens (B, T, N, Din) of latents x (B, T, C, h, w) at levels s (B, T), with each frame's
        previous frame `prev` (B, T, C, h, w) where the config uses it (`prev_frame`, `delta`) and, with
        `prev_stack` > 1, the frames before that one, `older` (B, T, prev_stack - 1, C, h, w)."""
        x = self.noisy_input(x, s, prev)
        if self.cfg.predict == "edm":  # unit-variance input (EDM's c_in)
            x = x / expand(self.edm_r(s, self.edm_sd(x, prev)), x).to(x.dtype)
        tok = self.patchify(x)
        if self.cfg.prev_frame:
            stack = [prev] + ([] if older is None else list(older.unbind(2)))
            tok = torch.cat([tok] + [self.patchify(f) for f in stack], dim=-1)  # (B, T, N, (1 + K) C p p)
        return tok

    def noisy_input(self, x: torch.Tensor, s: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """What the network denoises: the noisy frames x, or with `delta` the noisy change
        x_s - (1 - s) prev = (1 - s)(x0 - prev) + s eps."""
        return x - expand(1 - s, x).to(x.dtype) * prev if self.cfg.delta else x

    def edm_sd(self, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """EDM's sigma_data per frame (B, T), float32: the config's, except for frames with no previous frame
        (the first chunk of a window or of play, whose prev is zeros) under `delta`, whose change is the whole
        frame: unit scale (the latents are normalised)."""
        sd = torch.full(x.shape[:2], self.cfg.sigma_data, device=x.device)
        if not self.cfg.delta:
            return sd
        first = prev.flatten(2).abs().amax(-1) == 0  # (B, T); a real frame's normalised latents are never all zero
        return torch.where(first, torch.ones_like(sd), sd)

    @staticmethod
    def edm_r(s: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
        """EDM's scale of the noisy input at levels s (B, T): sqrt(s^2 + sd^2 (1 - s)^2), float32."""
        s = s.float()
        return (s**2 + sd**2 * (1 - s) ** 2).sqrt()

    def velocity_out(self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, prev: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Output tokens (B, T, N, C*p*p) of the noisy frames x (B, T, C, h, w) at levels s (B, T) -> velocity
        (B, T, C, h, w). With `delta` the network predicts the change (its velocity eps - (x0 - prev), or
        x0 - prev), so prev is taken off (added back) to give the frame's. `keep` (B, T, C, h, w) bool: latents
        whose clean prediction is the previous frame's (the change gate, see `gate_keep`)."""
        o = self.unpatchify(out)
        if self.cfg.predict == "velocity":
            return o - prev if self.cfg.delta else o
        noisy = self.noisy_input(x, s, prev) if self.cfg.predict == "edm" or self.refiner is not None else None
        if self.cfg.predict == "edm":  # x0 (or the change) = c_skip * noisy input + c_out * network
            sd = self.edm_sd(x, prev)
            r = self.edm_r(s, sd)
            o = expand(sd**2 * (1 - s) / r**2, x).to(x.dtype) * noisy + expand(s * sd / r, x).to(x.dtype) * o
        if self.refiner is not None:
            o = self.refiner(o, noisy, prev, s)
        x0 = o + prev if self.cfg.delta else o
        if keep is not None:
            x0 = torch.where(keep, prev, x0)
        return (x - x0) / expand(s.clamp(min=X0_MIN_LEVEL), x).to(x.dtype)

    def _body(self, x: torch.Tensor, c: torch.Tensor, attend: AttendFn, outputs: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """x (B, T, N, Din), c (B, T, D) -> (velocity tokens (B, T, N, Dout), or None without `outputs`; pooled
        features (B, T, D); the change gate's logits (B, T, G, h, w) (G: `gate_channels`), or None without the gate or `outputs`)."""
        h = self.x_embed(x)
        for blk in self.blocks:
            h = blk(h, c, attend)
        if not outputs:
            return None, h.mean(dim=2), None
        gate = None if self.gate is None else self.unpatchify(self.gate(h).float(), channels=self.cfg.gate_channels)
        return self.final(h, c), h.mean(dim=2), gate

    def gate_keep(self, gate: torch.Tensor | None, prev: torch.Tensor | None) -> torch.Tensor | None:
        """The latents (B, T, C, h, w) bool that generation takes from the previous frame: the gate's probability
        of a change below `gate_threshold` (decision i % G for channel i, see `DiTConfig.gate_channels`), in frames
        that have a previous frame (the first chunk of play has none: its prev is zeros). None when there is no
        gate or it is switched off (threshold 0)."""
        if gate is None or self.gate_threshold <= 0:
            return None
        has_prev = prev.flatten(2).abs().amax(-1) > 0  # (B, T)
        keep = (torch.sigmoid(gate) < self.gate_threshold) & has_prev[:, :, None, None, None]
        return keep.repeat(1, 1, self.cfg.in_channels // keep.shape[2], 1, 1)

    def read_heads(self, feats: torch.Tensor) -> Heads:
        out = self.heads(feats).float()  # (B, T, 3)
        return Heads(out[..., 0], out[..., 1], out[..., 2])

    # ----- teacher forcing: [clean | noisy] in one sequence -----
    def pack_mask(self, n_chunks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-level mask for [clean chunks | noisy chunks] under the sink + window rule.

        Returns (mask (2L, 2L) bool, chunk index per token (2L,), noisy flag per token (2L,)).
        Clean chunk i sees the clean chunks visible to it and itself; noisy chunk i sees the clean chunks
        visible to it (strictly before i) and itself; nothing sees a noisy chunk but itself.
        """
        S, W, tpc = self.cfg.sink_chunks, self.cfg.window_chunks, self.cfg.tokens_per_chunk
        chunk = torch.arange(n_chunks, device=device).repeat_interleave(tpc).repeat(2)  # (2L,)
        noisy = torch.arange(2, device=device).repeat_interleave(n_chunks * tpc).bool()
        qi, kj = chunk[:, None], chunk[None, :]
        qn, kn = noisy[:, None], noisy[None, :]
        see_clean = ~kn & (visible(qi, kj, S, W) | ((kj == qi) & ~qn))
        see_self_noisy = qn & kn & (kj == qi)
        return see_clean | see_self_noisy, chunk, noisy

    def forward_pack(
        self,
        clean: torch.Tensor,
        noisy: torch.Tensor,
        s_clean: torch.Tensor,
        s_noisy: torch.Tensor,
        actions: torch.Tensor,
        noisy_actions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Heads]:
        """Teacher-forcing forward.

        clean/noisy (B, T, C, h, w) latents of the same T frames; s_clean/s_noisy (B, T) noise levels;
        actions (B, T) for the clean stream, noisy_actions (B, T) for the noisy one (defaults to actions;
        differs when actions are dropped for guidance). Returns the velocity for the noisy frames
        (B, T, C, h, w) and the heads read off the clean frames.
        """
        cfg = self.cfg
        B, T = clean.shape[:2]
        Fc = cfg.frames_per_chunk
        if T % Fc:
            raise ValueError(f"sequence of {T} frames is not a whole number of {Fc}-frame chunks")
        if noisy.shape != clean.shape:
            raise ValueError(f"clean {tuple(clean.shape)} and noisy {tuple(noisy.shape)} latents must match")
        n = T // Fc
        noisy_actions = actions if noisy_actions is None else noisy_actions
        # Both copies of frame i see the same previous frame: the clean stream's, context noise included (at
        # play time the previous frame is the model's own output, errors and all). Important: rescaled by
        # 1 / (1 - s_clean) to the data's scale, so the noise is added to the frame rather than mixed in; a
        # frame shrunk by (1 - s) would teach a change model to brighten every clean frame it sees at play.
        prev = older = None
        if cfg.uses_prev:
            scaled = clean / expand(1 - s_clean, clean).to(clean.dtype)
            prev, older = self.previous_frames(scaled), self.older_frames(scaled)
        x = torch.cat([self.tokens(clean, s_clean, prev, older), self.tokens(noisy, s_noisy, prev, older)], dim=1)  # (B, 2T, N, Din)
        c = torch.cat([self.condition(s_clean, actions), self.condition(s_noisy, noisy_actions)], dim=1)  # (B, 2T, D)

        mask, chunk, is_noisy = self.pack_mask(n, x.device)
        S, W = cfg.sink_chunks, cfg.window_chunks
        pos = token_positions(torch.arange(n, device=x.device), cfg).reshape(n * cfg.tokens_per_chunk, 3).repeat(2, 1)
        cos, sin = self.rotary.cos_sin(pos)  # (2L, E)
        # Past S + W chunks, a query sees the sinks from the clamped position min(i, S + W) (see cache.py).
        # RoPE logits are q(p_q) . k(p_k), so two query rotations are packed along the feature axis:
        # [q(abs) | q(clamped)] . [k(abs) | 0] for window keys and [0 | k(abs)] for sink keys.
        clamp = S > 0 and n - 1 > S + W
        if clamp:
            pos_c = pos.clone()
            pos_c[:, 0] = query_position(chunk, S, W) * Fc + pos[:, 0] % Fc
            cos_c, sin_c = self.rotary.cos_sin(pos_c)
            sink_key = (chunk < S) & ~is_noisy  # (2L,)

        # On CUDA the pack's block structure goes to flex attention as a block-sparse mask.
        block_mask = None
        if x.is_cuda and not clamp:
            key = (n, str(x.device))
            if key not in self._block_masks:
                self._block_masks[key] = pack_block_mask(mask)
            block_mask = self._block_masks[key]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            qa, ka = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if not clamp:
                return attention(qa, ka, v, mask=mask, block_mask=block_mask)
            qc = apply_rotary(q, cos_c, sin_c)
            is_sink = sink_key[None, None, :, None]
            zero = torch.zeros_like(ka)
            q2 = torch.cat([qa, qc], dim=-1)
            k2 = torch.cat([torch.where(is_sink, zero, ka), torch.where(is_sink, ka, zero)], dim=-1)
            return attention(q2, k2, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))

        out, feats, gate = self._body(x, c, attend)
        # under autocast (train.teacher --bf16) the network runs in bfloat16; the velocity maths run in the latents' dtype
        v = self.velocity_out(out[:, T:].to(noisy.dtype), noisy, s_noisy, prev)
        heads = self.read_heads(feats[:, :T])
        if gate is not None:
            heads.change_logit = gate[:, T:]
        return v, heads

    # ----- generation: one chunk against the KV cache -----
    def forward_cached(self, x: torch.Tensor, s: torch.Tensor, actions: torch.Tensor, cache: KVCache, commit: bool | torch.Tensor = False,
                       gate: bool = False) -> tuple[torch.Tensor | None, Heads]:
        """x (B, F, C, h, w) one chunk, s/actions (B, F). Attends to the cache and itself. Returns the velocity
        and the heads; a commit pass returns no velocity (None): only its keys, values and heads are used, so the
        output layer and the refiner do not run.

        `gate` (the sampler's last step, whose clean prediction is the chunk): cells the change gate calls
        unchanged get the previous frame's clean prediction (see `gate_keep`; nothing without a gate). Earlier
        steps run ungated: at high noise the gate cannot yet see where a change goes, and gating there would
        steer every cell toward the previous frame before the ball's new place is decided.

        With commit=True (the re-cache pass; important: it must run on the final clean chunk at s=0, or on
        that chunk noised to a context-noise level s, see `sampler.recache`), the chunk's keys/values become
        permanent context for the chunks after it. A (B,) bool tensor commits only those worlds.
        """
        if x.shape[1] != self.cfg.frames_per_chunk:
            raise ValueError(f"forward_cached takes one chunk of {self.cfg.frames_per_chunk} frame(s), got {x.shape[1]}")
        if x.shape[0] != cache.batch:
            raise ValueError(f"batch of {x.shape[0]} worlds does not match the cache's {cache.batch}")
        cache.begin()
        prev = cache.prev[:, None].expand_as(x) if self.cfg.uses_prev else None  # (B, F, C, h, w)
        older = None if cache.older is None else cache.older[:, None].expand(x.shape[0], x.shape[1], *cache.older.shape[1:])
        out, feats, gate_logit = self._body(self.tokens(x, s, prev, older), self.condition(s, actions), cache.attend, outputs=commit is False)
        v = None if out is None else self.velocity_out(out.to(x.dtype), x, s, prev, keep=self.gate_keep(gate_logit, prev) if gate else None)
        # the next chunk's previous frame (and the older stack), where the network reads one: at data scale, as
        # in the pack (a chunk committed at context-noise level s is (1 - s) x0 + s eps)
        frames = x / expand(1 - s, x).to(x.dtype) if self.cfg.uses_prev and commit is not False else None
        if isinstance(commit, torch.Tensor):
            cache.commit(commit, frames=frames)
        elif commit:
            cache.commit(frames=frames)
        heads = self.read_heads(feats)
        heads.change_logit = gate_logit
        return v, heads

    def new_cache(self, batch: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg, batch, device=p.device, dtype=p.dtype)


def previous_frames(x: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """Each frame's previous frame in a sequence x (B, T, C, h, w) of chunks of `frames_per_chunk` frames: the
    last frame of the chunk before its own (zeros for the first chunk), (B, T, C, h, w)."""
    return frames_before(x, frames_per_chunk, 1)


def frames_before(x: torch.Tensor, frames_per_chunk: int, k: int) -> torch.Tensor:
    """For each frame of a sequence x (B, T, C, h, w) of chunks of `frames_per_chunk` frames, the frame k
    places before the first frame of its chunk (zeros where that lies before the sequence), (B, T, C, h, w)."""
    Fc = frames_per_chunk
    at = torch.arange(0, x.shape[1], Fc, device=x.device) - k  # (n,) index of that frame for each chunk
    picked = x[:, at.clamp(min=0)] * (at >= 0).to(x.dtype)[None, :, None, None, None]  # (B, n, C, h, w)
    return picked.repeat_interleave(Fc, dim=1)


# ----- the checkpoint folder -----
def save_dit(model: CausalDiT, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """The DiT's weights and config as a checkpoint folder (`extra`: more fields for its config.json)."""
    return save_checkpoint(path, {"kind": "dit", "config": to_dict(model.cfg), **(extra or {})}, {"model": model.state_dict()})


def load_dit(path: str | os.PathLike, device: str | torch.device = "cpu", group: str = "model") -> CausalDiT:
    """A DiT checkpoint folder -> the network (its config from the folder), on `device`, in eval mode."""
    meta = read_config(path)
    if meta.get("kind") != "dit":
        raise CheckpointError(f"{str(path)!r} is not a DiT checkpoint (kind {meta.get('kind')!r})")
    try:
        cfg = from_dict(DiTConfig, meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the DiT config in {str(path)!r} is invalid: {e}") from None
    model = CausalDiT(cfg)
    load_into(model, path, group)
    return model.to(device).eval()
