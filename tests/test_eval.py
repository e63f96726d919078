"""The evaluation command end to end (held-out data and freshly recorded episodes under each clip policy, several
models), and its measures on hand-made inputs: SSIM against a slow reference, reward / episode-end scores,
reward events reproduced, probe errors pooled and at exact steps, paddle response, partial denoising, the
contact sheet."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from envs.probe import probe_breakout
from envs.policies import BreakoutTracker, MixedPolicy, PersistentRandom
from train.eval_clips import clip_policy
from train.eval_metrics import (GLANCE_KEYS, SSIM_K2, action_directions, event_scores, events_reproduced, exact_horizons,
                                gaussian_window, luma, paddle_response, pooled, probe_errors, probe_exact_at, reward_scores,
                                ssim, termination_scores)
from train.eval_report import SHEET_HEADER_H, SHEET_LABEL_W, contact_sheet
from train.evaluate import (ModelSpec, evaluate_models, heldout_clips, load_model, main, parse_spec, partial_denoise, partial_denoise_ball,
                            random_actions, record_clips, reference, replay_emulator, rollout, teacher_forced)
from worldmodel.checkpoint import read_config

from tests.conftest import run


def strict_json(path: Path) -> dict:
    def no_constants(name):
        raise AssertionError(f"metrics.json holds {name}, not strict JSON")

    return json.loads(path.read_text(), parse_constant=no_constants)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----- the command -----
def test_two_models_on_heldout_data(teacher, acting_model, data, tmp_path):
    model = teacher / "model"
    p = run("-m", "train.evaluate", "--model", f"one={model}@1", "--model", f"two={acting_model}@2", "--data", str(data),
            "--out", str(tmp_path), "--episodes", "2", "--context", "2", "--horizon", "10", "--videos", "1", "--requantize")
    m = strict_json(tmp_path / "metrics.json")
    assert all(mm["requantize"] is True for mm in m["models"].values())
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
    # the same clips and noise: the baselines do not depend on the model
    assert m["models"]["one"]["rollout_psnr_at"]["8"]["hold_last_psnr"] == m["models"]["two"]["rollout_psnr_at"]["8"]["hold_last_psnr"]
    # at a glance: the probe at exact steps, reward events and partial denoising on the first steps
    assert m["exact_horizons"] == [1, 4, 8, 10] and m["glance_steps"] == 10
    with np.load(tmp_path / "rollouts.npz") as z:
        real_probe, gen_probe, tf_probe = (probe_breakout(z[k]) for k in ("real", "rollout_1", "teacher_forced_1"))
    want, tf = (probe_exact_at(real_probe, g, [1, 4, 8, 10]) for g in (gen_probe, tf_probe))  # on the free rollout, not teacher-forced
    assert want != tf, "the acting model's rollout and teacher-forced frames should read differently"
    for h, v in m["models"]["two"]["probe_exact_at"].items():
        assert set(v) == {*GLANCE_KEYS, "ball_both"} and 0 <= v["ball_agree"] <= 1 and v["ball_both"] == want[int(h)]["ball_both"]
        for k in GLANCE_KEYS:
            assert v[k] == pytest.approx(want[int(h)][k]) if v[k] is not None else math.isnan(want[int(h)][k]), (h, k)
    assert set(m["hold_last"]["probe_exact_at"]) == {"1", "4", "8", "10"}
    balls = int((~np.isnan(real_probe["ball_x"][:, :10])).sum())
    for mm in m["models"].values():
        ev = mm["reward_events_rollout"]
        assert ev["steps"] == 20 and ev["tol"] == 1 and ev["model_events"] >= ev["false_events"] >= 0
        assert all(ev[k] is None or 0 <= ev[k] <= 1 for k in ("reproduced", "false_rate"))
        pd = mm["partial_denoise_ball"]
        assert list(pd) == ["1.0", "0.4", "0.2"] and all(v["n"] == balls and 0 <= v["survival"] <= 1 for v in pd.values()), pd
        sheet = cv2.imread(str(tmp_path / mm["contact_sheet"]))
        assert sheet.shape == (SHEET_HEADER_H + 3 * 64 * 2, SHEET_LABEL_W + 10 * 64 * 2, 3)  # 3 rows, 10 steps (< 16), scale 2

    md = (tmp_path / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| model |")]
    assert table and "PSNR@8" in table[0] and "paddle@8" in table[0] and "NFE/step" in table[0] and "steps/s" in table[0]
    assert md.count("**Fidelity at a glance**") == 2 and "| measure | | h=1 | h=4 | h=8 | h=10 |" in md and "| ball agree | two |" in md
    assert "hold last |" in md and "![contact sheet" in md and "(one_contact.png)" in md and "Partial denoising" in md
    for row in ("| one | ", "| two | ", "| hold last frame | "):
        assert row in md, row
    for name in ("psnr.png", "ssim.png", "probe.png", "control.png", "one_rollout_00.mp4", "two_teacher_forced_00.mp4"):
        assert (tmp_path / name).stat().st_size > 0, name
    with np.load(tmp_path / "rollouts.npz") as z:
        assert z["rollout_1"].shape == z["real"].shape == (2, 10, 64, 64, 3) and list(z["model_names"]) == ["one", "two"]
    assert "| one |" in p.stdout


@pytest.mark.parametrize("policy", ["scripted", "random"])
def test_recorded_episodes_and_real_controllability(teacher, tmp_path, policy):
    run("-m", "train.evaluate", "--model", str(teacher / "model"), "--record-seeds", "0", "1", "--game", "breakout", "--policy", policy,
        "--out", str(tmp_path), "--context", "2", "--horizon", "8", "--videos", "1")
    m = strict_json(tmp_path / "metrics.json")
    assert m["source"]["kind"] == "recorded" and m["source"]["seeds"] == [0, 1] and m["episodes"] == 2 and m["source"]["policy"] == policy
    assert f"{policy} policy" in (tmp_path / "report.md").read_text()
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


def test_clip_policies_are_fixed_by_the_seed():
    rng = np.random.default_rng(0)
    assert isinstance(clip_policy("behaviour", "Breakout", 4, rng), MixedPolicy) and isinstance(clip_policy("scripted", "Breakout", 4, rng), BreakoutTracker)
    assert isinstance(clip_policy("random", "Pong", 6, rng), PersistentRandom)
    with pytest.raises(ValueError, match="--policy scripted is the Breakout tracker"):
        clip_policy("scripted", "Pong", 6, rng)
    with pytest.raises(ValueError, match="--policy must be one of behaviour, scripted, random"):
        clip_policy("greedy", "Breakout", 4, rng)
    recs = {p: record_clips("Breakout", [7], 30, size=(64, 64), frameskip=4, policy=p) for p in ("scripted", "random")}
    for p, rec in recs.items():
        again = record_clips("Breakout", [7], 30, size=(64, 64), frameskip=4, policy=p)
        np.testing.assert_array_equal(again.frames, rec.frames)
        np.testing.assert_array_equal(again.actions, rec.actions)
        assert again.lead_ins[0].tolist() == rec.lead_ins[0].tolist()  # the warm-up is drawn from the seed alone
    assert not np.array_equal(recs["scripted"].actions, recs["random"].actions)
    a = recs["random"].actions[0, 1:]
    assert (a[1:] == a[:-1]).mean() > 0.6  # persistent: repeats with probability 0.75 (+ 1/4 of fresh draws)


def test_evaluate_models_as_a_function(teacher, data):
    clips, actions, rewards, terminated = heldout_clips(data, 1, 5, seed=1)
    assert rewards.dtype == np.float32 and terminated.dtype == bool and rewards.shape == terminated.shape == actions.shape == (1, 5)
    spec = f"{teacher / 'model'}@1"
    m = evaluate_models([spec, ModelSpec("b", teacher / "model", 2), ModelSpec("noised", teacher / "model", 2, context_noise=0.2),
                         ModelSpec("guided", teacher / "model", 1, guidance=2.0)], clips, actions, rewards, terminated, context=2)
    assert list(m["models"]) == [spec, "b", "noised", "guided"] and m["horizons"] == [1, 3] and m["exact_horizons"] == [1, 3]
    assert m["models"]["guided"]["guidance"] == 2.0 and m["models"]["guided"]["nfe_per_step"] == 3  # 1 step, guided: 2 passes, + the re-cache
    assert [m["models"][n]["context_noise"] for n in (spec, "b", "noised")] == [0.0, 0.0, 0.2]
    assert m["models"]["noised"]["rollout_psnr_mean"] != m["models"]["b"]["rollout_psnr_mean"]  # the level is used
    hold = probe_exact_at(probe_breakout(clips[:, 2:]), probe_breakout(np.repeat(clips[:, 1:2], 3, axis=1)), [1, 3])  # the last context frame held
    assert {h: pytest.approx(v, nan_ok=True) for h, v in hold.items()} == m["hold_last"]["probe_exact_at"]
    assert m["models"]["b"]["contact_sheet"] is None  # no --out, no files


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

    def usage_error(*args: str) -> str:  # argparse's exit 2, with the usage line
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path), "--model", model, *args])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "--policy goes with --record-seeds" in usage_error("--data", str(data), "--policy", "random")
    assert "--context-noise must lie in [0, 1)" in usage_error("--data", str(data), "--context-noise", "1")
    assert "--gate must lie in [0, 1)" in usage_error("--data", str(data), "--gate", "1")
    assert "--guidance must be a finite number" in usage_error("--data", str(data), "--guidance", "nan")
    assert "--policy: invalid choice: 'greedy'" in usage_error("--record-seeds", "0", "--policy", "greedy")
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


def hand_readings() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Probe readings of one 4-step episode, real and generated, with known disagreements."""
    nan = np.nan
    real = {"paddle_x": np.array([[10.0, 20.0, nan, 5.0]]), "ball_x": np.array([[1.0, nan, 3.0, nan]]), "ball_y": np.array([[1.0, nan, 4.0, nan]]),
            "bricks_left": np.array([[108, 107, 100, 90]]), "score": np.array([[0, 4, -1, 10]])}
    gen = {"paddle_x": np.array([[12.0, nan, 3.0, 5.5]]), "ball_x": np.array([[4.0, 2.0, nan, nan]]), "ball_y": np.array([[5.0, 2.0, nan, nan]]),
           "bricks_left": np.array([[108, 108, 104, 90]]), "score": np.array([[1, -1, 3, 13]])}
    return real, gen


def test_probe_errors_and_pooling():
    nan = np.nan
    real, gen = hand_readings()
    e = probe_errors(real, gen)
    np.testing.assert_array_equal(e["paddle_abs_err"], [[2.0, nan, nan, 0.5]])
    np.testing.assert_array_equal(e["paddle_found"], [[1.0, 0.0, nan, 1.0]])
    np.testing.assert_array_equal(e["ball_agree"], [[1.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(e["ball_dist"], [[5.0, nan, nan, nan]])
    np.testing.assert_array_equal(e["ball_match"], [[0.0, 0.0, 0.0, 1.0]])  # step 0: both see one, 5 px apart
    near = {**gen, "ball_x": np.array([[2.0, 2.0, nan, nan]]), "ball_y": np.array([[2.0, 2.0, nan, nan]])}
    np.testing.assert_array_equal(probe_errors(real, near)["ball_match"], [[1.0, 0.0, 0.0, 1.0]])  # 1.4 px apart
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


def test_probe_exact_at_reads_each_step_alone():
    real, gen = hand_readings()
    # episode 2 is generated perfectly: the means at a step are over both episodes, undefined ones left out
    two_real, two_gen = ({k: np.concatenate([real[k], real[k]]) for k in real}, {k: np.concatenate([gen[k], real[k]]) for k in real})
    e = probe_exact_at(two_real, two_gen, [1, 3, 4])
    assert all(math.isnan(e[h].pop("clutter")) for h in e)  # readings without clutter (another game's probe)
    assert e[1] == {"ball_agree": 1.0, "ball_match": 0.5, "ball_dist": 2.5, "paddle_abs_err": 1.0, "bricks_abs_err": 0.0, "ball_both": 2}
    assert e[3]["ball_agree"] == 0.5 and e[3]["ball_dist"] == 0.0 and e[3]["ball_both"] == 1 and math.isnan(e[3]["paddle_abs_err"])
    assert e[3]["bricks_abs_err"] == 2.0  # step 3 alone; pooled over steps 2-3 it would be 1.25
    assert e[4] == {"ball_agree": 1.0, "ball_match": 1.0, "ball_dist": e[4]["ball_dist"], "paddle_abs_err": 0.25, "bricks_abs_err": 0.0, "ball_both": 0} and math.isnan(e[4]["ball_dist"])
    with pytest.raises(ValueError, match="must lie in"):
        probe_exact_at(real, gen, [5])
    assert [exact_horizons(h) for h in (1, 3, 4, 10, 16, 40)] == [[1], [1, 3], [1, 4], [1, 4, 8, 10], [1, 4, 8, 16], [1, 4, 8, 16, 32, 40]]


def test_probe_exact_at_on_frames(data):
    """Real frames against copies with the ball erased and moved 4 rows down: the answer is known."""
    clips, *_ = heldout_clips(data, 2, 100, seed=0)
    frames = clips.reshape(-1, *clips.shape[2:])  # (2*100, 64, 64, 3)
    p = probe_breakout(frames)
    clear = (p["ball_y"] > 33) & (p["ball_y"] < 48) & (p["ball_x"] > 12) & (p["ball_x"] < 50)  # below the bricks, above the paddle
    assert clear.any(), "the held-out play should show a ball in open space"
    i = int(np.argmax(clear))
    f, (y, x) = frames[i], (int(round(p["ball_y"][i])), int(round(p["ball_x"][i])))
    box = (slice(y - 3, y + 4), slice(x - 3, x + 4))
    erased = f.copy()
    erased[box] = 0  # the black background
    moved = erased.copy()
    moved[y + 1:y + 8, x - 3:x + 4] = f[box]
    real, gen = np.stack([f, f, f])[None], np.stack([f, erased, moved])[None]  # (1, 3, 64, 64, 3)
    e = probe_exact_at(probe_breakout(real), probe_breakout(gen), [1, 2, 3])
    assert [e[h].pop("clutter") for h in e] == [0.0, 0.0, 0.0]  # a ball erased or moved leaves no stray red
    assert e[1] == {"ball_agree": 1.0, "ball_match": 1.0, "ball_dist": 0.0, "paddle_abs_err": 0.0, "bricks_abs_err": 0.0, "ball_both": 1}
    assert e[2]["ball_agree"] == 0.0 and e[2]["ball_both"] == 0 and math.isnan(e[2]["ball_dist"]) and e[2]["bricks_abs_err"] == 0.0
    assert e[3]["ball_agree"] == 1.0 and e[3]["ball_dist"] == pytest.approx(4.0, abs=1e-6) and e[3]["paddle_abs_err"] == 0.0


def test_events_reproduced():
    pred = np.array([[0, 1, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 0, 0, 0]], dtype=bool)
    real = np.array([[1, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0]], dtype=bool)
    # first 6 steps: real events (0, 0) (matched by the model's event at 1) and (0, 4) (nothing within 1);
    # the model's (0, 1) is backed, (1, 4) is not (the real event at 6 is 2 steps away); (0, 6) and (1, 6) lie past step 6
    r = events_reproduced(pred, real, tol=1, first=6)
    assert r == {"reproduced": 0.5, "false_rate": 0.5, "real_events": 2, "model_events": 2, "false_events": 1, "steps": 12, "tol": 1}
    late = pred.copy()
    late[1] = np.roll(late[1], 1)  # the model's event at step 5 is backed by the real one at 6, just past the window
    assert events_reproduced(late, real, tol=1, first=6)["false_rate"] == 0.0
    exact = events_reproduced(pred, real, tol=0, first=6)
    assert exact["reproduced"] == 0.0 and exact["false_rate"] == 1.0
    assert events_reproduced(pred, real, tol=2, first=8)["reproduced"] == 1.0  # (0, 4) now 2 away from (0, 6), (1, 6) 2 from (1, 4)
    none = events_reproduced(np.zeros((2, 3), bool), np.zeros((2, 3), bool))
    assert math.isnan(none["reproduced"]) and math.isnan(none["false_rate"]) and none["steps"] == 6
    with pytest.raises(ValueError, match="one shape"):
        events_reproduced(pred, real[:, :4])


def test_contact_sheet():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    sheet = contact_sheet(real, gen, scale=2)
    assert sheet.shape == (SHEET_HEADER_H + 3 * 8 * 2, SHEET_LABEL_W + 3 * 10 * 2, 3) and sheet.dtype == np.uint8

    def cell(row: int, t: int) -> np.ndarray:  # the frame at row, step t, back at scale 1
        y, x = SHEET_HEADER_H + row * 16, SHEET_LABEL_W + t * 20
        return sheet[y:y + 16:2, x:x + 20:2]

    np.testing.assert_array_equal(cell(0, 2), real[2])
    np.testing.assert_array_equal(cell(1, 0), gen[0])
    np.testing.assert_array_equal(cell(2, 1), np.abs(real[1].astype(int) - gen[1].astype(int)))
    with pytest.raises(ValueError, match="one shape"):
        contact_sheet(real, gen[:2])


def test_partial_denoise(acting_model, data):
    clips, actions, rewards, terminated = heldout_clips(data, 2, 12, seed=2)
    E, horizon = 2, 10
    ref, _ = reference(read_config(acting_model), clips, actions, rewards, terminated, 2, random_actions(E, horizon, 4, 0), None)
    wm = load_model(ModelSpec("m", acting_model), batch=E)
    # s = 1 is a fresh sample from the real past: with the model's own levels (2 steps, shift 1, Euler) and the same
    # seeds it is the teacher-forced prediction, step by step (the cache follows the real frames and actions)
    assert (wm.steps, wm.sampling.shift, wm.sampling.solver) == (2, 1.0, "euler"), "the tiny model's sampling changed; update this test"
    got = partial_denoise(wm, ref, levels=(1.0, 0.0), steps=2, seed=3)
    tf, _, _ = teacher_forced(wm, ref.ctx_frames, ref.ctx_actions, ref.real, ref.actions, seed=3)
    np.testing.assert_array_equal(got[1.0], tf)
    free, *_ = rollout(wm, ref.ctx_frames, ref.ctx_actions, ref.actions, seed=3)
    assert not np.array_equal(free[:, 2:], tf[:, 2:]), "the acting model should depend on its context (else the parity above proves little)"
    np.testing.assert_array_equal(got[0.0], ref.real)  # s = 0: the exact patch tokenizer's round trip

    ball = partial_denoise_ball(wm, ref, levels=(1.0, 0.0), steps=2, seed=3)
    has = ~np.isnan(ref.real_probe["ball_x"])
    tf_probe = probe_breakout(tf)
    assert has.sum() > 0 and ball[1.0]["n"] == ball[0.0]["n"] == has.sum()
    assert ball[0.0]["survival"] == 1.0 and ball[0.0]["ball_dist"] == 0.0
    assert ball[1.0]["seen"] == (~np.isnan(tf_probe["ball_x"][has])).mean()
    assert ball[1.0]["survival"] == (probe_errors(ref.real_probe, tf_probe)["ball_dist"][has] <= 2.0).mean() <= ball[1.0]["seen"]
    assert ball[1.0]["ball_dist"] == pytest.approx(np.nanmean(probe_errors(ref.real_probe, tf_probe)["ball_dist"][has]), nan_ok=True)
    with pytest.raises(ValueError, match="levels in"):
        partial_denoise_ball(wm, ref, levels=(1.5,))
    with pytest.raises(ValueError, match="batch 1"):
        partial_denoise_ball(load_model(ModelSpec("m", acting_model), batch=1), ref)


def test_ablation_table_from_evaluations(teacher, tmp_path):
    """train.ablation: rows from evaluate outputs on the same clips, training columns from each model's run."""
    ev = tmp_path / "eval"
    run("-m", "train.evaluate", "--model", f"a={teacher / 'model'}", "--model", f"b={teacher / 'model'}@1", "--record-seeds", "0", "--game", "breakout",
        "--out", str(ev), "--context", "2", "--horizon", "8", "--videos", "0")
    p = run("-m", "train.ablation", "--eval", str(ev), "--out", str(tmp_path / "abl"))
    table = (tmp_path / "abl" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| a |") or line.startswith("| b |") or line.startswith("| hold last")]
    steps = json.loads((teacher / "checkpoint" / "state.json").read_text())["step"]
    assert len(rows) == 3 and f"| a | {steps} |" in table  # the training columns come from the model's run
    head = table.splitlines()[2].split(" | ")
    assert all(col in head for col in ("sampling", "paddle px @4", "bricks @8", "clutter @8", "reward events / false", "keys")), head
    b = next(line for line in rows if line.startswith("| b |")).split(" | ")
    assert len(b) == len(head) and b[head.index("sampling")] == "1 euler"
    assert "Real game: the paddle moves as the keys ask on" in table
    assert "python -m train.teacher" in table and (tmp_path / "abl" / "ablation.png").stat().st_size > 0
    other = tmp_path / "other"
    other.mkdir()
    m = json.loads((ev / "metrics.json").read_text())
    m["source"]["seeds"] = [1]
    (other / "metrics.json").write_text(json.dumps(m))
    p = run("-m", "train.ablation", "--eval", str(ev), "--eval", str(other), "--out", str(tmp_path / "abl2"), ok=False)
    assert p.returncode == 2 and "other clips" in p.stderr
    p = run("-m", "train.ablation", "--eval", str(tmp_path / "nothing"), "--out", str(tmp_path / "abl3"), ok=False)
    assert p.returncode == 2 and "--eval" in p.stderr

    # train.locate_error reads the same evaluation: one row per model, shares that add up, and the sheet
    p = run("-m", "train.locate_error", "--eval", str(ev), "--token", "16", "--figure", str(tmp_path / "sheet.png"))
    rows = [line for line in p.stdout.splitlines() if line.startswith("| a |") or line.startswith("| b |")]
    assert len(rows) == 2 and (tmp_path / "sheet.png").stat().st_size > 0
    p = run("-m", "train.locate_error", "--eval", str(tmp_path / "nothing"), ok=False)
    assert p.returncode == 2 and "no rollouts.npz" in p.stderr


def test_locate_error_splits_the_error_by_where_frames_really_change():
    """A dot moves inside token (0, 0); the model gets it right but adds speckle far from it in the same token
    (weight 3) and in a quiet token (weight 1): the shares follow, and the areas are the regions'."""
    from train.locate_error import split_error
    real = np.zeros((1, 2, 32, 32, 3), np.uint8)
    real[0, 0, 2, 2] = real[0, 1, 2, 4] = 200  # the dot moves two pixels: 2 changed pixels in token (0, 0)
    gen = real.copy()
    gen[0, 1, 12, 12, 0] = 30  # away from the change (> 2 px), inside the active token
    gen[0, 1, 20, 20, 0] = 10  # a quiet token
    s = split_error(real, gen, token=16, near=2)
    assert s["active_tokens"] == pytest.approx(0.25)
    assert s["error_near"] == 0 and s["error_active_away"] == pytest.approx(0.75) and s["error_quiet"] == pytest.approx(0.25)
    assert s["area_quiet"] == pytest.approx(0.75) and s["area_near"] + s["area_active_away"] == pytest.approx(0.25)
    assert s["error_mean"] == pytest.approx(40 / 32**2)
    with pytest.raises(ValueError, match="tokens"):
        split_error(real, gen, token=12)
    with pytest.raises(ValueError, match="same shape"):
        split_error(real, gen[:, :1])


def test_ablation_sampling_cell_names_the_change_gate():
    from train.ablation import sampling
    base = {"denoising_steps": 8, "solver": "euler", "guidance": 1.0, "context_noise": 0.0}
    assert sampling({**base, "change_gate": None}) == sampling(base) == "8 euler"  # a network without a gate
    assert sampling({**base, "change_gate": 0.5}) == "8 euler, gate 0.5" and sampling({**base, "change_gate": 0.0}) == "8 euler, gate off"
    assert sampling({**base, "change_gate": 0.1, "requantize": True}) == "8 euler, gate 0.1, requantized" and sampling({**base, "requantize": False}) == "8 euler"
