"""Latent windows, what every DiT stage trains on: the frames encoded once by the frozen tokenizer into
OUT/latents/{train,heldout}/ (shard by shard, resumable, stamped with the tokenizer's config), then streamed
as windows of T consecutive latent frames."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from train.dataset import iter_windows, list_shards, load_shard
from train.common import Dist, barrier, write_json
from worldmodel.checkpoint import read_config
from worldmodel.tokenizer import FrameTokenizer

LATENT_KEYS = ("latents", "actions", "rewards", "terminated", "first")
WINDOW_KEYS = LATENT_KEYS[:4]


def encode_split(data: Path, split: str, tok: FrameTokenizer, out: Path, rank: int, world: int, batch: int = 256) -> list[Path]:
    """Encode every shard of a split with the frozen tokenizer into out/split/ (resumable, shard by shard)."""
    shards = list_shards(data, split)
    (out / split).mkdir(parents=True, exist_ok=True)
    targets = [out / split / s.name for s in shards]
    for k, (src, dst) in enumerate(zip(shards, targets)):
        if k % world != rank or dst.exists():
            continue
        arr = load_shard(src)
        frames = torch.from_numpy(arr["frames"])
        with torch.inference_mode():
            lat = torch.cat([tok.encode(frames[i:i + batch].to(tok.device)).cpu() for i in range(0, len(frames), batch)])
        tmp = dst.with_name(dst.stem + ".tmp.npz")
        np.savez(tmp, latents=lat.half().numpy(), **{k2: arr[k2] for k2 in LATENT_KEYS[1:]})
        tmp.replace(dst)
    return targets


def check_stamp(lat: Path, tok_dir: Path, hint: str) -> None:
    """Latents resume only with the tokenizer that encoded them (every rank checks, so all exit together)."""
    stamp = lat / "tokenizer.json"
    if stamp.exists() and json.loads(stamp.read_text()) != read_config(tok_dir):
        raise ValueError(f"{lat} was encoded with another tokenizer; {hint}")


def encode_latents(data: Path, tok_dir: Path, lat: Path, d: Dist) -> tuple[list[Path], list[Path]]:
    """Train and held-out latent shards of `data`, encoded once into `lat` with the tokenizer in `tok_dir`."""
    check_stamp(lat, tok_dir, "delete it or use a new --out")
    barrier()  # every rank has read the old stamp (if any) before the main one writes it
    tok = FrameTokenizer.load(tok_dir, device=d.device).eval()
    lat.mkdir(parents=True, exist_ok=True)
    if d.is_main:  # written whole, then renamed: a rank never reads half a stamp
        write_json(lat / "tokenizer.json", read_config(tok_dir))
    train = encode_split(data, "train", tok, lat, d.rank, d.world_size)
    held = encode_split(data, "heldout", tok, lat, d.rank, d.world_size)
    barrier()
    return train, held


def existing_latents(lat: Path, tok_dir: Path, out: Path) -> tuple[list[Path], list[Path]]:
    """Latents a teacher run already encoded (--latents TEACHER_RUN/latents)."""
    # checked here: list_shards' own hint names train.collect, which records frames, not latents
    train = list_shards(lat, "train") if (lat / "train").is_dir() else []
    if not train:
        guess = f"did you mean --latents {lat / 'latents'}? " if (lat / "latents" / "train").is_dir() else ""
        raise ValueError(f"--latents {lat} holds no latent shards (no train/shard_*.npz in it); {guess}train.teacher writes them "
                         f"to TEACHER_RUN/latents (`python -m train.teacher --data DATA --tokenizer TOK_RUN/tokenizer --out TEACHER_RUN`), "
                         f"or drop --latents to encode the data into {out / 'latents'}")
    check_stamp(lat, tok_dir, "drop --latents")
    return train, list_shards(lat, "heldout") if (lat / "heldout").is_dir() else []


def target_std(paths: list[Path], delta: bool, frames_per_chunk: int = 1, max_frames: int = 20000) -> float:
    """Standard deviation of what the network predicts, over the first `max_frames` latent frames of the
    shards: the frames, or with `delta` their change from the previous frame the network reads (the last
    frame of the chunk before: 1 to frames_per_chunk frames back, each lag equally; within episodes, never
    across an episode start). EDM's sigma_data."""
    parts, n = [], 0
    for path in paths:
        arr = load_shard(path)
        x = arr["latents"].astype(np.float32)
        if delta:
            episode = np.cumsum(arr["first"].astype(np.int64))  # (N,) episode index of each frame
            x = np.concatenate([(x[lag:] - x[:-lag])[episode[lag:] == episode[:-lag]] for lag in range(1, frames_per_chunk + 1)])
        parts.append(x)
        n += len(x)
        if n >= max_frames:
            break
    if not n:
        raise ValueError("no latent frames to measure the target's standard deviation on")
    return float(np.concatenate(parts)[:max_frames].std())


def windows(paths: list[Path], frames: int, per_rank: int, d: Dist, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches {latents (B, T, C, h, w) float16, actions, rewards, terminated (B, T)} of real windows;
    every rank streams its own shards. Latents are small (2 KiB a frame): 8 shards in memory mix many episodes."""
    it = iter_windows(paths, frames, seed=seed, rank=d.rank, world_size=d.world_size, keys=WINDOW_KEYS, shards_in_memory=8)
    while True:
        ws = [next(it) for _ in range(per_rank)]
        yield {k: torch.from_numpy(np.stack([w[k] for w in ws])).to(d.device) for k in WINDOW_KEYS}


def fixed_batch(paths: list[Path], frames: int, n: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed set of held-out windows for the quick metrics (the same at every evaluation)."""
    ws = []
    for w in iter_windows(paths, frames, seed=seed, rank=0, world_size=1, keys=WINDOW_KEYS, loop=False):
        ws.append(w)
        if len(ws) == n:
            break
    if not ws:
        raise ValueError(f"no held-out window of {frames} frames")
    return {k: torch.from_numpy(np.stack([w[k] for w in ws])).to(device) for k in WINDOW_KEYS}
