"""Stage 4: Self Forcing with distribution matching distillation (DMD).

    python -m train.dmd --teacher TEACHER/model --init STUDENT/model --data DATA --out RUN [--latents TEACHER/latents]
    torchrun --nproc_per_node=2 -m train.dmd ...

The student generates rollouts exactly as at play time: real context frames are committed to its own KV
cache, then chunk after chunk is generated from noise under the actions of a real episode, each chunk
followed by the clean t=0 re-cache pass. The denoising list is `--train-steps` levels (1, 3/4, 1/2, 1/4 for
4), sampled with the consistency solver; one exit step per chunk is drawn at random, the steps before it
run without gradient, the exit step's clean prediction carries the gradient, and the cache is detached
between chunks (`KVCache.attend` builds its keys out of place when gradients are on).

On the generated rollout (real context + generated chunks, as the clean stream of a teacher-forcing pack),
every generated chunk is re-noised at a random level and scored twice: the real score is the frozen
teacher (with action guidance), the fake score a critic initialised from the teacher and trained online by
flow matching on the student's own rollouts, `--critic-steps` critic updates per student update. The
student's gradient is (fake - real) in clean-prediction space, normalised by the mean absolute error of
the teacher's prediction, the loss computed in float64 (`train.objectives.dmd_loss`); non-finite
gradients are zeroed per frame and counted. The reward/end heads keep learning from real labels. The
exported student (EMA weights) samples with the consistency solver at 1, 2 or 4 steps (any prefix-aligned
subset of the training levels).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from train.common import Logger, all_reduce_mean, barrier, cleanup_dist, ema_update, seed_everything, setup_dist, write_json
from train.objectives import critic_loss, dmd_loss
from train.student import (
    Timer, add_common_args, check_common_args, check_data, command_line, export_student, fail, finite_or_raise, fixed_batch, hardware, head_loss,
    load_teacher, lr_at, pack_velocity, prepare_latents, psnr_latent_decoded, resume_or_start, save_state, sync_grads, windows,
)
from worldmodel import cli
from worldmodel.checkpoint import CheckpointError
from worldmodel.dit import CausalDiT
from worldmodel.flow import sampling_levels, x0_from_velocity
from worldmodel.runtime import load_dit
from worldmodel.sampler import recache, solver_step
from worldmodel.tokenizer import FrameTokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.dmd", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    add_common_args(p, steps=300, lr=2e-5, batch=8)
    p.add_argument("--init", default=None, help="world-model folder the student starts from (a stage-3 student); default: the teacher")
    p.add_argument("--critic-lr", type=float, default=1e-4)
    p.add_argument("--critic-steps", type=int, default=4, help="critic updates per student update")
    p.add_argument("--context", type=int, default=2, help="real frames committed before the rollout starts")
    p.add_argument("--train-steps", type=int, default=4, help="levels of the student's denoising list (exit steps)")
    p.add_argument("--min-level", type=float, default=0.02)
    p.add_argument("--max-level", type=float, default=0.98)
    p.add_argument("--head-weight", type=float, default=0.1)
    args = p.parse_args(argv)
    check_common_args(p, args)
    if args.critic_steps < 1 or args.context < 1 or args.train_steps < 1:
        p.error("--critic-steps, --context and --train-steps must be >= 1")
    if args.context >= args.frames:
        p.error(f"--context {args.context} leaves nothing to generate in windows of --frames {args.frames}")
    if not 0 < args.min_level < args.max_level < 1:
        p.error("need 0 < --min-level < --max-level < 1")
    return args


def rollout(student: CausalDiT, latents: torch.Tensor, actions: torch.Tensor, context: int, levels: list[float], g: torch.Generator, grad: bool) -> torch.Tensor:
    """Self-forcing rollout: real context (B, context, ...) committed, then the rest of the window generated.

    Returns (B, T, C, h, w): the real context followed by the generated clean chunks; with grad=True each
    generated chunk carries the gradient of its (random) exit step.
    """
    cfg = student.cfg
    Fc = cfg.frames_per_chunk
    B, T = actions.shape
    dev = latents.device
    cache = student.new_cache(B)
    out = [latents[:, :context].float()]
    with torch.no_grad():
        for i in range(0, context, Fc):
            recache(student, cache, latents[:, i:i + Fc].float(), actions[:, i:i + Fc])
    K = len(levels) - 1
    for i in range(context, T, Fc):
        a = actions[:, i:i + Fc]
        x = torch.randn(B, Fc, cfg.in_channels, *cfg.latent_size, generator=g).to(dev)
        exit_step = int(torch.randint(0, K, (1,), generator=g))  # the same generator on every rank: same exit
        with torch.no_grad():
            for k in range(exit_step):
                t = torch.full(a.shape, levels[k], device=dev)
                v, _ = student.forward_cached(x, t, a, cache)
                x = solver_step(x, v, levels[k], levels[k + 1], "consistency", g if dev.type == "cpu" else None)
        t = torch.full(a.shape, levels[exit_step], device=dev)
        with torch.set_grad_enabled(grad):
            v, _ = student.forward_cached(x, t, a, cache)
            x0 = x0_from_velocity(x.float(), v.float(), t)
        out.append(x0)
        with torch.no_grad():
            recache(student, cache, x0.detach(), a)
    return torch.cat(out, dim=1)


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
        init = load_dit(Path(args.init) / "dit", d.device) if args.init else teacher
        if init.cfg != teacher.cfg:
            raise ValueError(f"--init {args.init} has another shape than the teacher")
        if args.batch_size % d.world_size:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by {d.world_size} processes")
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        return fail(str(e))
    cfg = teacher.cfg
    if args.frames % cfg.frames_per_chunk or args.context % cfg.frames_per_chunk:
        return fail(f"--frames and --context must be multiples of frames_per_chunk {cfg.frames_per_chunk}")
    seed_everything(args.seed + d.rank)

    student = copy.deepcopy(init).train().requires_grad_(True)
    ema = copy.deepcopy(init).eval().requires_grad_(False)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    opt_s = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.0, 0.999), weight_decay=0.0)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.0, 0.999), weight_decay=0.0)
    nets, opts = {"model": ema, "raw": student, "critic": critic}, {"student": opt_s, "critic": opt_c}
    ckpt = out / "checkpoint"
    try:
        state = resume_or_start(ckpt, cfg, nets, opts, d, args.export_only)
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
        print(f"self-forcing DMD: student from {args.init or 'the teacher'}, {d.world_size} process(es) on {d.device}")

    levels = sampling_levels(args.train_steps)
    quick = None
    if args.eval_every and d.is_main and held_paths:
        tok = FrameTokenizer.load(teacher_dir / "tokenizer", device=d.device).eval()
        quick = (tok, fixed_batch(held_paths, args.frames, 8, seed=1234, device=d.device))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Rollout PSNR of the EMA student on fixed held-out windows at 1 and 2 steps (same noise each time)."""
        tok, hb = quick
        m = {}
        for k in (1, 2):
            gen = rollout(ema, hb["latents"], hb["actions"].long(), args.context, sampling_levels(k), torch.Generator().manual_seed(7), grad=False)
            m[f"eval/rollout_psnr_{k}step"] = psnr_latent_decoded(tok, gen[:, args.context:], hb["latents"][:, args.context:])
        return m

    def save(step: int) -> None:
        if d.is_main:
            save_state(ckpt, cfg, nets, opts, {"step": step, "args": vars(args), "wall_s": timer.total(), "stage": "dmd"})
        barrier()

    if quick is not None and step == 0 and not args.export_only:
        log.log(0, **evaluate())

    data = windows(train_paths, args.frames, args.batch_size // d.world_size, d, seed=args.seed * 100003 + step)
    g = torch.Generator().manual_seed(args.seed * 7919 + d.rank * 104729 + step)
    g_shared = torch.Generator().manual_seed(args.seed * 31 + step)  # identical on every rank (exit steps)
    Fc = cfg.frames_per_chunk
    gen_mask = None
    acc, seen = {}, 0

    def levels_for(B: int, n: int) -> torch.Tensor:
        s = torch.rand(B, n, generator=g) * (args.max_level - args.min_level) + args.min_level
        return s.repeat_interleave(Fc, 1).to(d.device)

    while step < args.steps and not args.export_only:
        # critic updates on fresh (no-grad) rollouts, then one student update on a rollout with gradient
        for c in range(args.critic_steps + 1):
            train_student = c == args.critic_steps
            batch = next(data)
            x_real = batch["latents"].float()
            a = batch["actions"].long()
            B, T = a.shape
            n = T // Fc
            if gen_mask is None or gen_mask.shape != (B, T):
                gen_mask = torch.zeros(B, T, dtype=torch.bool, device=d.device)
                gen_mask[:, args.context:] = True
            x_gen = rollout(student, x_real, a, args.context, levels, g_shared, grad=train_student)
            zeros = torch.zeros(B, T, device=d.device)
            s = levels_for(B, n)
            eps = torch.randn(x_gen.shape, generator=g).to(d.device)
            ctx = x_gen.detach()
            if not train_student:
                loss_c, parts = critic_loss(pack_velocity(critic, ctx, zeros, a), x_gen, s, eps, gen_mask)
                finite_or_raise(loss_c, "critic loss", step)
                opt_c.zero_grad(set_to_none=True)
                loss_c.backward()
                sync_grads(critic, d)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
                for group in opt_c.param_groups:
                    group["lr"] = lr_at(step, args.critic_lr, args.warmup)
                opt_c.step()
                for key, v in parts.items():
                    acc[key] = acc.get(key, 0.0) + v / args.critic_steps
                continue
            real = pack_velocity(teacher, ctx, zeros, a, args.guidance)
            fake = pack_velocity(critic, ctx, zeros, a)  # called without gradient inside dmd_loss
            loss, parts = dmd_loss(x_gen, real, fake, s, eps, gen_mask)
            # heads: the student's clean-stream features on real frames, real labels
            heads: list = []
            pack_velocity(student, x_real, zeros, a, heads=heads)(x_real, zeros)
            l_head = head_loss(heads[-1], batch)
            total = loss.float() + args.head_weight * l_head
            finite_or_raise(total, "student loss", step)
            opt_s.zero_grad(set_to_none=True)
            total.backward()
            sync_grads(student, d)
            gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            for group in opt_s.param_groups:
                group["lr"] = lr_at(step, args.lr, args.warmup)
            opt_s.step()
            ema_update(ema, student, args.ema if step >= args.warmup else 0.0)
            parts["loss/heads"] = l_head.item()
            parts["grad_norm"] = float(gnorm)
            for key, v in parts.items():
                acc[key] = acc.get(key, 0.0) + v
        step += 1
        seen += 1
        if step % args.log_every == 0 or step == args.steps:
            scalars = {key: all_reduce_mean(v / seen, d) for key, v in acc.items()}
            scalars.update(lr=lr_at(step, args.lr, args.warmup), wall_s=timer.total())
            if quick is not None and (step % args.eval_every == 0 or step == args.steps):
                scalars.update(evaluate())
            log.log(step, **scalars)
            if d.is_main:
                print(f"step {step}: " + " ".join(f"{key}={v:.4g}" for key, v in scalars.items() if key.startswith(("loss/", "eval/"))), flush=True)
            acc, seen = {}, 0
        if step % args.ckpt_every == 0 or step == args.steps:
            save(step)
    log.close()

    if d.is_main:
        card = model_card(train_args, meta, step, timer.total(), d, teacher_dir)
        export_student(out, ema, teacher_dir, info, Path(args.data), "self-forcing-dmd", step, train_args.sample_steps, card)
        print(f"exported the student to {out / 'model'}")
    cleanup_dist()
    return 0


def model_card(args: argparse.Namespace, meta: dict, step: int, wall: float, d, teacher_dir: Path) -> str:
    return (
        f"# World model: {meta['game']} (student, Self Forcing with DMD)\n\n"
        f"- Stage 4: self-forcing rollouts of {args.frames - args.context} generated frames after {args.context} real ones, "
        f"{args.train_steps}-level denoising list with a random exit step per chunk; DMD against the teacher (guidance {args.guidance}) "
        f"with an online critic ({args.critic_steps} critic updates per student update)\n"
        f"- Student initialised from: `{args.init or teacher_dir}`; teacher: `{teacher_dir}`\n"
        f"- Data: actions and context of real {meta['game']} play recorded by `train.collect`\n"
        f"- Student updates: {step}, batch {args.batch_size}, lr {args.lr} (critic {args.critic_lr})\n"
        f"- Hardware: {hardware(d)} x {d.world_size} process(es); wall time {wall / 60:.1f} min\n"
        f"- Samples with {args.sample_steps} step(s) of the consistency solver by default\n\n"
        f"Reproduce:\n\n    {command_line('train.dmd', args)}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
