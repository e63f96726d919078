"""Hold a world model against the real game on held-out episodes.

    python -m train.evaluate --model RUN/model --data DATA --out EVAL_DIR [--episodes 8] [--horizon 64]

For each held-out episode: start from `--context` real frames, then
- teacher-forced one-step prediction: at every step the model sees the real past and predicts the next
  frame (PSNR against the real frame; baseline: copy the last real frame);
- autoregressive rollout: the model feeds on its own frames for `--horizon` steps under the real actions
  (PSNR at each horizon; baseline: hold the last context frame).
Also measures the tokenizer's own reconstruction PSNR (the ceiling) and the sampler's speed on this machine.
Writes metrics.json, report.md and side-by-side videos (real | generated | difference) to EVAL_DIR.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from envs.dataset import episodes, list_shards, load_shard, read_meta
from worldmodel.checkpoint import CheckpointError
from worldmodel.runtime import WorldModel

HORIZONS = (1, 8, 16, 32, 64, 128, 256)


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame mean squared error over (..., H, W, 3) uint8 frames."""
    return ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(-3, -2, -1))


def psnr_of(mse_value: float | np.ndarray) -> float:
    """PSNR (dB) of the mean of the given squared errors (0-255 scale): the PSNR of the pooled MSE, not the
    mean of per-frame PSNRs, so frames that happen to match exactly do not dominate. Floored at 100 dB."""
    return float(10 * np.log10(255.0**2 / np.maximum(np.mean(mse_value), 255.0**2 * 1e-10)))


def heldout_clips(data: Path, n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n clips of `length` consecutive steps, each from a different held-out episode, start chosen by seed."""
    rng = np.random.default_rng(seed)
    frames, actions = [], []
    for shard in list_shards(data, "heldout"):
        arr = load_shard(shard)
        for s, e in episodes(arr):
            if e - s < length:
                continue
            o = s + int(rng.integers(0, e - s - length + 1))
            frames.append(arr["frames"][o:o + length])
            actions.append(arr["actions"][o:o + length])
            if len(frames) == n:
                return np.stack(frames), np.stack(actions).astype(np.int64)
    if not frames:
        raise ValueError(f"no held-out episode in {data} is {length} steps long; lower --horizon or record longer episodes")
    return np.stack(frames), np.stack(actions).astype(np.int64)


def side_by_side_video(path: Path, real: np.ndarray, gen: np.ndarray, fps: int = 15, scale: int = 4) -> None:
    """mp4 of (real | generated | |difference|), each frame (H, W, 3) uint8, scaled up nearest-neighbour."""
    T, H, W, _ = real.shape
    diff = np.abs(real.astype(np.int16) - gen.astype(np.int16)).astype(np.uint8)
    size = (3 * W * scale, H * scale)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not vw.isOpened():
        raise RuntimeError(f"OpenCV could not open a video writer for {path}")
    for t in range(T):
        row = np.concatenate([real[t], gen[t], diff[t]], axis=1)
        row = cv2.resize(row, size, interpolation=cv2.INTER_NEAREST)
        vw.write(cv2.cvtColor(row, cv2.COLOR_RGB2BGR))
    vw.release()


def evaluate(wm_path: Path, data: Path, out: Path, episodes: int, context: int, horizon: int, steps: int | None, seed: int, videos: int) -> dict:
    clips, actions = heldout_clips(data, episodes, context + horizon, seed)
    E = len(clips)
    wm = WorldModel.load(wm_path, steps=steps, batch=E)
    Fc = wm.frames_per_chunk
    if Fc != 1:
        raise ValueError(f"evaluate drives one action per step and supports models with one frame per chunk; this one has {Fc}")
    ctx_f, ctx_a = clips[:, :context], actions[:, :context]
    real = clips[:, context:]  # (E, horizon, H, W, 3)
    fut_a = actions[:, context:]

    # tokenizer ceiling
    with torch.inference_mode():
        flat = torch.from_numpy(real.reshape(-1, *real.shape[2:]))
        recon = torch.cat([wm.tokenizer.decode(wm.tokenizer.encode(flat[i:i + 256])) for i in range(0, len(flat), 256)]).numpy()
    tok_mse = mse(recon, real.reshape(-1, *real.shape[2:]))

    # teacher-forced one step
    wm.reset(ctx_f, ctx_a, seed=seed)
    tf_gen = np.zeros_like(real)
    for i in range(0, horizon, Fc):
        tf_gen[:, i:i + Fc] = wm.predict_batch(fut_a[:, i])
        wm.observe(real[:, i:i + Fc], fut_a[:, i:i + Fc])
    tf_mse = mse(tf_gen, real)  # (E, horizon)
    prev = np.concatenate([ctx_f[:, -1:], real[:, :-1]], axis=1)
    copy_mse = mse(prev, real)

    # autoregressive rollout under the real actions
    wm.reset(ctx_f, ctx_a, seed=seed)
    ar_gen = np.zeros_like(real)
    t0 = time.perf_counter()
    for i in range(0, horizon, Fc):
        ar_gen[:, i:i + Fc] = wm.step_batch(fut_a[:, i])
    ar_time = time.perf_counter() - t0
    ar_mse = mse(ar_gen, real)
    hold_mse = mse(np.repeat(ctx_f[:, -1:], horizon, axis=1), real)

    # single-world sampler speed (batch 1, decoder included), median over steps after warm-up
    one = WorldModel.load(wm_path, steps=steps, batch=1)
    one.reset(ctx_f[0], ctx_a[0], seed=seed)
    lat = []
    for i in range(min(horizon, 48)):
        t1 = time.perf_counter()
        one.step(int(fut_a[0, i]))
        lat.append(time.perf_counter() - t1)
    lat_ms = np.array(lat[8:] if len(lat) > 16 else lat) * 1000

    out.mkdir(parents=True, exist_ok=True)
    for k in range(min(videos, E)):
        side_by_side_video(out / f"rollout_{k:02d}.mp4", real[k], ar_gen[k])
        side_by_side_video(out / f"teacher_forced_{k:02d}.mp4", real[k], tf_gen[k])
    np.savez_compressed(out / "rollouts.npz", real=real, rollout=ar_gen, teacher_forced=tf_gen, actions=fut_a)

    per_h = {h: {"rollout_psnr": psnr_of(ar_mse[:, h - 1]), "hold_last_psnr": psnr_of(hold_mse[:, h - 1])} for h in HORIZONS if h <= horizon}
    metrics = {
        "model": str(wm_path),
        "episodes": E,
        "context_frames": context,
        "horizon": horizon,
        "denoising_steps": wm.steps,
        "tokenizer_recon_psnr": psnr_of(tok_mse),
        "one_step_psnr": psnr_of(tf_mse),
        "one_step_copy_last_psnr": psnr_of(copy_mse),
        "rollout_psnr_mean": psnr_of(ar_mse),
        "rollout_psnr_at": per_h,
        "batched_steps_per_s": E * horizon / Fc / ar_time,
        "single_world_step_ms_median": float(np.median(lat_ms)),
        "single_world_steps_per_s": float(1000 / np.median(lat_ms)),
        "device": str(wm.device),
        "threads": torch.get_num_threads(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(report(metrics))
    return metrics


def report(m: dict) -> str:
    lines = [
        f"# Evaluation of `{m['model']}`",
        "",
        f"{m['episodes']} held-out episodes, {m['context_frames']} real context frames, {m['horizon']} steps, {m['denoising_steps']} denoising steps.",
        "",
        "PSNR is that of the mean squared error pooled over frames and episodes (0-255 scale).",
        "",
        "| measure | PSNR (dB) |",
        "|---|---|",
        f"| tokenizer reconstruction (ceiling) | {m['tokenizer_recon_psnr']:.2f} |",
        f"| one-step, teacher-forced | {m['one_step_psnr']:.2f} |",
        f"| one-step baseline: copy last frame | {m['one_step_copy_last_psnr']:.2f} |",
        f"| rollout, mean over {m['horizon']} steps | {m['rollout_psnr_mean']:.2f} |",
        "",
        "| horizon | rollout PSNR | hold-last-frame PSNR |",
        "|---|---|---|",
    ]
    lines += [f"| {h} | {v['rollout_psnr']:.2f} | {v['hold_last_psnr']:.2f} |" for h, v in m["rollout_psnr_at"].items()]
    lines += ["", f"Speed on {m['device']} ({m['threads']} threads): single world {m['single_world_steps_per_s']:.1f} steps/s (median {m['single_world_step_ms_median']:.1f} ms/step, decoder included); {m['episodes']} worlds batched: {m['batched_steps_per_s']:.1f} steps/s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="world-model folder (RUN/model or assets/...)")
    p.add_argument("--data", required=True, help="dataset folder with a held-out split")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--context", type=int, default=4, help="real frames the model starts from")
    p.add_argument("--horizon", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--videos", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.episodes <= 0 or args.horizon <= 0 or args.context <= 0:
        p.error("--episodes, --horizon and --context must be positive")
    try:
        read_meta(args.data)
        m = evaluate(Path(args.model), Path(args.data), Path(args.out), args.episodes, args.context, args.horizon, args.steps, args.seed, args.videos)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
