"""What the two distillation stages share: the frozen teacher, latent windows, the teacher-forcing pack as
a velocity function, gradient sync, resumable multi-network checkpoints, quick held-out metrics and the
export of the student as a world-model folder.

Stage 3 (`train.consistency`) and stage 4 (`train.dmd`) each stay one readable loop on top of this.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from envs.dataset import iter_windows, list_shards, read_meta
from train.common import Dist, barrier
from train.teacher import LATENT_KEYS, check_same_config, encode_split, start_contexts
from worldmodel.checkpoint import CheckpointError, flatten_optimizer, load_into, load_tensors, read_config, read_state, recover, remove_stale_temps, save_checkpoint, unflatten_optimizer
from worldmodel.config import DiTConfig, SamplingConfig, to_dict
from worldmodel.dit import CausalDiT, Heads
from worldmodel.flow import guided, sampling_levels
from worldmodel.runtime import export_world_model, load_dit
from worldmodel.sampler import solver_step
from worldmodel.tokenizer import FrameTokenizer


def add_common_args(p: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
    p.add_argument("--teacher", required=True, help="the teacher's world-model folder (RUN/model of train.teacher, or assets/...)")
    p.add_argument("--data", required=True, help="dataset folder written by train.collect")
    p.add_argument("--latents", default=None, help="latents already encoded by train.teacher (TEACHER_RUN/latents); default: encode into OUT/latents")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, exported model)")
    p.add_argument("--steps", type=int, default=steps, help="student optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch, help="windows per step, over all processes")
    p.add_argument("--frames", type=int, default=9, help="frames per window")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--guidance", type=float, default=1.0, help="action guidance of the teacher (real score); 1 = none")
    p.add_argument("--sample-steps", type=int, default=2, help="denoising steps the exported student samples with")
    p.add_argument("--eval-every", type=int, default=100, help="quick held-out metrics every N steps (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--export-only", action="store_true", help="write OUT/model from the latest checkpoint without training")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "frames", "log_every", "ckpt_every", "sample_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.eval_every < 0 or args.warmup < 0:
        p.error("--eval-every and --warmup must be >= 0")
    if not 0 <= args.ema < 1:
        p.error("--ema must lie in [0, 1)")


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def load_teacher(path: str | Path, device: torch.device) -> tuple[CausalDiT, dict]:
    """The frozen teacher DiT and its world-model info (config.json)."""
    path = Path(path)
    info = read_config(path)
    if info.get("kind") != "world_model":
        raise CheckpointError(f"{str(path)!r} is not a world-model folder (config.json kind {info.get('kind')!r})")
    dit = load_dit(path / "dit", device).requires_grad_(False)
    return dit, info


def prepare_latents(args: argparse.Namespace, teacher_dir: Path, d: Dist) -> tuple[list[Path], list[Path]]:
    """Train and held-out latent shards: from --latents, or encoded once into OUT/latents with the teacher's tokenizer."""
    tok_dir = teacher_dir / "tokenizer"
    if args.latents:
        lat = Path(args.latents)
        # checked here: list_shards' own hint names train.collect, which records frames, not latents
        train = list_shards(lat, "train") if (lat / "train").is_dir() else []
        if not train:
            guess = f"did you mean --latents {lat / 'latents'}? " if (lat / "latents" / "train").is_dir() else ""
            raise ValueError(f"--latents {lat} holds no latent shards (no train/shard_*.npz in it); {guess}train.teacher writes them "
                             f"to TEACHER_RUN/latents (`python -m train.teacher --data DATA --tokenizer TOK_RUN/tokenizer --out TEACHER_RUN`), "
                             f"or drop --latents to encode the data into {Path(args.out) / 'latents'}")
        stamp = lat / "tokenizer.json"
        if stamp.exists() and json.loads(stamp.read_text()) != read_config(tok_dir):
            raise ValueError(f"{lat} was encoded with another tokenizer than the teacher's; drop --latents")
        return train, list_shards(lat, "heldout") if (lat / "heldout").is_dir() else []
    lat = Path(args.out) / "latents"
    tok = FrameTokenizer.load(tok_dir, device=d.device).eval()
    lat.mkdir(parents=True, exist_ok=True)
    stamp = lat / "tokenizer.json"
    if stamp.exists() and json.loads(stamp.read_text()) != read_config(tok_dir):
        raise ValueError(f"{lat} was encoded with another tokenizer; delete it or use a new --out")
    if d.is_main:
        stamp.write_text(json.dumps(read_config(tok_dir)))
    train = encode_split(Path(args.data), "train", tok, lat, d.rank, d.world_size)
    held = encode_split(Path(args.data), "heldout", tok, lat, d.rank, d.world_size)
    barrier()
    return train, held


def windows(paths: list[Path], frames: int, per_rank: int, d: Dist, seed: int):
    """Endless batches {latents (B, T, C, h, w) float16, actions, rewards, terminated} of real windows."""
    it = iter_windows(paths, frames, seed=seed, rank=d.rank, world_size=d.world_size, keys=LATENT_KEYS[:4], shards_in_memory=8)
    while True:
        ws = [next(it) for _ in range(per_rank)]
        yield {k: torch.from_numpy(np.stack([w[k] for w in ws])).to(d.device) for k in LATENT_KEYS[:4]}


def fixed_batch(paths: list[Path], frames: int, n: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed set of held-out windows for the quick metrics (the same at every evaluation)."""
    it = iter_windows(paths, frames, seed=seed, rank=0, world_size=1, keys=LATENT_KEYS[:4], loop=False)
    ws = []
    for w in it:
        ws.append(w)
        if len(ws) == n:
            break
    if not ws:
        raise ValueError(f"no held-out window of {frames} frames")
    return {k: torch.from_numpy(np.stack([w[k] for w in ws])).to(device) for k in LATENT_KEYS[:4]}


def pack_velocity(model: CausalDiT, clean: torch.Tensor, t_clean: torch.Tensor, actions: torch.Tensor, guidance: float = 1.0, heads: list | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The teacher-forcing pack as a velocity function (x_s, s) -> v over the noisy stream, the clean
    stream fixed. With guidance != 1 the conditional and null-action passes run as one batch of 2B.
    `heads`, when given, receives the heads of the clean stream."""
    null = torch.full_like(actions, model.null_action)

    def v(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            out, h = model.forward_pack(clean, x, t_clean, s, actions)
        else:
            two = lambda a, b: torch.cat([a, b])  # noqa: E731
            out2, h = model.forward_pack(two(clean, clean), two(x, x), two(t_clean, t_clean), two(s, s), two(actions, actions), two(actions, null))
            c, u = out2.chunk(2)
            out = guided(c.float(), u.float(), guidance).to(c.dtype)
        if heads is not None and torch.is_grad_enabled():  # not from no-grad / forward-mode (JVP) calls
            heads.append(h)
        return out

    return v


def head_loss(heads: Heads, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's reward/end head losses on real labels (keeps the student's heads calibrated)."""
    import torch.nn.functional as F

    B = batch["rewards"].shape[0]
    r = batch["rewards"].float()
    heads = Heads(*(h[:B] for h in (heads.reward_logit, heads.reward_value, heads.end_logit)))
    event = (r != 0).float()
    l_event = F.binary_cross_entropy_with_logits(heads.reward_logit, event)
    l_value = ((heads.reward_value - r) ** 2 * event).sum() / event.sum().clamp(min=1)
    l_end = F.binary_cross_entropy_with_logits(heads.end_logit, batch["terminated"].float())
    return l_event + l_value + l_end


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


def lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / max(1, warmup))


# ----- checkpoints of several networks -----
def save_state(ckpt: Path, cfg: DiTConfig, nets: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], state: dict) -> None:
    tensors = {name: net.state_dict() for name, net in nets.items()}
    skel = {}
    for name, opt in opts.items():
        tensors[f"opt_{name}"], skel[name] = flatten_optimizer(opt)
    save_checkpoint(ckpt, {"kind": "dit", "config": to_dict(cfg)}, tensors, {**state, "optimizers": skel})


def load_state(ckpt: Path, cfg: DiTConfig, nets: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], device: torch.device) -> dict:
    """Restore networks and optimizers saved by save_state; returns the saved state (step, args, wall_s...)."""
    check_same_config(ckpt, cfg)
    state = read_state(ckpt)
    if state is None or "step" not in state or "optimizers" not in state:
        raise CheckpointError(f"{ckpt} has no usable state.json (step, optimizers); it is not a training checkpoint of this stage")
    for name, net in nets.items():
        load_into(net, ckpt, name)
    for name, opt in opts.items():
        unflatten_optimizer(opt, {k: v.to(device) for k, v in load_tensors(ckpt, f"opt_{name}").items()}, state["optimizers"][name])
    return state


def resume_or_start(ckpt: Path, cfg: DiTConfig, nets: dict, opts: dict, d: Dist, export_only: bool) -> dict:
    recover(ckpt)
    if d.is_main and not export_only:  # only the checkpoint's writer (rank 0 of a training run) may
        remove_stale_temps(ckpt)  # remove the temp folders of saves a kill cut short
    if ckpt.exists():
        return load_state(ckpt, cfg, nets, opts, d.device)
    if export_only:
        raise CheckpointError(f"--export-only needs a checkpoint in {ckpt}")
    return {"step": 0, "wall_s": 0.0}


# ----- quick held-out metrics (teacher forcing, few steps) -----
@torch.no_grad()
def tf_sample(model: CausalDiT, batch: dict[str, torch.Tensor], steps: int, noise: torch.Tensor, solver: str = "consistency", guidance: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every frame of the window denoised in `steps` steps given the real frames before it (teacher forcing)."""
    x0 = batch["latents"].float()
    a = batch["actions"].long()
    zeros = torch.zeros(a.shape, device=x0.device)
    v = pack_velocity(model, x0, zeros, a, guidance)
    levels = sampling_levels(steps)
    x = noise
    for s, s_next in zip(levels[:-1], levels[1:]):
        x = solver_step(x, v(x, torch.full(a.shape, s, device=x.device)), s, s_next, solver, generator)
    return x


def psnr_latent_decoded(tok: FrameTokenizer, pred: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB, 0-255) between decoded predictions and decoded reference latents (B, T, C, h, w)."""
    a = tok.decode(pred.flatten(0, 1).float()).float()
    b = tok.decode(ref.flatten(0, 1).float()).float()
    mse = ((a - b) ** 2).mean().clamp(min=1e-10)
    return float(10 * torch.log10(255.0**2 / mse))


# ----- export -----
def export_student(out: Path, ema: CausalDiT, teacher_dir: Path, teacher_info: dict, data: Path, stage: str, step: int, sample_steps: int, card: str) -> Path:
    cfg = ema.cfg
    frames, actions = start_contexts(data, n=16, length=cfg.sink_chunks * cfg.frames_per_chunk + 3 * cfg.frames_per_chunk)
    info = {k: v for k, v in teacher_info.items() if k not in ("kind", "format_version", "sampling", "trained")}
    info["sampling"] = to_dict(SamplingConfig(steps=sample_steps, solver="consistency"))
    info["trained"] = {"stage": stage, "steps": step, "teacher": str(teacher_dir), "data": str(data)}
    remove_stale_temps(out / "model")  # export_world_model writes through the same temp-folder scheme
    return export_world_model(out / "model", ema, teacher_dir / "tokenizer", info, frames, actions, card)


def hardware(d: Dist) -> str:
    return torch.cuda.get_device_name(0) if d.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def command_line(module: str, args: argparse.Namespace) -> str:
    parts = []
    for k, v in vars(args).items():
        if k == "export_only" or v is None or v is False:
            continue
        parts.append(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}")
    return f"python -m {module} " + " ".join(parts)


class Timer:
    def __init__(self, before: float) -> None:
        self.before, self.t0 = before, time.time()

    def total(self) -> float:
        return self.before + time.time() - self.t0


def check_data(args: argparse.Namespace, info: dict) -> dict:
    meta = read_meta(args.data)
    if meta["num_actions"] != len(info["action_meanings"]):
        raise ValueError(f"the dataset has {meta['num_actions']} actions but the teacher {len(info['action_meanings'])}")
    if tuple(meta["frame_size"]) != tuple(info["frame_size"]):
        raise ValueError(f"dataset frames are {meta['frame_size']} but the teacher's are {info['frame_size']}")
    return meta


def finite_or_raise(x: torch.Tensor, what: str, step: int) -> None:
    if not math.isfinite(float(x.detach())):
        raise FloatingPointError(f"{what} is {float(x.detach())} at step {step}; lower the learning rate")
