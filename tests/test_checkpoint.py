"""Checkpoint folders: atomic writes, recovery after an interrupted swap, clear errors."""
from __future__ import annotations

import os

import pytest
import torch

from worldmodel.checkpoint import CheckpointError, load_tensors, read_config, save_checkpoint


def test_roundtrip_and_interrupted_swap(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, {"kind": "x", "n": 1}, {"model": {"w": torch.arange(4.0)}}, {"step": 1})
    save_checkpoint(path, {"kind": "x", "n": 2}, {"model": {"w": torch.arange(4.0) * 2}}, {"step": 2})
    assert read_config(path)["n"] == 2
    torch.testing.assert_close(load_tensors(path)["w"], torch.arange(4.0) * 2)
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary folders left behind
    # a kill between the two renames of a save leaves only the set-aside copy: it comes back
    os.replace(path, tmp_path / ".ckpt.old")
    assert read_config(path)["n"] == 2 and path.exists()


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(tmp_path / "empty")
    save_checkpoint(tmp_path / "c", {"kind": "x"}, {"model": {"w": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="has no optimizer.safetensors"):
        load_tensors(tmp_path / "c", "optimizer")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_tensors(tmp_path / "c")
