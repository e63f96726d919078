"""train.context_swap: which part of a model's own frame spoils its next prediction."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from envs.probe import probe_breakout, record_breakout
from train.context_swap import ball_boxes, ball_match, context_frame

from tests.conftest import ROOT, run


def test_ball_boxes_and_the_swapped_frames():
    ys, xs = np.array([10.2, np.nan]), np.array([20.7, 5.0])
    box = ball_boxes(ys, xs, (64, 64), half=3)
    assert box[0].sum() == 49 and box[0, 10, 21] and not box[0, 10, 25] and not box[1].any()  # no ball: no box
    real = np.zeros((2, 64, 64, 3), np.uint8)
    own = np.full((2, 64, 64, 3), 7, np.uint8)
    rng = np.random.default_rng(0)
    assert context_frame("real", real, own, (ys, xs), rng) is real and context_frame("own", real, own, (ys, xs), rng) is own
    noisy = context_frame("noise", real + 100, own, (ys, xs), rng, sigma=4.0)
    assert noisy.dtype == np.uint8 and 3.8 < (noisy.astype(float) - 100).std() < 4.2
    # the model's frame shows no ball, so the boxes are the real ball's only
    a = context_frame("own_scene_real_ball", real, own, (ys, xs), rng)
    b = context_frame("real_scene_own_ball", real, own, (ys, xs), rng)
    assert (a[0][box[0]] == 0).all() and (a[0][~box[0]] == 7).all() and (a[1] == 7).all()
    assert (b[0][box[0]] == 7).all() and (b[0][~box[0]] == 0).all() and (b[1] == 0).all()
    with pytest.raises(ValueError, match="unknown condition"):
        context_frame("mixed", real, own, (ys, xs), rng)


def test_ball_match_counts_balls_within_two_pixels():
    _, frames, _ = record_breakout(seed=3, steps=40)
    real = frames[None, 20:32]
    truth = probe_breakout(real)
    seen = np.isfinite(truth["ball_y"])[0]
    assert seen.any()
    np.testing.assert_array_equal(ball_match(truth, truth)[seen], 1.0)  # a model that draws the real frames
    held = np.repeat(real[:, :1], real.shape[1], axis=1)  # one that holds the first frame: the ball stays put
    assert np.nanmean(ball_match(truth, probe_breakout(held))[1:]) < 0.5


def test_the_cli_runs_every_condition_and_refuses_other_games(tmp_path):
    out = tmp_path / "swap.json"
    p = run("-m", "train.context_swap", "--model", "assets/breakout@1", "--record-seeds", "1000", "1001", "--horizon", "3",
            "--noise", "4", "--out", str(out))
    assert "real_scene_own_ball" in p.stdout
    res = json.loads(out.read_text())
    assert [c["condition"] for c in res["conditions"]] == ["real", "own", "noise 4", "own_scene_real_ball", "real_scene_own_ball"]
    assert res["steps"] == 1 and all(len(c["per_step"]) == 3 for c in res["conditions"])
    other = tmp_path / "pong"
    shutil.copytree(ROOT / "assets" / "breakout", other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "game": "Pong"}))
    p = run("-m", "train.context_swap", "--model", str(other), "--record-seeds", "1000", ok=False)
    assert "Breakout probe" in p.stderr and "Traceback" not in p.stderr
    p = run("-m", "train.context_swap", "--model", "assets/breakout", "--record-seeds", "1000", "--noise", "-1", ok=False)
    assert "--noise" in p.stderr
    p = run("-m", "train.context_swap", "--model", "assets/breakout", "--record-seeds", "1000", "--gate", "1.5", ok=False)
    assert "--gate must lie in [0, 1)" in p.stderr


def test_a_gate_screen_runs_the_chosen_conditions_at_the_given_threshold(tmp_path):
    out = tmp_path / "screen.json"
    run("-m", "train.context_swap", "--model", "assets/breakout@1", "--record-seeds", "1000", "--horizon", "2", "--gate", "0.3",
        "--conditions", "real", "own", "--out", str(out))
    res = json.loads(out.read_text())
    assert res["gate"] == 0.3 and [c["condition"] for c in res["conditions"]] == ["real", "own"]
    assert all(c["clutter_last4"] >= 0 for c in res["conditions"])
