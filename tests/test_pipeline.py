"""Smoke runs of every stage as a user runs them (subprocesses, tiny budgets, the real emulator), then the
runtime on what they produced. One small dataset is recorded once per session."""
from __future__ import annotations

import json

import numpy as np
import pytest

from worldmodel.checkpoint import CheckpointError
from worldmodel.runtime import WorldModel

from tests.conftest import TEACHER, run, torchrun


def test_teacher_outputs_and_resume(teacher, data, tokenizer):
    assert (teacher / "checkpoint" / "model.safetensors").is_file()
    assert (teacher / "model" / "README.md").is_file()
    log = [json.loads(line) for line in (teacher / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss/flow"]) for r in log)
    p = run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(teacher), "--steps", "5", *TEACHER)
    assert "resumed from" in p.stdout and "at step 3" in p.stdout
    steps = [json.loads(line)["step"] for line in (teacher / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    # --export-only rewrites the model from the checkpoint; the card keeps the arguments it trained with
    p = run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(teacher), "--steps", "99", "--export-only", *TEACHER)
    card = (teacher / "model" / "README.md").read_text()
    assert "Optimizer steps: 5" in card and "--steps 5 " in card and "--steps 99" not in card


def test_teacher_under_torchrun(data, tokenizer, tmp_path):
    torchrun("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(tmp_path), "--steps", "2", *TEACHER)
    assert (tmp_path / "model" / "dit" / "model.safetensors").is_file()


def test_runtime_on_trained_model(teacher, data):
    wm = WorldModel.load(teacher / "model")
    from worldmodel.runtime import load_start_frames

    frames, actions = load_start_frames(teacher / "model" / "start_frames.npz")
    assert frames.dtype == np.uint8 and frames.shape[2:] == (64, 64, 3)
    wm.reset(frames[0], actions[0], seed=1)
    a = wm.step(1)
    assert a.shape == (1, 64, 64, 3) and a.dtype == np.uint8
    wm.reset(frames[0], actions[0], seed=1)
    torch_again = wm.step(1)
    np.testing.assert_array_equal(a, torch_again)  # same seed, same actions, same frames
    assert np.isfinite(wm.reward).all() and ((wm.end_prob >= 0) & (wm.end_prob <= 1)).all()
    with pytest.raises(ValueError, match="actions must lie in"):
        wm.step(wm.num_actions)
    with pytest.raises(ValueError, match="context frames must be uint8"):
        wm.reset(frames[0].astype(np.float32), actions[0])
    with pytest.raises(ValueError, match="context frames must be uint8"):
        wm.reset(frames[0][:, :32], actions[0])


def test_step_before_reset(teacher):
    wm = WorldModel.load(teacher / "model")
    with pytest.raises(RuntimeError, match="reset"):
        wm.step(0)


def test_missing_and_corrupt_checkpoints(teacher, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        WorldModel.load(tmp_path / "nowhere")
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(teacher / "model", bad)
    (bad / "dit" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        WorldModel.load(bad)
    (bad / "config.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        WorldModel.load(bad)


def test_commands_reject_bad_input(data, tmp_path):
    p = run("-m", "train.teacher", "--data", str(tmp_path / "none"), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o"), ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "error" in p.stderr.lower()
    p = run("-m", "train.collect", "--game", "Breakoutt", "--out", str(tmp_path / "d"), "--steps", "10", ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "Breakout" in p.stderr
    p = run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "-1", ok=False)
    assert p.returncode != 0 and "--steps must be positive" in p.stderr


def test_teacher_init_of_another_shape_is_refused_before_the_latents(teacher, data, tokenizer, tmp_path):
    out = tmp_path / "o"
    p = run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out), "--steps", "2", *TEACHER,
            "--prev-frame", "--init", str(teacher / "model"), ok=False)
    assert p.returncode == 2 and "--init: " in p.stderr and "prev_frame False (this run: True)" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (out / "latents").exists()  # refused before any encoding


def test_teacher_refuses_a_broken_checkpoint(data, tokenizer, tmp_path):
    run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(tmp_path), "--steps", "2", *TEACHER)
    (tmp_path / "checkpoint" / "state.json").unlink()
    p = run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(tmp_path), "--steps", "4", *TEACHER, ok=False)
    assert p.returncode == 2 and "cannot resume" in p.stderr and "Traceback" not in p.stderr


def test_model_folder_without_sampling_settings(teacher, tmp_path):
    import shutil

    bad = tmp_path / "nosampling"
    shutil.copytree(teacher / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["sampling"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="sampling settings"):
        WorldModel.load(bad)
