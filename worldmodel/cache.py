"""The context rule (sinks + rolling window) and the preallocated KV cache that implements it.

Context rule. Chunk i sees: the first `S = sink_chunks` chunks (permanent sinks), the `W = window_chunks`
chunks just before it, and itself. Positions stay bounded however long play runs: at read time the
window and the query are placed right after the sinks,

    lo = max(S, i - W);  sink s -> s;  window chunk j -> S + j - lo;  query chunk i -> S + i - lo,

so a window key keeps its true distance i - j to the query, sinks sit at distance min(i, S + W) - s, and
no position ever exceeds S + W. Keys are cached unrotated and rotated at read time for that reason.
The teacher-forcing pack (`CausalDiT.forward_pack`) applies the same rule, which is what the parity test
between cached generation and the full-sequence forward checks.

Cache layout, per layer, slots of one chunk each: [scratch | S sinks | W ring]. The chunk being generated
writes its keys/values into the scratch slot at every denoising step; the clean re-cache pass (s=0)
then commits the scratch into its permanent slot. Slots fill in order, so filled slots are always a
prefix and a batch whose worlds are all at the same chunk needs no mask.
"""
from __future__ import annotations

import torch

from .attention import Rotary, apply_rotary, attention
from .config import DiTConfig


def visible(i: torch.Tensor, j: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Does query chunk i see earlier chunk j (j < i) under the sink + window rule? Broadcasts."""
    return (j < i) & ((j < sinks) | (j >= i - window))


def query_position(i: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Read-time position of query chunk i as seen from the sinks: min(i, S + W)."""
    return torch.clamp(i, max=sinks + window)


def token_positions(chunk_pos: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    """chunk positions (...,) -> per-token (time, row, col) positions (..., tokens_per_chunk, 3)."""
    F = cfg.frames_per_chunk
    gh, gw = cfg.grid
    dev = chunk_pos.device
    f = torch.arange(F, device=dev).repeat_interleave(gh * gw)  # (tpc,)
    r = torch.arange(gh, device=dev).repeat_interleave(gw).repeat(F)
    c = torch.arange(gw, device=dev).repeat(gh * F)
    t = chunk_pos[..., None] * F + f  # (..., tpc)
    return torch.stack([t, r.expand_as(t), c.expand_as(t)], dim=-1)


class KVCache:
    """Preallocated keys/values for `batch` worlds: constant memory over any number of steps."""

    def __init__(self, cfg: DiTConfig, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.cfg = cfg
        self.batch = batch
        self.S, self.W, self.tpc = cfg.sink_chunks, cfg.window_chunks, cfg.tokens_per_chunk
        self.n_slots = 1 + self.S + self.W
        shape = (cfg.depth, batch, cfg.heads, self.n_slots, self.tpc, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # chunk index held by each slot (-1: empty); the scratch slot holds the chunk being generated
        self.slot_chunk = torch.full((batch, self.n_slots), -1, dtype=torch.long, device=device)
        self.n_chunks = torch.zeros(batch, dtype=torch.long, device=device)  # committed chunks per world
        # the last frame of the last committed chunk, per world (zeros before the first): the pixel-aligned
        # conditioning of DiTConfig.prev_frame / delta; (B, C, h, w)
        self.prev = torch.zeros(batch, cfg.in_channels, *cfg.latent_size, device=device, dtype=dtype)
        # with DiTConfig.prev_stack K > 1, the K - 1 frames before that one, nearest first (B, K - 1, C, h, w)
        K = cfg.prev_stack  # > 1 only with prev_frame (DiTConfig checks)
        self.older = torch.zeros(batch, K - 1, cfg.in_channels, *cfg.latent_size, device=device, dtype=dtype) if K > 1 else None
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta).to(device)
        self._read: dict | None = None
        self.reuse_reads = True  # False recomputes the rotations at every forward (the benchmark's baseline)

    def reset(self, worlds: torch.Tensor | list[int] | None = None) -> None:
        """Forget the context of the given worlds (all when None)."""
        idx = slice(None) if worlds is None else torch.as_tensor(worlds, dtype=torch.long, device=self.n_chunks.device)
        self.slot_chunk[idx] = -1
        self.n_chunks[idx] = 0
        self.prev[idx] = 0
        if self.older is not None:
            self.older[idx] = 0
        self._read = None

    def home_slot(self, i: torch.Tensor) -> torch.Tensor:
        """Permanent slot of chunk i: a sink slot, else the ring slot it overwrites."""
        return torch.where(i < self.S, 1 + i, 1 + self.S + (i - self.S) % self.W)

    def begin(self) -> None:
        """Prepare read-time rotations for the next chunk of every world (called before every forward; the
        rotations hold until the next commit or reset, so the denoising steps and the re-cache of one chunk
        share them)."""
        if self._read is not None and self.reuse_reads:
            return
        S, W = self.S, self.W
        i = self.n_chunks  # (B,) chunk being generated
        lo = torch.clamp(i - W, min=S)
        chunk = self.slot_chunk.clone()
        chunk[:, 0] = i  # scratch
        pos = torch.where(chunk < S, chunk, S + chunk - lo[:, None])  # (B, n_slots)
        pos = pos.clamp(min=0)  # empty slots: any valid number, they are masked out
        valid = self.slot_chunk >= 0
        valid[:, 0] = True
        cos, sin = self.rotary.cos_sin(token_positions(pos, self.cfg))  # (B, n_slots, tpc, E)
        B = self.batch
        E = self.cfg.head_dim
        n_valid = valid.sum(1)
        uniform = bool((n_valid == n_valid[0]).all())
        if uniform:
            n = int(n_valid[0])  # filled slots are a prefix
            mask = None
        else:
            n = self.n_slots
            mask = valid[:, None, None, :, None].expand(B, 1, 1, n, self.tpc).reshape(B, 1, 1, n * self.tpc)
        self._read = dict(
            n=n,
            mask=mask,
            k_cos=cos[:, None, :n].reshape(B, 1, n * self.tpc, E),  # (B, 1, Lk, E)
            k_sin=sin[:, None, :n].reshape(B, 1, n * self.tpc, E),
            q_cos=cos[:, None, 0],  # (B, 1, tpc, E)
            q_sin=sin[:, None, 0],
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q/k/v (B, H, tpc, E) of the current chunk, unrotated -> attention output (B, H, tpc, E)."""
        r = self._read
        assert r is not None, "KVCache.begin() must be called before attend()"
        n, B, H, E = r["n"], self.batch, self.cfg.heads, self.cfg.head_dim
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Training through generation (Self Forcing): the scratch gets a detached copy (the cache is
            # detached between chunks) and this forward attends to [k | cached slots] built out of place,
            # so later in-place cache writes cannot invalidate the graph.
            self.k[layer, :, :, 0] = k.detach()
            self.v[layer, :, :, 0] = v.detach()
            past_k = self.k[layer, :, :, 1:n].reshape(B, H, (n - 1) * self.tpc, E)
            past_v = self.v[layer, :, :, 1:n].reshape(B, H, (n - 1) * self.tpc, E)
            keys, vals = torch.cat([k, past_k], dim=2), torch.cat([v, past_v], dim=2)  # (B, H, Lk, E)
        else:
            self.k[layer, :, :, 0] = k  # scratch slot
            self.v[layer, :, :, 0] = v
            keys = self.k[layer, :, :, :n].reshape(B, H, n * self.tpc, E)  # (B, H, Lk, E), unrotated
            vals = self.v[layer, :, :, :n].reshape(B, H, n * self.tpc, E)
        q = apply_rotary(q, r["q_cos"], r["q_sin"])
        keys = apply_rotary(keys, r["k_cos"], r["k_sin"])
        return attention(q, keys, vals, mask=r["mask"])

    def commit(self, worlds: torch.Tensor | None = None, frames: torch.Tensor | None = None) -> None:
        """Move the scratch slot (the clean chunk just run at s=0) into its permanent slot, and keep that
        chunk's `frames` (B, F, C, h, w), where the network reads them (detached, like the cache): the last is
        the next chunk's previous frame, and the ones before it (then the frames kept before) fill the older
        stack of `prev_stack`. `worlds` (B,) bool: commit only those worlds (e.g. the ones being reset); the
        rest keep their context."""
        b = torch.arange(self.batch, device=self.n_chunks.device)
        if worlds is not None:
            if worlds.shape != (self.batch,) or worlds.dtype != torch.bool:
                raise ValueError(f"worlds must be a ({self.batch},) bool mask, got {worlds.dtype} {tuple(worlds.shape)}")
            b = b[worlds.to(b.device)]
        i = self.n_chunks[b]
        slot = self.home_slot(i)  # (b,)
        # advanced indices split by a slice put the batch dim first: (B, depth, H, tpc, E)
        self.k[:, b, :, slot] = self.k[:, b, :, 0].transpose(0, 1)
        self.v[:, b, :, slot] = self.v[:, b, :, 0].transpose(0, 1)
        self.slot_chunk[b, slot] = i
        self.n_chunks[b] += 1
        if frames is not None:
            f = frames[b].detach().to(self.prev.dtype)  # (b, F, C, h, w)
            if self.older is not None:  # nearest first: the chunk's frames before its last, the old prev, the old stack
                self.older[b] = torch.cat([f.flip(1)[:, 1:], self.prev[b][:, None], self.older[b]], dim=1)[:, :self.older.shape[1]]
            self.prev[b] = f[:, -1]
        self._read = None

    def max_position(self) -> int:
        """Largest time position the next read will use (bounded by (S + W + 1) * frames_per_chunk)."""
        S, W = self.S, self.W
        lo = torch.clamp(self.n_chunks - W, min=S)
        return int(((S + self.n_chunks - lo).max() + 1) * self.cfg.frames_per_chunk - 1)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
