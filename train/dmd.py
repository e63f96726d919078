"""Stage 4: Self Forcing with distribution matching distillation (DMD).

    python -m train.dmd --teacher TEACHER/model --init STUDENT/model --data DATA --out RUN [--latents TEACHER/latents]
    torchrun --nproc_per_node=2 -m train.dmd ...

The student generates rollouts exactly as at play time: real context frames are committed to its own KV
cache, then chunk after chunk is generated from noise under the actions of a real episode, each chunk
followed by the clean s=0 re-cache pass. The denoising list is `--train-steps` levels (1, 3/4, 1/2, 1/4 for
4), sampled with the consistency solver; one exit step per chunk is drawn at random, the steps before it
run without gradient, the exit step's clean prediction carries the gradient, and the cache is detached
between chunks (`KVCache.attend` builds its keys out of place when gradients are on).

On the generated rollout (real context + generated chunks, as the clean stream of a teacher-forcing pack),
every generated chunk is re-noised at a random level and scored twice: the real score is the frozen
teacher (with action guidance), the fake score a critic initialised from the teacher and trained online by
flow matching on the student's own rollouts, `--critic-steps` critic updates per student update. The
student's gradient is (fake - real) in clean-prediction space, normalised by the mean absolute error of
the teacher's prediction, the loss computed in float64 (`train.objectives.dmd_loss`); non-finite
gradients are zeroed per frame and counted. The reward/end heads keep learning from real labels, and an
inherited change gate from the real changed cells at the exit levels. The exported student (EMA weights) samples with the consistency solver at 1, 2 or 4 steps (any prefix-aligned
subset of the training levels).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from train.common import ema_update
from train.latents import windows
from train.objectives import critic_loss, dmd_loss, head_loss
from train.skeleton import UsageError, hardware, model_card, stage_main, usage_errors
from train.student import Distill, add_common_args, check_common_args, pack_velocity, psnr_latent_decoded, start, student_gate_loss
from worldmodel import cli
from worldmodel.dit import CausalDiT, load_dit
from worldmodel.flow import add_noise, sampling_levels
from worldmodel.sampler import denoise, randn_worlds, recache


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


def rollout(student: CausalDiT, latents: torch.Tensor, actions: torch.Tensor, context: int, levels: list[float], g: torch.Generator, grad: bool,
            exit_step: int | None = None) -> torch.Tensor:
    """Self-forcing rollout: real context (B, context, ...) committed, then the rest of the window generated
    by the play-time sampler (`worldmodel.sampler.denoise` and `recache`, consistency solver, no guidance).

    Returns (B, T, C, h, w): the real context followed by the generated clean chunks; with grad=True each
    generated chunk carries the gradient of its exit step. `exit_step` None draws one per chunk from `g`
    (training); an int fixes it for every chunk and draws none (len(levels) - 2: the chain as played).
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
    fresh = g if dev.type == "cpu" else None  # the consistency steps' fresh noise; on a GPU the device's default generator
    for i in range(context, T, Fc):
        a = actions[:, i:i + Fc]
        x = randn_worlds((B, Fc, cfg.in_channels, *cfg.latent_size), g, g.device).to(dev)  # (B, F, C, h, w), drawn on g's device
        k = int(torch.randint(0, len(levels) - 1, (1,), generator=g)) if exit_step is None else exit_step  # g is the same on every rank: same exit
        with torch.set_grad_enabled(grad):
            x0 = denoise(student, cache, a, x, levels, solver="consistency", generator=fresh, exit_step=k)  # only step k carries a gradient
        out.append(x0)
        with torch.no_grad():
            recache(student, cache, x0.detach(), a)
    return torch.cat(out, dim=1)


def train(args: argparse.Namespace) -> int:
    setup = start(args, "dmd")
    run, teacher, d = setup.run, setup.teacher, setup.run.d
    with usage_errors():
        init = load_dit(Path(args.init) / "dit", d.device) if args.init else teacher
    if init.cfg != teacher.cfg:
        raise UsageError(f"--init {args.init} has another shape than the teacher")
    Fc = teacher.cfg.frames_per_chunk
    if args.frames % Fc or args.context % Fc:
        raise UsageError(f"--frames and --context must be multiples of frames_per_chunk {Fc}")
    student = copy.deepcopy(init).train().requires_grad_(True)
    ema = copy.deepcopy(init).eval().requires_grad_(False)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    opt_s = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.0, 0.999), weight_decay=0.0)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.0, 0.999), weight_decay=0.0)
    train_args = run.resume(teacher.cfg, nets={"model": ema, "raw": student, "critic": critic}, opts={"student": opt_s, "critic": opt_c})
    if d.is_main and not args.export_only:
        print(f"self-forcing DMD: student from {args.init or 'the teacher'}, {d.world_size} process(es) on {d.device}")
    run.set_eval(quick_metrics(setup, ema, args), args.eval_every)

    batches = windows(setup.train, args.frames, args.batch_size // d.world_size, d, seed=run.seeds.int("data", run.step, shared=True))
    g = run.seeds.generator("noise", run.step)
    g_shared = run.seeds.generator("shared", run.step, shared=True)  # identical on every rank (exit steps)
    levels = sampling_levels(args.train_steps)

    def generate(grad: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of real windows, the student's rollout from their context, re-noising levels and noise."""
        batch = next(batches)
        x_gen = rollout(student, batch["latents"].float(), batch["actions"].long(), args.context, levels, g_shared, grad=grad)
        B, T = batch["actions"].shape
        s = (torch.rand(B, T // Fc, generator=g) * (args.max_level - args.min_level) + args.min_level).repeat_interleave(Fc, 1).to(d.device)
        return batch, x_gen, s, torch.randn(x_gen.shape, generator=g).to(d.device)

    while run.training():
        parts: dict[str, float] = {}
        for _ in range(args.critic_steps):  # critic updates on fresh (no-grad) rollouts
            batch, x_gen, s, eps = generate(grad=False)
            a, mask = batch["actions"].long(), generated(batch, args.context)
            loss_c, critic_parts = critic_loss(pack_velocity(critic, x_gen.detach(), torch.zeros(a.shape, device=d.device), a), x_gen, s, eps, mask)
            run.update(opt_c, loss_c, critic, args.critic_lr, sync=True, what="critic loss")
            for k, v in critic_parts.items():
                parts[k] = parts.get(k, 0.0) + v / args.critic_steps
        batch, x_gen, s, eps = generate(grad=True)  # then one student update on a rollout with gradient
        loss, student_parts = student_loss(student, teacher, critic, batch, x_gen, s, eps, args, g)
        gnorm = run.update(opt_s, loss, student, args.lr, sync=True, what="student loss")
        ema_update(ema, student, args.ema if run.step >= args.warmup else 0.0)
        run.step_done({**parts, **student_parts}, gnorm)
    run.finish()

    if d.is_main:
        setup.export(ema, "self-forcing-dmd", train_args.sample_steps, card(train_args, setup.meta, run.step, run.wall(), d, setup.teacher_dir))
    run.close()
    return 0


def generated(batch: dict[str, torch.Tensor], context: int) -> torch.Tensor:
    """(B, T) bool: the frames of a rollout the student generated (after the real context)."""
    mask = torch.zeros(batch["actions"].shape, dtype=torch.bool, device=batch["actions"].device)
    mask[:, context:] = True
    return mask


def student_loss(student: CausalDiT, teacher: CausalDiT, critic: CausalDiT, batch: dict[str, torch.Tensor], x_gen: torch.Tensor, s: torch.Tensor,
                 eps: torch.Tensor, args: argparse.Namespace, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """DMD on the generated rollout (the real score: the guided teacher; the fake score: the critic), plus the heads and the change gate."""
    a = batch["actions"].long()
    zeros = torch.zeros(a.shape, device=x_gen.device)
    ctx = x_gen.detach()
    real = pack_velocity(teacher, ctx, zeros, a, args.guidance)
    fake = pack_velocity(critic, ctx, zeros, a)  # called without gradient inside dmd_loss
    loss, parts = dmd_loss(x_gen, real, fake, s, eps, generated(batch, args.context))
    # heads: the student's clean-stream features on real frames, real labels; the change gate on the real
    # frames noised to the levels its denoising list exits from (where it acts at play)
    heads: list = []
    x_real = batch["latents"].float()
    Fc = student.cfg.frames_per_chunk
    B, T = a.shape
    exits = torch.tensor(sampling_levels(args.train_steps)[:-1])
    s_gate = exits[torch.randint(0, len(exits), (B, T // Fc), generator=g)].repeat_interleave(Fc, 1).to(x_real.device)
    noisy = add_noise(x_real, torch.randn(x_real.shape, generator=g).to(x_real.device), s_gate)
    pack_velocity(student, x_real, zeros, a, heads=heads)(noisy, s_gate)
    l_head, head_parts = head_loss(heads[-1], batch["rewards"], batch["terminated"])
    l_gate, gate_parts = student_gate_loss(heads[-1], x_real, Fc, args)
    return loss.float() + args.head_weight * l_head + l_gate, {**parts, **head_parts, **gate_parts}


def quick_metrics(setup: Distill, ema: CausalDiT, args: argparse.Namespace):
    """Rollout PSNR of the EMA student on fixed held-out windows at 1 and 2 steps, the whole chain as at play time
    (same noise each time); None where there is nothing to measure."""
    held = setup.held_batch(args.frames)
    if held is None:
        return None
    tok, hb = held

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        m = {}
        for k in (1, 2):
            levels = sampling_levels(k)  # the whole chain, as played: exit at the last step
            gen = rollout(ema, hb["latents"], hb["actions"].long(), args.context, levels, setup.run.seeds.generator("eval", 1, shared=True), grad=False, exit_step=len(levels) - 2)
            m[f"eval/rollout_psnr_{k}step"] = psnr_latent_decoded(tok, gen[:, args.context:], hb["latents"][:, args.context:])
        return m

    return evaluate


def card(args: argparse.Namespace, meta: dict, step: int, wall: float, d, teacher_dir: Path) -> str:
    return model_card(f"{meta['game']} (student, Self Forcing with DMD)", [
        f"Stage 4: self-forcing rollouts of {args.frames - args.context} generated frames after {args.context} real ones, "
        f"{args.train_steps}-level denoising list with a random exit step per chunk; DMD against the teacher (guidance {args.guidance}) "
        f"with an online critic ({args.critic_steps} critic updates per student update)",
        f"Student initialised from: `{args.init or teacher_dir}`; teacher: `{teacher_dir}`",
        f"Data: actions and context of real {meta['game']} play recorded by `train.collect`",
        f"Student updates: {step}, batch {args.batch_size}, lr {args.lr} (critic {args.critic_lr})",
        f"Hardware: {hardware(d)} x {d.world_size} process(es); wall time {wall / 60:.1f} min",
        f"Samples with {args.sample_steps} step(s) of the consistency solver by default",
    ], "train.dmd", args)


main = stage_main(parse_args, train)


if __name__ == "__main__":
    sys.exit(main())
