"""Frame tokenizer: shapes, exact patch inverse, checkpoints, input errors, learning, and the training CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.tokenizer import main as train_main
from train.tokenizer import tokenizer_loss
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import TokenizerConfig, to_dict
from worldmodel.tokenizer import FrameTokenizer, frames_to_pixels

ROOT = Path(__file__).resolve().parents[1]
# Tiny VAE for tests: 64x64 -> 8x8x4 with 8-channel blocks (the default is ~1M parameters, too slow here).
TINY = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4)
SIZE = 64
SUBPROCESS_TIMEOUT_S = 240


def tiny_cfg(**kw) -> TokenizerConfig:
    return TokenizerConfig(**{**TINY, **kw})


def breakout_like_frames(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 64, 64, 3) uint8: black screen, a band of coloured bricks, a moving paddle and a small ball."""
    frames = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    frames[:, 8:16] = rng.integers(60, 255, size=(1, 1, 1, 3), dtype=np.uint8)  # bricks
    for i in range(n):
        px, bx, by = rng.integers(0, SIZE - 8), rng.integers(0, SIZE - 2), rng.integers(18, SIZE - 6)
        frames[i, 8:16, rng.integers(0, SIZE - 4, size=2)] = 0  # a few broken bricks
        frames[i, SIZE - 4:SIZE - 3, px:px + 8] = (200, 72, 72)  # paddle
        frames[i, by:by + 2, bx:bx + 2] = (200, 72, 72)  # ball
    return frames


def write_dataset(root: Path, shards: dict[str, int], frames_per_shard: int = 24) -> Path:
    """A tiny dataset in the train/dataset.py layout: meta.json, {train,heldout}/shard_XXXXX.npz."""
    rng = np.random.default_rng(0)
    for split, count in shards.items():
        (root / split).mkdir(parents=True)
        for k in range(count):
            n = frames_per_shard
            first = np.zeros(n, bool)
            first[[0, n // 2]] = True  # two episodes per shard
            np.savez_compressed(
                root / split / f"shard_{k:05d}.npz", frames=breakout_like_frames(n, rng),
                actions=rng.integers(0, 4, n).astype(np.int64), rewards=np.zeros(n, np.float32),
                terminated=np.roll(first, -1), truncated=np.zeros(n, bool), first=first,
                episode=np.cumsum(first).astype(np.int64) + 2 * k)
    (root / "meta.json").write_text(json.dumps({"format_version": 1, "game": "Synthetic", "frame_size": [SIZE, SIZE]}))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), {"train": 2, "heldout": 1})


# ---- the module ----------------------------------------------------------------------------------------------
def test_vae_shapes_and_dtypes():
    torch.manual_seed(0)
    tok = FrameTokenizer(tiny_cfg()).eval()
    frames = torch.from_numpy(breakout_like_frames(3, np.random.default_rng(1)))  # (3, 64, 64, 3)
    z = tok.encode(frames)
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    assert torch.equal(z, tok.encode(frames)), "encoding must be deterministic (posterior mean)"
    out = tok.decode(z)
    assert out.shape == (3, SIZE, SIZE, 3) and out.dtype == torch.uint8
    pixels = tok.decode_float(z)
    assert pixels.shape == (3, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(out, ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    np.testing.assert_array_equal(tok.encode(frames.numpy()).numpy(), z.numpy())  # numpy input too


def test_default_config_is_8x8x16():
    cfg = TokenizerConfig()
    assert (cfg.channels, *cfg.latent_size) == (16, 8, 8)
    tok = FrameTokenizer(cfg)
    assert tok.encode(torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8)).shape == (1, 16, 8, 8)


def test_patch_tokenizer_is_an_exact_inverse():
    cfg = TokenizerConfig(kind="patch", patch=8)
    tok = FrameTokenizer(cfg)
    frames = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8)
    z = tok.encode(frames)
    assert z.shape == (2, 3 * 8 * 8, 8, 8)
    # latent cell (i, j) holds the pixels of patch (i, j), channel-major
    pixels = frames_to_pixels(frames)  # (2, 3, 64, 64)
    torch.testing.assert_close(z[1, :, 2, 5].reshape(3, 8, 8), pixels[1, :, 16:24, 40:48], rtol=0, atol=0)
    assert torch.equal(tok.decode(z), frames)
    tok.set_latent_stats(torch.rand(192).tolist(), (torch.rand(192) + 0.1).tolist())
    assert torch.equal(tok.decode(tok.encode(frames)), frames), "normalisation must not break the exact inverse"


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = FrameTokenizer(tiny_cfg()).eval()
    tok.set_latent_stats([0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0])
    tok.save(tmp_path / "tok")
    loaded = FrameTokenizer.load(tmp_path / "tok")
    assert to_dict(loaded.cfg) == to_dict(tok.cfg)
    frames = torch.from_numpy(breakout_like_frames(2, np.random.default_rng(2)))
    z = tok.encode(frames)
    assert torch.equal(loaded.encode(frames), z)
    assert torch.equal(loaded.decode(z), tok.decode(z))
    assert not torch.equal(z, FrameTokenizer(tiny_cfg()).eval().encode(frames)), "a fresh model must differ"
    patch = FrameTokenizer(TokenizerConfig(kind="patch"))
    patch.save(tmp_path / "patch")
    assert torch.equal(FrameTokenizer.load(tmp_path / "patch").decode(patch.encode(frames)), frames)


def test_missing_or_corrupt_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        FrameTokenizer.load(tmp_path / "nope")
    FrameTokenizer(tiny_cfg()).save(tmp_path / "tok")
    weights = tmp_path / "tok" / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        FrameTokenizer.load(tmp_path / "tok")
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        FrameTokenizer.load(tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        FrameTokenizer.load(tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"kind": "dit", "config": {}}))
    with pytest.raises(CheckpointError, match="not a tokenizer checkpoint"):
        FrameTokenizer.load(tmp_path / "tok")


def test_wrong_inputs_raise_clear_errors():
    tok = FrameTokenizer(tiny_cfg())
    with pytest.raises(ValueError, match=r"expected frames of shape \(B, 64, 64, 3\) uint8, got \(2, 32, 32, 3\)"):
        tok.encode(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8, got \(2, 64, 64, 3\) torch.float32"):
        tok.encode(torch.zeros(2, SIZE, SIZE, 3))
    with pytest.raises(ValueError, match=r"expected frames .* got \(64, 64, 3\)"):
        tok.encode(torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 4, 8, 8\) float"):
        tok.decode(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="4 entries"):
        tok.set_latent_stats([0.0] * 3, [1.0] * 3)


# ---- learning ------------------------------------------------------------------------------------------------
def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    tok = FrameTokenizer(tiny_cfg())
    rng = np.random.default_rng(3)
    frames = torch.from_numpy(breakout_like_frames(16, rng))  # (16, 64, 64, 3)
    median = torch.from_numpy(np.median(frames.numpy(), axis=0).astype(np.uint8))  # (64, 64, 3)
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)

    def loss_now() -> float:
        with torch.no_grad():
            recon, kl = tok(frames_to_pixels(frames), sample=False)
            return float(tokenizer_loss(recon, kl, frames, median, 10.0, 1e-6)[0])

    before = loss_now()
    for _ in range(25):
        recon, kl = tok(frames_to_pixels(frames))
        loss, _ = tokenizer_loss(recon, kl, frames, median, 10.0, 1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_now()
    assert after < 0.5 * before, f"25 steps should at least halve the loss: {before:.4f} -> {after:.4f}"


def test_rare_pixels_weigh_more():
    frames = torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8)
    frames[0, 30, 30] = 200  # the "ball"
    median = torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8)
    recon_ball_wrong = frames_to_pixels(torch.zeros_like(frames))  # misses the ball
    recon_bg_wrong = frames_to_pixels(frames).clone()
    recon_bg_wrong[0, :, 0, 0] += recon_ball_wrong[0, :, 30, 30] - frames_to_pixels(frames)[0, :, 30, 30]
    kl = torch.zeros(1)
    ball = tokenizer_loss(recon_ball_wrong, kl, frames, median, 10.0, 0.0)[0]
    background = tokenizer_loss(recon_bg_wrong, kl, frames, median, 10.0, 0.0)[0]
    torch.testing.assert_close(ball / background, torch.tensor(11.0), rtol=1e-4, atol=0)


# ---- the training command ------------------------------------------------------------------------------------
def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--batch-size", "4", "--log-every", "1", "--ckpt-every", "2",
            "--eval-frames", "16", "--config", json.dumps(TINY), *extra]


def run_cli(args: list[str], torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "train.tokenizer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def check_export(out: Path, step: int) -> dict:
    tok = FrameTokenizer.load(out / "tokenizer")
    assert len(tok.cfg.latent_mean) == len(tok.cfg.latent_std) == 4
    metrics = json.loads((out / "tokenizer" / "metrics.json").read_text())
    assert metrics["step"] == step and metrics["eval_frames"] == 16
    assert 0 < metrics["psnr"] < 100 and metrics["decode_ms_per_frame"] > 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == step
    return metrics


def test_cli_trains_resumes_and_finishes(dataset, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(cli_args(dataset, out, "--steps", "3"))
    assert "held-out PSNR" in proc.stdout
    check_export(out, 3)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in logged)
    assert "already finished" in run_cli(cli_args(dataset, out, "--steps", "3")).stdout
    proc = run_cli(cli_args(dataset, out, "--steps", "5"))
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    check_export(out, 5)


def test_cli_under_torchrun(dataset, tmp_path):
    out = tmp_path / "ddp"
    run_cli(cli_args(dataset, out, "--steps", "2"), torchrun=True)
    check_export(out, 2)


def test_cli_patch_kind_exports_an_exact_tokenizer(dataset, tmp_path, capsys):
    out = tmp_path / "patch"
    assert train_main(["--data", str(dataset), "--out", str(out), "--kind", "patch", "--eval-frames", "16"]) == 0
    metrics = json.loads((out / "tokenizer" / "metrics.json").read_text())
    assert metrics["psnr"] == 100.0 and metrics["psnr_rare_pixels"] == 100.0, "pixel patches are exact"
    assert FrameTokenizer.load(out / "tokenizer").cfg.kind == "patch"


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert exit_info.value.code != 0 and "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "-1"])
    assert exit_info.value.code != 0 and "--steps must be >= 1" in capsys.readouterr().err
    assert train_main(["--data", str(tmp_path), "--out", str(tmp_path / "r")]) != 0  # a folder, but no dataset
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "meta.json" in err and "Traceback" not in err


def test_probe_fidelity_on_real_frames():
    """The state probe on round trips: exact for pixel patches; a tokenizer that loses small objects shows it."""
    from envs.probe import probe_breakout, record_breakout
    from train.tokenizer import probe_fidelity

    _, frames, _ = record_breakout(seed=7, steps=120)
    patch = FrameTokenizer(TokenizerConfig(kind="patch", patch=8)).eval()
    m = probe_fidelity(patch, frames, probe_breakout)
    assert m["probe_in_play_frames"] > 20
    assert m["ball_kept"] == 1.0 and m["ball_err_max_px"] == 0.0 and m["ball_false"] == 0 and m["paddle_err_max_px"] == 0.0 and m["bricks_exact"] == 1.0

    class Lossy(FrameTokenizer):  # drops what moves between the bricks and the paddle, as a weak decoder does
        def decode(self, latents):
            out = super().decode(latents).clone()
            out[:, 30:54, 8:56] = 0
            return out

    lossy = probe_fidelity(Lossy(TokenizerConfig(kind="patch", patch=8)).eval(), frames, probe_breakout)
    assert lossy["ball_kept"] < 0.8 and lossy["bricks_exact"] == 1.0
