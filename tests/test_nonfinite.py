"""Non-finite values are refused where they enter (sampling settings, loaded weights) and a generation that
turns non-finite stops with an error, never black frames or NaN rewards with exit code 0."""
from __future__ import annotations

import math
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, run
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import SamplingConfig
from worldmodel.runtime import NonFiniteError, WorldModel, load_start_frames

SHIPPED = ROOT / "assets" / "breakout"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        SamplingConfig(guidance=bad)
    with pytest.raises(ValueError, match="time shift"):
        SamplingConfig(shift=bad)
    with pytest.raises(ValueError, match="denoising steps"):
        SamplingConfig(steps=bad)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        WorldModel.load(SHIPPED, guidance=bad)
    import worldmodel  # noqa: F401  registers the ids
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        gym.make("worldmodel/Breakout-v0", guidance=bad)


@pytest.fixture
def nan_model(model, tmp_path):
    """A copy of the tiny teacher's model folder with one NaN in the DiT's weights."""
    bad = tmp_path / "nan_model"
    shutil.copytree(model, bad)
    f = bad / "dit" / "model.safetensors"
    sd = load_file(str(f))
    key = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(f))
    return bad, key


def test_weights_holding_nan_are_refused_at_load(nan_model):
    bad, key = nan_model
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:
        WorldModel.load(bad)
    assert key in str(e.value)


def test_commands_refuse_a_nan_model_instead_of_writing_black_video(nan_model, tmp_path):
    bad, _ = nan_model
    p = run("play.py", "--model", str(bad), "--headless", "5", "--video", str(tmp_path / "v.mp4"), ok=False)
    assert p.returncode == 2 and "NaN or infinite" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "v.mp4").exists()
    p = run("-m", "envs.record", "--model", str(bad), "--episodes", "1", "--max-steps", "5", "--out", str(tmp_path / "rec"), ok=False)
    assert p.returncode != 0 and "NaN or infinite" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not list((tmp_path / "rec").glob("**/*.mp4"))


def _started(path, batch=1):
    wm = WorldModel.load(path, batch=batch)
    frames, actions = load_start_frames(path / "start_frames.npz")
    wm.reset(frames[:batch], actions[:batch], seed=0)
    return wm


def test_a_generation_that_turns_non_finite_stops_with_an_error(model):
    wm = _started(model, batch=2)
    assert np.isfinite(wm.reward).all()
    wm.step_batch([0, 1])  # finite weights: steps fine
    with torch.no_grad():  # break the network in memory, after the load-time check
        next(p for n, p in wm.dit.named_parameters() if n == "final.linear.weight").fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"world\(s\) \[0, 1\]"):
        wm.step_batch([0, 1])
    with pytest.raises(NonFiniteError):
        wm.predict_batch([0, 1])


def test_non_finite_heads_stop_with_an_error(model):
    wm = _started(model)
    head = [p for n, p in wm.dit.named_parameters() if n.startswith("head")]
    assert head, [n for n, _ in wm.dit.named_parameters()]
    with torch.no_grad():
        for p in head:
            p.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="reward and end heads"):
        wm.step(0)
