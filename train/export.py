"""The output of training: a world-model folder that `WorldModel.load`, the env and the player read."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from worldmodel.checkpoint import remove_stale_temps, replace_dir, temp_prefix
from worldmodel.dit import CausalDiT, save_dit
from worldmodel.runtime import MODEL_FORMAT_VERSION


def export_world_model(path: str | os.PathLike, dit: CausalDiT, tokenizer_dir: str | os.PathLike, info: dict[str, Any], start_frames: np.ndarray, start_actions: np.ndarray, card: str) -> Path:
    """Write a world-model folder (the layout is in `worldmodel.runtime`'s docstring); the tokenizer is copied
    from its checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)  # the temp folders of exports a kill cut short (as save_checkpoint does)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps({"kind": "world_model", "format_version": MODEL_FORMAT_VERSION, **info}, indent=2))
        save_dit(dit, tmp / "dit")
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        np.savez_compressed(tmp / "start_frames.npz", frames=start_frames, actions=start_actions)
        (tmp / "README.md").write_text(card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)
    return path
