"""Rollout recordings: the recorder's files read back exactly, the wrapper on the world model and on the real
game, and the `python -m envs.record` command end to end."""
from __future__ import annotations

import io
import json
import zipfile

import cv2
import gymnasium as gym
import numpy as np
import pytest

import worldmodel  # noqa: F401  (registers the ids)
from envs.games import FrameObservation, make_game
from envs.recording import RecordRollouts, RolloutRecorder, load_recording

from tests.conftest import run


def random_frames(rng, n, size=(16, 24)):
    return rng.integers(1, 256, size=(n, *size, 3), dtype=np.uint8)


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_recording_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    frames = random_frames(rng, 6)
    actions, rewards = [-1, 3, 1, 2, 0, 1], [0.0, 0.5, -1.25, 0.0, 7.0, 1.0]
    rec = RolloutRecorder(tmp_path / "sub" / "run", fps=10, meta={"game": "Test", "seed": 4}, scale=2)
    for i in range(6):
        rec.add(frames[i], actions[i], rewards[i], terminated=i == 5, truncated=False)
    assert rec.close() == tmp_path / "sub" / "run"
    for name in ("run", "run.npz", "run.mp4", "run.json"):  # any of the three names, or none, finds it
        r = load_recording(tmp_path / "sub" / name)
        np.testing.assert_array_equal(r.frames, frames)
        np.testing.assert_array_equal(r.actions, actions)
        np.testing.assert_array_equal(r.rewards, np.array(rewards, dtype=np.float32))
        np.testing.assert_array_equal(r.terminated, [False] * 5 + [True])
        assert not r.truncated.any() and r.steps == 5
        assert r.actions.dtype == np.int64 and r.rewards.dtype == np.float32 and r.terminated.dtype == bool
    meta = r.meta
    assert meta["game"] == "Test" and meta["seed"] == 4 and meta["rows"] == 6 and meta["steps"] == 5 and meta["fps"] == 10
    assert {"python", "torch", "gymnasium", "ale-py", "numpy", "worldmodel"} <= set(meta["versions"]) and "created" in meta
    video = cv2.VideoCapture(str(tmp_path / "sub" / "run.mp4"))
    n, shape = 0, None
    while True:
        ok, img = video.read()
        if not ok:
            break
        n, shape = n + 1, img.shape
    assert n == 6 and shape == (32, 48, 3)  # scaled 2x
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["run.json", "run.mp4", "run.npz"]  # no temp files left


def test_chunks_and_restarts(tmp_path):
    rng = np.random.default_rng(1)
    rec = RolloutRecorder(tmp_path / "c")
    rec.add(random_frames(rng, 1)[0], -1)
    rec.add(random_frames(rng, 3), 2, 1.5, False, True)  # a 3-frame chunk: 3 rows, the step's outcome on the last
    rec.add(random_frames(rng, 1)[0], -1)  # a reset inside the recording
    rec.close()
    r = load_recording(tmp_path / "c")
    np.testing.assert_array_equal(r.actions, [-1, 2, 2, 2, -1])
    np.testing.assert_array_equal(r.rewards, [0, 0, 0, 1.5, 0])
    np.testing.assert_array_equal(r.truncated, [False, False, False, True, False])


def test_recorder_and_loader_refuse_bad_input(tmp_path):
    rng = np.random.default_rng(2)
    rec = RolloutRecorder(tmp_path / "bad")
    with pytest.raises(ValueError, match="the first add\\(\\) takes action -1"):
        rec.add(random_frames(rng, 1)[0], 0)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        rec.add(random_frames(rng, 1)[0].astype(np.float32), -1)
    rec.add(random_frames(rng, 1)[0], -1)
    with pytest.raises(ValueError, match="share a size"):
        rec.add(random_frames(rng, 1, (8, 8))[0], 1)
    for action in (-2, 1.0, True):
        with pytest.raises(ValueError, match="action must be an integer >= 0, or -1"):
            rec.add(random_frames(rng, 1)[0], action)
    with pytest.raises(ValueError, match="scale must be an integer >= 1"):
        RolloutRecorder(tmp_path / "x", scale=0)
    assert RolloutRecorder(tmp_path / "empty").close() is None and not list(tmp_path.glob("empty*"))
    with pytest.raises(FileNotFoundError, match="no recording at"):
        load_recording(tmp_path / "missing")
    (tmp_path / "text.npz").write_text("1 2 3\n")  # not a zip, which numpy would report as pickled data
    with pytest.raises(ValueError, match="is not an npz archive"):
        load_recording(tmp_path / "text")
    np.savez(tmp_path / "corrupt.npz", frames=random_frames(rng, 2))
    data = bytearray((tmp_path / "corrupt.npz").read_bytes())
    data[200] ^= 0xFF  # inside the stored frames: the zip's CRC no longer matches
    (tmp_path / "corrupt.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt"):
        load_recording(tmp_path / "corrupt")
    (tmp_path / "member.npz").write_bytes(zip_of({f"{k}.npy": b"not an array" for k in ("frames", "actions", "rewards", "terminated", "truncated")}))
    with pytest.raises(ValueError, match="is corrupt: 'frames' is not an array"):
        load_recording(tmp_path / "member")
    np.savez(tmp_path / "short.npz", frames=random_frames(rng, 2), actions=np.array([-1, 0]), rewards=np.zeros(2, np.float32),
             terminated=np.zeros(2, bool), truncated=np.zeros(3, bool))
    with pytest.raises(ValueError, match=r"truncated must be bool of shape \(2,\)"):
        load_recording(tmp_path / "short")
    np.savez(tmp_path / "lacks.npz", frames=random_frames(rng, 2))
    with pytest.raises(ValueError, match="lacks"):
        load_recording(tmp_path / "lacks")


def test_record_world_model_episodes(teacher, tmp_path):
    env = RecordRollouts(gym.make("worldmodel/Breakout-v0", model=str(teacher / "model"), max_episode_steps=3, end_threshold=1.0), tmp_path, meta={"who": "test"})
    seen = []
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        frames, actions, rewards = [obs], [-1], [0.0]
        for a in (1, 3, 2):
            obs, r, terminated, truncated, _ = env.step(a)
            frames.append(obs)
            actions.append(a)
            rewards.append(r)
        assert truncated
        seen.append((frames, actions, rewards))
    env.close()
    assert [p.name for p in env.paths] == ["episode_0000", "episode_0001"]
    for k, (frames, actions, rewards) in enumerate(seen):
        r = load_recording(env.paths[k])
        np.testing.assert_array_equal(r.frames, np.stack(frames))
        np.testing.assert_array_equal(r.actions, actions)
        np.testing.assert_allclose(r.rewards, rewards, rtol=1e-6)
        np.testing.assert_array_equal(r.truncated, [False, False, False, True])
        assert r.meta["env_id"] == "worldmodel/Breakout-v0" and r.meta["seed"] == k and r.meta["episode"] == k
        assert r.meta["who"] == "test" and r.meta["model"] == str(teacher / "model")


def test_record_the_real_game(tmp_path):
    env = RecordRollouts(gym.wrappers.TimeLimit(FrameObservation(make_game("Breakout"), (64, 64)), 5), tmp_path)
    obs, _ = env.reset(seed=3)
    frames = [obs]
    done = False
    while not done:
        obs, _, terminated, truncated, _ = env.step(1)
        frames.append(obs)
        done = terminated or truncated
    r = load_recording(tmp_path / "episode_0000")
    assert r.frames.shape == (6, 64, 64, 3) and r.frames.any()
    np.testing.assert_array_equal(r.frames, np.stack(frames))
    assert r.meta["env_id"] == "ALE/Breakout-v5" and r.truncated[-1]
    env.close()


def test_record_command(teacher, tmp_path):
    out = tmp_path / "wm"
    p = run("-m", "envs.record", "--env", "worldmodel/Breakout-v0", "--model", str(teacher / "model"), "--episodes", "2", "--max-steps", "4", "--seed", "5", "--out", str(out))
    assert "recorded 2 episode(s)" in p.stdout and str(out / "episode_0001") in p.stdout
    r = load_recording(out / "episode_0000")
    assert 2 <= len(r.frames) <= 5 and r.meta["seed"] == 5 and r.meta["policy"].startswith("PersistentRandom")
    assert (out / "episode_0001.mp4").stat().st_size > 0
    # the real emulator, then the world model replaying its actions from the recording
    real = tmp_path / "real"
    p = run("-m", "envs.record", "--env", "real:Breakout", "--policy", "scripted", "--max-steps", "12", "--out", str(real))
    r = load_recording(real / "episode_0000")
    assert r.frames.shape == (13, 64, 64, 3) and r.meta["env_id"] == "ALE/Breakout-v5" and r.meta["real"]
    replay = tmp_path / "replay"
    run("-m", "envs.record", "--model", str(teacher / "model"), "--policy", f"actions:{real / 'episode_0000.npz'}", "--max-steps", "50", "--out", str(replay))
    rr = load_recording(replay / "episode_0000")
    np.testing.assert_array_equal(rr.actions[1:], r.actions[1:len(rr.actions)])  # the same actions, until an episode end
    txt = tmp_path / "a.txt"
    txt.write_text("1, 2 3\n0")
    run("-m", "envs.record", "--model", str(teacher / "model"), "--policy", f"actions:{txt}", "--max-steps", "50", "--out", str(tmp_path / "t"))
    assert load_recording(tmp_path / "t" / "episode_0000").actions.tolist()[:3] == [-1, 1, 2]


def test_record_command_refuses_bad_input(teacher, tmp_path):
    model = str(teacher / "model")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps([0, 1, 9]))
    cases = [
        (["--env", "worldmodel/Nope-v0"], "registered world-model ids:"),
        (["--env", "real:Breakoutt"], "Did you mean 'Breakout'"),
        (["--model", model, "--policy", "scripted"], "a world model does not have"),
        (["--model", model, "--policy", f"actions:{tmp_path / 'none.npy'}"], "does not exist"),
        (["--model", model, "--policy", f"actions:{bad_json}"], "this env takes 0..3"),
        (["--model", str(tmp_path / "nowhere")], "does not exist"),
        (["--policy", "greedy"], "--policy must be random, scripted or actions:FILE"),
    ]
    for args, message in cases:
        p = run("-m", "envs.record", *args, "--out", str(tmp_path / "o"), ok=False)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_record_command_keeps_an_earlier_run(tmp_path):
    """--out holding episodes of an earlier run: refused (exit 2, naming --out and what is there), nothing rewritten;
    the wrapper itself refuses such a folder too."""
    rng = np.random.default_rng(5)
    out = tmp_path / "rec"
    for k in range(3):
        rec = RolloutRecorder(out / f"episode_{k:04d}")
        rec.add(random_frames(rng, 1)[0], -1)
        rec.add(random_frames(rng, 1)[0], 1, 1.0)
        rec.close()
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    p = run("-m", "envs.record", "--env", "real:Breakout", "--max-steps", "2", "--out", str(out), ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert "--out" in p.stderr and str(out) in p.stderr and "3 episodes" in p.stderr and "episode_0000" in p.stderr, p.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    with pytest.raises(FileExistsError, match="episode_0000"):
        RecordRollouts(FrameObservation(make_game("Breakout"), (64, 64)), out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a recording")  # a folder without episodes is fine
    run("-m", "envs.record", "--env", "real:Breakout", "--max-steps", "2", "--out", str(tmp_path / "other"))
    assert load_recording(tmp_path / "other" / "episode_0000").steps == 2 and (tmp_path / "other" / "notes.txt").is_file()
