"""The evaluation command end to end (held-out data and freshly recorded episodes, several models), and its
measures on hand-made inputs: SSIM against a slow reference, reward / episode-end scores, paddle response."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from train.eval_metrics import (SSIM_K2, action_directions, event_scores, gaussian_window, luma, paddle_response, pooled,
                                probe_errors, reward_scores, ssim, termination_scores)
from train.evaluate import ModelSpec, evaluate_models, heldout_clips, main, parse_spec, record_clips, replay_emulator

from tests.conftest import run


def strict_json(path: Path) -> dict:
    def no_constants(name):
        raise AssertionError(f"metrics.json holds {name}, not strict JSON")

    return json.loads(path.read_text(), parse_constant=no_constants)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----- the command -----
def test_two_models_on_heldout_data(teacher, data, tmp_path):
    model = teacher / "model"
    p = run("-m", "train.evaluate", "--model", f"one={model}@1", "--model", f"two={model}@2", "--data", str(data),
            "--out", str(tmp_path), "--episodes", "2", "--context", "2", "--horizon", "10", "--videos", "1")
    m = strict_json(tmp_path / "metrics.json")
    assert list(m["models"]) == ["one", "two"] and m["episodes"] == 2 and m["horizon"] == 10
    assert m["horizons"] == [1, 8, 10] and m["source"]["kind"] == "heldout" and m["probe"] == "Breakout"
    assert [m["models"][n]["denoising_steps"] for n in ("one", "two")] == [1, 2]
    assert [m["models"][n]["nfe_per_step"] for n in ("one", "two")] == [2, 3]  # steps + 1 re-cache, no guidance
    for mm in m["models"].values():
        for key in ("one_step_psnr", "one_step_ssim", "rollout_psnr_mean", "rollout_ssim_mean", "tokenizer_recon_psnr", "single_world_steps_per_s", "batched_steps_per_s"):
            assert finite(mm[key]), (key, mm[key])
        assert set(mm["rollout_psnr_at"]) == {"1", "8", "10"} and all(finite(v["rollout_psnr"]) and finite(v["hold_last_psnr"]) for v in mm["rollout_psnr_at"].values())
        assert all(-1 <= v <= 1 for v in mm["rollout_ssim_at"].values()) and len(mm["ssim_per_step"]) == len(mm["psnr_per_step"]) == 10
        assert set(mm["probe_at"]) == {"1", "8", "10"}
        for v in mm["probe_at"].values():
            assert 0 <= v["ball_agree"] <= 1 and finite(v["bricks_abs_err"]) and (v["paddle_abs_err"] is None or v["paddle_abs_err"] >= 0)
        for key in ("reward_rollout", "reward_teacher_forced", "termination_rollout", "termination_teacher_forced"):
            assert mm[key]["steps"] == 20 and 0 <= mm[key]["accuracy"] <= 1
        c = mm["controllability"]
        assert finite(c["divergence_mean"]) and c["real_divergence_mean"] is None  # no emulator for a dataset
        assert 0 <= c["paddle_response_random_actions"] <= 1
    assert finite(m["real"]["paddle_response_real_actions"]) and m["real"]["paddle_response_random_actions"] is None
    # the same model, the same clips and noise: the baselines do not depend on the model
    assert m["models"]["one"]["rollout_psnr_at"]["8"]["hold_last_psnr"] == m["models"]["two"]["rollout_psnr_at"]["8"]["hold_last_psnr"]

    md = (tmp_path / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| model |")]
    assert table and "PSNR@8" in table[0] and "paddle@8" in table[0] and "NFE/step" in table[0] and "steps/s" in table[0]
    for row in ("| one | ", "| two | ", "| hold last frame | "):
        assert row in md, row
    for name in ("psnr.png", "ssim.png", "probe.png", "control.png", "one_rollout_00.mp4", "two_teacher_forced_00.mp4"):
        assert (tmp_path / name).stat().st_size > 0, name
    with np.load(tmp_path / "rollouts.npz") as z:
        assert z["rollout_1"].shape == z["real"].shape == (2, 10, 64, 64, 3) and list(z["model_names"]) == ["one", "two"]
    assert "| one |" in p.stdout


def test_recorded_episodes_and_real_controllability(teacher, tmp_path):
    run("-m", "train.evaluate", "--model", str(teacher / "model"), "--record-seeds", "0", "1", "--game", "breakout",
        "--out", str(tmp_path), "--context", "2", "--horizon", "8", "--videos", "1")
    m = strict_json(tmp_path / "metrics.json")
    assert m["source"]["kind"] == "recorded" and m["source"]["seeds"] == [0, 1] and m["episodes"] == 2
    (mm,) = m["models"].values()
    assert finite(mm["controllability"]["real_divergence_mean"]) and finite(m["real"]["divergence_random_actions_mean"])
    assert 0 <= m["real"]["paddle_response_random_actions"] <= 1
    with np.load(tmp_path / "rollouts.npz") as z:
        assert z["real_random"].shape == z["real"].shape == (2, 8, 64, 64, 3)


def test_emulator_replay_is_exact():
    rec = record_clips("Breakout", [5], 14, size=(64, 64), frameskip=4)
    again = replay_emulator("Breakout", rec, 3, rec.actions[:, 3:], size=(64, 64), frameskip=4)
    np.testing.assert_array_equal(again, rec.frames[:, 3:])  # the recorded actions give the recorded frames
    other = replay_emulator("Breakout", rec, 3, (rec.actions[:, 3:] + 1) % 4, size=(64, 64), frameskip=4)
    assert other.shape == again.shape


def test_evaluate_models_as_a_function(teacher, data):
    clips, actions, rewards, terminated = heldout_clips(data, 1, 5, seed=1)
    assert rewards.dtype == np.float32 and terminated.dtype == bool and rewards.shape == terminated.shape == actions.shape == (1, 5)
    spec = f"{teacher / 'model'}@1"
    m = evaluate_models([spec, ModelSpec("b", teacher / "model", 2)], clips, actions, rewards, terminated, context=2)
    assert list(m["models"]) == [spec, "b"] and m["horizons"] == [1, 3]


def test_bad_input_is_a_clear_error(teacher, data, tmp_path, capsys):
    model = str(teacher / "model")
    p = run("-m", "train.evaluate", "--model", f"{model}@abc", "--data", str(data), "--out", str(tmp_path), ok=False)
    assert p.returncode == 2 and "error: bad --model" in p.stderr and "STEPS after '@'" in p.stderr and "Traceback" not in p.stderr, p.stderr

    def fails(*args: str) -> str:  # in-process: main returns 2 (an exception would fail the test)
        assert main(["--out", str(tmp_path), *args]) == 2
        return capsys.readouterr().err

    for spec, says in ((f"{model}@0", "STEPS after '@'"), ("=" + model, "empty NAME"), ("x=@2", "no PATH")):
        err = fails("--model", spec, "--data", str(data))
        assert err.startswith("error: bad --model") and says in err, err
    err = fails("--model", str(teacher / "nope" / "model"), "--data", str(data))
    assert "no world-model folder" in err and "model/" in err  # lists what is there
    assert "distinct names" in fails("--model", model, "--model", model, "--data", str(data))
    assert fails("--model", model, "--data", str(data), "--horizon", "5000").startswith("error: no held-out episode")
    assert "error: every recorded episode ended before" in fails("--model", model, "--record-seeds", "0", "--horizon", "5000")


def test_parse_spec():
    assert parse_spec("runs/t/model") == ModelSpec("runs/t/model", Path("runs/t/model"), None)
    assert parse_spec("runs/t/model@4") == ModelSpec("runs/t/model@4", Path("runs/t/model"), 4)
    assert parse_spec("student=~/s/model@1") == ModelSpec("student", Path("~/s/model").expanduser(), 1)
    assert parse_spec("s16=m@2#bfloat16") == ModelSpec("s16", Path("m"), 2, "bfloat16")
    assert parse_spec("m#float16") == ModelSpec("m#float16", Path("m"), None, "float16")
    with pytest.raises(ValueError, match="DTYPE after '#' must be one of"):
        parse_spec("m@2#int8")
    with pytest.raises(ValueError, match="STEPS"):
        parse_spec("a=b@-1")


# ----- SSIM -----
def slow_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Direct SSIM: every valid 11x11 window, the 2-D gaussian weights written out (no separable filter)."""
    x, y = luma(a), luma(b)
    w = np.outer(gaussian_window(), gaussian_window())
    c1, c2 = (0.01 * 255) ** 2, (SSIM_K2 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_direct_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 18, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    got = ssim(a, b)
    want = np.array([slow_ssim(a[k], b[k]) for k in range(2)])
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-9, atol=1e-12)
    assert got.shape == (2,) and (got < 0.99).all()


def test_ssim_identical_and_noisy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(ssim(a, b), ssim(b, a), atol=1e-12)  # symmetric
    # A flat image against itself plus gaussian noise of std s: no structure to share, so SSIM is the
    # contrast term C2 / (C2 + local variance), the window's variance estimate being s^2 (1 - sum w^2).
    flat = np.full((1, 256, 256, 3), 128, dtype=np.uint8)
    sw2 = (gaussian_window() ** 2).sum() ** 2
    previous = 1.0
    for s in (3.0, 10.0, 30.0):
        noise = rng.normal(0, s, (1, 256, 256, 1)).repeat(3, axis=3)  # gray noise: luma noise std s
        noisy = np.clip(np.round(128 + noise), 0, 255).astype(np.uint8)
        c2 = (SSIM_K2 * 255) ** 2
        expected = c2 / (c2 + (s**2 + 1 / 12) * (1 - sw2))  # + rounding noise of variance 1/12
        got = float(ssim(flat, noisy)[0])
        assert abs(got - expected) < 0.03 and got < previous, (s, got, expected)
        previous = got
    with pytest.raises(ValueError, match="smaller than"):
        ssim(a[:, :8, :8], a[:, :8, :8])


# ----- events, probes, controllability -----
def test_reward_and_termination_scores():
    r = reward_scores(np.array([[0, 1, 0], [4, 0, 0]]), np.array([[0, 1, 1], [0, 0, 7]]))
    assert r["precision"] == 0.5 and r["recall"] == pytest.approx(1 / 3) and r["accuracy"] == 0.5 and r["abs_err"] == 2.0
    assert (r["predicted"], r["real"], r["steps"]) == (2, 3, 6)
    t = termination_scores(np.array([0.1, 0.9, 0.6, 0.2]), np.array([False, True, False, False]))
    assert t["accuracy"] == 0.75 and t["recall"] == 1.0 and t["precision"] == 0.5
    none = termination_scores(np.array([0.1, 0.2]), np.array([False, False]))
    assert math.isnan(none["recall"]) and math.isnan(none["precision"]) and none["accuracy"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        event_scores(np.zeros(3, bool), np.zeros(4, bool))


def test_probe_errors_and_pooling():
    nan = np.nan
    real = {"paddle_x": np.array([[10.0, 20.0, nan, 5.0]]), "ball_x": np.array([[1.0, nan, 3.0, nan]]), "ball_y": np.array([[1.0, nan, 4.0, nan]]),
            "bricks_left": np.array([[108, 107, 100, 90]]), "score": np.array([[0, 4, -1, 10]])}
    gen = {"paddle_x": np.array([[12.0, nan, 3.0, 5.5]]), "ball_x": np.array([[4.0, 2.0, nan, nan]]), "ball_y": np.array([[5.0, 2.0, nan, nan]]),
           "bricks_left": np.array([[108, 108, 104, 90]]), "score": np.array([[1, -1, 3, 13]])}
    e = probe_errors(real, gen)
    np.testing.assert_array_equal(e["paddle_abs_err"], [[2.0, nan, nan, 0.5]])
    np.testing.assert_array_equal(e["paddle_found"], [[1.0, 0.0, nan, 1.0]])
    np.testing.assert_array_equal(e["ball_agree"], [[1.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(e["ball_dist"], [[5.0, nan, nan, nan]])
    np.testing.assert_array_equal(e["bricks_abs_err"], [[0.0, 1.0, 4.0, 0.0]])
    np.testing.assert_array_equal(e["score_abs_err"], [[1.0, nan, nan, 3.0]])
    p = pooled(e, [1, 3, 4])
    assert p[1]["paddle_abs_err"] == 2.0 and p[3]["bricks_abs_err"] == 2.5 and p[3]["ball_agree"] == 0.0 and math.isnan(p[3]["ball_dist"])


def test_paddle_response():
    meanings = ["NOOP", "FIRE", "RIGHT", "LEFT", "UPRIGHT", "DOWNLEFTFIRE"]
    directions = action_directions(meanings)
    np.testing.assert_array_equal(directions, [0, 0, 1, -1, 1, -1])
    paddle = np.array([[10.0, 12.0, 12.0, 11.0, np.nan, 9.0]])
    actions = np.array([[2, 4, 3, 5, 3, 0]])  # right +1, right +2, left 0 (fails), left -1, left to nothing (fails), noop
    assert paddle_response(paddle, np.array([9.0]), actions, directions) == 0.6
    assert paddle_response(paddle[:, :1] + 0.1, np.array([10.0]), actions[:, :1], directions) == 0.0  # within the dead zone
    assert math.isnan(paddle_response(paddle, np.array([9.0]), np.zeros_like(actions), directions))
