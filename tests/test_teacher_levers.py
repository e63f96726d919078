"""The teacher's fidelity levers, each on its mechanics: the change-weighted flow loss, the shifted noise
levels, the wall-time budget, and a tiny run with every input lever on (previous frame, change target,
finest tokens) that exports a model the runtime plays. Parity of the new inputs between the pack and the
cache is in test_dit.py."""
from __future__ import annotations

import copy
import json
import math
import shlex
import time

import numpy as np
import pytest
import torch

from train.latents import target_std
from train.skeleton import Schedule
from train.teacher import PackForward, changed, flow_loss, gate_loss, model_cfg, own_context, parse_args, teacher_loss
from worldmodel.config import SamplingConfig, dit_config
from worldmodel.dit import CausalDiT, previous_frames
from worldmodel.config import X0_MIN_LEVEL
from worldmodel.flow import x0_from_velocity
from worldmodel.flow import sample_levels
from worldmodel.runtime import WorldModel, load_start_frames

from tests.conftest import TEACHER, run


def window_with_a_moving_dot() -> torch.Tensor:
    """(1, 3, 2, 4, 4): a flat background; one element lights up in frame 1 and moves in frame 2."""
    x = torch.zeros(1, 3, 2, 4, 4)
    x[0, 1, 0, 1, 1] = 1.0
    x[0, 2, 0, 1, 2] = 1.0
    return x


def test_changed_marks_what_moved_and_not_the_first_frame():
    x = window_with_a_moving_dot()
    m = changed(x, threshold=0.05)
    assert m.shape == x.shape and m.dtype == torch.bool
    assert not m[:, 0].any()  # no frame before the first
    assert m[0, 1, 0, 1, 1] and m.sum() == 1 + 2  # frame 1: the dot appears; frame 2: it leaves one place, enters another
    assert m[0, 2, 0, 1, 1] and m[0, 2, 0, 1, 2]
    assert not changed(x + 0.01 * torch.randn_like(x).clamp(-1, 1), threshold=0.05)[:, 1:].logical_xor(m[:, 1:]).any()


def test_change_weight_puts_the_gradient_where_frames_change():
    x = window_with_a_moving_dot()
    g = torch.Generator().manual_seed(0)
    target = torch.randn(x.shape, generator=g)
    err = torch.full_like(x, 0.5)  # the same error everywhere, so only the weight differs
    v = (target + err).requires_grad_(True)
    plain, parts = flow_loss(v, target, x, change_weight=0.0, threshold=0.05)
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(v, target))
    assert set(parts) == {"loss/flow"}

    lam = 50.0
    loss, parts = flow_loss(v, target, x, change_weight=lam, threshold=0.05)
    (grad,) = torch.autograd.grad(loss, v)
    m = changed(x, 0.05)
    ratio = grad[m].abs().min() / grad[~m].abs().max()
    torch.testing.assert_close(ratio, torch.tensor(1 + lam))  # largest exactly where frames change
    f = m.float().mean().item()
    assert parts["changed_fraction"] == pytest.approx(f)
    assert parts["changed_weight_share"] == pytest.approx(f * (1 + lam) / (1 + f * lam))  # 3 of 96 elements: 3% -> 62%
    assert parts["changed_weight_share"] > 10 * f
    assert parts["loss/flow"] == pytest.approx(0.25) and parts["loss/flow_weighted"] == pytest.approx(loss.item())


@pytest.mark.parametrize("frames_per_chunk,predict", [(1, "x0"), (2, "x0"), (1, "velocity"), (2, "edm")])
def test_own_context_replaces_the_picked_windows_after_the_first_chunk_with_the_networks_own_predictions(frames_per_chunk, predict):
    torch.manual_seed(0)
    dit = CausalDiT(dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, prev_frame=True, delta=True, predict=predict,
                               frames_per_chunk=frames_per_chunk, sigma_data=0.2))
    with torch.no_grad():  # adaLN-Zero makes a fresh network ignore its input: random weights, so the test bites
        for p in dit.parameters():
            p.normal_(0, 0.3)
    model = PackForward(dit)
    Fc, B, T = dit.cfg.frames_per_chunk, 6, 4 * dit.cfg.frames_per_chunk
    x0 = torch.randn(B, T, 4, 4, 4)
    a = torch.randint(0, 4, (B, T))
    assert own_context(model, x0, a, 0.0, torch.Generator().manual_seed(1)) is x0  # off: the real frames, no draw

    own = own_context(model, x0, a, 1.0, torch.Generator().manual_seed(1))
    assert not own.requires_grad  # the network's own frames are inputs, not a path for the gradient
    torch.testing.assert_close(own[:, :Fc], x0[:, :Fc])  # the first chunk stays real
    g = torch.Generator().manual_seed(1)  # the same draws, by hand: one-step predictions from a training level
    torch.rand(B, generator=g)
    s = sample_levels((B, T // Fc), generator=g).repeat_interleave(Fc, dim=1)
    noisy = (1 - s[..., None, None, None]) * x0 + s[..., None, None, None] * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        v, _ = model(x0, noisy, torch.zeros_like(s), s, a, a)
    torch.testing.assert_close(own[:, Fc:], x0_from_velocity(noisy, v, s)[:, Fc:])  # x_s - s v, the velocity being what the loss fits
    assert (own[:, Fc:] - x0[:, Fc:]).abs().mean() > 0.1

    # the frame-sized noise can come from a second generator (on the GPU in training): the same numbers give
    # the same frames, and the small draws stay on the first
    g_dev = torch.Generator().manual_seed(7)
    split = own_context(model, x0, a, 1.0, torch.Generator().manual_seed(1), g_dev=g_dev)
    assert not torch.equal(split, own)
    g = torch.Generator().manual_seed(1)
    torch.rand(B, generator=g)
    s = sample_levels((B, T // Fc), generator=g).repeat_interleave(Fc, dim=1)
    noisy = (1 - s[..., None, None, None]) * x0 + s[..., None, None, None] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        v, _ = model(x0, noisy, torch.zeros_like(s), s, a, a)
    torch.testing.assert_close(split[:, Fc:], x0_from_velocity(noisy, v, s)[:, Fc:])

    half = own_context(model, x0, a, 0.5, torch.Generator().manual_seed(0))
    kept = [bool(torch.equal(half[b], x0[b])) for b in range(B)]
    assert 0 < sum(kept) < B  # some windows keep their real context, the others are replaced
    for b in range(B):
        assert torch.equal(half[b, :Fc], x0[b, :Fc]) and (kept[b] or not torch.equal(half[b, Fc:], x0[b, Fc:]))


@pytest.mark.parametrize("delta", [False, True])
def test_edm_preconditioning_anchors_the_output_at_low_noise_and_scales_the_target(delta):
    sd = 0.1
    dit = CausalDiT(dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, predict="edm", sigma_data=sd, delta=delta, prev_frame=delta))
    g = torch.Generator().manual_seed(0)
    B, T, C = 3, 2, 4
    prev = torch.randn(B, T, C, 4, 4, generator=g) if delta else None
    x0 = (prev if delta else 0) + sd * torch.randn(B, T, C, 4, 4, generator=g)  # the target (frame or change) has std sd
    eps = torch.randn(x0.shape, generator=g)
    out = torch.randn(B, T, dit.cfg.tokens_per_frame, C * dit.cfg.patch_size**2, generator=g)  # whatever the network says
    F = dit.unpatchify(out)

    def predicted_x0(s: float) -> torch.Tensor:
        lv = torch.full((B, T), s)
        x = (1 - s) * x0 + s * eps
        return x - max(s, X0_MIN_LEVEL) * dit.velocity_out(out, x, lv, prev)

    base = prev if delta else torch.zeros_like(x0)
    torch.testing.assert_close(predicted_x0(1.0), base + sd * F)  # pure noise: the network alone, at the target's scale
    torch.testing.assert_close(predicted_x0(0.0), x0)  # no noise: the input itself, whatever the network says
    s = 0.3
    r = math.sqrt(s**2 + sd**2 * (1 - s) ** 2)
    noisy = (1 - s) * (x0 - base) + s * eps
    torch.testing.assert_close(predicted_x0(s), base + sd**2 * (1 - s) / r**2 * noisy + s * sd / r * F)
    for s in (0.0, 0.2, 0.6, 1.0):  # c_in: unit-variance inputs at every level
        lv = torch.full((B, T), s)
        tok = dit.tokens((1 - s) * x0 + s * eps, lv, prev)[..., :C * dit.cfg.patch_size**2]
        assert tok.std().item() == pytest.approx(1.0, rel=0.25)
    if delta:  # a frame with no previous frame (prev zeros: a window's or play's first chunk) has the whole frame as its change
        frame = torch.randn(B, T, C, 4, 4, generator=g)
        none = torch.zeros_like(prev)
        for s in (0.0, 0.5):
            tok = dit.tokens((1 - s) * frame + s * eps, torch.full((B, T), s), none)[..., :C * dit.cfg.patch_size**2]
            assert tok.std().item() == pytest.approx(1.0, rel=0.25)  # unit scale there too, not 1 / sigma_data
        torch.testing.assert_close(dit.edm_sd(frame, torch.cat([none[:, :1], prev[:, 1:]], 1)), torch.tensor([[1.0, sd]] * B))


def test_target_std_measures_the_change_the_network_reads_within_episodes(tmp_path):
    x = np.zeros((6, 1, 1, 1), dtype=np.float16)
    x[:, 0, 0, 0] = [0, 1, 3, 100, 101, 103]  # two episodes: 0 1 3 | 100 101 103
    first = np.array([1, 0, 0, 1, 0, 0], dtype=bool)
    path = tmp_path / "shard_00000.npz"
    np.savez(path, latents=x, actions=np.zeros(6, np.int64), rewards=np.zeros(6, np.float32), terminated=np.zeros(6, bool), first=first)
    assert target_std([path], delta=True) == pytest.approx(np.std([1, 2, 1, 2]))  # lag 1, never across the episode start
    assert target_std([path], delta=True, frames_per_chunk=2) == pytest.approx(np.std([1, 2, 1, 2, 3, 3]))  # lags 1 and 2
    assert target_std([path], delta=False) == pytest.approx(np.std([0, 1, 3, 100, 101, 103]))


def test_level_mean_shifts_training_toward_noise():
    g = torch.Generator().manual_seed(0)
    plain = sample_levels((20000,), generator=g)
    high = sample_levels((20000,), generator=g, mean=1.0)
    assert plain.median() == pytest.approx(0.5, abs=0.02)
    assert high.median() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.02)
    assert ((high > 0) & (high < 1)).all()


def test_schedule_follows_the_wall_budget():
    budget = Schedule(warmup=10, steps=1000, min_ratio=0.1, max_minutes=2.0)
    assert budget.factor(500, wall_s=0.0) == pytest.approx(Schedule(warmup=10, steps=1000, min_ratio=0.1).factor(500))
    assert budget.factor(20, wall_s=120.0) == pytest.approx(0.1)  # budget spent: the floor, whatever the step
    assert budget.factor(20, wall_s=60.0) < budget.factor(20, wall_s=1.0)
    assert budget.factor(0) == pytest.approx(0.1) and budget.factor(9) == pytest.approx(1.0)  # linear warm-up


def test_bf16_runs_the_network_in_bfloat16_and_keeps_the_loss_in_float32():
    """--bf16: the network's matrix products run in bfloat16 under autocast, the velocity and the losses come
    back in float32, close to the float32 network's, and the gradient reaches the float32 weights."""
    torch.manual_seed(0)
    dit = CausalDiT(dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, prev_frame=True, prev_stack=2, delta=True,
                               predict="x0", change_gate=True))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.3)
    seen = []
    dit.x_embed.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    args = parse_args(["--data", "d", "--tokenizer", "t", "--out", "o", "--prev-frame", "--delta", "--predict", "x0", "--change-gate"])
    batch = {"latents": torch.randn(2, 6, 4, 4, 4), "actions": torch.randint(0, 4, (2, 6)), "rewards": torch.zeros(2, 6), "terminated": torch.zeros(2, 6, dtype=torch.bool)}
    losses = {}
    for bf16 in (False, True):
        args.bf16 = bf16
        loss, parts = teacher_loss(PackForward(dit), batch, args, 4, torch.Generator().manual_seed(3))
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in dit.parameters() if p.grad is not None)
        losses[bf16] = parts["loss/flow"]
        dit.zero_grad()
    assert seen == [torch.float32, torch.bfloat16]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)  # the same draws, bfloat16 rounding apart


def test_compile_gives_the_eager_loss_and_gradients_in_one_graph():
    """--compile: the compiled training forward computes the eager one's loss and gradients, in one graph (the
    action range check would break it), and the run still reads its config through the wrapper."""
    torch.manual_seed(0)
    dit = CausalDiT(dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, prev_frame=True, delta=True, predict="x0", change_gate=True))
    args = parse_args(["--data", "d", "--tokenizer", "t", "--out", "o", "--prev-frame", "--delta", "--predict", "x0", "--change-gate", "--compile"])
    batch = {"latents": torch.randn(2, 6, 4, 4, 4), "actions": torch.randint(0, 4, (2, 6)), "rewards": torch.zeros(2, 6), "terminated": torch.zeros(2, 6, dtype=torch.bool)}
    torch._dynamo.reset()
    compiled = torch.compile(PackForward(dit), fullgraph=True)  # fullgraph: a graph break is an error
    assert model_cfg(compiled) is dit.cfg
    out = []
    for model in (PackForward(dit), compiled):
        loss, _ = teacher_loss(model, batch, args, 4, torch.Generator().manual_seed(3))
        loss.backward()
        out.append((loss.item(), torch.cat([p.grad.flatten() for p in dit.parameters() if p.grad is not None])))
        dit.zero_grad()
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-5)


def test_bad_lever_flags_are_refused():
    base = ["--data", "d", "--tokenizer", "t", "--out", "o"]
    for bad in (["--change-weight", "-1"], ["--change-weight", "nan"], ["--change-threshold", "0"], ["--level-mean", "inf"],
                ["--max-minutes", "0"], ["--patch-size", "0"], ["--own-context", "1.5"], ["--own-context", "-0.1"], ["--residue", "1.5"], ["--residue", "-0.1"], ["--sigma-data", "0"], ["--sigma-data", "nan"], ["--predict", "eps"], ["--time-scale", "0"], ["--time-scale", "inf"], ["--sigma-data", "0.1"], ["--out-hidden", "-1"],
                ["--change-gate"], ["--change-gate", "--delta"], ["--gate-weight", "0"], ["--gate-weight", "nan"],
                ["--gate-channels", "4"], ["--prev-frame", "--delta", "--predict", "x0", "--change-gate", "--gate-channels", "0"],
                ["--prev-stack", "2"], ["--prev-frame", "--prev-stack", "0"]):  # --sigma-data 0.1 without --predict edm
        with pytest.raises(SystemExit) as e:
            parse_args(base + bad)
        assert e.value.code == 2


def test_teacher_with_every_lever_trains_exports_and_plays(data, tokenizer, tmp_path):
    """prev frame + change target + change weight + level shift + 1x1 patches + own-prediction context + EDM output
    + pixel refiner + time scale + MLP output layer + change gate + two stacked previous frames."""
    out = tmp_path / "run"
    levers = ("--prev-frame", "--delta", "--change-weight", "20", "--level-mean", "0.5", "--patch-size", "1", "--own-context", "0.5", "--residue", "0.5", "--predict", "edm", "--refine", "4", "--time-scale", "5", "--out-hidden", "24", "--change-gate", "--gate-weight", "2", "--prev-stack", "2", "--bf16")
    run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out), *TEACHER, *levers, "--steps", "3")
    cfg = json.loads((out / "model" / "dit" / "config.json").read_text())["config"]
    assert cfg["prev_frame"] and cfg["delta"] and cfg["patch_size"] == 1 and cfg["predict"] == "edm" and cfg["refine"] == 4 and cfg["pixel_patch"] > 0
    assert cfg["time_scale"] == 5 and cfg["out_hidden"] == 24 and cfg["change_gate"] and cfg["prev_stack"] == 2
    assert "gate" not in json.loads((out / "model" / "config.json").read_text())["sampling"]  # the default threshold, 0.5
    assert "context_noise" not in json.loads((out / "model" / "config.json").read_text())["sampling"]  # unset: readable by code older than the field
    assert cfg["sigma_data"] == pytest.approx(target_std(sorted((out / "latents" / "train").glob("*.npz")), True, cfg["frames_per_chunk"]), rel=1e-4)  # measured
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(0 < r["changed_weight_share"] < 1 and np.isfinite(r["loss/flow_weighted"]) for r in log)
    assert all(np.isfinite(r["loss/gate"]) and 0 < r["gate/changed_cells"] < 1 for r in log)

    card = (out / "model" / "README.md").read_text()
    cmd = next(line.strip() for line in card.splitlines() if line.strip().startswith("python -m train.teacher"))
    again = parse_args(shlex.split(cmd)[3:])  # the card's command reproduces the run's arguments
    assert again.prev_frame and again.delta and again.change_weight == 20 and again.patch_size == 1 and again.level_mean == 0.5 and again.own_context == 0.5 and again.residue == 0.5
    assert again.predict == "edm" and again.sigma_data == cfg["sigma_data"] and again.refine == 4 and again.time_scale == 5 and again.out_hidden == 24
    assert again.change_gate and again.gate_weight == 2 and again.prev_stack == 2 and again.bf16
    # the card's EDM command (sigma_data given) starts a fresh run from the model with --init
    p = run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "again"), *TEACHER, *levers,
            "--sigma-data", str(cfg["sigma_data"]), "--init", str(out / "model"), "--steps", "1")
    assert f"initialised from {out / 'model'}" in p.stdout, p.stdout[-2000:]
    trained = json.loads((tmp_path / "again" / "model" / "config.json").read_text())["trained"]
    assert trained["steps"] == 1 and trained["total_steps"] == 4 and trained["init"]["trained"]["steps"] == 3  # the steps behind a fine-tuned export
    assert "after the 3 steps of the network it was initialised from" in (tmp_path / "again" / "model" / "README.md").read_text()

    wm = WorldModel.load(out / "model")
    frames, actions = load_start_frames(out / "model" / "start_frames.npz")
    wm.reset(frames[0], actions[0], seed=0)
    assert wm.cache.prev.abs().sum() > 0  # the last context frame is kept as the next step's previous frame
    assert wm.cache.older.shape[1] == 1 and wm.cache.older.abs().sum() > 0  # and the one before it
    a = wm.step(1)
    wm.reset(frames[0], actions[0], seed=0)
    np.testing.assert_array_equal(a, wm.step(1))
    assert a.shape == (1, 64, 64, 3)
    off = WorldModel.load(out / "model", gate=0.0)  # the gate switched off at play
    assert off.dit.gate_threshold == 0 and wm.dit.gate_threshold == 0.5
    assert off.gate == 0 and wm.gate == 0.5  # what the reports record
    off.reset(frames[0], actions[0], seed=0)
    assert off.step(1).shape == (1, 64, 64, 3)
    from envs.vector_env import WorldModelVectorEnv
    from envs.world_env import WorldModelEnv
    from play import make_adapter, parse_args as play_args
    assert WorldModelEnv(out / "model", gate=0.3).wm.dit.gate_threshold == 0.3 and WorldModelVectorEnv(2, model=out / "model", gate=0.0).wm.dit.gate_threshold == 0
    adapter = make_adapter(play_args(["--model", str(out / "model"), "--gate", "0.2"]), out / "model", random_policy=True)
    assert adapter.env.wm.dit.gate_threshold == 0.2 and adapter.meta["gate"] == 0.2
    adapter.env.close()
    with pytest.raises(SystemExit):
        play_args(["--gate", "1"])


def test_wall_budget_stops_the_run_with_a_checkpoint(data, tokenizer, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out), *TEACHER, "--steps", "100000", "--max-minutes", "0.01")
    assert time.time() - t0 < 120
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] < 100000 and state["wall_s"] >= 0.6  # stopped by the budget, where it stopped
    assert f"Optimizer steps: {state['step']}," in (out / "model" / "README.md").read_text()


def refined_pair(predict: str = "edm") -> tuple[CausalDiT, CausalDiT]:
    """A plain and a refined tiny network on 2x2 pixel patches (12 channels, 8x8 pixels), the same weights
    where they share them."""
    over = dict(in_channels=12, latent_size=(4, 4), num_actions=4, prev_frame=True, delta=True, predict=predict, sigma_data=0.1, pixel_patch=2)
    torch.manual_seed(0)
    plain = CausalDiT(dit_config("tiny", **over)).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.3)
    refined = CausalDiT(dit_config("tiny", **over, refine=4)).eval()
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("refiner.") for k in missing)
    return plain, refined


def pack_inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 3
    clean = torch.randn(B, T, cfg.in_channels, *cfg.latent_size, generator=g)
    return clean, torch.randn(clean.shape, generator=g), torch.zeros(B, T), torch.rand(B, T, generator=g), torch.randint(0, cfg.num_actions, (B, T), generator=g)


@pytest.mark.parametrize("predict", ["x0", "edm"])
def test_pixel_refiner_starts_as_the_identity_and_reads_the_patch_tokenizers_pixels(predict):
    plain, refined = refined_pair(predict)
    inputs = pack_inputs(plain.cfg)
    with torch.no_grad():
        v_plain, _ = plain.forward_pack(*inputs)
        v_refined, _ = refined.forward_pack(*inputs)
    torch.testing.assert_close(v_refined, v_plain)  # the last convolution starts at zero
    # its pixels are the patch tokenizer's: latents of a frame, laid out back, give the frame
    from worldmodel.config import TokenizerConfig
    from worldmodel.tokenizer import FrameTokenizer
    tok = FrameTokenizer(TokenizerConfig(kind="patch", patch=2, frame_size=(8, 8)))
    pixels = torch.rand(3, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(refined.refiner.to_pixels(tok.encode_raw(pixels)), pixels)
    torch.testing.assert_close(refined.refiner.to_latents(pixels), tok.encode_raw(pixels))


def test_pixel_refiner_corrects_locally_and_learns():
    """Once trained off zero, the correction at a pixel depends on the 7x7 pixels around it alone (three 3x3
    convolutions), not on a whole token; and a few steps on a target it can express take the loss down."""
    _, refined = refined_pair("x0")
    ref = refined.refiner
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    pred = torch.zeros(1, 1, 12, 4, 4, requires_grad=True)
    out = ref(pred, torch.zeros_like(pred), None, torch.full((1, 1), 0.5))
    px = ref.to_pixels(out.flatten(0, 1))  # (1, 3, 8, 8)
    px[0, 0, 0, 0].backward()
    grad = ref.to_pixels(pred.grad.flatten(0, 1))[0].abs().sum(0)  # (8, 8): which input pixels it read
    assert grad[:4, :4].sum() > 0 and grad[4:].sum() == 0 and grad[:, 4:].sum() == 0

    # it can learn to wipe speckle off a prediction: the target is the prediction with isolated dots removed
    _, refined = refined_pair("x0")
    ref = refined.refiner
    g = torch.Generator().manual_seed(2)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        clean = torch.zeros(8, 1, 12, 4, 4)
        speckle = (torch.rand(clean.shape, generator=g) < 0.05).float()
        out = ref(clean + speckle, clean, None, torch.full((8, 1), 0.3))
        loss = (out - clean).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_init_loads_a_checkpoint_and_starts_a_refiner_as_the_identity(tmp_path):
    from train.teacher import init_weights
    from worldmodel.checkpoint import CheckpointError
    from worldmodel.dit import save_dit
    plain, refined = refined_pair("edm")
    save_dit(plain, tmp_path / "dit")
    fresh = CausalDiT(refined.cfg).eval()
    ema = CausalDiT(refined.cfg).eval()
    note = init_weights(fresh, ema, tmp_path / "dit")
    assert "identity" in note
    inputs = pack_inputs(plain.cfg, seed=3)
    with torch.no_grad():
        want, _ = plain.forward_pack(*inputs)
        torch.testing.assert_close(fresh.forward_pack(*inputs)[0], want)
        torch.testing.assert_close(ema.forward_pack(*inputs)[0], want)
    other = CausalDiT(dit_config("tiny", in_channels=12, latent_size=(4, 4), num_actions=4, predict="x0", pixel_patch=2, refine=4))
    with pytest.raises(CheckpointError, match="another shape.*predict 'edm' \\(this run: 'x0'\\)"):
        init_weights(other, copy.deepcopy(other), tmp_path / "dit")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        init_weights(fresh, ema, tmp_path / "nothing")


def test_gate_loss_at_a_finer_grain_has_one_target_per_decision():
    """gate_loss with G decisions per cell: decision j of a cell is 'changed' when any latent channel i with
    i % G == j moved by more than the threshold. A known answer: 4 channels, G = 2, one cell where only channel
    3 (decision 1) moves, another where only channel 0 (decision 0) moves."""
    x0 = torch.zeros(1, 2, 4, 2, 2)
    x0[0, 1, 3, 0, 0] = 1.0  # channel 3 -> decision 1, cell (0, 0)
    x0[0, 1, 0, 1, 1] = 1.0  # channel 0 -> decision 0, cell (1, 1)
    want = torch.zeros(1, 1, 2, 2, 2)
    want[0, 0, 1, 0, 0] = want[0, 0, 0, 1, 1] = 1.0
    logit = torch.where(want.bool(), 9.0, -9.0)
    logit = torch.cat([torch.zeros(1, 1, 2, 2, 2), logit], dim=1)  # the first frame has no previous frame: not scored
    loss, parts = gate_loss(logit, x0, 1, 0.05)
    assert parts["gate/changed_cells"] == pytest.approx(2 / 8) and parts["gate/recall"] == parts["gate/precision"] == 1
    assert loss.item() == pytest.approx(math.log1p(math.exp(-9.0)), rel=1e-2)
    wrong, _ = gate_loss(logit.flip(2), x0, 1, 0.05)  # the decisions of each cell swapped
    assert wrong.item() > 2.0
    _, per_cell = gate_loss(logit[:, :, :1], x0, 1, 0.05)  # one decision per cell: any channel moving makes the cell changed
    assert per_cell["gate/changed_cells"] == pytest.approx(2 / 4)


def test_init_copies_a_cell_gate_into_a_finer_one_exactly(tmp_path):
    """--gate-channels G from a network with one decision per cell (--init): each new decision starts as a copy
    of its cell's, so the finer network keeps the very latents the source kept, and generates the same frames."""
    from train.teacher import init_weights
    from worldmodel.checkpoint import CheckpointError
    from worldmodel.dit import save_dit
    base = dict(in_channels=4, latent_size=(4, 4), num_actions=4, prev_frame=True, delta=True, predict="x0", change_gate=True)
    torch.manual_seed(0)
    src = CausalDiT(dit_config("tiny", **base)).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.3)
    save_dit(src, tmp_path / "dit")
    fine = CausalDiT(dit_config("tiny", **base, gate_channels=2)).eval()
    init_weights(fine, copy.deepcopy(fine), tmp_path / "dit")
    clean, noisy, s_clean, s, a = pack_inputs(src.cfg, seed=4)[:5]
    with torch.no_grad():
        v0, h0 = src.forward_pack(clean, noisy, s_clean, s, a)
        v1, h1 = fine.forward_pack(clean, noisy, s_clean, s, a)
    torch.testing.assert_close(v1, v0)
    assert h1.change_logit.shape[2] == 2
    torch.testing.assert_close(h1.change_logit, h0.change_logit.expand_as(h1.change_logit))
    prev = torch.randn_like(clean)
    keep0, keep1 = src.gate_keep(h0.change_logit, prev), fine.gate_keep(h1.change_logit, prev)
    assert keep1.shape == clean.shape and torch.equal(keep0, keep1) and 0 < keep0.float().mean() < 1
    coarse = CausalDiT(dit_config("tiny", **base, gate_channels=4))
    save_dit(coarse, tmp_path / "g4")
    with pytest.raises(CheckpointError, match="multiple"):
        init_weights(fine, copy.deepcopy(fine), tmp_path / "g4")  # 4 decisions cannot be copied into 2


def test_refiner_configs_are_checked():
    base = dict(in_channels=12, latent_size=(4, 4), num_actions=4, predict="x0")
    with pytest.raises(ValueError, match="pixel patches"):
        dit_config("tiny", **base, refine=4)
    with pytest.raises(ValueError, match="12 latent channels|27 latent channels"):
        dit_config("tiny", **{**base, "in_channels": 4}, pixel_patch=2)
    with pytest.raises(ValueError, match="velocity"):
        dit_config("tiny", **{**base, "predict": "velocity"}, pixel_patch=2, refine=4)
    base_args = ["--data", "d", "--tokenizer", "t", "--out", "o"]
    for bad in (["--refine", "-1"], ["--refine", "8"]):  # the second with the default velocity prediction
        with pytest.raises(SystemExit):
            parse_args(base_args + bad)


def test_gate_loss_targets_the_cells_that_change_after_the_first_chunk():
    """The change gate's target is a latent cell that moves in any channel by more than the threshold from the
    previous frame; frames of the first chunk (no previous frame) are left out. A gate that says exactly that
    has a lower loss than one that says the opposite, recall and precision 1."""
    x = window_with_a_moving_dot()  # (1, 3, 2, 4, 4): the dot lights (1, 1) in frame 1, moves to (1, 2) in frame 2
    want = torch.zeros(1, 2, 1, 4, 4, dtype=torch.bool)  # frames 1 and 2
    want[0, 0, 0, 1, 1] = True
    want[0, 1, 0, 1, 1] = want[0, 1, 0, 1, 2] = True
    right = torch.where(want, 6.0, -6.0)
    logit = torch.cat([torch.full((1, 1, 1, 4, 4), 6.0), right], dim=1)  # frame 0 says "changed" everywhere: not counted
    loss, parts = gate_loss(logit, x, frames_per_chunk=1, threshold=0.05)
    wrong, _ = gate_loss(-logit, x, frames_per_chunk=1, threshold=0.05)
    assert loss < 0.01 < wrong and parts["gate/recall"] == 1 and parts["gate/precision"] == 1
    assert parts["gate/changed_cells"] == pytest.approx(3 / 32)
    below, parts = gate_loss(logit, x * 0.04, frames_per_chunk=1, threshold=0.05)  # a move below the threshold is no change
    assert parts["gate/changed_cells"] == 0 and below > 0.5


def test_gate_loss_targets_the_cells_that_differ_from_the_context_it_was_given():
    """Under error recycling the network reads its own frames: a cell its error spoiled in the context frame
    differs from the real next frame, so it is a cell to rewrite (target 1), though the real frames there do
    not change; a context equal to x0 gives the real-frames target."""
    x = window_with_a_moving_dot()  # (1, 3, 2, 4, 4)
    _, real = gate_loss(torch.zeros(1, 3, 1, 4, 4), x, frames_per_chunk=1, threshold=0.05)
    _, same = gate_loss(torch.zeros(1, 3, 1, 4, 4), x, frames_per_chunk=1, threshold=0.05, context=x.clone())
    assert same == real
    spoiled = x.clone()
    spoiled[0, 1, 0, 3, 0] += 0.5  # the network's own frame 1 has a speck at (3, 0), where nothing ever changes
    want = torch.zeros(1, 2, 1, 4, 4, dtype=torch.bool)
    want[0, 0, 0, 1, 1] = True
    want[0, 1, 0, 1, 1] = want[0, 1, 0, 1, 2] = want[0, 1, 0, 3, 0] = True  # frame 2 must rewrite the speck
    logit = torch.cat([torch.zeros(1, 1, 1, 4, 4), torch.where(want, 6.0, -6.0)], dim=1)
    loss, parts = gate_loss(logit, x, frames_per_chunk=1, threshold=0.05, context=spoiled)
    blind, _ = gate_loss(logit, x, frames_per_chunk=1, threshold=0.05)  # the same logits against the real frames' target
    assert parts["gate/changed_cells"] == pytest.approx(4 / 32) and parts["gate/recall"] == 1 and parts["gate/precision"] == 1
    assert loss < 0.01 < blind


def test_own_context_keeps_the_previous_frame_where_the_change_gate_says_no():
    """With a change gate, the network's own frames are gated as at play: a cell whose change probability is
    below SamplingConfig.gate is the real previous frame's, the others the network's one-step prediction."""
    torch.manual_seed(0)
    dit = CausalDiT(dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, prev_frame=True, delta=True, predict="x0",
                               change_gate=True))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.3)
        dit.gate[-1].weight.mul_(20)  # logits spread on both sides of the threshold
        dit.gate[-1].bias.zero_()
    model = PackForward(dit)
    B, T = 4, 4
    x0 = torch.randn(B, T, 4, 4, 4)
    a = torch.randint(0, 4, (B, T))
    own = own_context(model, x0, a, 1.0, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.rand(B, generator=g)
    s = sample_levels((B, T), generator=g)
    noisy = (1 - s[..., None, None, None]) * x0 + s[..., None, None, None] * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        v, heads = model(x0, noisy, torch.zeros_like(s), s, a, a)
    pred, prev = x0_from_velocity(noisy, v, s), previous_frames(x0, 1)
    keep = (torch.sigmoid(heads.change_logit) < SamplingConfig().gate).expand_as(x0)
    assert keep[:, 1:].any() and not keep[:, 1:].all()  # random weights: the gate keeps some cells and opens others
    assert (pred[:, 1:] - prev[:, 1:]).abs().min() > 0  # so each cell tells which of the two it holds
    torch.testing.assert_close(own[:, 1:][keep[:, 1:]], prev[:, 1:][keep[:, 1:]])
    torch.testing.assert_close(own[:, 1:][~keep[:, 1:]], pred[:, 1:][~keep[:, 1:]])
    torch.testing.assert_close(own[:, :1], x0[:, :1])


def test_sampling_gate_threshold_is_checked_and_written_only_when_set():
    assert "gate" not in SamplingConfig().to_json() and SamplingConfig(gate=0).to_json()["gate"] == 0
    for bad in (1.0, -0.1, True, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="gate"):
            SamplingConfig(gate=bad)


def test_residue_leaves_a_faint_copy_where_the_ball_was_and_keeps_the_real_ball(monkeypatch):
    """A 3x3 court, the ball at (0, 0), (1, 1), (2, 2) in frames 1-3: with every frame a source and alpha 0.25, frame
    2 keeps a quarter of the ball at (0, 0) and frame 3 at (0, 0) and (1, 1); the real ball is untouched."""
    import train.teacher as teacher

    monkeypatch.setattr(teacher, "RESIDUE_SOURCE_PROB", 1.0)
    monkeypatch.setattr(teacher, "RESIDUE_ALPHA", (0.25, 0.25))
    x0 = torch.zeros(1, 4, 1, 3, 3)
    for t, (r, c) in ((1, (0, 0)), (2, (1, 1)), (3, (2, 2))):
        x0[0, t, 0, r, c] = 1.0
    out, mask = teacher.residue_context(x0.clone(), x0, 1.0, 0.05, 1, torch.Generator().manual_seed(0))
    want = x0.clone()
    want[0, 2, 0, 0, 0] = 0.25
    want[0, 3, 0, 0, 0] = 0.25
    want[0, 3, 0, 1, 1] = 0.25
    torch.testing.assert_close(out, want)
    assert mask.sum() == 3 and mask[0, 2, 0, 0, 0] and mask[0, 3, 0, 0, 0] and mask[0, 3, 0, 1, 1]
    same, none = teacher.residue_context(x0, x0, 0.0, 0.05, 1, torch.Generator().manual_seed(0))
    assert same is x0 and none is None
    # the loss weights a frame whose previous context frame holds residue as a change to make
    v, target = torch.zeros_like(x0), torch.zeros_like(x0)
    v[0, 3, 0, 0, 0] = 1.0  # an error only where frame 3 must erase the residue of frame 2
    erase = previous_frames(mask.float(), 1) > 0
    plain, _ = flow_loss(v, target, x0, 10.0, 0.05)
    weighted, _ = flow_loss(v, target, x0, 10.0, 0.05, also=erase)
    assert erase[0, 3, 0, 0, 0] and weighted > 2 * plain
