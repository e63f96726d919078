"""Checkpoints: a folder holding `config.json` plus safetensors files, written atomically.

Layout of a checkpoint folder (diffusers-style):
    config.json               {"kind": ..., "config": {...}, ...} - everything needed to rebuild the model
    model.safetensors         weights (for the teacher: the EMA weights, the ones to sample with)
    <name>.safetensors        any other tensor groups (raw weights, optimizer state, ...)
    state.json                non-tensor training state (step, RNG seeds, optimizer skeleton), optional

A folder is written under a temporary name and renamed into place, so a kill never leaves a half-written
checkpoint (the temp folder a kill leaves is removed by the next save). Loading uses safetensors only:
nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def save_checkpoint(
    path: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any] | None = None,
) -> Path:
    """Write `config.json`, one `<group>.safetensors` per entry of `tensors`, and `state.json`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for group, sd in tensors.items():
            # safetensors wants contiguous tensors that do not share memory
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, str(tmp / f"{group}.safetensors"))
        if state is not None:
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)
    return path


def replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished folder into place: the old copy is set aside first, so a kill at any point leaves
    either the old or the new folder under `path` (or `.NAME.old`, which `recover` puts back)."""
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


# tempfile.mkdtemp appends 8 characters of this alphabet to the prefix (CPython's _RandomNameSequence)
MKDTEMP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
MKDTEMP_LEN = 8


def temp_prefix(path: Path) -> str:
    """Saves of `path` write into `.NAME.tmp-XXXXXXXX` beside it, then rename that into place."""
    return f".{path.name}.tmp-"


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp folders that saves of `path` killed before their rename left beside it; returns them.

    Only names `temp_prefix` and mkdtemp make, only real folders (not links or files). Important: only the
    process that writes `path` may call this (rank 0 of a run): another process's save in flight would lose
    its folder."""
    path = Path(path)
    prefix = temp_prefix(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and len(p.name) == len(prefix) + MKDTEMP_LEN
             and set(p.name[len(prefix):]) <= MKDTEMP_CHARS and p.is_dir() and not p.is_symlink()]
    for p in stale:
        shutil.rmtree(p)
    return stale


def recover(path: str | os.PathLike) -> None:
    """Finish a save that a kill interrupted between its two renames (only `.NAME.old` is left)."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    recover(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint folder: no config.json in it")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint config {str(cfg_file)!r} is corrupt: {e}") from None


def read_state(path: str | os.PathLike) -> dict[str, Any] | None:
    f = Path(path) / "state.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint state {str(f)!r} is corrupt: {e}") from None


def load_tensors(path: str | os.PathLike, group: str = "model") -> dict[str, torch.Tensor]:
    f = Path(path) / f"{group}.safetensors"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {group}.safetensors")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(f)!r} is corrupt or not a safetensors file: {e}") from None


def load_into(module: torch.nn.Module, path: str | os.PathLike, group: str = "model") -> None:
    """Load a tensor group into a module; a shape or key mismatch is a CheckpointError naming the keys."""
    load_state(module, load_tensors(path, group), f"{group}.safetensors in {str(path)!r}")


def load_state(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load tensors into a module; a key or shape mismatch, or a NaN, is a CheckpointError naming `what` and the keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{what} does not match the model built from its config.json: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {bad[:5]}"
        )
    nonfinite = sorted(k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nonfinite:
        raise CheckpointError(f"{what} holds NaN or infinite values in {len(nonfinite)} tensor(s): {nonfinite[:5]}; the run that wrote it diverged or the file is damaged")
    module.load_state_dict(sd)


# Optimizer state: tensors go to safetensors, the rest of the structure to JSON.
def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_skel: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        state_skel[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                key = f"{pid}.{k}"
                tensors[key] = v
                state_skel[str(pid)][k] = {"tensor": key}
            else:
                state_skel[str(pid)][k] = v
    return tensors, {"state": state_skel, "param_groups": sd["param_groups"]}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], skel: dict[str, Any]) -> None:
    state = {}
    for pid, st in skel["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": skel["param_groups"]})
