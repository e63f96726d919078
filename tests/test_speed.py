"""The fast paths against the plain ones (parity), reduced precision, the phase timer and the speed harness."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.timer import PhaseTimer
from worldmodel.config import TokenizerConfig
from worldmodel.runtime import WorldModel
from worldmodel.tokenizer import FrameTokenizer

from tests.conftest import run


def rollout(wm: WorldModel, starts, actions, seed=0) -> tuple[np.ndarray, np.ndarray]:
    frames, acts = starts
    wm.reset(frames[0], acts[0], seed=seed)
    out, rewards = [], []
    for a in actions:
        out.append(wm.step(int(a)))
        rewards.append(float(wm.reward_prob[0]))
    return np.stack(out), np.asarray(rewards)


def test_reused_cache_reads_equal_recomputed_ones(model, starts):
    """The rotations prepared once per chunk (shared by its denoising steps and its re-cache) give exactly
    what recomputing them at every forward gives, through the window filling up and wrapping around."""
    wm = WorldModel.load(model, steps=3)
    actions = np.random.default_rng(0).integers(wm.num_actions, size=3 * (wm.cache.S + wm.cache.W) + 2)
    fast = rollout(wm, starts, actions)
    wm.cache.reuse_reads = False
    plain = rollout(wm, starts, actions)
    np.testing.assert_array_equal(fast[0], plain[0])
    np.testing.assert_array_equal(fast[1], plain[1])


def tiny_vae() -> FrameTokenizer:
    torch.manual_seed(0)
    cfg = TokenizerConfig(kind="vae", block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    tok = FrameTokenizer(cfg).eval()
    with torch.no_grad():  # a non-trivial decoder output (freshly initialised convs are near zero)
        for p in tok.vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok


def test_inference_layout_of_the_vae_matches_the_default():
    """channels-last weights (the runtime's VAE layout) give the default layout's numbers; bfloat16 is close."""
    tok = tiny_vae()
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8))
    lat = tok.encode(frames)
    pix = tok.decode_float(lat)
    fast = tiny_vae().prepare_inference(torch.float32)
    assert next(fast.vae.parameters()).dtype == torch.float32
    lat_f = fast.encode(frames)
    assert lat_f.dtype == torch.float32 and lat_f.is_contiguous()
    torch.testing.assert_close(lat_f, lat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.decode_float(lat), pix, rtol=1e-5, atol=1e-5)
    half = tiny_vae().prepare_inference(torch.bfloat16)
    out = half.decode_float(lat)
    assert out.dtype == torch.float32
    assert (out - pix).abs().mean() < 0.02  # bfloat16 keeps ~3 significant digits


def test_bfloat16_runtime_is_close_to_float32(model, starts):
    """The same seed gives the same noise in every dtype, so bfloat16 play stays near float32 play."""
    actions = np.random.default_rng(1).integers(4, size=6)
    f32, _ = rollout(WorldModel.load(model), starts, actions)
    wm = WorldModel.load(model, dtype="bfloat16")
    assert wm.dtype == torch.bfloat16 and wm.cache.k.dtype == torch.bfloat16
    b16, r = rollout(wm, starts, actions)
    assert b16.dtype == np.uint8 and b16.shape == f32.shape and np.isfinite(r).all()
    diff = np.abs(b16.astype(np.int16) - f32.astype(np.int16))
    assert diff.mean() < 4.0, diff.mean()  # pixels of 0..255; an unrelated frame differs by tens


def test_bad_dtype_is_refused_clearly(model):
    with pytest.raises(ValueError, match="dtype must be one of"):
        WorldModel.load(model, dtype="int8")


def test_phase_timer_splits_each_step(model, starts):
    wm = WorldModel.load(model, steps=2)
    frames, acts = starts
    wm.reset(frames[0], acts[0], seed=0)
    wm.timer = PhaseTimer()
    for a in (0, 1, 2):
        wm.step(a)
    wm.predict_batch([3])
    t = wm.timer.times
    assert len(t["denoise"]) == 4 and len(t["recache"]) == 3 and len(t["decode"]) == 4
    assert all(x > 0 for v in t.values() for x in v)
    wm.timer.clear()
    assert all(not v for v in wm.timer.times.values())


def test_speed_harness(model, tmp_path):
    out = tmp_path / "speed.json"
    p = run("-m", "bench.speed", "--student", str(model), "--teacher", str(model), "--teacher-steps", "4", "--student-steps", "1", "2",
            "--modes", "single", "vec2", "--baseline", "--steps", "3", "--vec-steps", "2", "--repeats", "2", "--warmup", "2", "--out", str(out))
    report = json.loads(out.read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert len(rows) == 3 * 2 * 2  # (teacher@4, student@1, student@2) x (single, vec2) x (fast, plain)
    for r in rows.values():
        assert r["env_steps_per_s"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["max"]
        assert r["phase_ms"]["denoise"] > 0 and r["phase_ms"]["recache"] > 0 and r["phase_ms"]["decode"] > 0
        assert r["gflop_per_env_step"] > 0 and 0 < r["fraction_of_peak"] < 1
        assert r["memory"]["peak_rss_mib"] > r["memory"]["model_mib"] > 0
    # more denoising steps, more FLOPs; vec2 does the same work per world as single
    assert rows["teacher@4 single float32"]["gflop_per_env_step"] > rows["student@2 single float32"]["gflop_per_env_step"] > rows["student@1 single float32"]["gflop_per_env_step"]
    assert rows["student@2 vec2 float32"]["gflop_per_env_step"] == pytest.approx(rows["student@2 single float32"]["gflop_per_env_step"], rel=1e-6)
    kinds = {x["kind"] for x in report["ratios"]}
    assert kinds == {"student/teacher", "fast/plain"}
    assert [g["goal"] for g in report["goals"]][:2] == ["single world >= 30 steps/s, p95 < 50 ms (shipped student)", "student >= 10x teacher steps/s (single world)"]
    assert "ratios (env steps/s, same run)" in p.stdout and "goals" in p.stdout


def test_speed_harness_refuses_bad_input(model, tmp_path):
    p = run("-m", "bench.speed", "--student", str(tmp_path), "--out", str(tmp_path / "x.json"), ok=False)
    assert p.returncode == 2 and "is not a world-model folder" in p.stderr
    p = run("-m", "bench.speed", "--student", str(model), "--modes", "vecx", ok=False)
    assert p.returncode == 2 and "a mode is 'single' or 'vecN'" in p.stderr
    p = run("-m", "bench.speed", "--student", "", "--teacher", "", ok=False)
    assert p.returncode == 2 and "nothing to measure" in p.stderr
