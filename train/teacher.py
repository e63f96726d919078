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
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from train.dataset import read_meta
from train.common import ema_update
from train.latents import check_stamp, encode_latents, target_std, windows
from train.objectives import gate_loss, head_loss
from train.skeleton import Run, Schedule, UsageError, check_positive, export_world, hardware, model_card, read_network_config, stage_main, usage_errors
from worldmodel import cli
from worldmodel.checkpoint import CheckpointError, load_state, load_tensors
from worldmodel.config import DIT_PRESETS, PREDICTIONS, DiTConfig, SamplingConfig, dit_config, to_dict
from worldmodel.dit import CausalDiT, previous_frames
from worldmodel.flow import add_noise, sample_levels, velocity, x0_from_velocity
from worldmodel.tokenizer import FrameTokenizer


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
    p.add_argument("--own-context", type=float, default=0.0, help="share of windows whose clean context, after the first chunk, is the network's own one-step predictions of those frames instead of the real ones (error recycling: it learns to continue from its own imperfect frames toward the real next frame; the targets stay real)")
    p.add_argument("--residue", type=float, default=0.0, metavar="SHARE",
                   help="share of windows whose clean context carries a faint residue of moving content: each later frame keeps "
                        "RESIDUE_ALPHA of what moved into some earlier frame (as a gated model leaves where the ball was, then keeps); "
                        "the targets stay real, so the network learns to erase such residue (and its gate to open there)")
    p.add_argument("--bf16", action="store_true", help="run the network in bfloat16 under torch.autocast (weights, optimizer and losses stay float32): about 2x the steps per second on a CPU with AVX512-BF16, as on GPUs")
    p.add_argument("--compile", action="store_true", help="compile the training forward with torch.compile (inductor): about 1.3x the steps per second on this CPU on top of --bf16, after a compile of a few minutes at the first step; the weights and checkpoints are the same as without")
    p.add_argument("--head-weight", type=float, default=0.1, help="weight of the reward/end head losses")
    p.add_argument("--prev-frame", action="store_true", help="concatenate each frame's previous frame to its input tokens (pixel-aligned conditioning)")
    p.add_argument("--prev-stack", type=int, default=1, metavar="K", help="with --prev-frame: how many frames before each chunk its input tokens carry (2 adds the frame before the previous one, so a moving object's velocity is pixel-aligned; DIAMOND stacks 4)")
    p.add_argument("--delta", action="store_true", help="the network sees and predicts the change from the previous frame")
    p.add_argument("--predict", choices=PREDICTIONS, default="velocity", help="what the network outputs: the velocity, the clean frame x0 (JiT; for pixel patches wider than the network), or x0 through EDM's preconditioning (edm: anchored to the input at low noise, unit-scale target)")
    p.add_argument("--sigma-data", type=float, default=None, help="with --predict edm: the target's standard deviation (default: measured on the training latents)")
    p.add_argument("--patch-size", type=int, default=None, help="DiT patch size over the latent grid (default: the preset's); 1 gives the finest tokens")
    p.add_argument("--time-scale", type=float, default=1000.0, help="the time embedding reads TIME_SCALE x the noise level (DiT: 1000; a teacher to be "
                   "distilled with sCM wants a low one, e.g. 1-10, whose derivative in the level stays small)")
    p.add_argument("--refine", type=int, default=0, metavar="CHANNELS", help="a pixel-space refiner of this many hidden channels after the last layer (3x3 convolutions over each frame's pixels; needs the patch tokenizer and --predict x0 or edm; 0: none)")
    p.add_argument("--out-hidden", type=int, default=0, metavar="UNITS", help="the output layer that writes each token's latents: 0 for DiT's linear map, else a two-layer MLP of this hidden width (>= the token's latent size makes it full-rank; 768 with pixel patches at preset small)")
    p.add_argument("--init", default=None, metavar="PATH", help="start a fresh run from these weights: a training checkpoint (RUN/checkpoint), an exported model (RUN/model) or its dit/ folder; the network must have the same shape, except that a refiner the source lacks starts as the identity; a re-run with RUN/checkpoint present resumes from that instead")
    p.add_argument("--change-weight", type=float, default=0.0, help="extra flow-loss weight of latent elements that change from the previous frame (0: plain MSE)")
    p.add_argument("--change-threshold", type=float, default=0.05, help="an element changes when it moves by more than this (normalised latent units)")
    p.add_argument("--change-gate", action="store_true", help="a head that decides, per latent cell, whether it changes from the previous frame; generation keeps the previous frame's cell where it says no (Delta-IRIS's idea, per cell; needs --delta and --predict x0 or edm)")
    p.add_argument("--gate-channels", type=int, default=1, metavar="G", help="with --change-gate: decisions per latent cell, latent channel i "
                   "following decision i %% G (1: one per cell; with pixel patches of side P, P*P is one per pixel: the still pixels around a "
                   "moving ball are the previous frame's); --init from a gate of another grain copies its decision to each of the new ones")
    p.add_argument("--gate-weight", type=float, default=1.0, help="weight of the change gate's cross-entropy (with --change-gate)")
    p.add_argument("--level-mean", type=float, default=0.0, help="mean of the logit-normal training noise levels; > 0 shifts training toward high noise")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget (all resumed parts): stop and export when it is spent; the schedule then follows whichever of --steps and this runs out first")
    p.add_argument("--sample-steps", type=int, default=8, help="denoising steps the exported model samples with")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--export-only", action="store_true", help="write RUN/model from the latest checkpoint (EMA weights) without training")
    args = p.parse_args(argv)
    check_positive(p, args, ("steps", "batch_size", "frames", "window_chunks", "ckpt_every", "log_every", "sample_steps"))
    if args.sink_chunks < 0 or args.warmup < 0:
        p.error("--sink-chunks and --warmup must be >= 0")
    if not 0 <= args.action_drop < 1 or not 0 <= args.ctx_noise < 1:
        p.error("--action-drop and --ctx-noise must lie in [0, 1)")
    if not 0 <= args.own_context <= 1:
        p.error("--own-context must lie in [0, 1]")
    if not 0 <= args.residue <= 1:
        p.error("--residue must lie in [0, 1]")
    if args.sigma_data is not None and not (math.isfinite(args.sigma_data) and args.sigma_data > 0):
        p.error("--sigma-data must be a positive finite number")
    if args.sigma_data is not None and args.predict != "edm":
        p.error("--sigma-data is EDM's: it needs --predict edm")
    if args.patch_size is not None and args.patch_size <= 0:
        p.error("--patch-size must be positive")
    if args.refine < 0:
        p.error("--refine must be >= 0 (0: no refiner)")
    if args.out_hidden < 0:
        p.error("--out-hidden must be >= 0 (0: a linear output layer)")
    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        p.error(f"--time-scale must be a positive number, got {args.time_scale}")
    if args.refine and args.predict == "velocity":
        p.error("--refine corrects a predicted clean frame: it needs --predict x0 or edm")
    if not (math.isfinite(args.change_weight) and args.change_weight >= 0) or not (math.isfinite(args.change_threshold) and args.change_threshold > 0):
        p.error("--change-weight must be >= 0 and --change-threshold > 0 (finite)")
    if args.prev_stack < 1 or (args.prev_stack > 1 and not args.prev_frame):
        p.error(f"--prev-stack {args.prev_stack}: it must be >= 1, and above 1 it needs --prev-frame (it stacks the frames that --prev-frame concatenates)")
    if args.change_gate and not (args.delta and args.predict != "velocity"):
        p.error("--change-gate keeps cells of the previous frame: it needs --delta and --predict x0 or edm")
    if args.gate_channels != 1 and not args.change_gate:
        p.error("--gate-channels is the change gate's grain: it needs --change-gate")
    if args.gate_channels < 1:
        p.error(f"--gate-channels must be >= 1, got {args.gate_channels}")
    if not (math.isfinite(args.gate_weight) and args.gate_weight > 0):
        p.error(f"--gate-weight must be a positive number, got {args.gate_weight}")
    if not math.isfinite(args.level_mean):
        p.error("--level-mean must be finite")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        p.error("--max-minutes must be positive")
    return args


def changed(x0: torch.Tensor, threshold: float) -> torch.Tensor:
    """Latent elements of a window x0 (B, T, C, h, w) that differ from the frame before by more than
    `threshold` (False for the first frame, which has none), (B, T, C, h, w) bool. In Breakout these are the
    ball, the paddle's edges, a broken brick and the score: a fraction of a percent of the frame."""
    moved = (x0[:, 1:] - x0[:, :-1]).abs() > threshold  # (B, T-1, C, h, w)
    return torch.cat([torch.zeros_like(moved[:, :1]), moved], dim=1)


def flow_loss(v: torch.Tensor, target: torch.Tensor, x0: torch.Tensor, change_weight: float, threshold: float,
              also: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-matching MSE, weighted 1 + change_weight on the elements that change between frames (normalised
    by the total weight). Plain MSE leaves the small moving objects a tiny share of the gradient; the weight
    buys it back. `also` (B, T, C, h, w) bool: more elements to weight so, e.g. those whose previous frame in the
    context carries a residue to erase. Also returns the plain MSE and the weight's share on changed elements
    (for the logs)."""
    se = (v.float() - target).pow(2)
    plain = se.mean()
    if change_weight == 0:
        return plain, {"loss/flow": plain.item()}
    moved = changed(x0, threshold)
    moved = (moved if also is None else moved | also).float()
    w = 1 + change_weight * moved
    weighted = (w * se).sum() / w.sum()
    share = (w * moved).sum() / w.sum()
    return weighted, {"loss/flow": plain.item(), "loss/flow_weighted": weighted.item(), "changed_fraction": moved.mean().item(), "changed_weight_share": share.item()}


def own_context(model: torch.nn.Module, x0: torch.Tensor, a: torch.Tensor, share: float, g: torch.Generator, level_mean: float = 0.0,
                g_dev: torch.Generator | None = None) -> torch.Tensor:
    """Error recycling: the clean stream of a window x0 (B, T, C, h, w), with a random `share` of the windows
    replaced from the second chunk on by the network's own teacher-forced predictions of those frames (each
    denoised in one step from a training noise level, no gradient). At play time the context is the model's
    own output, errors and all; trained on real contexts only, it amplifies its errors step after step. The
    first chunk stays real (nothing before it to predict it from). `g_dev` draws the frame-sized noise on x0's
    device (default: `g`, on the CPU)."""
    if share == 0:
        return x0
    B, T = a.shape
    Fc = model_cfg(model).frames_per_chunk
    dev = x0.device
    pick = (torch.rand(B, generator=g) < share).to(dev)
    s = sample_levels((B, T // Fc), generator=g, mean=level_mean).repeat_interleave(Fc, dim=1).to(dev)
    noisy = add_noise(x0, randn_on(x0, g if g_dev is None else g_dev), s)
    with torch.no_grad():
        v, heads = model(x0, noisy, torch.zeros_like(s), s, a, a)
        own = x0_from_velocity(noisy, v.float(), s)  # x_s - s v: the velocity is what the loss fits, at every level
        prev = previous_frames(x0, Fc)
        keep = network(model).gate_keep(heads.change_logit, prev)  # as at play: cells the change gate calls unchanged
        if keep is not None:                                          # keep the previous frame
            own = torch.where(keep, prev, own)
    own[:, :Fc] = x0[:, :Fc]
    return torch.where(pick.view(B, 1, 1, 1, 1), own, x0)


# --residue: each frame of a picked window is a residue source with this probability; a residue keeps a share drawn
# uniformly from RESIDUE_ALPHA of the source frame's value. The long-play trails of the per-pixel-gate student are
# values 20-70 of 255 where the ball (red 200) was: 0.1-0.35 of it.
RESIDUE_SOURCE_PROB = 0.3
RESIDUE_ALPHA = (0.1, 0.4)


def residue_context(context: torch.Tensor, x0: torch.Tensor, share: float, threshold: float, frames_per_chunk: int,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residue of moving content in the clean stream `context` (B, T, C, h, w) of the real window x0: on a random
    `share` of windows, each frame j after the first chunk is a source with probability RESIDUE_SOURCE_PROB, and
    at the elements that changed into frame j (by more than `threshold`) every later frame t whose element is back
    to its value before j (frame j - 1's) takes alpha x0_j + (1 - alpha) of its own: a faint copy of the ball where
    it was, while the real ball, wherever it is now, stays as it is. alpha is drawn per source from RESIDUE_ALPHA.
    A gated model at play leaves such a copy where the ball was and, having never seen one erased, keeps it for
    good. Returns the context and the mask (B, T, C, h, w) bool of the elements given residue (None when none
    were), for the loss weights."""
    if share == 0:
        return context, None
    B, T = x0.shape[:2]
    moved = changed(x0, threshold)  # (B, T, C, h, w); False in frame 0
    pick = torch.rand(B, generator=g) < share
    source = (torch.rand(B, T, generator=g) < RESIDUE_SOURCE_PROB) & pick[:, None]
    source[:, :max(frames_per_chunk, 1)] = False
    source[:, -1] = False  # no later frame to carry it
    if not bool(source.any()):
        return context, None
    lo, hi = RESIDUE_ALPHA
    alpha = lo + (hi - lo) * torch.rand(B, T, generator=g)
    out = context.clone()
    mask = torch.zeros_like(moved)
    for b, j in source.nonzero().tolist():
        back = (x0[b, j + 1:] - x0[b, j - 1][None]).abs() <= threshold  # (T - j - 1, C, h, w)
        m = moved[b, j][None] & back
        a = float(alpha[b, j])
        out[b, j + 1:] = torch.where(m, a * x0[b, j][None] + (1 - a) * out[b, j + 1:], out[b, j + 1:])
        mask[b, j + 1:] |= m
    return out, mask


def randn_on(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn by g on g's device and moved to x's. On a GPU the frame-sized
    draws come from a generator on the GPU: a CPU drawing 2 x 7M numbers per step at batch 64 would cap the
    step rate near 10 per second."""
    return torch.randn(x.shape, generator=g, device=g.device).to(x.device)


def teacher_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace, num_actions: int, g: torch.Generator,
                 g_dev: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch. `g` draws the small random numbers (levels, drops) on the CPU, `g_dev` the
    frame-sized noise on the batch's device (default: `g` too, which keeps CPU runs as they were)."""
    x0 = batch["latents"].float()  # (B, T, C, h, w)
    a = batch["actions"].long()  # (B, T)
    B, T = a.shape
    Fc = model_cfg(model).frames_per_chunk
    n = T // Fc
    dev = x0.device
    # one noise level per chunk, shared by its frames
    s = sample_levels((B, n), generator=g, mean=args.level_mean).repeat_interleave(Fc, dim=1).to(dev)
    s_ctx = (torch.rand(B, n, generator=g) * args.ctx_noise).repeat_interleave(Fc, dim=1).to(dev)
    g_dev = g if g_dev is None else g_dev
    eps = randn_on(x0, g_dev)
    eps_ctx = randn_on(x0, g_dev)
    noisy = add_noise(x0, eps, s)
    # --bf16: the network's matrix products in bfloat16 (weights, optimizer, velocity maths and losses stay float32)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=getattr(args, "bf16", False)):
        context = own_context(model, x0, a, args.own_context, g, args.level_mean, g_dev)
        context, residue = residue_context(context, x0, getattr(args, "residue", 0.0), args.change_threshold, Fc, g)
        clean = add_noise(context, eps_ctx, s_ctx)
        drop = (torch.rand(B, n, generator=g) < args.action_drop).repeat_interleave(Fc, dim=1).to(dev)
        noisy_a = torch.where(drop, torch.full_like(a, num_actions), a)
        v, heads = model(clean, noisy, s_ctx, s, a, noisy_a)
    # a frame whose previous frame in the context carries residue has it to erase: weighted as a change
    erase = None if residue is None else previous_frames(residue.float(), Fc) > 0
    flow, flow_parts = flow_loss(v, velocity(x0, eps), x0, args.change_weight, args.change_threshold, also=erase)
    l_heads, head_parts = head_loss(heads, batch["rewards"], batch["terminated"])
    loss = flow + args.head_weight * l_heads
    if heads.change_logit is not None:
        l_gate, gate_parts = gate_loss(heads.change_logit, x0, Fc, args.change_threshold, context=context)
        loss = loss + args.gate_weight * l_gate
        head_parts.update(gate_parts)
    return loss, {**flow_parts, **head_parts}


def init_source(path: Path, cfg: DiTConfig, ignore: tuple[str, ...] = ()) -> tuple[Path, bool]:
    """The folder of --init's weights and whether its network lacks `cfg`'s refiner, or a CheckpointError: no
    checkpoint there, or a network of another shape than `cfg` (except for a refiner it lacks; fields in
    `ignore` are not compared)."""
    folder = path / "dit" if (path / "dit" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} holds no checkpoint (no config.json, nor dit/config.json)")
    src = read_network_config(folder, DiTConfig, hint="--init takes a teacher's checkpoint, its model folder or that folder's dit/")
    added = bool(cfg.refine and not src.refine)
    if added:
        src = dataclasses.replace(src, refine=cfg.refine, pixel_patch=cfg.pixel_patch)
    if src.change_gate and cfg.change_gate and src.gate_channels != cfg.gate_channels:
        if cfg.gate_channels % src.gate_channels:
            raise CheckpointError(f"{str(path)!r} has a change gate of {src.gate_channels} decisions per cell, which cannot be copied into "
                                  f"{cfg.gate_channels} (--gate-channels must be a multiple of it)")
        src = dataclasses.replace(src, gate_channels=cfg.gate_channels)  # its decisions are copied (see regrain_gate)
    theirs, ours = to_dict(src), to_dict(cfg)
    diff = sorted(k for k in ours if theirs[k] != ours[k] and k not in ignore)
    if diff:
        raise CheckpointError(f"{str(path)!r} holds a network of another shape: {', '.join(f'{k} {theirs[k]!r} (this run: {ours[k]!r})' for k in diff)}")
    return folder, added


def init_history(path: Path) -> dict | None:
    """The "trained" record of the exported model --init named (its folder or that folder's dit/), so that a
    fine-tuned export says how many steps stand behind it; None for a training checkpoint or a folder without one."""
    for folder in (path, path.parent) if path.name == "dit" else (path,):
        try:
            trained = json.loads((folder / "config.json").read_text()).get("trained")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(trained, dict) and isinstance(trained.get("steps"), int):
            return trained
    return None


def gate_card(args: argparse.Namespace) -> str:
    """The change gate in words, for the model card."""
    if not getattr(args, "change_gate", False):
        return "no"
    g = getattr(args, "gate_channels", 1)
    grain = "one decision per latent cell" if g == 1 else f"{g} decisions per latent cell (channel i follows decision i % {g})"
    return f"yes ({grain}, cross-entropy weight {args.gate_weight})"


def regrain_gate(tensors: dict[str, torch.Tensor], net: CausalDiT) -> dict[str, torch.Tensor]:
    """Source weights whose change gate has fewer decisions per cell than `net`'s, with each of its decisions
    copied to the finer ones it covers, so that the finer gate starts as the source's exactly: output row
    g * p * p + k of the gate's last layer (decision g of token cell k, see `CausalDiT.unpatchify`) takes the
    source's row (g % G_src) * p * p + k. Other weights pass as they are."""
    if net.gate is None:
        return tensors
    out = dict(tensors)
    n_cells = net.cfg.patch_size ** 2
    for name in ("gate.1.weight", "gate.1.bias"):
        src, want = tensors.get(name), net.state_dict()[name]
        if src is None or src.shape[0] == want.shape[0]:
            continue
        g_src, g_new = src.shape[0] // n_cells, want.shape[0] // n_cells
        rows = torch.tensor([(g % g_src) * n_cells + k for g in range(g_new) for k in range(n_cells)])
        out[name] = src[rows].clone()
    return out


def init_weights(dit: CausalDiT, ema: CausalDiT, path: Path) -> str:
    """Load the weights of a training checkpoint (raw into `dit`, EMA into `ema`), an exported model folder or
    a DiT folder (its weights into both). The source's network must have the shape of `dit`'s config, except
    for a refiner it lacks, which keeps its identity start. Returns a note for the log."""
    folder, added = init_source(path, dit.cfg)
    groups = [("raw", dit), ("model", ema)] if (folder / "raw.safetensors").is_file() else [("model", dit), ("model", ema)]
    for group, net in groups:
        tensors = regrain_gate(load_tensors(folder, group), net)
        if added:  # the refiner the source lacks keeps this network's identity start
            tensors.update({k: v for k, v in net.state_dict().items() if k.startswith("refiner.")})
        load_state(net, tensors, f"{group}.safetensors in {str(folder)!r}")
    return f" ({'raw and EMA' if groups[0][0] == 'raw' else 'EMA'} weights{'; the refiner starts as the identity' if added else ''})"


def network(model: torch.nn.Module) -> CausalDiT:
    """The CausalDiT inside the training wrappers: torch.compile's, DDP and PackForward."""
    model = getattr(model, "_orig_mod", model)
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "dit", model)


def model_cfg(model: torch.nn.Module) -> DiTConfig:
    return network(model).cfg


class PackForward(torch.nn.Module):
    """DDP wraps `forward`, so route it to forward_pack."""

    def __init__(self, dit: CausalDiT) -> None:
        super().__init__()
        self.dit = dit
        self.cfg = dit.cfg

    def forward(self, *a):
        return self.dit.forward_pack(*a)


def train(args: argparse.Namespace) -> int:
    data, tok_dir = Path(args.data), Path(args.tokenizer)
    with usage_errors():
        meta = read_meta(data)
        tok_cfg = FrameTokenizer.load(tok_dir).cfg
        check_stamp(Path(args.out) / "latents", tok_dir, "delete it or use a new --out")  # every rank checks, so all exit together
    if tuple(meta["frame_size"]) != tuple(tok_cfg.frame_size):
        raise UsageError(f"dataset frames are {meta['frame_size']} but the tokenizer takes {list(tok_cfg.frame_size)}")
    shape = {} if args.patch_size is None else {"patch_size": args.patch_size}
    if args.out_hidden:
        shape["out_hidden"] = args.out_hidden
    if args.change_gate:
        shape["change_gate"] = True
        if args.gate_channels != 1:
            shape["gate_channels"] = args.gate_channels
    if args.prev_stack > 1:
        shape["prev_stack"] = args.prev_stack
    if args.refine:
        if tok_cfg.kind != "patch":
            raise UsageError(f"--refine works on pixels: it needs the patch tokenizer (train.tokenizer --kind patch), not {tok_cfg.kind!r}")
        shape.update(refine=args.refine, pixel_patch=tok_cfg.patch)
    if args.sigma_data is not None:  # given (EDM only, parse_args checks); else measured on the latents below
        shape["sigma_data"] = args.sigma_data
    measured = args.predict == "edm" and args.sigma_data is None
    with usage_errors():
        cfg = dit_config(args.preset, in_channels=tok_cfg.channels, latent_size=tok_cfg.latent_size, num_actions=meta["num_actions"], sink_chunks=args.sink_chunks,
                         window_chunks=args.window_chunks, prev_frame=args.prev_frame, delta=args.delta, predict=args.predict, time_scale=args.time_scale, **shape)
    run = Run.start(args, "teacher", Schedule(args.warmup, args.steps, min_ratio=0.1, max_minutes=args.max_minutes), args.export_only)
    d = run.d
    if args.init is not None and not run.has_checkpoint():  # before the latents: a wrong source is refused at once
        with usage_errors("--init: "):  # a sigma_data still to be measured is compared when the weights load
            init_source(Path(args.init), cfg, ignore=("sigma_data",) if measured else ())
    train_lat, _ = encode_latents(data, tok_dir, run.out / "latents", d)  # once; each rank encodes its share of the shards
    if d.is_main:
        print(f"latents ready in {run.out / 'latents'} ({run.wall():.0f}s)")

    with usage_errors():
        if measured:  # the card's command repeats it
            args.sigma_data = round(target_std(train_lat, args.delta, cfg.frames_per_chunk), 6)
            cfg = dataclasses.replace(cfg, sigma_data=args.sigma_data)
        if args.predict == "edm" and d.is_main:
            print(f"EDM preconditioning: sigma_data {args.sigma_data} ({'measured on the training latents' if measured else 'given'})")
    if args.frames % cfg.frames_per_chunk:
        raise UsageError(f"--frames {args.frames} must be a multiple of frames_per_chunk {cfg.frames_per_chunk}")
    dit = CausalDiT(cfg).to(d.device)
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    if args.init is not None and not run.has_checkpoint():  # a resume keeps its checkpoint's weights
        with usage_errors("--init: "):
            note = init_weights(dit, ema, Path(args.init))
        if d.is_main:
            print(f"initialised from {args.init}{note}")
    elif args.init is not None and d.is_main and not args.export_only:
        print(f"--init {args.init}: {run.ckpt} exists, so this run resumes from it")
    train_args = run.resume(cfg, nets={"model": ema, "raw": dit}, opts={"dit": opt})
    n_params = sum(p.numel() for p in dit.parameters())
    model = PackForward(dit) if d.world_size == 1 else DDP(PackForward(dit))
    if getattr(args, "compile", False):  # the weights stay dit's: checkpoints and the export are as without it
        model = torch.compile(model)
    if d.is_main:
        print(f"teacher {args.preset}: {n_params / 1e6:.2f}M parameters, {cfg.tokens_per_frame} tokens/frame, {args.frames} frames/window, {d.world_size} process(es) on {d.device}")

    batches = windows(train_lat, args.frames, args.batch_size // d.world_size, d, seed=run.seeds.int("data", run.step, shared=True))
    g = run.seeds.generator("noise", run.step)
    g_dev = g if d.device.type == "cpu" else run.seeds.generator("noise-device", run.step, device=d.device)
    while run.training():
        loss, parts = teacher_loss(model, next(batches), args, cfg.num_actions, g, g_dev)
        gnorm = run.update(opt, loss, dit, args.lr)
        ema_update(ema, dit, args.ema if run.step >= args.warmup else 0.0)
        run.step_done(parts, gnorm)
    run.finish()

    if d.is_main:  # the world model (EMA weights) with real start contexts from held-out episodes
        info = {"game": meta["game"], "env_id": meta.get("env_id"), "action_meanings": meta["action_meanings"], "frame_size": list(meta["frame_size"]),
                "frameskip": meta["frameskip"], "sampling": SamplingConfig(steps=args.sample_steps).to_json(),
                "trained": {"stage": "teacher", "steps": run.step, "preset": args.preset, "data": str(data)}}
        before = None  # the steps behind an --init network, where its export says
        if getattr(train_args, "init", None):
            prior = init_history(Path(train_args.init))
            info["trained"]["init"] = {"path": str(train_args.init), **({"trained": prior} if prior else {})}
            if prior:
                before = prior.get("total_steps", prior["steps"])
                info["trained"]["total_steps"] = run.step + before
        export_world(run.out, ema, tok_dir, info, data, card(train_args, meta, n_params, run.step, run.wall(), d, before))
    run.close()
    return 0


def card(args: argparse.Namespace, meta: dict, n_params: int, step: int, wall: float, d, before: int | None = None) -> str:
    after = f" after the {before} steps of the network it was initialised from" if before is not None else ""
    return model_card(f"{meta['game']} (teacher)", [
        f"Stage: teacher (flow matching, teacher forcing), preset `{args.preset}`, {n_params / 1e6:.2f}M parameters",
        f"Data: {meta.get('splits', {}).get('train', {}).get('steps', '?')} training steps of real {meta['game']} play recorded by `train.collect`",
        f"Optimizer steps: {step}{after}, batch {args.batch_size} windows of {args.frames} frames",
        f"Hardware: {hardware(d)} x {d.world_size} process(es); wall time {wall / 60:.1f} min (latent encoding and training, all resumed parts{'; not counting the training of the network it was initialised from' if getattr(args, 'init', None) else ''})",
        f"Network: predicts {args.predict}{f' (sigma_data {args.sigma_data})' if getattr(args, 'sigma_data', None) else ''}; previous frame concatenated {('yes' + (f', {args.prev_stack} frames stacked' if getattr(args, 'prev_stack', 1) > 1 else '')) if args.prev_frame else 'no'}, change-from-previous parameterisation {'yes' if args.delta else 'no'}; "
        f"flow loss change weight {args.change_weight} (threshold {args.change_threshold}); logit-normal level mean {args.level_mean}; "
        f"own-prediction context (error recycling) on {getattr(args, 'own_context', 0.0):.0%} of windows; "
        f"residue of moving content in the context on {getattr(args, 'residue', 0.0):.0%} of windows",
        f"Output layer: {f'MLP of {args.out_hidden} hidden units' if getattr(args, 'out_hidden', 0) else 'linear'}; "
        f"pixel refiner: {f'{args.refine} hidden channels' if getattr(args, 'refine', 0) else 'none'}; "
        f"change gate: {gate_card(args)}" + (f"; initialised from {args.init}" if getattr(args, "init", None) else ""),
        f"Precision: {'bfloat16 autocast (float32 weights and losses)' if getattr(args, 'bf16', False) else 'float32'}; samples with {args.sample_steps} Euler steps by default",
    ], "train.teacher", args)


main = stage_main(parse_args, train)


if __name__ == "__main__":
    sys.exit(main())
