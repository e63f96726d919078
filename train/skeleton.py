"""The skeleton every training stage runs on: processes, seeds, the resumable checkpoint, the learning-rate
schedule, resume-safe logs with a periodic evaluation hook, and the export of a world model with its card.

A stage file holds its method (its loss and its update) and its command line, and drives one `Run`:

    run = Run.start(args, "teacher", Schedule(args.warmup, args.steps, min_ratio=0.1))
    run.resume(cfg, nets={"model": ema, "raw": dit}, opts={"dit": opt})   # or a fresh start
    while run.training():
        loss, parts = ...                                  # the method
        gnorm = run.update(opt, loss, dit, args.lr)        # scheduled lr, backward, clip, finite check, step
        run.step_done(parts, gnorm)                        # logs (and the eval hook), checkpoints
    run.finish()

Checkpoint format 2 (one for every stage), the folder `OUT/checkpoint` (written atomically by
`worldmodel.checkpoint.save_checkpoint`):
    config.json          {"kind": "training", "stage": ..., "network": "dit" | "tokenizer", "config": {...}}
    <net>.safetensors    one per named network; `model` is what the export uses (EMA weights where there
                         are some), `raw` the trained weights when they differ, `critic` (DMD) ...
    opt_<name>.safetensors  one per named optimizer (its tensors; the rest of its state in state.json)
    rng.safetensors      every rank's torch RNG state (restored when the process count is the same)
    state.json           {"format": 2, "stage", "step", "wall_s", "world_size", "args", "optimizers"}
Checkpoints written before format 2 (config kind "dit" or "tokenizer_train") still load: `legacy_groups`
says where their optimizer and weights lie.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from train.common import Dist, Logger, all_reduce_mean, barrier, cleanup_dist, seed_everything, setup_dist, sync_grads, write_json
from train.dataset import episodes, list_shards, load_shard
from train.export import export_world_model
from worldmodel.checkpoint import (CheckpointError, flatten_optimizer, load_into, load_tensors, read_config, read_state, recover,
                                   remove_stale_temps, save_checkpoint, unflatten_optimizer)
from worldmodel.config import from_dict, to_dict
from worldmodel.dit import CausalDiT

FORMAT = 2
NETWORK_KINDS = {"DiTConfig": "dit", "TokenizerConfig": "tokenizer"}
LEGACY_KINDS = {"dit": "dit", "tokenizer_train": "tokenizer"}  # config.json kinds before format 2 -> network


class UsageError(ValueError):
    """Bad command-line input, data or checkpoint; reported as one line `error: ...`, exit status 2."""


@contextlib.contextmanager
def usage_errors(prefix: str = "") -> Iterator[None]:
    """Report what a missing or malformed input raises (file, value, checkpoint) as a UsageError."""
    try:
        yield
    except UsageError:
        raise
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UsageError(f"{prefix}{e}") from None


def fail(e: BaseException | str) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def stage_main(parse_args: Callable[[list[str] | None], argparse.Namespace], train: Callable[[argparse.Namespace], int]) -> Callable[[list[str] | None], int]:
    """A stage's `main(argv)`: parse the command line, train, and report a UsageError as one line with exit 2."""
    def main(argv: list[str] | None = None) -> int:
        args = parse_args(argv)
        try:
            return train(args)
        except UsageError as e:
            return fail(e)
    return main


# ----- seeds -----
PURPOSES = ("global", "data", "noise", "shared", "eval", "median", "stats")


class Seeds:
    """Every random stream of a run, drawn from one numpy SeedSequence(--seed): one stream per purpose, per rank
    (or shared by every rank), per start step (a resumed run starts fresh streams instead of replaying)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def int(self, purpose: str, step: int = 0, shared: bool = False) -> int:
        """A 63-bit seed; `shared`: the same on every rank (data streams split by rank themselves, exit steps)."""
        assert purpose in PURPOSES, f"seed purpose {purpose!r} is not one of {PURPOSES}"
        key = (PURPOSES.index(purpose), 0 if shared else self.rank + 1, step)
        words = np.random.SeedSequence(self.seed, spawn_key=key).generate_state(2, np.uint32)
        return (int(words[0]) << 31) ^ int(words[1])

    def generator(self, purpose: str, step: int = 0, shared: bool = False, device: str | torch.device = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.int(purpose, step, shared))


# ----- learning-rate schedule -----
@dataclass(frozen=True)
class Schedule:
    """Linear warm-up over `warmup` steps, then a cosine from 1 to `min_ratio` over the remaining steps, or over
    the wall budget `max_minutes` (all resumed parts) if that runs out first; min_ratio 1 holds the rate after
    warm-up (the distillation stages). `factor` multiplies each optimizer's base learning rate."""

    warmup: int
    steps: int
    min_ratio: float = 0.1
    max_minutes: float | None = None

    def factor(self, step: int, wall_s: float = 0.0) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.max_minutes is not None:
            progress = max(progress, wall_s / (60 * self.max_minutes))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----- checkpoint format 2 -----
def network_kind(cfg: Any) -> str:
    name = type(cfg).__name__
    assert name in NETWORK_KINDS, f"no checkpoint network kind for a {name}; add it to NETWORK_KINDS"
    return NETWORK_KINDS[name]


def read_network_config(ckpt: Path, cls: type, hint: str = "use another --out") -> Any:
    """The network config a training checkpoint was written with (format 2 or the older kinds, which include
    a plain network folder such as a model's dit/); `hint` ends the error of a checkpoint of another kind."""
    saved = read_config(ckpt)
    network = saved.get("network") if saved.get("kind") == "training" else LEGACY_KINDS.get(saved.get("kind"))
    if network != NETWORK_KINDS[cls.__name__]:
        raise CheckpointError(f"{str(ckpt)!r} is not a training checkpoint of a {NETWORK_KINDS[cls.__name__]} "
                              f"(config.json kind {saved.get('kind')!r}, network {network!r}); {hint}")
    try:
        return from_dict(cls, saved["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"network config in {str(ckpt)!r} is invalid: {e}") from None


def legacy_groups(kind: str, state: dict, nets: dict, opts: dict) -> tuple[dict[str, str], dict[str, tuple[str, dict]]]:
    """Where a checkpoint keeps each network (name -> tensor group) and optimizer (name -> group, skeleton).
    Before format 2: the teacher and the tokenizer kept their one optimizer in `optimizer.safetensors`
    (skeleton state["optimizer"]); the tokenizer named its trained weights `model` and its EMA `ema`."""
    net_groups = {name: name for name in nets}
    if state.get("format") == FORMAT or "optimizers" in state:  # format 2, or the students' older layout (the same)
        return net_groups, {name: (f"opt_{name}", state["optimizers"][name]) for name in opts}
    if "optimizer" not in state or len(opts) > 1:
        raise CheckpointError("its state.json has no optimizer state this stage can read; it is not a training checkpoint of this stage "
                              "(delete the checkpoint folder to train from scratch)")
    if kind == "tokenizer_train":
        net_groups = {name: {"raw": "model", "model": "ema"}[name] for name in nets}
    return net_groups, {name: ("optimizer", state["optimizer"]) for name in opts}


def save_run(ckpt: Path, stage: str, cfg: Any, nets: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer],
             rng: list[torch.Tensor], state: dict) -> None:
    tensors = {name: net.state_dict() for name, net in nets.items()}
    skels = {}
    for name, opt in opts.items():
        tensors[f"opt_{name}"], skels[name] = flatten_optimizer(opt)
    tensors["rng"] = {f"torch.rank{r}": s for r, s in enumerate(rng)}
    config = {"kind": "training", "stage": stage, "network": network_kind(cfg), "config": to_dict(cfg)}
    save_checkpoint(ckpt, config, tensors, {"format": FORMAT, "stage": stage, **state, "world_size": len(rng), "optimizers": skels})


def load_run(ckpt: Path, cfg: Any, nets: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], d: Dist,
             stage: str | None = None) -> dict:
    """Restore networks, optimizers and this rank's RNG from a training checkpoint; returns its state.json.
    It resumes only into networks of the same shape, and, given `stage`, only a checkpoint of that stage (a
    consistency run's variant is part of its stage: the same student network trains under another objective)."""
    if read_network_config(ckpt, type(cfg)) != cfg:
        raise CheckpointError(f"{ckpt} holds a network of another shape ({read_config(ckpt).get('config')}); use a new --out or the same arguments")
    state = read_state(ckpt)
    if state is None or "step" not in state:
        raise CheckpointError(f"{ckpt} has no usable state.json (step, optimizers); it is not a training checkpoint (delete it to start over)")
    saved = state.get("stage")  # checkpoints before format 2 did not record it
    if stage is not None and saved is not None and saved != stage:
        raise CheckpointError(f"{ckpt} is a checkpoint of stage {saved!r}, not {stage!r}; use a new --out (or the arguments it trained with)")
    net_groups, opt_groups = legacy_groups(read_config(ckpt)["kind"], state, nets, opts)
    for name, net in nets.items():
        load_into(net, ckpt, net_groups[name])
    for name, opt in opts.items():
        group, skel = opt_groups[name]
        unflatten_optimizer(opt, {k: v.to(d.device) for k, v in load_tensors(ckpt, group).items()}, skel)
    if (ckpt / "rng.safetensors").is_file() and state.get("world_size") == d.world_size:  # else the fresh per-rank seeds
        torch.set_rng_state(load_tensors(ckpt, "rng")[f"torch.rank{d.rank}"])
    return state


def gather_rng(d: Dist) -> list[torch.Tensor]:
    state = torch.get_rng_state()
    if d.world_size == 1:
        return [state]
    out: list[torch.Tensor | None] = [None] * d.world_size
    dist.all_gather_object(out, state)
    return out


# ----- the run -----
class Run:
    """One training run's lifecycle: processes, seeds, wall clock, schedule, checkpoint, logs, evaluation hook."""

    def __init__(self, args: argparse.Namespace, stage: str, schedule: Schedule, d: Dist, export_only: bool) -> None:
        self.args, self.stage, self.schedule, self.d, self.export_only = args, stage, schedule, d, export_only
        self.out = Path(args.out)
        self.ckpt = self.out / "checkpoint"
        self.seeds = Seeds(args.seed, d.rank)
        seed_everything(self.seeds.int("global") % 2**32)  # weight init, the VAE's posterior samples
        self.t0, self.wall_before = time.time(), 0.0
        self.step = self.saved_step = 0
        self.state: dict = {}
        self.evaluate: Callable[[], dict[str, float]] | None = None
        self.eval_every = 0
        self.gnorm, self.lr_factor = float("nan"), float("nan")

    @classmethod
    def start(cls, args: argparse.Namespace, stage: str, schedule: Schedule, export_only: bool = False) -> "Run":
        """Join the process group (torchrun) and seed every stream; a device that cannot work is a UsageError.
        `export_only`: load the checkpoint and export, train nothing, write no checkpoint."""
        with usage_errors("--device: "):
            d = setup_dist(args.device)
        if args.batch_size % d.world_size:
            raise UsageError(f"--batch-size {args.batch_size} is not divisible by {d.world_size} processes")
        return cls(args, stage, schedule, d, export_only)

    def wall(self) -> float:
        """Seconds of this run so far, all resumed parts included."""
        return self.wall_before + time.time() - self.t0

    def has_checkpoint(self) -> bool:
        """Whether OUT/checkpoint exists, a save that a kill cut short between its renames included."""
        recover(self.ckpt)
        return self.ckpt.exists()

    def resume(self, cfg: Any, nets: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer]) -> argparse.Namespace:
        """Resume from OUT/checkpoint if it exists (else a fresh start), open the logs from that step, and return
        the arguments the checkpoint trained with (for --export-only's model card; else this run's)."""
        self.cfg, self.nets, self.opts = cfg, nets, opts
        recover(self.ckpt)
        if self.d.is_main and not self.export_only:  # only the checkpoint's writer (rank 0 of a training run) may
            remove_stale_temps(self.ckpt)  # remove the temp folders of saves a kill cut short
        if self.ckpt.exists():
            with usage_errors("cannot resume: "):
                self.state = load_run(self.ckpt, cfg, nets, opts, self.d, self.stage)
            self.step = self.saved_step = int(self.state["step"])
            self.wall_before = float(self.state.get("wall_s", 0.0))  # checkpoints before wall_s was recorded count 0
            if self.d.is_main:
                print(f"resumed from {self.ckpt} at step {self.step}")
        elif self.export_only:
            raise UsageError(f"--export-only needs a checkpoint in {self.ckpt}")
        else:
            self.saved_step = -1  # no checkpoint yet: finish() writes one even if no step runs
        self.log = Logger(self.out, enabled=self.d.is_main, resume_step=self.step)
        if self.d.is_main and not self.export_only:
            write_json(self.out / "args.json", vars(self.args))
        self.bar = tqdm(total=self.schedule.steps, initial=self.step, desc=self.stage, disable=not self.d.is_main or self.export_only, dynamic_ncols=True)
        self.acc: dict[str, float] = {}
        self.seen, self.t_log = 0, time.time()
        return argparse.Namespace(**self.state["args"]) if self.export_only else self.args

    def set_eval(self, evaluate: Callable[[], dict[str, float]] | None, every: int) -> None:
        """Metrics logged at step 0 of a fresh run, then every `every` steps (on a logged step) and at the end."""
        self.evaluate, self.eval_every = evaluate, every
        if evaluate is not None and every and self.step == 0 and not self.export_only:
            self.log.log(0, **evaluate())

    def out_of_time(self) -> bool:  # every rank stops at the same step
        budget = self.schedule.max_minutes
        return budget is not None and all_reduce_mean(float(self.wall() >= 60 * budget), self.d) > 0

    def training(self) -> bool:
        return self.step < self.schedule.steps and not self.export_only and not self.out_of_time()

    def update(self, opt: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module, lr: float, clip: float = 1.0,
               sync: bool = False, what: str = "loss") -> float:
        """One optimizer step at lr times the schedule: backward, the gradient all-reduce where DDP does not do it
        (`sync`), clipping, then a finite check that every rank agrees on (the norm of the all-reduced gradients)."""
        self.lr_factor = self.schedule.factor(self.step, self.wall())
        for group in opt.param_groups:
            group["lr"] = lr * self.lr_factor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sync:
            sync_grads(module, self.d)
        gnorm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        if not torch.isfinite(gnorm):
            raise FloatingPointError(f"{what}: gradient norm is {gnorm.item()} at step {self.step} (loss {loss.item()}); lower the learning rate")
        opt.step()
        return float(gnorm)

    def step_done(self, parts: dict[str, float], gnorm: float) -> None:
        """Count one training step: accumulate its parts; every --log-every steps log their means over the
        processes (with the evaluation hook's metrics every eval_every steps); checkpoint every --ckpt-every."""
        self.step += 1
        self.seen += 1
        for k, v in parts.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.bar.update(1)
        last = self.step == self.schedule.steps
        if self.step % self.args.log_every == 0 or last:
            dt = time.time() - self.t_log
            scalars = {k: all_reduce_mean(v / self.seen, self.d) for k, v in self.acc.items()}
            scalars.update(lr=self.args.lr * self.lr_factor, grad_norm=gnorm, steps_per_s=self.seen / dt, wall_s=self.wall())
            if self.evaluate is not None and self.eval_every and (self.step % self.eval_every == 0 or last):
                scalars.update(self.evaluate())
            self.log.log(self.step, **scalars)
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items() if k.startswith(("loss", "eval/"))})
            self.acc, self.seen, self.t_log = {}, 0, time.time()
        if self.step % self.args.ckpt_every == 0 or last:
            self.save()

    def save(self) -> None:
        rng = gather_rng(self.d)  # every rank takes part
        if self.d.is_main:
            save_run(self.ckpt, self.stage, self.cfg, self.nets, self.opts, rng, {"step": self.step, "wall_s": self.wall(), "args": vars(self.args)})
        self.saved_step = self.step
        barrier()

    def finish(self) -> None:
        """Checkpoint a run that stopped between checkpoints (the wall budget) or before any (a run with nothing to
        train, e.g. pixel patches, has no checkpoint), then close the logs."""
        if self.step != self.saved_step and not self.export_only and self.schedule.steps > 0:
            self.save()
        self.bar.close()
        self.log.close()

    def close(self) -> None:
        cleanup_dist()


# ----- export of a world model, with its card -----
def start_contexts(data: Path, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `length` frames (and actions) of up to n held-out episodes (train episodes if none)."""
    frames, actions = [], []
    for split in ("heldout", "train"):
        for shard in list_shards(data, split):
            arr = load_shard(shard)
            for s, e in episodes(arr):
                if e - s >= length:
                    frames.append(arr["frames"][s:s + length])
                    actions.append(arr["actions"][s:s + length])
                if len(frames) == n:
                    return np.stack(frames), np.stack(actions).astype(np.int64)
        if frames:
            break
    if not frames:
        raise ValueError(f"no episode in {data} has {length} frames for a start context")
    return np.stack(frames), np.stack(actions).astype(np.int64)


def export_world(out: Path, dit: CausalDiT, tokenizer_dir: Path, info: dict, data: Path, card: str) -> Path:
    """OUT/model: the world-model folder of `dit` (its sampling weights) with real start contexts and its card."""
    cfg = dit.cfg
    frames, actions = start_contexts(data, n=16, length=cfg.sink_chunks * cfg.frames_per_chunk + 3 * cfg.frames_per_chunk)
    path = export_world_model(out / "model", dit, tokenizer_dir, info, frames, actions, card)
    print(f"exported the world model to {path}")
    return path


def hardware(d: Dist) -> str:
    return torch.cuda.get_device_name(0) if d.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def command_line(module: str, args: argparse.Namespace) -> str:
    """The command that reproduces a run (flags at their values; --export-only and unset flags left out)."""
    parts = []
    for k, v in vars(args).items():
        if k == "export_only" or v is None or v is False:
            continue
        parts.append(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}")
    return f"python -m {module} " + " ".join(parts)


def model_card(title: str, lines: list[str], module: str, args: argparse.Namespace) -> str:
    """README.md of an exported model: what it is, how it was trained, and the command that reproduces it."""
    return f"# World model: {title}\n\n" + "".join(f"- {line}\n" for line in lines) + f"\nReproduce:\n\n    {command_line(module, args)}\n"


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")

