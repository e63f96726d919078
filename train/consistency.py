"""Stage 3: teacher-forcing consistency distillation of the causal teacher into a few-step student.

    python -m train.consistency --teacher TEACHER/model --data DATA --out RUN --variant dcm|scm [--latents TEACHER/latents]
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
The reward/end heads keep learning from real labels. Quick held-out metrics (1- and 2-step teacher-forced
PSNR, distance to the teacher's own 8-step ODE) are logged every `--eval-every` steps for the
quality-against-steps curves. The exported student samples with the consistency solver.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from train.common import Logger, all_reduce_mean, barrier, cleanup_dist, ema_update, seed_everything, setup_dist, write_json
from train.objectives import consistency_grid, dcm_loss, scm_loss
from train.student import (
    Timer, add_common_args, check_common_args, check_data, command_line, export_student, fail, finite_or_raise, fixed_batch, hardware, head_loss,
    load_teacher, lr_at, pack_velocity, prepare_latents, psnr_latent_decoded, resume_or_start, save_state, sync_grads, tf_sample, windows,
)
from worldmodel import cli
from worldmodel.attention import attention_backend
from worldmodel.checkpoint import CheckpointError
from worldmodel.flow import add_noise
from worldmodel.tokenizer import FrameTokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.consistency", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    add_common_args(p, steps=1000, lr=5e-5, batch=8)
    p.add_argument("--variant", choices=["dcm", "scm"], default="scm")
    p.add_argument("--grid", type=int, default=48, help="dCM: intervals of the discrete time grid")
    p.add_argument("--tangent-warmup", type=int, default=200, help="sCM: steps over which the JVP term ramps from 0 to 1")
    p.add_argument("--min-level", type=float, default=0.02, help="sCM: smallest noise level trained")
    p.add_argument("--ctx-noise", type=float, default=0.1, help="max noise level on the clean context (as the teacher)")
    p.add_argument("--head-weight", type=float, default=0.1)
    args = p.parse_args(argv)
    check_common_args(p, args)
    if args.grid < 2 or not 0 < args.min_level < 1 or not 0 <= args.ctx_noise < 1:
        p.error("--grid must be >= 2, --min-level in (0, 1), --ctx-noise in [0, 1)")
    if args.tangent_warmup < 0:
        p.error("--tangent-warmup must be >= 0 (0: no warm-up)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, teacher_dir = Path(args.out), Path(args.teacher)
    try:
        d = setup_dist(args.device)
    except ValueError as e:
        return fail(f"--device: {e}")
    try:
        teacher, info = load_teacher(teacher_dir, d.device)
        meta = check_data(args, info)
        train_paths, held_paths = prepare_latents(args, teacher_dir, d)
        if args.batch_size % d.world_size:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by {d.world_size} processes")
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        return fail(str(e))
    cfg = teacher.cfg
    if args.frames % cfg.frames_per_chunk:
        return fail(f"--frames {args.frames} must be a multiple of frames_per_chunk {cfg.frames_per_chunk}")
    seed_everything(args.seed + d.rank)

    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ckpt = out / "checkpoint"
    try:
        state = resume_or_start(ckpt, cfg, {"model": ema, "raw": student}, {"student": opt}, d, args.export_only)
    except CheckpointError as e:
        return fail(f"cannot resume: {e}")
    step = int(state["step"])
    timer = Timer(float(state.get("wall_s", 0.0)))
    train_args = argparse.Namespace(**state["args"]) if args.export_only else args
    if d.is_main and step:
        print(f"resumed from {ckpt} at step {step}")
    log = Logger(out, enabled=d.is_main, resume_step=step)
    if d.is_main and not args.export_only:
        write_json(out / "args.json", vars(args))
        print(f"consistency distillation ({args.variant}): {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters, {d.world_size} process(es) on {d.device}")

    # quick held-out metrics: fixed windows, fixed noise, the teacher's 8-step ODE computed once
    quick = None
    if args.eval_every and d.is_main and held_paths:
        tok = FrameTokenizer.load(teacher_dir / "tokenizer", device=d.device).eval()
        hb = fixed_batch(held_paths, args.frames, 8, seed=1234, device=d.device)
        noise = torch.randn(hb["latents"].shape, generator=torch.Generator().manual_seed(4321)).to(d.device)
        ode8 = tf_sample(teacher, hb, 8, noise, solver="euler", guidance=args.guidance)
        quick = (tok, hb, noise, ode8)

    def evaluate() -> dict[str, float]:
        tok, hb, noise, ode8 = quick
        m = {}
        for k in (1, 2):
            pred = tf_sample(ema, hb, k, noise, generator=torch.Generator(device=d.device).manual_seed(7))
            m[f"eval/psnr_{k}step"] = psnr_latent_decoded(tok, pred, hb["latents"])
            m[f"eval/psnr_to_teacher_ode_{k}step"] = psnr_latent_decoded(tok, pred, ode8)
        m["eval/teacher_8step_psnr"] = psnr_latent_decoded(tok, ode8, hb["latents"])
        return m

    def save(step: int) -> None:
        if d.is_main:
            save_state(ckpt, cfg, {"model": ema, "raw": student}, {"student": opt}, {"step": step, "args": vars(args), "wall_s": timer.total(), "stage": f"consistency-{args.variant}"})
        barrier()

    if quick is not None and step == 0 and not args.export_only:
        log.log(0, **evaluate())

    data = windows(train_paths, args.frames, args.batch_size // d.world_size, d, seed=args.seed * 100003 + step)
    g = torch.Generator().manual_seed(args.seed * 7919 + d.rank * 104729 + step)
    grid = consistency_grid(args.grid)
    Fc = cfg.frames_per_chunk
    acc, seen = {}, 0
    while step < args.steps and not args.export_only:
        batch = next(data)
        x0 = batch["latents"].float()
        a = batch["actions"].long()
        B, T = a.shape
        n = T // Fc
        s_ctx = (torch.rand(B, n, generator=g) * args.ctx_noise).repeat_interleave(Fc, 1).to(d.device)
        clean = add_noise(x0, torch.randn(x0.shape, generator=g).to(d.device), s_ctx)
        eps = torch.randn(x0.shape, generator=g).to(d.device)
        heads: list = []
        f_student = pack_velocity(student, clean, s_ctx, a, heads=heads)
        f_teacher = pack_velocity(teacher, clean, s_ctx, a, args.guidance)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup)
        if args.variant == "dcm":
            k = torch.randint(1, args.grid + 1, (B, n), generator=g).repeat_interleave(Fc, 1).to(d.device)
            loss, parts = dcm_loss(f_student, pack_velocity(student, clean, s_ctx, a), f_teacher, x0, eps, k, grid)
        else:
            s = (torch.rand(B, n, generator=g) * (1 - args.min_level) + args.min_level).repeat_interleave(Fc, 1).to(d.device)
            warm = min(1.0, step / args.tangent_warmup) if args.tangent_warmup else 1.0
            with attention_backend("math"):
                loss, parts = scm_loss(f_student, f_teacher, x0, eps, s, warm)
            parts["scm/warmup"] = warm
        l_head = head_loss(heads[-1], batch)
        total = loss + args.head_weight * l_head
        finite_or_raise(total, "loss", step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        sync_grads(student, d)
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(ema, student, args.ema if step >= args.warmup else 0.0)
        step += 1
        seen += 1
        parts["loss/heads"] = l_head.item()
        for key, v in parts.items():
            acc[key] = acc.get(key, 0.0) + v
        if step % args.log_every == 0 or step == args.steps:
            scalars = {key: all_reduce_mean(v / seen, d) for key, v in acc.items()}
            scalars.update(lr=lr_at(step, args.lr, args.warmup), grad_norm=float(gnorm), wall_s=timer.total())
            if quick is not None and (step % args.eval_every == 0 or step == args.steps):
                scalars.update(evaluate())
            log.log(step, **scalars)
            if d.is_main:
                print(f"step {step}: " + " ".join(f"{key}={v:.4g}" for key, v in scalars.items() if key.startswith(("loss/", "eval/psnr_"))), flush=True)
            acc, seen = {}, 0
        if step % args.ckpt_every == 0 or step == args.steps:
            save(step)
    log.close()

    if d.is_main:
        card = model_card(train_args, meta, step, timer.total(), d, teacher_dir)
        export_student(out, ema, teacher_dir, info, Path(args.data), f"consistency-{train_args.variant}", step, train_args.sample_steps, card)
        print(f"exported the student to {out / 'model'}")
    cleanup_dist()
    return 0


def model_card(args: argparse.Namespace, meta: dict, step: int, wall: float, d, teacher_dir: Path) -> str:
    return (
        f"# World model: {meta['game']} (student, teacher-forcing consistency distillation, {args.variant})\n\n"
        f"- Stage 3: {'discrete-time CM on a ' + str(args.grid) + '-interval grid' if args.variant == 'dcm' else 'continuous-time sCM (forward-mode JVP), tangent warm-up ' + str(args.tangent_warmup) + ' steps'}, teacher guidance {args.guidance}\n"
        f"- Teacher: `{teacher_dir}`; data: real {meta['game']} play recorded by `train.collect`\n"
        f"- Optimizer steps: {step}, batch {args.batch_size} windows of {args.frames} frames, lr {args.lr}\n"
        f"- Hardware: {hardware(d)} x {d.world_size} process(es); wall time {wall / 60:.1f} min\n"
        f"- Samples with {args.sample_steps} step(s) of the consistency solver by default\n\n"
        f"Reproduce:\n\n    {command_line('train.consistency', args)}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
