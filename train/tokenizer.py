"""Stage 1: train the frame tokenizer (a small AutoencoderKL, from scratch) on the recorded frames.

    python -m train.tokenizer --data DATA --out RUN_DIR                 # one process
    torchrun --nproc_per_node=2 -m train.tokenizer --data DATA --out RUN_DIR   # DDP (gloo on CPU)

Loss: L1 + MSE reconstruction with rare pixels up-weighted, plus a tiny KL. Breakout is a black screen
with a few bricks: an autoencoder that blurs away the 1-2 pixel ball and the thin paddle already scores a
high PSNR, so pixels that differ from the dataset's per-pixel median frame (ball, paddle, broken bricks,
score digits) weigh `1 + --rare-weight`.

RUN_DIR/checkpoint/  training state (weights, optimizer, step, RNG), written every --ckpt-every steps;
                     re-running the same command resumes from it.
RUN_DIR/tokenizer/   the exported tokenizer (`FrameTokenizer.load`), with per-channel latent statistics
                     measured on training frames, and metrics.json (held-out PSNR, decode ms per frame).
--kind patch trains nothing (pixel patches have no weights) but still exports and measures.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from envs.probe import probe_for
from train.eval_metrics import probe_errors
from train.common import Dist, ema_update, write_json
from train.dataset import iter_windows, list_shards, load_shard, read_meta
from train.skeleton import Run, Schedule, Seeds, UsageError, read_network_config
from worldmodel import cli
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import TokenizerConfig, from_dict, to_dict
from worldmodel.tokenizer import FrameTokenizer, frames_to_pixels

MEDIAN_FRAMES = 2048  # frames sampled to compute the per-pixel median ("background") frame
STATS_FRAMES = 2048  # frames sampled to measure the per-channel latent mean / std
SAMPLE_MAX_SHARDS = 8  # those samples are drawn from at most this many shards (spread over the split)
RARE_THRESHOLD = 16  # uint8 levels: a pixel whose channel differs from the median by more is "rare"
MIN_LATENT_STD = 1e-3  # floor for a (near-)constant latent channel, e.g. an always-black pixel patch
ENCODE_BATCH = 256  # frames per forward when measuring statistics and PSNR
WARMUP_STEPS = 100  # linear learning-rate warm-up, then cosine decay to MIN_LR_RATIO * lr
MIN_LR_RATIO = 0.1
DECODE_WARMUP, DECODE_REPEATS = 10, 50  # decode-speed measurement at batch 1
PSNR_CAP_DB = 100.0  # per-frame PSNR of an exact reconstruction (MSE 0) is reported as this
SHARDS_IN_MEMORY = 4  # shards each rank holds while streaming (wider pool, less correlated batches)


# ---- data ------------------------------------------------------------------------------------------------
def frame_batches(shards: list[Path], batch_size: int, seed: int, d: Dist) -> Iterator[torch.Tensor]:
    """Endless uint8 batches (B, H, W, 3) of single frames; each rank streams its own shards."""
    windows = iter_windows(shards, 1, seed=seed, rank=d.rank, world_size=d.world_size, keys=("frames",),
                           shards_in_memory=SHARDS_IN_MEMORY)
    while True:
        frames = [next(windows)["frames"][0] for _ in range(batch_size)]  # B x (H, W, 3)
        yield torch.from_numpy(np.stack(frames))  # (B, H, W, 3)


def sample_frames(shards: list[Path], count: int, seed: int) -> np.ndarray:
    """Up to `count` frames (N, H, W, 3) uint8 drawn without replacement from up to SAMPLE_MAX_SHARDS shards."""
    picked = [shards[i] for i in np.linspace(0, len(shards) - 1, min(len(shards), SAMPLE_MAX_SHARDS)).round().astype(int)]
    frames = np.concatenate([load_shard(p)["frames"] for p in dict.fromkeys(picked)])  # (N_all, H, W, 3)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(frames))[:count])
    return frames[keep]


def rare_pixel_mask(frames: torch.Tensor, median: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) vs median (H, W, 3) -> float mask (B, 1, H, W): 1 where any channel differs."""
    diff = (frames.int() - median.int()).abs().amax(dim=-1)  # (B, H, W)
    return (diff > RARE_THRESHOLD).float().unsqueeze(1)  # (B, 1, H, W)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of an MSE measured on [-1, 1] pixels (peak-to-peak 2), capped at PSNR_CAP_DB."""
    return (10 * torch.log10(4.0 / mse.clamp_min(4.0 * 10 ** (-PSNR_CAP_DB / 10)))).clamp_max(PSNR_CAP_DB)


def tokenizer_loss(recon: torch.Tensor, kl: torch.Tensor, frames: torch.Tensor, median: torch.Tensor,
                   rare_weight: float, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, reconstruction loss) for reconstructions (B, 3, H, W) of uint8 `frames` (B, H, W, 3).

    Reconstruction: L1 + MSE per pixel element, averaged with weight 1 + rare_weight on rare pixels.
    KL (B,) is summed over the latent; it is divided by the pixel elements per frame so that `kl_weight`
    means what it means in LDM's summed losses (1e-6: a gentle pull towards N(0, I)).
    """
    x = frames_to_pixels(frames)  # (B, 3, H, W)
    weight = 1.0 + rare_weight * rare_pixel_mask(frames, median)  # (B, 1, H, W)
    diff = recon.float() - x  # (B, 3, H, W)
    rec = (weight * (diff.abs() + diff**2)).sum() / (weight.sum() * diff.shape[1])
    return rec + kl_weight * kl.float().mean() / x[0].numel(), rec


# ---- export and evaluation -------------------------------------------------------------------------------
@torch.inference_mode()
def measure_latent_stats(tok: FrameTokenizer, frames: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw latents of `frames` (N, H, W, 3)."""
    raws = []
    for i in range(0, len(frames), ENCODE_BATCH):
        x = frames_to_pixels(torch.from_numpy(frames[i:i + ENCODE_BATCH]).to(tok.device))  # (b, 3, H, W)
        raws.append(tok.encode_raw(x).double())  # (b, C, h, w)
    raw = torch.cat(raws).transpose(0, 1).flatten(1)  # (C, N*h*w)
    return raw.mean(1).tolist(), raw.std(1).clamp_min(MIN_LATENT_STD).tolist()


@torch.inference_mode()
def evaluate_psnr(tok: FrameTokenizer, frames: np.ndarray, median: np.ndarray) -> dict[str, float]:
    """Round trip uint8 -> latents -> uint8: mean per-frame PSNR, and PSNR over the rare pixels only."""
    median_t = torch.from_numpy(median)
    psnrs, rare_err, rare_count = [], 0.0, 0.0
    for i in range(0, len(frames), ENCODE_BATCH):
        x = torch.from_numpy(frames[i:i + ENCODE_BATCH])  # (b, H, W, 3)
        y = tok.decode(tok.encode(x)).cpu()  # (b, H, W, 3)
        err = ((frames_to_pixels(y) - frames_to_pixels(x)) ** 2).double()  # (b, 3, H, W)
        psnrs.append(psnr_from_mse(err.mean(dim=(1, 2, 3))))
        mask = rare_pixel_mask(x, median_t).double()  # (b, 1, H, W)
        rare_err += float((err * mask).sum())
        rare_count += float(mask.sum()) * 3
    rare_psnr = float(psnr_from_mse(torch.tensor(rare_err / rare_count))) if rare_count else None
    return {"psnr": float(torch.cat(psnrs).mean()), "psnr_rare_pixels": rare_psnr, "eval_frames": len(frames),
            "rare_pixel_fraction": rare_count / (3 * frames[..., 0].size)}


BALL_KEPT_PX = 1.0  # probe_fidelity: a reconstructed ball farther than this from the real one is not kept


@torch.no_grad()
def probe_fidelity(tok: FrameTokenizer, frames: np.ndarray, probe) -> dict[str, float | int | None]:
    """The game's state probe (envs.probe) on real frames and on their round trips: what a world model on
    this tokenizer can reproduce at best. Ball kept = the reconstruction shows a ball within BALL_KEPT_PX of
    the real one (in-play frames); its position error where it shows one; paddle error; bricks-left exact."""
    recon = np.concatenate([tok.decode(tok.encode(torch.from_numpy(frames[i:i + ENCODE_BATCH]))).cpu().numpy() for i in range(0, len(frames), ENCODE_BATCH)])
    real, rec = probe(frames), probe(recon)
    e = probe_errors(real, rec)
    ball, seen = ~np.isnan(real["ball_x"]), ~np.isnan(rec["ball_x"])
    dist = e["ball_dist"][ball & seen]
    kept = e["ball_dist"][ball] <= BALL_KEPT_PX  # seen, and where the real one is
    paddle = e["paddle_abs_err"][~np.isnan(real["paddle_x"])]  # NaN where the reconstruction lost the paddle
    return {"probe_in_play_frames": int(ball.sum()), "ball_kept": float(kept.mean()) if ball.any() else None,
            "ball_false": int((seen & ~ball).sum()), "ball_err_mean_px": float(dist.mean()) if dist.size else None,
            "ball_err_max_px": float(dist.max()) if dist.size else None,
            "paddle_err_max_px": float(np.nan_to_num(paddle, nan=np.inf).max()) if paddle.size else None,
            "bricks_exact": float((e["bricks_abs_err"] == 0).mean())}


@torch.inference_mode()
def measure_decode_ms(tok: FrameTokenizer) -> float:
    """Median wall time in ms to decode one frame (batch 1) after warm-up, as the env does every step."""
    latents = torch.randn(1, tok.cfg.channels, *tok.cfg.latent_size, device=tok.device)  # (1, C, h, w)
    for _ in range(DECODE_WARMUP):
        tok.decode(latents)
    times = []
    for _ in range(DECODE_REPEATS):
        t0 = time.perf_counter()
        tok.decode(latents)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def export(args: argparse.Namespace, cfg: TokenizerConfig, weights: dict[str, torch.Tensor] | None,
           median: np.ndarray, step: int, device: torch.device, seeds: Seeds) -> dict:
    """Write RUN_DIR/tokenizer/ (with latent statistics) and its metrics.json; return the metrics."""
    out_dir = Path(args.out) / "tokenizer"
    tok = FrameTokenizer(copy.deepcopy(cfg)).to(device).eval()
    if weights is not None:
        tok.load_state_dict(weights)
    train_shards = list_shards(args.data, "train")
    mean, std = measure_latent_stats(tok, sample_frames(train_shards, STATS_FRAMES, seeds.int("stats", shared=True)))
    tok.set_latent_stats(mean, std)
    tok.save(out_dir)
    tok = FrameTokenizer.load(out_dir, device=device)  # evaluate exactly what a user loads
    heldout = list_shards(args.data, "heldout")
    if heldout:
        quality = evaluate_psnr(tok, sample_frames(heldout, args.eval_frames, seeds.int("eval", shared=True)), median)
    else:
        print(f"warning: no held-out shards in {args.data}/heldout; PSNR is not measured", file=sys.stderr)
        quality = {"psnr": None, "psnr_rare_pixels": None, "eval_frames": 0, "rare_pixel_fraction": None}
    probe = probe_for(read_meta(args.data)["game"])
    fidelity = probe_fidelity(tok, sample_frames(heldout, args.eval_frames, seeds.int("eval", shared=True)), probe) if heldout and probe else {}
    metrics = {
        "kind": cfg.kind,
        "step": step,
        **quality,
        **fidelity,
        "decode_ms_per_frame": measure_decode_ms(tok),
        "decode_device": str(device),
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in tok.parameters()),
        "latent_shape": [cfg.channels, *cfg.latent_size],
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


# ---- training --------------------------------------------------------------------------------------------
def config(args: argparse.Namespace, meta: dict, ckpt: Path) -> TokenizerConfig:
    """The tokenizer's config: the checkpoint's when resuming (a --config that differs is refused), else --config."""
    try:
        overrides = json.loads(args.config)
        requested = from_dict(TokenizerConfig, {**overrides, "kind": args.kind, "frame_size": tuple(meta["frame_size"])})
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise UsageError(f"bad --config {args.config!r}: {e}") from None
    if not ckpt.exists():
        return requested
    cfg = read_network_config(ckpt, TokenizerConfig)
    if cfg.kind != args.kind:
        raise UsageError(f"{ckpt} holds a {cfg.kind!r} tokenizer but --kind is {args.kind!r}; use another --out")
    if overrides and cfg != requested:
        raise UsageError(f"{ckpt} was trained with config {to_dict(cfg)}, not the --config given; use another --out")
    if cfg.frame_size != tuple(meta["frame_size"]):
        raise UsageError(f"the checkpoint's frame_size {cfg.frame_size} differs from the data's {tuple(meta['frame_size'])}")
    return cfg


def train(args: argparse.Namespace) -> dict | None:
    meta = read_meta(args.data)
    if "frame_size" not in meta:
        raise UsageError(f"{args.data}/meta.json has no frame_size; record the data with `python -m train.collect`")
    train_shards = list_shards(args.data, "train")
    if not train_shards:
        raise UsageError(f"no training shards in {args.data}/train")
    cfg = config(args, meta, Path(args.out) / "checkpoint")
    steps = args.steps if cfg.kind == "vae" else 0  # pixel patches have nothing to train
    run = Run.start(args, "tokenizer", Schedule(min(WARMUP_STEPS, max(1, steps // 10)), steps, MIN_LR_RATIO))  # short runs warm up for a tenth
    d = run.d
    tok = FrameTokenizer(cfg).to(d.device)
    ema = copy.deepcopy(tok).eval() if args.ema_decay > 0 else None
    opt = torch.optim.AdamW(tok.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay) if steps else None
    run.resume(cfg, nets={"raw": tok, **({"model": ema} if ema is not None else {})}, opts={"tokenizer": opt} if opt else {})
    export_dir = run.out / "tokenizer"
    if run.step >= steps and (export_dir / "metrics.json").exists():
        if d.is_main:
            print(f"already finished: trained {run.step} of {steps} steps; the tokenizer is in {export_dir}")
        run.finish()
        run.close()
        return None

    # The median frame is the "background"; computed identically on every rank from the same sample.
    median = np.median(sample_frames(train_shards, MEDIAN_FRAMES, run.seeds.int("median", shared=True)), axis=0).astype(np.uint8)  # (H, W, 3)
    median_t = torch.from_numpy(median).to(d.device)
    model = DDP(tok) if d.world_size > 1 and steps > run.step else tok  # DDP refuses a module with no parameters
    batches = frame_batches(train_shards, args.batch_size // d.world_size, run.seeds.int("data", run.step, shared=True), d)
    while run.training():
        frames = next(batches).to(d.device)  # (b, H, W, 3)
        x = frames_to_pixels(frames)  # (b, 3, H, W)
        recon, kl = model(x)  # (b, 3, H, W), (b,)
        loss, rec = tokenizer_loss(recon, kl, frames, median_t, args.rare_weight, args.kl_weight)
        gnorm = run.update(opt, loss, tok, args.lr, clip=args.grad_clip)
        if ema is not None:
            ema_update(ema, tok, args.ema_decay)
        with torch.no_grad():
            psnr = float(psnr_from_mse((recon.detach().clamp(-1, 1) - x).pow(2).mean()))
        run.step_done({"loss": loss.item(), "recon": rec.item(), "kl": kl.mean().item(), "psnr": psnr}, gnorm)
    run.finish()
    run.close()
    if not d.is_main:
        return None
    return export(args, cfg, (ema if ema is not None else tok).state_dict(), median, run.step, d.device, run.seeds)


# ---- command line ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.tokenizer", description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (meta.json, train/, heldout/)")
    p.add_argument("--out", required=True, help="run folder: checkpoint/, tokenizer/, log.jsonl, tb/")
    p.add_argument("--kind", choices=("vae", "patch"), default="vae")
    p.add_argument("--config", default="{}", help='TokenizerConfig fields as JSON, e.g. \'{"latent_channels": 8}\'')
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (ignored for --kind patch)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per step, over all processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--rare-weight", type=float, default=10.0, help="extra loss weight of pixels that differ from the median frame")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights (0: off); the export uses the EMA")
    p.add_argument("--eval-frames", type=int, default=2048, help="held-out frames for the PSNR (a sample if more)")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    # --steps 0 would export an untrained autoencoder, --eval-frames 0 would fail at export after training
    for name in ("steps", "eval_frames", "batch_size", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not Path(args.data).is_dir():
        p.error(f"--data {args.data} is not a folder; record a dataset with `python -m train.collect`")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = train(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    if metrics is not None:
        psnr = "n/a" if metrics["psnr"] is None else f"{metrics['psnr']:.2f} dB"
        rare = "n/a" if metrics["psnr_rare_pixels"] is None else f"{metrics['psnr_rare_pixels']:.2f} dB"
        print(f"tokenizer ({metrics['kind']}, step {metrics['step']}) -> {Path(args.out) / 'tokenizer'}\n"
              f"  held-out PSNR {psnr} (rare pixels {rare}) on {metrics['eval_frames']} frames\n"
              f"  decode {metrics['decode_ms_per_frame']:.2f} ms per frame (batch 1, {metrics['decode_device']}, "
              f"{metrics['torch_threads']} threads)")
        if metrics.get("ball_kept") is not None:
            print(f"  state probe on {metrics['probe_in_play_frames']} in-play held-out frames: ball kept {100 * metrics['ball_kept']:.1f}% "
                  f"(position error mean {metrics['ball_err_mean_px']:.2f} px, max {metrics['ball_err_max_px']:.2f} px; {metrics['ball_false']} false balls), "
                  f"paddle error max {metrics['paddle_err_max_px']:.2f} px, bricks-left exact {100 * metrics['bricks_exact']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
