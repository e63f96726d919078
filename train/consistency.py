"""Stage 3: teacher-forcing consistency distillation of the causal teacher into a few-step student.

    python -m train.consistency --teacher TEACHER/model --data DATA --out RUN --variant dcm|scm|ode [--latents TEACHER/latents]
    torchrun --nproc_per_node=2 -m train.consistency ...

The student starts as a copy of the teacher and learns to jump along the teacher's probability-flow ODE
straight to the clean frame, with clean ground-truth context in the teacher-forcing pack (each noisy chunk
sees the real chunks before it, exactly as in stage 2):
- `--variant dcm` (discrete time): a grid of `--grid` intervals; the teacher (with action guidance) takes
  one Euler step from s_k to s_{k-1}; the target is the student's own stop-gradient clean prediction there.
- `--variant scm` (continuous time): the limit of the same loss; the JVP of the student along the teacher's
  ODE is computed in forward mode (`torch.func.jvp`) through the math attention path (the only one with
  forward-mode AD on every device; on CUDA too), the tangent normalised g / (||g|| + 0.1) and its JVP
  term warmed up over `--tangent-warmup` steps.
- `--variant ode` (Causal Forcing's causal ODE initialisation, a DMD initialisation rather than a consistency
  model): the teacher solves its probability-flow ODE from fresh noise in `--ode-steps` Euler steps (with
  action guidance; the student's levels joined to its grid), under teacher forcing, so each frame's solution
  is the autoregressive teacher's given the real frames before it; the student, at the trajectory's point at
  one of its denoising levels (`--student-steps`, which should be stage 4's `--train-steps`: 1, 3/4, 1/2, 1/4
  for 4), regresses its clean prediction onto the ODE's end.
The reward/end heads keep learning from real labels, and an inherited change gate from the real changed cells.
Quick held-out metrics (1- and 2-step teacher-forced PSNR, distance to the teacher's own 8-step ODE) are
logged every `--eval-every` steps for the quality-against-steps curves. The exported student samples with the consistency solver.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from train.common import ema_update
from train.latents import windows
from train.objectives import at_levels, consistency_grid, dcm_loss, head_loss, ode_levels, ode_loss, ode_pairs, scm_loss
from train.skeleton import UsageError, hardware, model_card, stage_main
from train.student import Distill, add_common_args, check_common_args, pack_velocity, psnr_latent_decoded, start, student_gate_loss, tf_sample
from worldmodel import cli
from worldmodel.attention import attention_backend
from worldmodel.dit import CausalDiT
from worldmodel.flow import add_noise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.consistency", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    add_common_args(p, steps=1000, lr=5e-5, batch=8)
    p.add_argument("--variant", choices=["dcm", "scm", "ode"], default="scm")
    p.add_argument("--ode-steps", type=int, default=16, help="ode: the teacher's uniform Euler steps from noise to the clean frame (the student's levels are joined to its grid)")
    p.add_argument("--student-steps", type=int, default=4, help="ode: the student's denoising list the regression trains at (its levels above 0); "
                   "match stage 4's --train-steps, which DMD then rolls out with")
    p.add_argument("--grid", type=int, default=48, help="dCM: intervals of the discrete time grid")
    p.add_argument("--tangent-warmup", type=int, default=200, help="sCM: steps over which the JVP term ramps from 0 to 1")
    p.add_argument("--min-level", type=float, default=0.02, help="sCM: smallest noise level trained")
    p.add_argument("--ctx-noise", type=float, default=0.1, help="max noise level on the clean context (as the teacher)")
    p.add_argument("--head-weight", type=float, default=0.1)
    args = p.parse_args(argv)
    check_common_args(p, args)
    if args.grid < 2 or not 0 < args.min_level < 1 or not 0 <= args.ctx_noise < 1:
        p.error("--grid must be >= 2, --min-level in (0, 1), --ctx-noise in [0, 1)")
    if args.ode_steps < 1 or args.student_steps < 1:
        p.error("--ode-steps and --student-steps must be >= 1")
    if args.tangent_warmup < 0:
        p.error("--tangent-warmup must be >= 0 (0: no warm-up)")
    return args


def cm_loss(student: CausalDiT, teacher: CausalDiT, batch: dict[str, torch.Tensor], args: argparse.Namespace, step: int, g: torch.Generator,
            grid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The consistency loss of one batch of real windows (teacher-forcing pack, noised clean context), plus the heads and the change gate."""
    x0 = batch["latents"].float()  # (B, T, C, h, w)
    a = batch["actions"].long()  # (B, T)
    B, T = a.shape
    Fc = student.cfg.frames_per_chunk
    n, dev = T // Fc, x0.device
    s_ctx = (torch.rand(B, n, generator=g) * args.ctx_noise).repeat_interleave(Fc, 1).to(dev)
    clean = add_noise(x0, torch.randn(x0.shape, generator=g).to(dev), s_ctx)
    eps = torch.randn(x0.shape, generator=g).to(dev)
    heads: list = []
    f_student = pack_velocity(student, clean, s_ctx, a, heads=heads)
    f_teacher = pack_velocity(teacher, clean, s_ctx, a, args.guidance)
    if args.variant == "dcm":
        k = torch.randint(1, args.grid + 1, (B, n), generator=g).repeat_interleave(Fc, 1).to(dev)
        loss, parts = dcm_loss(f_student, pack_velocity(student, clean, s_ctx, a), f_teacher, x0, eps, k, grid)
    elif args.variant == "ode":
        levels, keep = ode_levels(args.ode_steps, args.student_steps)
        points, x0_ode = ode_pairs(f_teacher, eps, levels, keep)  # (K, B, T, ...), (B, T, ...), no gradient
        k = torch.randint(0, len(keep), (B, n), generator=g).repeat_interleave(Fc, 1).to(dev)  # one level per chunk
        loss, parts = ode_loss(f_student, at_levels(points, k), torch.tensor(keep, device=dev)[k], x0_ode)
    else:
        s = (torch.rand(B, n, generator=g) * (1 - args.min_level) + args.min_level).repeat_interleave(Fc, 1).to(dev)
        warm = min(1.0, step / args.tangent_warmup) if args.tangent_warmup else 1.0
        with attention_backend("math"):
            loss, parts = scm_loss(f_student, f_teacher, x0, eps, s, warm)
        parts["scm/warmup"] = warm
    l_head, head_parts = head_loss(heads[-1], batch["rewards"], batch["terminated"])
    l_gate, gate_parts = student_gate_loss(heads[-1], x0, Fc, args)  # the gate at the levels this batch trains
    return loss + args.head_weight * l_head + l_gate, {**parts, **head_parts, **gate_parts}


def train(args: argparse.Namespace) -> int:
    setup = start(args, f"consistency-{args.variant}")
    run, teacher, d = setup.run, setup.teacher, setup.run.d
    if args.frames % teacher.cfg.frames_per_chunk:
        raise UsageError(f"--frames {args.frames} must be a multiple of frames_per_chunk {teacher.cfg.frames_per_chunk}")
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    train_args = run.resume(teacher.cfg, nets={"model": ema, "raw": student}, opts={"student": opt})
    if d.is_main and not args.export_only:
        print(f"consistency distillation ({args.variant}): {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters, {d.world_size} process(es) on {d.device}")
    run.set_eval(quick_metrics(setup, ema, args), args.eval_every)

    batches = windows(setup.train, args.frames, args.batch_size // d.world_size, d, seed=run.seeds.int("data", run.step, shared=True))
    g = run.seeds.generator("noise", run.step)
    grid = consistency_grid(args.grid)
    while run.training():
        loss, parts = cm_loss(student, teacher, next(batches), args, run.step, g, grid)
        gnorm = run.update(opt, loss, student, args.lr, sync=True)
        ema_update(ema, student, args.ema if run.step >= args.warmup else 0.0)
        run.step_done(parts, gnorm)
    run.finish()

    if d.is_main:
        setup.export(ema, f"consistency-{train_args.variant}", train_args.sample_steps, card(train_args, setup.meta, run.step, run.wall(), d, setup.teacher_dir))
    run.close()
    return 0


def quick_metrics(setup: Distill, ema: CausalDiT, args: argparse.Namespace):
    """Held-out teacher-forced PSNR of the EMA student at 1 and 2 steps, to the real frames and to the teacher's
    own 8-step ODE (computed once); fixed windows, fixed noise. None where there is nothing to measure."""
    held = setup.held_batch(args.frames)
    if held is None:
        return None
    tok, hb = held
    dev = setup.run.d.device
    noise = torch.randn(hb["latents"].shape, generator=setup.run.seeds.generator("eval", 1, shared=True)).to(dev)
    ode8 = tf_sample(setup.teacher, hb, 8, noise, solver="euler", guidance=args.guidance)

    def evaluate() -> dict[str, float]:
        m = {}
        for k in (1, 2):
            pred = tf_sample(ema, hb, k, noise, generator=setup.run.seeds.generator("eval", 2, shared=True, device=dev))
            m[f"eval/psnr_{k}step"] = psnr_latent_decoded(tok, pred, hb["latents"])
            m[f"eval/psnr_to_teacher_ode_{k}step"] = psnr_latent_decoded(tok, pred, ode8)
        m["eval/teacher_8step_psnr"] = psnr_latent_decoded(tok, ode8, hb["latents"])
        return m

    return evaluate


def card(args: argparse.Namespace, meta: dict, step: int, wall: float, d, teacher_dir) -> str:
    if args.variant == "dcm":
        method, kind = f"discrete-time CM on a {args.grid}-interval grid", "teacher-forcing consistency distillation, dcm"
    elif args.variant == "scm":
        method, kind = f"continuous-time sCM (forward-mode JVP), tangent warm-up {args.tangent_warmup} steps", "teacher-forcing consistency distillation, scm"
    else:
        method = (f"causal ODE initialisation (Causal Forcing): regression at the levels of {args.student_steps} denoising steps onto the teacher's "
                  f"{args.ode_steps}-step probability-flow ODE under teacher forcing")
        kind = "causal ODE initialisation"
    return model_card(f"{meta['game']} (student, {kind})", [
        f"Stage 3: {method}, teacher guidance {args.guidance}",
        f"Teacher: `{teacher_dir}`; data: real {meta['game']} play recorded by `train.collect`",
        f"Optimizer steps: {step}, batch {args.batch_size} windows of {args.frames} frames, lr {args.lr}",
        f"Hardware: {hardware(d)} x {d.world_size} process(es); wall time {wall / 60:.1f} min",
        f"Samples with {args.sample_steps} step(s) of the consistency solver by default",
    ], "train.consistency", args)


main = stage_main(parse_args, train)


if __name__ == "__main__":
    sys.exit(main())
