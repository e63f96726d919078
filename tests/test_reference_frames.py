"""Behaviour is kept across refactors: the shipped models generate the frames, rewards and episode ends
recorded in tests/reference/frames.npz (by tests/make_reference_frames.py) for the same seed and actions."""
from __future__ import annotations

import numpy as np
import pytest

from tests.make_reference_frames import IDS, OUT, rollout


@pytest.mark.parametrize("name", sorted(IDS))
def test_shipped_models_generate_the_recorded_frames(name):
    ref = np.load(OUT)
    got = rollout(IDS[name])
    want = ref[f"{name}_frames"]
    assert got["frames"].shape == want.shape
    diff = np.abs(got["frames"].astype(int) - want.astype(int))
    # Bit-exact on the machine that recorded them; a CPU with other vector units may round a value by one level.
    assert diff.max() <= 1 and (diff == 0).mean() > 0.9999, f"{(diff > 0).sum()} values differ, by up to {diff.max()}"
    assert np.allclose(got["rewards"], ref[f"{name}_rewards"], atol=1e-4)
    assert (got["ends"] == ref[f"{name}_ends"]).all()
    assert np.abs(np.diff(want.astype(int), axis=0)).max() > 0, "the recorded rollout must move, or this test checks nothing"
