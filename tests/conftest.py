"""Session fixtures shared by the test files: a small real Breakout dataset recorded once, a patch tokenizer
and a tiny teacher trained on it (all by running the commands a user runs, as subprocesses)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(*args: str, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if ok:
        # stderr's head too: under torchrun the rank that failed first prints its traceback before the launcher's summary
        err = p.stderr if len(p.stderr) <= 8000 else f"{p.stderr[:5000]}\n[...]\n{p.stderr[-3000:]}"
        assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{err}"
    return p


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    run("-m", "train.collect", "--game", "Breakout", "--out", str(d), "--steps", "500", "--heldout-steps", "300", "--episodes-per-shard", "2", "--max-episode-steps", "120", "--seed", "3")
    return d


@pytest.fixture(scope="session")
def tokenizer(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    run("-m", "train.tokenizer", "--data", str(data), "--out", str(out), "--kind", "patch")
    return out / "tokenizer"


TEACHER = ("--preset", "tiny", "--batch-size", "2", "--frames", "4", "--window-chunks", "3", "--log-every", "1", "--ckpt-every", "2", "--sample-steps", "2")


@pytest.fixture(scope="session")
def teacher(data, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out), "--steps", "3", *TEACHER)
    return out


@pytest.fixture(scope="session")
def model(teacher) -> Path:
    """The tiny teacher's exported world-model folder."""
    return teacher / "model"


@pytest.fixture(scope="session")
def starts(model):
    """Its real start contexts: frames (K, T, H, W, 3) uint8, actions (K, T)."""
    from worldmodel.runtime import load_start_frames

    return load_start_frames(model / "start_frames.npz")


@pytest.fixture(scope="session")
def acting_model(model, tmp_path_factory) -> Path:
    """The tiny model with its adaLN-Zero layers (zero at init, barely moved by 3 training steps) and action
    embedding shaken, so that the context and the actions reach the pixels: RIGHT and LEFT give different frames."""
    import shutil

    import torch

    from worldmodel.dit import load_dit, save_dit

    out = tmp_path_factory.mktemp("acting") / "model"
    shutil.copytree(model, out)
    dit = load_dit(model / "dit")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "ada" in name or "final" in name or "a_embed" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    shutil.rmtree(out / "dit")
    save_dit(dit, out / "dit")
    return out
