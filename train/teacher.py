"""Stage 2: train the causal teacher by flow matching with teacher forcing.

    python -m train.teacher --data DATA --tokenizer TOK_RUN/tokenizer --out RUN [--preset small] [--steps N]
    torchrun --nproc_per_node=2 -m train.teacher ...            (DDP; gloo on CPU, NCCL on GPUs)

Each batch is a window of T real frames. The sequence packs [clean chunks | noisy chunks]: noisy chunk i
(own noise level) attends to itself and to the clean chunks before it; clean and noisy copies share
positions. The clean context gets a little noise of its own (the model is told its level), so it learns
to tolerate its own errors at play time. Actions of noisy chunks are dropped at a small rate so action
guidance works. The reward/end heads learn from the real rewards and terminations on the clean stream.

Outputs under RUN: latents/ (frames encoded once by the frozen tokenizer), checkpoint/ (resumable:
EMA + raw weights, optimizer, step), tb/ and log.jsonl (TensorBoard), model/ (the exported world model).
Re-running the same command after a kill resumes from checkpoint/ (weights, optimizer and step; the data
stream starts a fresh shuffle seeded by the step, so it does not replay the exact windows of the lost run).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from envs.dataset import episodes, iter_windows, list_shards, load_shard, read_meta
from train.common import Logger, all_reduce_mean, barrier, cleanup_dist, ema_update, seed_everything, setup_dist, write_json
from worldmodel import cli
from worldmodel.checkpoint import CheckpointError, flatten_optimizer, load_into, load_tensors, read_config, read_state, recover, remove_stale_temps, save_checkpoint, unflatten_optimizer
from worldmodel.config import DIT_PRESETS, PREDICTIONS, DiTConfig, SamplingConfig, dit_config, from_dict, to_dict
from worldmodel.dit import CausalDiT
from worldmodel.flow import add_noise, sample_levels, velocity
from worldmodel.runtime import export_world_model
from worldmodel.tokenizer import FrameTokenizer

LATENT_KEYS = ("latents", "actions", "rewards", "terminated", "first")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.teacher", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder written by train.collect")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder written by train.tokenizer (RUN/tokenizer)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, exported model)")
    p.add_argument("--preset", default="small", choices=sorted(DIT_PRESETS))
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=16, help="windows per optimizer step, over all processes")
    p.add_argument("--frames", type=int, default=12, help="frames per training window; longer than the context (sinks + window + 1 chunks) trains the rolling-window regime of long play")
    p.add_argument("--sink-chunks", type=int, default=1)
    p.add_argument("--window-chunks", type=int, default=7)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--action-drop", type=float, default=0.1, help="probability of dropping a noisy frame's action (for guidance)")
    p.add_argument("--ctx-noise", type=float, default=0.1, help="max noise level on the clean context")
    p.add_argument("--head-weight", type=float, default=0.1, help="weight of the reward/end head losses")
    p.add_argument("--prev-frame", action="store_true", help="concatenate each frame's previous frame to its input tokens (pixel-aligned conditioning)")
    p.add_argument("--delta", action="store_true", help="the network sees and predicts the change from the previous frame")
    p.add_argument("--predict", choices=PREDICTIONS, default="velocity", help="what the network outputs: the velocity, or the clean frame x0 (JiT; for pixel patches wider than the network)")
    p.add_argument("--patch-size", type=int, default=None, help="DiT patch size over the latent grid (default: the preset's); 1 gives the finest tokens")
    p.add_argument("--change-weight", type=float, default=0.0, help="extra flow-loss weight of latent elements that change from the previous frame (0: plain MSE)")
    p.add_argument("--change-threshold", type=float, default=0.05, help="an element changes when it moves by more than this (normalised latent units)")
    p.add_argument("--level-mean", type=float, default=0.0, help="mean of the logit-normal training noise levels; > 0 shifts training toward high noise")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget (all resumed parts): stop and export when it is spent; the schedule then follows whichever of --steps and this runs out first")
    p.add_argument("--sample-steps", type=int, default=8, help="denoising steps the exported model samples with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--export-only", action="store_true", help="write RUN/model from the latest checkpoint (EMA weights) without training")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "frames", "window_chunks", "ckpt_every", "log_every", "sample_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.sink_chunks < 0 or args.warmup < 0:
        p.error("--sink-chunks and --warmup must be >= 0")
    if not 0 <= args.action_drop < 1 or not 0 <= args.ctx_noise < 1:
        p.error("--action-drop and --ctx-noise must lie in [0, 1)")
    if args.patch_size is not None and args.patch_size <= 0:
        p.error("--patch-size must be positive")
    if not (math.isfinite(args.change_weight) and args.change_weight >= 0) or not (math.isfinite(args.change_threshold) and args.change_threshold > 0):
        p.error("--change-weight must be >= 0 and --change-threshold > 0 (finite)")
    if not math.isfinite(args.level_mean):
        p.error("--level-mean must be finite")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        p.error("--max-minutes must be positive")
    return args


# ----- data: frames -> latents once, then windows of latents -----
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


def batches(paths: list[Path], args: argparse.Namespace, rank: int, world: int, per_rank: int, seed: int):
    # latents are small (2 KiB a frame): keep 8 shards in memory so a batch mixes many episodes
    it = iter_windows(paths, args.frames, seed=seed, rank=rank, world_size=world, keys=LATENT_KEYS[:4], shards_in_memory=8)
    while True:
        ws = [next(it) for _ in range(per_rank)]
        yield {k: torch.from_numpy(np.stack([w[k] for w in ws])) for k in LATENT_KEYS[:4]}


def changed(x0: torch.Tensor, threshold: float) -> torch.Tensor:
    """Latent elements of a window x0 (B, T, C, h, w) that differ from the frame before by more than
    `threshold` (False for the first frame, which has none), (B, T, C, h, w) bool. In Breakout these are the
    ball, the paddle's edges, a broken brick and the score: a fraction of a percent of the frame."""
    moved = (x0[:, 1:] - x0[:, :-1]).abs() > threshold  # (B, T-1, C, h, w)
    return torch.cat([torch.zeros_like(moved[:, :1]), moved], dim=1)


def flow_loss(v: torch.Tensor, target: torch.Tensor, x0: torch.Tensor, change_weight: float, threshold: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-matching MSE, weighted 1 + change_weight on the elements that change between frames (normalised
    by the total weight). Plain MSE leaves the small moving objects a tiny share of the gradient; the weight
    buys it back. Also returns the plain MSE and the weight's share on changed elements (for the logs)."""
    se = (v.float() - target).pow(2)
    plain = se.mean()
    if change_weight == 0:
        return plain, {"loss/flow": plain.item()}
    moved = changed(x0, threshold).float()
    w = 1 + change_weight * moved
    weighted = (w * se).sum() / w.sum()
    share = (w * moved).sum() / w.sum()
    return weighted, {"loss/flow": plain.item(), "loss/flow_weighted": weighted.item(), "changed_fraction": moved.mean().item(), "changed_weight_share": share.item()}


def teacher_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace, num_actions: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    x0 = batch["latents"].float()  # (B, T, C, h, w)
    a = batch["actions"].long()  # (B, T)
    B, T = a.shape
    Fc = model_cfg(model).frames_per_chunk
    n = T // Fc
    dev = x0.device
    # one noise level per chunk, shared by its frames
    s = sample_levels((B, n), generator=g, mean=args.level_mean).repeat_interleave(Fc, dim=1).to(dev)
    s_ctx = (torch.rand(B, n, generator=g) * args.ctx_noise).repeat_interleave(Fc, dim=1).to(dev)
    eps = torch.randn(x0.shape, generator=g).to(dev)
    eps_ctx = torch.randn(x0.shape, generator=g).to(dev)
    noisy = add_noise(x0, eps, s)
    clean = add_noise(x0, eps_ctx, s_ctx)
    drop = (torch.rand(B, n, generator=g) < args.action_drop).repeat_interleave(Fc, dim=1).to(dev)
    noisy_a = torch.where(drop, torch.full_like(a, num_actions), a)
    v, heads = model(clean, noisy, s_ctx, s, a, noisy_a)
    flow, flow_parts = flow_loss(v, velocity(x0, eps), x0, args.change_weight, args.change_threshold)
    r = batch["rewards"].float().to(dev)
    event = (r != 0).float()
    l_event = F.binary_cross_entropy_with_logits(heads.reward_logit, event)
    l_value = ((heads.reward_value - r) ** 2 * event).sum() / event.sum().clamp(min=1)
    l_end = F.binary_cross_entropy_with_logits(heads.end_logit, batch["terminated"].float().to(dev))
    loss = flow + args.head_weight * (l_event + l_value + l_end)
    return loss, {**flow_parts, "loss/reward_event": l_event.item(), "loss/reward_value": l_value.item(), "loss/end": l_end.item()}


def model_cfg(model: torch.nn.Module) -> DiTConfig:
    return (model.module if isinstance(model, DDP) else model).cfg


class PackForward(torch.nn.Module):
    """DDP wraps `forward`, so route it to forward_pack."""

    def __init__(self, dit: CausalDiT) -> None:
        super().__init__()
        self.dit = dit
        self.cfg = dit.cfg

    def forward(self, *a):
        return self.dit.forward_pack(*a)


def lr_at(step: int, args: argparse.Namespace, wall_s: float = 0.0) -> float:
    """Linear warm-up, then cosine to 0.1 lr over the steps, or over --max-minutes if that runs out first."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    prog = (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.max_minutes is not None:
        prog = max(prog, wall_s / (60 * args.max_minutes))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    try:
        meta = read_meta(data)
        tok = FrameTokenizer.load(args.tokenizer)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tuple(meta["frame_size"]) != tuple(tok.cfg.frame_size):
        print(f"error: dataset frames are {meta['frame_size']} but the tokenizer takes {list(tok.cfg.frame_size)}", file=sys.stderr)
        return 2
    lat_dir = out / "latents"
    stamp = lat_dir / "tokenizer.json"
    tok_id = read_config(args.tokenizer)
    if stamp.exists() and json.loads(stamp.read_text()) != tok_id:  # every rank checks, so all exit together
        print(f"error: {lat_dir} was encoded with another tokenizer; delete it or use a new --out", file=sys.stderr)
        return 2
    try:
        d = setup_dist(args.device)
    except ValueError as e:
        print(f"error: --device: {e}", file=sys.stderr)
        return 2
    world = d.world_size
    if args.batch_size % world:
        print(f"error: --batch-size {args.batch_size} is not divisible by {world} processes", file=sys.stderr)
        return 2
    seed_everything(args.seed + d.rank)
    tok = tok.to(d.device).eval()

    # 1. latents, once (each rank encodes its share of the shards)
    t0 = time.time()
    lat_dir.mkdir(parents=True, exist_ok=True)
    if d.is_main:
        write_json(stamp, tok_id)
    train_lat = encode_split(data, "train", tok, lat_dir, d.rank, world)
    encode_split(data, "heldout", tok, lat_dir, d.rank, world)
    barrier()
    if d.is_main:
        print(f"latents ready in {lat_dir} ({time.time() - t0:.0f}s)")

    # 2. model, EMA, optimizer; resume if a checkpoint exists
    shape = {} if args.patch_size is None else {"patch_size": args.patch_size}
    try:
        cfg = dit_config(args.preset, in_channels=tok.cfg.channels, latent_size=tok.cfg.latent_size, num_actions=meta["num_actions"], sink_chunks=args.sink_chunks,
                         window_chunks=args.window_chunks, prev_frame=args.prev_frame, delta=args.delta, predict=args.predict, **shape)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.frames % cfg.frames_per_chunk:
        print(f"error: --frames {args.frames} must be a multiple of frames_per_chunk {cfg.frames_per_chunk}", file=sys.stderr)
        return 2
    ckpt = out / "checkpoint"
    dit = CausalDiT(cfg).to(d.device)
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    step, wall_before = 0, 0.0  # wall time of earlier (killed) parts of this run
    train_args = args  # the arguments the checkpoint was trained with (for the model card)
    recover(ckpt)
    if d.is_main and not args.export_only:  # only the checkpoint's writer (rank 0 of a training run) may
        remove_stale_temps(ckpt)  # remove the temp folders of saves a kill cut short
    if ckpt.exists():
        try:
            step, state = resume(ckpt, cfg, dit, ema, opt, d.device)
        except CheckpointError as e:
            print(f"error: cannot resume: {e}", file=sys.stderr)
            return 2
        if d.is_main:
            print(f"resumed from {ckpt} at step {step}")
    elif args.export_only:
        print(f"error: --export-only needs a checkpoint in {ckpt}", file=sys.stderr)
        return 2
    if args.export_only:
        args.steps = step  # nothing to train
        train_args = argparse.Namespace(**state["args"])
    if ckpt.exists():
        wall_before = float(state.get("wall_s", 0.0))  # checkpoints before wall_s was recorded count 0
    n_params = sum(p.numel() for p in dit.parameters())
    model: torch.nn.Module = PackForward(dit)
    if world > 1:
        model = DDP(model)
    log = Logger(out, enabled=d.is_main, resume_step=step)
    if d.is_main:
        if not args.export_only:
            write_json(out / "args.json", vars(args))
        print(f"teacher {args.preset}: {n_params / 1e6:.2f}M parameters, {cfg.tokens_per_frame} tokens/frame, {args.frames} frames/window, {world} process(es) on {d.device}")

    def save(step: int) -> None:
        if d.is_main:
            otensors, oskel = flatten_optimizer(opt)
            save_checkpoint(ckpt, {"kind": "dit", "config": to_dict(cfg)}, {"model": ema.state_dict(), "raw": dit.state_dict(), "optimizer": otensors}, {"step": step, "optimizer": oskel, "args": vars(args), "wall_s": wall_before + time.time() - t0})
        barrier()

    # 3. train
    per_rank = args.batch_size // world
    data_it = batches(train_lat, args, d.rank, world, per_rank, seed=args.seed * 100003 + step)
    g = torch.Generator().manual_seed(args.seed * 7919 + d.rank * 104729 + step)
    bar = tqdm(total=args.steps, initial=step, desc="teacher", disable=not d.is_main, dynamic_ncols=True)
    t_log, seen = time.time(), 0
    acc: dict[str, float] = {}
    def wall() -> float:
        return wall_before + time.time() - t0

    def out_of_time() -> bool:  # every rank stops at the same step
        return args.max_minutes is not None and all_reduce_mean(float(wall() >= 60 * args.max_minutes), d) > 0

    while step < args.steps and not out_of_time():
        batch = {k: v.to(d.device) for k, v in next(data_it).items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args, wall())
        loss, parts = teacher_loss(model, batch, args, cfg.num_actions, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        if not torch.isfinite(gnorm):  # from the all-reduced gradients, so every rank agrees
            raise FloatingPointError(f"gradient norm is {gnorm.item()} at step {step} (loss {loss.item()}); lower --lr")
        opt.step()
        ema_update(ema, dit, args.ema if step >= args.warmup else 0.0)
        step += 1
        seen += 1
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + v
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - t_log
            scalars = {k: all_reduce_mean(v / seen, d) for k, v in acc.items()}
            scalars.update({"lr": lr_at(step, args, wall()), "grad_norm": float(gnorm), "steps_per_s": seen / dt})
            log.log(step, **scalars)
            bar.set_postfix(flow=f"{scalars['loss/flow']:.4f}", sps=f"{seen / dt:.2f}")
            acc, seen, t_log = {}, 0, time.time()
        if step % args.ckpt_every == 0 or step == args.steps:
            save(step)
    stopped_between = step % args.ckpt_every != 0 and step < args.steps  # by --max-minutes, after the last checkpoint
    if stopped_between or not ckpt.exists():
        save(step)
    bar.close()
    log.close()

    # 4. export the world model (EMA weights) with real start contexts from held-out episodes
    if d.is_main:
        frames, actions = start_contexts(data, n=16, length=cfg.sink_chunks * cfg.frames_per_chunk + 3 * cfg.frames_per_chunk)
        info = {
            "game": meta["game"],
            "env_id": meta.get("env_id"),
            "action_meanings": meta["action_meanings"],
            "frame_size": list(meta["frame_size"]),
            "frameskip": meta["frameskip"],
            "sampling": to_dict(SamplingConfig(steps=args.sample_steps)),
            "trained": {"stage": "teacher", "steps": step, "preset": args.preset, "data": str(data)},
        }
        card = model_card(train_args, meta, n_params, step, wall_before + time.time() - t0, d)
        remove_stale_temps(out / "model")  # export_world_model writes through the same temp-folder scheme
        export_world_model(out / "model", ema, args.tokenizer, info, frames, actions, card)
        print(f"exported world model to {out / 'model'}")
    cleanup_dist()
    return 0


def check_same_config(ckpt: Path, cfg: DiTConfig) -> None:
    """A training checkpoint resumes only into a model of the same shape."""
    saved = read_config(ckpt)
    try:
        same = from_dict(DiTConfig, saved.get("config", {})) == cfg
    except (TypeError, ValueError):
        same = False
    if not same:
        raise CheckpointError(f"{ckpt} holds a model of another shape ({saved.get('config')}); use a new --out or the same arguments")


def resume(ckpt: Path, cfg: DiTConfig, dit: CausalDiT, ema: CausalDiT, opt: torch.optim.Optimizer, device: torch.device) -> tuple[int, dict]:
    """Load raw and EMA weights and the optimizer from a training checkpoint; returns its step and state."""
    check_same_config(ckpt, cfg)
    state = read_state(ckpt)
    if state is None or "step" not in state or "optimizer" not in state:
        raise CheckpointError(f"{ckpt} has no usable state.json (step, optimizer); it is not a training checkpoint")
    load_into(dit, ckpt, "raw")
    load_into(ema, ckpt, "model")
    unflatten_optimizer(opt, {k: v.to(device) for k, v in load_tensors(ckpt, "optimizer").items()}, state["optimizer"])
    return int(state["step"]), state


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


def model_card(args: argparse.Namespace, meta: dict, n_params: int, step: int, wall: float, d) -> str:
    hw = torch.cuda.get_device_name(0) if d.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    flags = {k: v for k, v in vars(args).items() if k != "export_only" and v is not None and v is not False}
    cmd = "python -m train.teacher " + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in flags.items())
    return (
        f"# World model: {meta['game']} (teacher)\n\n"
        f"- Stage: teacher (flow matching, teacher forcing), preset `{args.preset}`, {n_params / 1e6:.2f}M parameters\n"
        f"- Data: {meta.get('splits', {}).get('train', {}).get('steps', '?')} training steps of real {meta['game']} play recorded by `train.collect`\n"
        f"- Optimizer steps: {step}, batch {args.batch_size} windows of {args.frames} frames\n"
        f"- Hardware: {hw} x {d.world_size} process(es); wall time {wall / 60:.1f} min (latent encoding and training, all resumed parts)\n"
        f"- Network: predicts {args.predict}; previous frame concatenated {'yes' if args.prev_frame else 'no'}, change-from-previous parameterisation {'yes' if args.delta else 'no'}; "
        f"flow loss change weight {args.change_weight} (threshold {args.change_threshold}); logit-normal level mean {args.level_mean}\n"
        f"- Samples with {args.sample_steps} Euler steps by default\n\n"
        f"Reproduce:\n\n    {cmd}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
