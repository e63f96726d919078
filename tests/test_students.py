"""Smoke runs of the distillation stages and the pipeline as a user runs them (subprocesses, tiny budgets),
single process and under torchrun, then the exported students in the runtime."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run, torchrun
from worldmodel.runtime import WorldModel, load_start_frames

CM = ("--batch-size", "2", "--frames", "4", "--log-every", "1", "--ckpt-every", "1", "--eval-every", "2", "--warmup", "1")
DMD = ("--batch-size", "2", "--frames", "4", "--context", "2", "--critic-steps", "2", "--log-every", "1", "--ckpt-every", "1", "--eval-every", "2", "--warmup", "1")


def stage_args(teacher: Path, data: Path, out: Path) -> tuple[str, ...]:
    return ("--teacher", str(teacher / "model"), "--data", str(data), "--latents", str(teacher / "latents"), "--out", str(out))


@pytest.fixture(scope="module")
def dcm_student(teacher, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dcm")
    run("-m", "train.consistency", *stage_args(teacher, data, out), "--variant", "dcm", "--steps", "2", "--guidance", "1.5", *CM)
    return out


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_dcm_trains_logs_exports_and_resumes(dcm_student, teacher, data):
    log = read_log(dcm_student)
    steps = [r["step"] for r in log if "loss/dcm" in r]
    assert steps == [1, 2] and all(np.isfinite(r["loss/dcm"]) for r in log if "loss/dcm" in r)
    assert any("eval/psnr_1step" in r for r in log)  # quick held-out metrics at step 0 and 2
    info = json.loads((dcm_student / "model" / "config.json").read_text())
    assert info["sampling"]["solver"] == "consistency" and info["trained"]["stage"] == "consistency-dcm"
    assert "consistency distillation, dcm" in (dcm_student / "model" / "README.md").read_text()
    p = run("-m", "train.consistency", *stage_args(teacher, data, dcm_student), "--variant", "dcm", "--steps", "3", "--guidance", "1.5", *CM)
    assert "resumed from" in p.stdout and "at step 2" in p.stdout
    assert [r["step"] for r in read_log(dcm_student) if "loss/dcm" in r] == [1, 2, 3]


def test_ode_initialisation_trains_and_exports(teacher, data, tmp_path):
    """Causal Forcing's ODE initialisation (--variant ode), a 2-step student on a 3-step teacher ODE (the
    student's level 0.5 joins the teacher's grid)."""
    out = tmp_path / "ode"
    run("-m", "train.consistency", *stage_args(teacher, data, out), "--variant", "ode", "--ode-steps", "3", "--student-steps", "2", "--steps", "2", "--guidance", "1.5", *CM)
    log = read_log(out)
    assert [r["step"] for r in log if "loss/ode" in r] == [1, 2] and all(np.isfinite(r["loss/ode"]) for r in log if "loss/ode" in r)
    info = json.loads((out / "model" / "config.json").read_text())
    assert info["trained"]["stage"] == "consistency-ode" and info["sampling"]["solver"] == "consistency"
    assert "causal ODE initialisation" in (out / "model" / "README.md").read_text()
    p = run("-m", "train.consistency", *stage_args(teacher, data, out), "--variant", "dcm", "--steps", "3", "--guidance", "1.5", *CM, ok=False)
    assert p.returncode == 2 and "stage 'consistency-ode', not 'consistency-dcm'" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = run("-m", "train.consistency", *stage_args(teacher, data, tmp_path / "bad"), "--variant", "ode", "--ode-steps", "0", ok=False)
    assert p.returncode == 2 and "--ode-steps and --student-steps must be >= 1" in p.stderr


def test_export_only_of_a_checkpoint_older_than_the_ode_variant(dcm_student, teacher, data, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(dcm_student / "checkpoint", old / "checkpoint")
    state = json.loads((old / "checkpoint" / "state.json").read_text())
    for key in ("ode_steps", "student_steps"):  # a checkpoint saved before these flags existed
        state["args"].pop(key)
    (old / "checkpoint" / "state.json").write_text(json.dumps(state))
    p = run("-m", "train.consistency", *stage_args(teacher, data, old), "--variant", "dcm", "--export-only", *CM, ok=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "consistency distillation, dcm" in (old / "model" / "README.md").read_text()


def test_scm_single_process_and_torchrun(teacher, data, tmp_path):
    run("-m", "train.consistency", *stage_args(teacher, data, tmp_path / "one"), "--variant", "scm", "--steps", "2", "--tangent-warmup", "1", *CM)
    log = read_log(tmp_path / "one")
    rows = [r for r in log if "loss/scm" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss/scm"]) and np.isfinite(r["scm/tangent_norm"]) for r in rows)
    torchrun("-m", "train.consistency", *stage_args(teacher, data, tmp_path / "two"), "--variant", "scm", "--steps", "2", *CM)
    assert (tmp_path / "two" / "model" / "dit" / "model.safetensors").is_file()


def test_dmd_from_a_cm_student_and_under_torchrun(dcm_student, teacher, data, tmp_path):
    out = tmp_path / "dmd"
    run("-m", "train.dmd", *stage_args(teacher, data, out), "--init", str(dcm_student / "model"), "--steps", "2", "--guidance", "1.5", *DMD)
    log = read_log(out)
    rows = [r for r in log if "loss/dmd" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss/dmd"]) and np.isfinite(r["loss/critic"]) and r["dmd/nonfinite"] == 0 for r in rows)
    assert any("eval/rollout_psnr_1step" in r for r in log)
    # the student plays at 1, 2 and 4 steps
    for steps in (1, 2, 4):
        wm = WorldModel.load(out / "model", steps=steps)
        frames, actions = load_start_frames(out / "model" / "start_frames.npz")
        wm.reset(frames[0], actions[0], seed=0)
        f = wm.step(1)
        assert f.shape == (1, 64, 64, 3) and f.dtype == np.uint8
    torchrun("-m", "train.dmd", *stage_args(teacher, data, tmp_path / "ddp"), "--steps", "1", *DMD)
    assert (tmp_path / "ddp" / "model" / "README.md").is_file()


@pytest.fixture(scope="module")
def gated_teacher(data, tokenizer, tmp_path_factory) -> Path:
    """A tiny teacher of the shipped design: previous frame, change target, clean-frame output, change gate."""
    from tests.conftest import TEACHER

    out = tmp_path_factory.mktemp("gated")
    run("-m", "train.teacher", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out), "--steps", "2", *TEACHER,
        "--prev-frame", "--delta", "--predict", "x0", "--change-gate")
    return out


def test_both_stages_keep_training_the_change_gate_of_a_gated_teacher(gated_teacher, teacher, data, tmp_path):
    """The student inherits the teacher's change gate; both stages train it on the cells that really change
    (at the levels they train), --gate-weight 0 leaves it alone, and the students play gated."""
    run("-m", "train.consistency", *stage_args(gated_teacher, data, tmp_path / "cm"), "--variant", "dcm", "--steps", "2", *CM)
    run("-m", "train.dmd", *stage_args(gated_teacher, data, tmp_path / "dmd"), "--init", str(tmp_path / "cm" / "model"), "--steps", "2", *DMD)
    for stage, key in (("cm", "loss/dcm"), ("dmd", "loss/dmd")):
        rows = [r for r in read_log(tmp_path / stage) if key in r]
        assert len(rows) == 2 and all(np.isfinite(r["loss/gate"]) and 0 < r["gate/changed_cells"] < 1 for r in rows), rows
        wm = WorldModel.load(tmp_path / stage / "model")
        assert wm.gate == 0.5
    run("-m", "train.consistency", *stage_args(gated_teacher, data, tmp_path / "off"), "--variant", "dcm", "--steps", "1", "--gate-weight", "0", *CM)
    assert not any("loss/gate" in r for r in read_log(tmp_path / "off"))
    p = run("-m", "train.dmd", *stage_args(gated_teacher, data, tmp_path / "bad"), "--gate-weight", "-1", ok=False)
    assert p.returncode == 2 and "--gate-weight must be >= 0" in p.stderr and "Traceback" not in p.stderr


def test_student_gate_loss_is_the_weighted_gate_cross_entropy_and_zero_without_a_gate():
    import argparse

    import torch

    from train.objectives import gate_loss
    from train.student import student_gate_loss
    from worldmodel.dit import Heads

    x = torch.zeros(2, 3, 1, 4, 4)
    x[:, 2, 0, 1, 1] = 1.0  # one cell changes in the last frame
    logit = torch.randn(2, 3, 1, 4, 4)
    args = argparse.Namespace(gate_weight=3.0, change_threshold=0.05)
    heads = Heads(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    loss, parts = student_gate_loss(heads, x, 1, args)
    assert loss.item() == 0 and parts == {}  # a network without a gate
    heads.change_logit = torch.cat([logit, logit])  # a guided pass: 2B rows, the conditional half first
    loss, parts = student_gate_loss(heads, x, 1, args)
    ref, _ = gate_loss(logit, x, 1, 0.05)
    assert loss.item() == pytest.approx(3.0 * ref.item()) and parts["gate/changed_cells"] == pytest.approx(1 / 32)


def test_stages_reject_bad_input(teacher, data, tmp_path):
    p = run("-m", "train.dmd", *stage_args(teacher, data, tmp_path), "--frames", "4", "--context", "4", ok=False)
    assert p.returncode == 2 and "leaves nothing to generate" in p.stderr and "Traceback" not in p.stderr
    p = run("-m", "train.consistency", "--teacher", str(tmp_path / "nowhere"), "--data", str(data), "--out", str(tmp_path / "o"), ok=False)
    assert p.returncode == 2 and "error" in p.stderr and "Traceback" not in p.stderr
    p = run("-m", "train.dmd", *stage_args(teacher, data, tmp_path / "o2"), "--init", str(tmp_path / "missing"), ok=False)
    assert p.returncode == 2 and "missing" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_pipeline_runs_every_stage_then_skips_them(nproc, tmp_path):
    out = tmp_path / "run"
    p = run("-m", "train.pipeline", "--out", str(out), "--tiny", "--nproc", str(nproc), timeout=900)
    for stage in ("collect", "tokenizer", "teacher", "consistency", "dmd"):
        assert f"{stage}]" in p.stdout
    assert (out / "dmd" / "model" / "config.json").is_file()
    cfg = json.loads((out / "dmd" / "model" / "dit" / "config.json").read_text())["config"]
    assert cfg["prev_frame"] and cfg["delta"] and cfg["predict"] == "x0" and cfg["change_gate"]  # the shipped design, end to end
    assert json.loads((out / "tokenizer" / "tokenizer" / "config.json").read_text())["config"]["kind"] == "patch"
    if nproc == 2:
        assert "--nproc_per_node=2" in p.stdout
    p = run("-m", "train.pipeline", "--out", str(out), "--tiny", "--nproc", str(nproc))
    assert p.stdout.count("exists: skipped") == 5
    p = run("-m", "train.pipeline", "--out", str(out), "--stages", "9", ok=False)
    assert p.returncode == 2 and "stage numbers" in p.stderr
