"""What every training stage shares: process-group setup, seeding, logging, EMA."""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from worldmodel.device import resolve_device


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPUs); else a single process.
    A device this torch cannot use (e.g. "cuda" on a CPU-only build) is a ValueError that says why."""
    dev = resolve_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        return Dist(rank, world, local, dev)
    return Dist(0, 1, 0, dev)


def cleanup_dist() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sync_grads(module: torch.nn.Module, d: Dist) -> None:
    """Average gradients over processes (one flat all-reduce; used where DDP's forward hook cannot be)."""
    if d.world_size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world_size
    o = 0
    for g in grads:
        g.copy_(flat[o:o + g.numel()].view_as(g))
        o += g.numel()


def all_reduce_mean(x: float, d: Dist) -> float:
    if d.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


class Logger:
    """Scalars to TensorBoard (`tensorboard --logdir RUN_DIR`) and to `RUN_DIR/log.jsonl`; rank 0 only.

    `resume_step` is the step of the checkpoint the run resumed from (0: a fresh start). The rows a killed run
    logged after that checkpoint are logged again by the resumed run, so they are dropped from log.jsonl and
    purged from TensorBoard; a fresh start drops every old row (they belong to a run whose state is gone).
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            truncate_log(run_dir / "log.jsonl", resume_step)
            # TensorBoard hides the older events at steps >= purge_step (a step-0 row of a fresh start included)
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else 0)
            self.jsonl = open(run_dir / "log.jsonl", "a")
        self.t0 = time.time()

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time() - self.t0, 2), **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def truncate_log(path: Path, resume_step: int) -> None:
    """Keep the rows of log.jsonl up to `resume_step` (none when it is 0), atomically: a temp file renamed over it.
    A row cut short by a kill does not parse and is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if resume_step and isinstance(row, dict) and row.get("step", resume_step + 1) <= resume_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
