"""What the two distillation stages share: their common flags, the start of a run from the frozen teacher
and its latents, the teacher-forcing pack as a velocity function, quick held-out metrics and the export of
the student as a world-model folder.

Stage 3 (`train.consistency`) and stage 4 (`train.dmd`) each stay one readable loop on this and
`train.skeleton`.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from train.dataset import read_meta
from train.latents import encode_latents, existing_latents, fixed_batch
from train.objectives import gate_loss
from train.skeleton import Run, Schedule, check_positive, export_world, usage_errors
from worldmodel import cli
from worldmodel.checkpoint import CheckpointError, read_config
from worldmodel.config import SamplingConfig
from worldmodel.dit import CausalDiT, load_dit
from worldmodel.flow import guided, sampling_levels
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
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--export-only", action="store_true", help="write OUT/model from the latest checkpoint without training")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget (all resumed parts): stop and export when it is spent, "
                   "or at --steps if that comes first (equal-budget comparisons)")
    p.add_argument("--gate-weight", type=float, default=1.0, help="networks with a change gate: weight of the gate's cross-entropy on real "
                   "windows, which keeps the gate the student inherits in step with its features (0: the gate is left as it is)")
    p.add_argument("--change-threshold", type=float, default=0.05, help="the gate's target: a latent cell changes when it moves by more than "
                   "this (normalised latent units; as the teacher's train.teacher --change-threshold)")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_positive(p, args, ("steps", "batch_size", "frames", "log_every", "ckpt_every", "sample_steps"))
    if args.eval_every < 0 or args.warmup < 0:
        p.error("--eval-every and --warmup must be >= 0")
    if not 0 <= args.ema < 1:
        p.error("--ema must lie in [0, 1)")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        p.error("--max-minutes must be positive")
    if not (math.isfinite(args.gate_weight) and args.gate_weight >= 0) or not (math.isfinite(args.change_threshold) and args.change_threshold > 0):
        p.error("--gate-weight must be >= 0 and --change-threshold > 0 (finite)")


@dataclass
class Distill:
    """What a distillation run starts from: its Run, the frozen teacher and its folder, the data's latents."""

    run: Run
    teacher: CausalDiT
    teacher_dir: Path
    info: dict  # the teacher's world-model config.json
    meta: dict  # the dataset's meta.json
    train: list[Path]
    held: list[Path]

    def held_batch(self, frames: int) -> tuple[FrameTokenizer, dict[str, torch.Tensor]] | None:
        """Fixed held-out windows and the tokenizer for the quick metrics (rank 0, --eval-every > 0), else None."""
        if not (self.run.args.eval_every and self.run.d.is_main and self.held):
            return None
        tok = FrameTokenizer.load(self.teacher_dir / "tokenizer", device=self.run.d.device).eval()
        return tok, fixed_batch(self.held, frames, 8, seed=self.run.seeds.int("eval", shared=True), device=self.run.d.device)

    def export(self, ema: CausalDiT, stage: str, sample_steps: int, card: str) -> Path:
        """OUT/model: the student (EMA weights) with the teacher's game info, sampling with the consistency solver."""
        info = {k: v for k, v in self.info.items() if k not in ("kind", "format_version", "sampling", "trained")}
        info["sampling"] = SamplingConfig(steps=sample_steps, solver="consistency").to_json()
        info["trained"] = {"stage": stage, "steps": self.run.step, "teacher": str(self.teacher_dir), "data": str(self.run.args.data)}
        return export_world(self.run.out, ema, self.teacher_dir / "tokenizer", info, Path(self.run.args.data), card)


def start(args: argparse.Namespace, stage: str) -> Distill:
    """Processes, seeds, the frozen teacher, the data checked against it and its latents. The learning rate
    warms up and then holds (the distillation stages' practice: no decay)."""
    run = Run.start(args, stage, Schedule(args.warmup, args.steps, min_ratio=1.0, max_minutes=args.max_minutes), args.export_only)
    teacher_dir = Path(args.teacher)
    with usage_errors():
        teacher, info = load_teacher(teacher_dir, run.d.device)
        meta = check_data(args, info)
        if args.latents:
            train, held = existing_latents(Path(args.latents), teacher_dir / "tokenizer", run.out)
        else:
            train, held = encode_latents(Path(args.data), teacher_dir / "tokenizer", run.out / "latents", run.d)
    return Distill(run, teacher, teacher_dir, info, meta, train, held)


def load_teacher(path: str | Path, device: torch.device) -> tuple[CausalDiT, dict]:
    """The frozen teacher DiT and its world-model info (config.json)."""
    path = Path(path)
    info = read_config(path)
    if info.get("kind") != "world_model":
        raise CheckpointError(f"{str(path)!r} is not a world-model folder (config.json kind {info.get('kind')!r})")
    dit = load_dit(path / "dit", device).requires_grad_(False)
    return dit, info


def check_data(args: argparse.Namespace, info: dict) -> dict:
    meta = read_meta(args.data)
    if meta["num_actions"] != len(info["action_meanings"]):
        raise ValueError(f"the dataset has {meta['num_actions']} actions but the teacher {len(info['action_meanings'])}")
    if tuple(meta["frame_size"]) != tuple(info["frame_size"]):
        raise ValueError(f"dataset frames are {meta['frame_size']} but the teacher's are {info['frame_size']}")
    return meta


def student_gate_loss(heads, x0: torch.Tensor, frames_per_chunk: int, args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, float]]:
    """The change gate's cross-entropy (`train.objectives.gate_loss`) on the noisy stream's gate logits of a
    student pack over real windows x0, weighted by --gate-weight; zero for networks without a gate."""
    if heads.change_logit is None or args.gate_weight == 0:
        return torch.zeros((), device=x0.device), {}
    loss, parts = gate_loss(heads.change_logit[: x0.shape[0]], x0, frames_per_chunk, args.change_threshold)
    return args.gate_weight * loss, parts


def pack_velocity(model: CausalDiT, clean: torch.Tensor, s_clean: torch.Tensor, actions: torch.Tensor, guidance: float = 1.0, heads: list | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The teacher-forcing pack as a velocity function (x_s, s) -> v over the noisy stream, the clean
    stream fixed. With guidance != 1 the conditional and null-action passes run as one batch of 2B.
    `heads`, when given, receives the heads of the clean stream."""
    null = torch.full_like(actions, model.null_action)

    def v(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            out, h = model.forward_pack(clean, x, s_clean, s, actions)
        else:
            two = lambda a, b: torch.cat([a, b])  # noqa: E731
            out2, h = model.forward_pack(two(clean, clean), two(x, x), two(s_clean, s_clean), two(s, s), two(actions, actions), two(actions, null))
            c, u = out2.chunk(2)
            out = guided(c.float(), u.float(), guidance).to(c.dtype)
        if heads is not None and torch.is_grad_enabled():  # not from no-grad / forward-mode (JVP) calls
            heads.append(h)
        return out

    return v


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
