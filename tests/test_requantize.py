"""SamplingConfig.requantize: each generated chunk enters the context as the uint8 frames it shows, encoded again
as real frames are, instead of as the generated latents themselves."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from worldmodel.config import SamplingConfig
from worldmodel.runtime import NonFiniteError, WorldModel, load_start_frames


def _pair(path, batch=2):
    frames, actions = load_start_frames(path / "start_frames.npz")
    worlds = []
    for requantize in (True, False):
        wm = WorldModel.load(path, batch=batch, requantize=requantize)
        wm.reset(frames[:batch], actions[:batch], seed=3)
        worlds.append(wm)
    return worlds


def test_a_requantized_step_is_the_prediction_observed_as_a_real_frame(acting_model):
    """step_batch with requantize equals predict_batch followed by observe() of the frames it showed: the context
    is exactly what the player saw, as if those frames had come from the real game."""
    q, ref = _pair(acting_model)
    Fc = q.frames_per_chunk
    for actions in ([2, 3], [3, 3], [1, 0], [2, 2]):
        shown = q.step_batch(actions)
        predicted = ref.predict_batch(actions)
        np.testing.assert_array_equal(shown, predicted)
        ref.observe(predicted, np.repeat(np.asarray(actions)[:, None], Fc, 1))
        np.testing.assert_array_equal(q.reward_prob, ref.reward_prob)
        np.testing.assert_array_equal(q.end_prob, ref.end_prob)
    torch.testing.assert_close(q.cache.k, ref.cache.k, rtol=0, atol=0)  # the same context, key for key
    torch.testing.assert_close(q.cache.v, ref.cache.v, rtol=0, atol=0)


def test_without_requantize_the_generated_latents_themselves_are_the_context(acting_model):
    q, raw = _pair(acting_model)
    shown_q, shown_raw = q.step_batch([2, 3]), raw.step_batch([2, 3])
    np.testing.assert_array_equal(shown_q, shown_raw)  # the first chunk is the same: only what enters the context differs
    assert (q.cache.k - raw.cache.k).abs().max() > 0  # generated latents are not on the grid of uint8 frames: another context
    x0 = raw.tokenizer.encode(torch.from_numpy(shown_raw[:, -1]))
    again = raw.tokenizer.encode(raw.tokenizer.decode(x0))
    torch.testing.assert_close(again, x0, rtol=0, atol=0)  # while a real frame's latents survive the round trip exactly


def test_requantize_is_checked_and_written_only_when_set():
    assert "requantize" not in SamplingConfig().to_json()
    assert SamplingConfig(requantize=True).to_json()["requantize"] is True
    for bad in (1, 0, "true", None):
        with pytest.raises(ValueError, match="requantize must be true or false"):
            SamplingConfig(requantize=bad)


def test_requantize_from_the_config_and_overridden_by_env_and_player(acting_model, tmp_path):
    from envs.vector_env import WorldModelVectorEnv
    from envs.world_env import WorldModelEnv
    from play import make_adapter, parse_args as play_args

    on = tmp_path / "on"
    shutil.copytree(acting_model, on)
    cfg = json.loads((on / "config.json").read_text())
    cfg["sampling"]["requantize"] = True
    (on / "config.json").write_text(json.dumps(cfg))
    assert WorldModel.load(on).sampling.requantize and not WorldModel.load(acting_model).sampling.requantize
    assert not WorldModel.load(on, requantize=False).sampling.requantize
    assert WorldModelEnv(acting_model, requantize=True).wm.sampling.requantize
    assert not WorldModelVectorEnv(2, model=on, requantize=False).wm.sampling.requantize
    adapter = make_adapter(play_args(["--model", str(acting_model), "--requantize"]), acting_model, random_policy=True)
    assert adapter.env.wm.sampling.requantize and adapter.meta["requantize"] is True
    adapter.env.close()
    adapter = make_adapter(play_args(["--model", str(on), "--no-requantize"]), on, random_policy=True)
    assert not adapter.env.wm.sampling.requantize and adapter.meta["requantize"] is False
    adapter.env.close()
    bad = tmp_path / "bad"
    shutil.copytree(acting_model, bad)
    cfg["sampling"]["requantize"] = "yes"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="requantize must be true or false"):
        WorldModel.load(bad)


def test_a_requantized_generation_that_turns_non_finite_stops_before_the_decode(acting_model):
    q, _ = _pair(acting_model)
    q.step_batch([0, 1])
    with torch.no_grad():
        next(p for n, p in q.dit.named_parameters() if n == "final.linear.weight").fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"generated chunk of world\(s\) \[0, 1\]"):
        q.step_batch([0, 1])
