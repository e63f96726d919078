"""The Breakout state probe on real emulator frames, against the truth in RAM and on the 210x160 screen."""
from __future__ import annotations

import numpy as np
import pytest

from envs.breakout import NUM_BRICKS
from envs.probe import breakout_truth, probe_breakout, probe_for, record_breakout, score_matches

PADDLE_TOL = 0.5  # 64-px columns (1.25 screen pixels)
BALL_TOL = 0.5  # 64-px pixels, each axis


@pytest.fixture(scope="module")
def play():
    """~630 steps: the scripted tracker (breaks bricks, scores), then an episode of the behaviour policy
    that loses its five balls (frames with no ball in play)."""
    parts = [record_breakout(seed=1, steps=450, scripted=True), record_breakout(seed=4, steps=250, scripted=False)]
    frames = np.concatenate([f for _, f, _ in parts])
    truths = [breakout_truth(s, r) for s, _, r in parts]
    truth = {k: np.concatenate([t[k] for t in truths]) for k in truths[0]}
    return frames, truth, parts


def test_paddle(play):
    frames, truth, _ = play
    p = probe_breakout(frames)
    assert not np.isnan(p["paddle_x"]).any(), "the paddle is always on screen"
    err = np.abs(p["paddle_x"] - truth["paddle_x"])
    assert np.ptp(truth["paddle_x"]) > 20, "the play should move the paddle across the screen"
    assert err.mean() < 0.05 and np.mean(err <= PADDLE_TOL) >= 0.99, f"paddle error mean {err.mean():.3f}, max {err.max():.3f}"


def test_ball(play):
    frames, truth, _ = play
    p = probe_breakout(frames)
    seen = ~np.isnan(p["ball_x"])
    drawn, in_play = truth["ball_drawn"], truth["ball_in_play"]
    assert drawn.sum() > 300 and (~in_play).sum() > 10, "the play should have frames with and without a ball"
    assert seen[drawn].mean() >= 0.97, f"ball found in {seen[drawn].mean():.1%} of frames where it is drawn"
    assert seen[in_play].mean() >= 0.90, f"ball found in {seen[in_play].mean():.1%} of frames where RAM has it in play"
    assert not (seen & ~in_play).any(), "a ball was read where RAM has none"
    both = seen & drawn
    err = np.maximum(np.abs(p["ball_x"] - truth["ball_x"]), np.abs(p["ball_y"] - truth["ball_y"]))[both]
    assert np.mean(err <= BALL_TOL) >= 0.98 and np.median(err) < 0.1, f"ball error median {np.median(err):.3f}, max {err.max():.3f}"


def test_bricks(play):
    frames, truth, parts = play
    p = probe_breakout(frames)
    assert p["bricks_left"][0] == NUM_BRICKS == truth["bricks_left"][0]
    first_episode = truth["bricks_left"][:len(parts[0][0])]
    assert first_episode.min() <= NUM_BRICKS - 5, "the tracker should have broken bricks"
    np.testing.assert_array_equal(p["bricks_left"], truth["bricks_left"])


def test_score(play):
    frames, truth, parts = play
    p = probe_breakout(frames)
    assert (p["score"] >= 0).all(), "every real score is readable"
    n = len(parts[0][0])
    assert truth["score"][:n].max() >= 5, "the tracker should have scored"
    for sl in (slice(0, n), slice(n, None)):  # each episode: consecutive steps
        ok = score_matches(p["score"][sl], truth["score"][sl])
        assert ok.all(), f"score misread at {np.flatnonzero(~ok)}: read {p['score'][sl][~ok]}, RAM {truth['score'][sl][~ok]}"


def test_score_reads_every_digit():
    """Write each digit into every slot of the RAM score and read it back from the 64x64 frame."""
    from envs.games import make_game, preprocess_frame

    env = make_game("Breakout", render_mode="rgb_array")
    env.reset(seed=0)
    read = []
    for hundreds, bcd in [(0, 0x00), (1, 0x23), (4, 0x56), (7, 0x89), (9, 0x90), (8, 0x17)]:
        env.unwrapped.ale.setRAM(76, hundreds)
        env.unwrapped.ale.setRAM(77, bcd)
        obs, *_ = env.step(0)
        read.append(int(probe_breakout(preprocess_frame(obs, (64, 64)))["score"]))
    env.close()
    assert read == [0, 123, 456, 789, 990, 817]


def test_blank_frames_and_shapes():
    blank = probe_breakout(np.zeros((2, 3, 64, 64, 3), dtype=np.uint8))
    assert blank["paddle_x"].shape == (2, 3) and np.isnan(blank["paddle_x"]).all() and np.isnan(blank["ball_x"]).all()
    assert (blank["bricks_left"] == 0).all() and (blank["score"] == -1).all()
    noise = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    assert (probe_breakout(noise)["score"] == -1).all(), "noise is not a score"
    with pytest.raises(ValueError, match="uint8 frames of shape"):
        probe_breakout(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 frames of shape"):
        probe_breakout(np.zeros((2, 32, 32, 3), dtype=np.uint8))


def test_probe_for():
    assert probe_for("Breakout") is probe_breakout
    assert probe_for("breakout") is probe_breakout and probe_for("ALE/Breakout-v5") is probe_breakout
    assert probe_for("Pong") is None and probe_for("no such game") is None


def test_clutter_is_nil_on_real_frames_and_counts_stray_red_on_the_court(play):
    frames, truth, _ = play
    p = probe_breakout(frames)
    assert p["clutter"].max() < 1e-3, "a real court holds nothing but the ball and the paddle"
    i = int(np.flatnonzero(~np.isnan(p["ball_y"]) & (p["ball_y"] > 30) & (p["ball_y"] < 40))[0])  # a ball high in the open court
    speckled = frames[i:i + 1].copy()
    ys, xs = np.array([45, 48, 51, 54, 45, 54]), np.array([12, 20, 28, 36, 44, 50])  # six stray pixels between the ball and the paddle,
    speckled[0, ys, xs] = (100, 36, 36)  # each half covered by the ball's red: half a ball's mass, less than the ball

    q = probe_breakout(speckled)
    assert q["ball_x"][0] == p["ball_x"][i] and q["ball_y"][0] == p["ball_y"][i]  # the ball reading stands
    assert q["clutter"][0] == pytest.approx(6 * 0.5 / (2 * 4 * (64 / 210) * (64 / 160)), rel=1e-3)  # in balls (a ball is 2x4 screen pixels)
    hazy = frames[i:i + 1].astype(np.int64)
    hazy[0, 29:57, 3:61] += 12  # a gray haze over the court is no red
    assert probe_breakout(hazy.clip(0, 255).astype(np.uint8))["clutter"][0] == 0.0
