"""The recorded-play dataset on disk: shards of whole episodes, streamed in windows, never all in RAM.

Layout (docs/data_format.md has every field):
    DATA/meta.json
    DATA/train/shard_00000.npz, shard_00001.npz, ...
    DATA/heldout/shard_00000.npz, ...
A shard (np.savez_compressed) holds whole episodes concatenated along axis 0; N = steps in the shard:
    frames      uint8   (N, H, W, 3)  the screen after step i (an episode's first row: the reset screen)
    actions     int64   (N,)          the action whose step produced frames[i] (0 on a first row)
    rewards     float32 (N,)          reward of that step
    terminated  bool    (N,)          the game ended at this step
    truncated   bool    (N,)          the time limit (max_episode_steps) ended the episode at this step
    first       bool    (N,)          True on an episode's first (reset) row
    episode     int64   (N,)          episode id, unique within a split
    ram         uint8   (N, 128)      ALE RAM after the step (ALE games only)
Later stages write shards of the same layout with other keys (e.g. `latents` instead of `frames`);
everything here works on any key as long as `first` (or `episode`) marks the episode boundaries.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
META_FILE = "meta.json"
SHARD_GLOB = "shard_*.npz"
TMP_SUFFIX = ".tmp.npz"
DEFAULT_WINDOW_KEYS = ("frames", "actions", "rewards", "terminated")
COLLECT_HINT = "record one with `python -m train.collect --game Breakout --out {data_dir}`"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npz"


def split_dir(data_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {SPLITS}")
    return Path(data_dir) / split


def read_meta(data_dir: str | Path) -> dict:
    """The dataset's meta.json as a dict (game, frame size, actions, shard lists; see docs/data_format.md)."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no dataset at {data_dir} (no {META_FILE}); {COLLECT_HINT.format(data_dir=data_dir)}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {path}: {err}; delete it and {COLLECT_HINT.format(data_dir=data_dir)}") from err
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ValueError(f"{path} is not a dataset meta file (no format_version); "
                         f"{COLLECT_HINT.format(data_dir=data_dir)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta['format_version']}, this code reads {FORMAT_VERSION}")
    return meta


def write_meta(data_dir: str | Path, meta: dict) -> None:
    """Write meta.json atomically (a reader never sees half a file)."""
    path = Path(data_dir) / META_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The complete shard files of `split` ("train" or "heldout"), in index order."""
    directory = split_dir(data_dir, split)
    if not directory.is_dir():
        raise FileNotFoundError(f"no {split} split at {directory}; {COLLECT_HINT.format(data_dir=data_dir)}")
    return sorted(p for p in directory.glob(SHARD_GLOB) if not p.name.endswith(TMP_SUFFIX))


def _read_npz(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Arrays `keys` (all if None) of one .npz, decompressed into memory; clear errors for bad files."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no shard file {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if keys is None:
                keys = list(npz.files)
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise KeyError(f"shard {path} has no array {missing} (it has {sorted(npz.files)})")
            arrays = {k: npz[k] for k in keys}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ValueError(f"corrupt shard {path} ({type(err).__name__}: {err}); delete it and re-run "
                         f"`python -m train.collect` with the same arguments to record it again") from err
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"corrupt shard {path}: arrays have different lengths along axis 0: {lengths}")
    return arrays


def load_shard(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of one shard, in memory: {'frames': (N, H, W, 3) uint8, 'actions': (N,) int64, ...}."""
    return _read_npz(path)


def write_shard(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one shard atomically: `shard_k.tmp.npz` first, then renamed, so a killed run leaves no half shard."""
    path = Path(path)
    tmp = path.with_name(path.name[: -len(".npz")] + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Collects whole episodes (dicts of equal-length arrays) and writes them as one shard."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.parts: list[dict[str, np.ndarray]] = []
        self.num_steps = 0

    @property
    def num_episodes(self) -> int:
        return len(self.parts)

    def add_episode(self, arrays: dict[str, np.ndarray]) -> None:
        if self.parts and set(arrays) != set(self.parts[0]):
            raise ValueError(f"episode keys {sorted(arrays)} differ from the shard's {sorted(self.parts[0])}")
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            shapes = {k: v.shape for k, v in arrays.items()}
            raise ValueError(f"episode arrays must share their length along axis 0, got {shapes}")
        if "first" in arrays and not (arrays["first"][0] and not arrays["first"][1:].any()):
            raise ValueError("an episode's `first` must be True on its first row only")
        self.parts.append(arrays)
        self.num_steps += lengths.pop()

    def close(self) -> None:
        if not self.parts:
            raise ValueError(f"shard {self.path} has no episodes; an empty shard is not written")
        write_shard(self.path, {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]})
        self.parts = []


def episodes(shard: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """(start, stop) row ranges of the episodes in a shard, from `first` (or, without it, `episode` ids)."""
    if "first" in shard:
        first = np.asarray(shard["first"], dtype=bool)
    elif "episode" in shard:
        ids = np.asarray(shard["episode"])
        first = np.ones(len(ids), dtype=bool)
        first[1:] = ids[1:] != ids[:-1]
    else:
        raise ValueError(f"a shard needs `first` or `episode` to mark episodes; it has {sorted(shard)}")
    num_rows = len(first)
    if num_rows == 0:
        return []
    if not first[0]:
        raise ValueError("a shard must start at an episode's first row (first[0] is False): "
                         "episodes never cross shards")
    starts = np.flatnonzero(first)  # (E,)
    stops = np.append(starts[1:], num_rows)  # (E,)
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _window_starts(bounds: list[tuple[int, int]], length: int, rng: np.random.Generator) -> np.ndarray:
    """Non-overlapping window starts tiling each episode from a random offset (shuffled later).

    An episode of n >= length rows gives n // length windows; the random offset moves the tiling each
    epoch, so over epochs every start position is used while one epoch still shows each row about once.
    """
    starts = []
    for start, stop in bounds:
        count = (stop - start) // length
        if count == 0:
            continue  # episode shorter than a window: skipped
        offset = int(rng.integers(0, (stop - start) - count * length + 1))
        starts.append(start + offset + length * np.arange(count))
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


class _OpenShard:
    """One shard held in memory while the stream draws its windows in a shuffled order."""

    def __init__(self, path: Path, keys: Sequence[str], length: int, rng: np.random.Generator) -> None:
        with np.load(path, allow_pickle=False) as npz:
            boundary_key = "first" if "first" in npz.files else "episode"
        wanted = list(dict.fromkeys([*keys, boundary_key]))
        arrays = _read_npz(path, wanted)
        self.starts = rng.permutation(_window_starts(episodes(arrays), length, rng))
        self.arrays = {k: arrays[k] for k in keys}
        self.next = 0

    @property
    def remaining(self) -> int:
        return len(self.starts) - self.next

    def pop(self, length: int) -> dict[str, np.ndarray]:
        start = int(self.starts[self.next])
        self.next += 1
        # copies: a window must not keep its whole shard alive after the stream drops it
        return {k: v[start:start + length].copy() for k, v in self.arrays.items()}


def _stream_epoch(paths: list[Path], length: int, keys: Sequence[str], rng: np.random.Generator,
                  shards_in_memory: int) -> Iterator[dict[str, np.ndarray]]:
    """Windows of `paths` in a shuffled order, holding at most `shards_in_memory` shards at once.

    A pool of open shards; each window is drawn from a pool shard chosen with probability proportional
    to its remaining windows (uniform over the pooled windows), and an exhausted shard is replaced by
    the next one. Mixing spans the pool, so bigger pools give less correlated batches.
    """
    pending = iter(paths)
    pool: list[_OpenShard] = []
    while True:
        while len(pool) < shards_in_memory:
            path = next(pending, None)
            if path is None:
                break
            shard = _OpenShard(path, keys, length, rng)
            if shard.remaining:
                pool.append(shard)
        if not pool:
            return
        remaining = np.cumsum([s.remaining for s in pool])  # (pool,)
        pick = int(np.searchsorted(remaining, rng.integers(remaining[-1]), side="right"))
        yield pool[pick].pop(length)
        if pool[pick].remaining == 0:
            pool.pop(pick)


def iter_windows(
    shard_paths: Sequence[str | Path],
    length: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    keys: Sequence[str] = DEFAULT_WINDOW_KEYS,
    loop: bool = True,
    shards_in_memory: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream windows of `length` consecutive rows of one episode: {key: (length, ...) array}.

    No window crosses an episode boundary; episodes shorter than `length` are skipped. Each epoch
    shuffles the shard order and the windows deterministically from (seed, epoch). Ranks see disjoint
    data: shard i goes to rank i % world_size; with fewer shards than ranks every rank reads every
    shard and window j of the shared stream goes to rank j % world_size. loop=False: one epoch only.
    """
    paths = [Path(p) for p in shard_paths]
    if not paths:
        raise ValueError("iter_windows needs at least one shard path (is the split empty?)")
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if shards_in_memory < 1:
        raise ValueError(f"shards_in_memory must be >= 1, got {shards_in_memory}")
    if not keys:
        raise ValueError("iter_windows needs at least one key to return")
    split_by_shard = len(paths) >= world_size
    epoch = 0
    while True:
        if split_by_shard:
            mine = paths[rank::world_size]
            rng = np.random.default_rng([seed, epoch, rank])
        else:
            mine = paths
            rng = np.random.default_rng([seed, epoch])  # the same stream on every rank, dealt out below
        order = rng.permutation(len(mine))
        yielded = 0
        for index, window in enumerate(_stream_epoch([mine[i] for i in order], length, keys, rng, shards_in_memory)):
            if split_by_shard or index % world_size == rank:
                yielded += 1
                yield window
        if yielded == 0:
            raise ValueError(f"rank {rank} of {world_size} got no window of {length} steps from {len(mine)} "
                             f"shard(s): every episode there is shorter than {length}, or there are fewer "
                             f"windows than ranks")
        if not loop:
            return
        epoch += 1
