"""What a killed, resumed, raced or mistyped training run leaves behind: logs with each step once (log.jsonl and
TensorBoard), no stale checkpoint temp folders, a locked and verified dataset folder, and one-line exit-2
errors for flags that cannot work (an unwritable --out, zero counts, --device cuda without CUDA, --latents
in the wrong place)."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from train.collect import CollectConfig, collect
from train.collect import parse_args as collect_args
from train.common import Dist
from train.consistency import main as consistency_main
from train.consistency import parse_args as consistency_args
from train.dataset import list_shards, load_shard, write_shard
from train.dmd import main as dmd_main
from train.dmd import parse_args as dmd_args
from train.skeleton import load_run, save_run
from train.teacher import main as teacher_main
from train.teacher import parse_args as teacher_args
from train.tokenizer import main as tokenizer_main
from worldmodel.checkpoint import CheckpointError, save_checkpoint
from worldmodel.config import dit_config
from worldmodel.dit import CausalDiT

from tests.conftest import TEACHER, run

TINY_COLLECT = dict(game="Breakout", steps=300, heldout_steps=100, seed=5, size=64, episodes_per_shard=2,
                    max_episode_steps=100)


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar as TensorBoard shows it (after its purge of restarted runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ---------------------------------------------------------------- resumed logs


def test_a_resumed_logger_keeps_rows_up_to_the_checkpoint_and_purges_tensorboard_after_it(tmp_path):
    from train.common import Logger

    log = Logger(tmp_path)
    for step in (1, 2, 3, 4):
        log.log(step, loss=float(step))
    log.close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # a kill in the middle of a row
    log = Logger(tmp_path, resume_step=2)  # the checkpoint was at step 2; the killed run logged 3, 4, 5
    for step in (3, 4):
        log.log(step, loss=10.0 + step)
    log.close()
    assert [(r["step"], r["loss"]) for r in log_rows(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert tb_scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert not list(tmp_path.glob("log.jsonl.*")), "the truncation writes a temp file and renames it"
    Logger(tmp_path).close()  # a fresh start (no checkpoint): both logs start afresh
    assert (tmp_path / "log.jsonl").read_text() == "" and tb_scalars(tmp_path, "loss") == []


def test_a_resumed_teacher_logs_each_step_once(data, tokenizer, tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    args = ["--data", str(data), "--tokenizer", str(tokenizer), "--out", str(tmp_path), *TEACHER]
    assert teacher_main([*args, "--steps", "2"]) == 0  # checkpoint at step 2
    # what a run killed after step 4 left behind: rows 3 and 4 in both logs, the checkpoint still at 2
    with open(tmp_path / "log.jsonl", "a") as f:
        for step in (3, 4):
            f.write(json.dumps({"step": step, "loss/flow": -1.0}) + "\n")
    killed = SummaryWriter(str(tmp_path / "tb"))
    for step in (3, 4):
        killed.add_scalar("loss/flow", -1.0, step)
    killed.close()
    assert teacher_main([*args, "--steps", "4"]) == 0
    assert "at step 2" in capsys.readouterr().out
    rows = log_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss/flow"] != -1.0 for r in rows)
    assert [s for s, _ in tb_scalars(tmp_path, "loss/flow")] == [1, 2, 3, 4]
    assert all(v != -1.0 for _, v in tb_scalars(tmp_path, "loss/flow"))


def test_plot_runs_keeps_the_last_row_of_a_step_logged_twice(tmp_path):
    from train.plot_runs import read_metric

    rows = [(1, 1.0), (2, 2.0), (3, 3.0), (2, 20.0), (3, 30.0), (4, 40.0)]  # an old log of a resumed run
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "m": v}) + "\n" for s, v in rows))
    assert read_metric(tmp_path, "m") == ([1, 2, 3, 4], [1.0, 20.0, 30.0, 40.0])


# ---------------------------------------------------------------- stale checkpoint temp folders


def test_saving_a_checkpoint_removes_its_own_stale_temp_folders_only(tmp_path):
    stale = tmp_path / ".checkpoint.tmp-ab12cd_3"  # what a save killed before its rename leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    precious = tmp_path / "precious"
    precious.mkdir()
    keep = [tmp_path / ".model.tmp-ab12cd34",  # another folder's temp
            tmp_path / ".checkpoint.tmp-user-notes",  # not a name the save makes
            tmp_path / "checkpoint.tmp-ab12cd34"]  # no leading dot
    for p in keep:
        p.mkdir()
    (tmp_path / ".checkpoint.tmp-zz99zz99").write_text("a file, not a temp folder")
    (tmp_path / ".checkpoint.tmp-ln00ln00").symlink_to(precious)
    save_checkpoint(tmp_path / "checkpoint", {"kind": "x"}, {"model": {"w": torch.ones(2)}}, {"step": 1})
    assert not stale.exists()
    assert all(p.is_dir() for p in keep) and precious.is_dir() and (tmp_path / ".checkpoint.tmp-zz99zz99").is_file()
    assert (tmp_path / ".checkpoint.tmp-ln00ln00").is_symlink()
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def test_a_resumed_run_removes_stale_temp_folders_and_an_export_only_run_spares_the_checkpoints(teacher, data, tokenizer, tmp_path, monkeypatch):
    run_dir = tmp_path / "teacher"
    shutil.copytree(teacher, run_dir)
    ckpt_tmp, model_tmp = run_dir / ".checkpoint.tmp-dead0001", run_dir / ".model.tmp-dead0002"
    for p in (ckpt_tmp, model_tmp):
        p.mkdir()
        (p / "raw.safetensors").write_bytes(b"x" * 1000)
    args = ["--data", str(data), "--tokenizer", str(tokenizer), "--out", str(run_dir), "--steps", "6", *TEACHER]
    # --export-only does not write the checkpoint: a trainer still running there may own that temp folder
    assert teacher_main([*args, "--export-only"]) == 0
    assert ckpt_tmp.is_dir() and not model_tmp.exists()
    monkeypatch.setattr("train.skeleton.save_checkpoint", lambda *a, **k: None)  # no save cleans up: the resume must
    assert teacher_main(args) == 0
    assert not ckpt_tmp.exists()


# ---------------------------------------------------------------- train.collect's output folder


def test_collect_refuses_an_out_folder_that_another_collect_is_writing(tmp_path):
    from train.collect import lock_out

    out = tmp_path / "data"
    held = lock_out(out)  # this process plays the run already writing there
    try:
        p = run("-m", "train.collect", "--out", str(out), "--steps", "50", ok=False, timeout=120)
    finally:
        held.close()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "--out" in p.stderr and f"pid {os.getpid()}" in p.stderr and socket.gethostname() in p.stderr
    assert not (out / "meta.json").exists() and not (out / "train").exists()


def test_collect_rerecords_a_corrupt_shard_instead_of_calling_the_dataset_complete(tmp_path, capsys):
    cfg = CollectConfig(out=tmp_path / "d", **TINY_COLLECT)
    collect(cfg)
    shards = list_shards(cfg.out, "train")
    assert len(shards) >= 2
    originals = {p: load_shard(p) for p in shards[:2]}
    raw = bytearray(shards[1].read_bytes())  # a flipped byte in the compressed frames
    raw[len(raw) // 2] ^= 0xFF
    shards[1].write_bytes(raw)
    write_shard(shards[0], {k: v[:-5] for k, v in originals[shards[0]].items()})  # opens, but 5 rows short
    capsys.readouterr()
    collect(cfg)
    said = capsys.readouterr()
    text = said.out + said.err
    assert "nothing to do" not in text
    for p, arrays in originals.items():
        assert f"train/{p.name}" in text
        for key, value in arrays.items():
            np.testing.assert_array_equal(load_shard(p)[key], value, err_msg=f"{p.name} {key}")
        assert len(list(p.parent.glob(p.name + ".corrupt*"))) == 1, "the corrupt file is kept aside, not deleted"
    collect(cfg)
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["parent is a file", "out is a file"])
def test_collect_out_that_cannot_be_written_is_one_line_with_exit_2(tmp_path, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "data" if where == "parent is a file" else tmp_path / "file"
    p = run("-m", "train.collect", "--out", str(out), "--steps", "10", ok=False, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out"), p.stderr


def test_collect_holds_out_a_tenth_of_the_steps_by_default(tmp_path):
    assert collect_args(["--out", str(tmp_path), "--steps", "10"]).heldout_steps == 1
    assert collect_args(["--out", str(tmp_path), "--steps", "5000"]).heldout_steps == 500
    assert collect_args(["--out", str(tmp_path), "--steps", "1000000"]).heldout_steps == 20_000
    assert collect_args(["--out", str(tmp_path), "--steps", "10", "--heldout-steps", "0"]).heldout_steps == 0


# ---------------------------------------------------------------- counts that cannot work


@pytest.mark.parametrize("flag", ["--steps", "--eval-frames"])
def test_tokenizer_refuses_a_zero_count_before_training(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        tokenizer_main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), flag, "0"])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("parse, extra, flag", [
    (teacher_args, ["--steps", "0"], "--steps"),
    (teacher_args, ["--warmup", "-1"], "--warmup"),
    (consistency_args, ["--steps", "0"], "--steps"),
    (consistency_args, ["--tangent-warmup", "-1"], "--tangent-warmup"),
    (dmd_args, ["--steps", "0"], "--steps"),
    (dmd_args, ["--critic-steps", "0"], "--critic-steps"),
])
def test_stages_refuse_counts_that_cannot_work(tmp_path, capsys, parse, extra, flag):
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "run")]
    base += ["--tokenizer", str(tmp_path)] if parse is teacher_args else ["--teacher", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        parse([*base, *extra])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


# ---------------------------------------------------------------- --device and --latents


def test_device_cuda_without_cuda_is_a_clear_error_in_every_stage(data, tokenizer, model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only torch says
    stages = {
        "tokenizer": (tokenizer_main, ["--data", str(data), "--kind", "patch"]),
        "teacher": (teacher_main, ["--data", str(data), "--tokenizer", str(tokenizer), *TEACHER]),
        "consistency": (consistency_main, ["--teacher", str(model), "--data", str(data)]),
        "dmd": (dmd_main, ["--teacher", str(model), "--data", str(data)]),
    }
    for name, (main, args) in stages.items():
        assert main([*args, "--out", str(tmp_path / name), "--device", "cuda"]) == 2, name
        err = capsys.readouterr().err
        assert "--device" in err and "CUDA" in err and "Traceback" not in err, (name, err)


def test_latents_errors_name_the_stage_that_writes_them(model, data, tmp_path, capsys):
    args = ["--teacher", str(model), "--data", str(data), "--out", str(tmp_path / "run")]
    assert consistency_main([*args, "--latents", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--latents" in err and "train.teacher" in err and "train.collect" not in err, err
    # the teacher's run folder instead of its latents/ folder: the hint names the right one
    assert dmd_main([*args, "--latents", str(model.parent)]) == 2
    assert f"--latents {model.parent / 'latents'}" in capsys.readouterr().err


def test_a_checkpoint_resumes_only_into_its_own_stage(tmp_path):
    """A consistency run's variant is part of its stage: the same student network under another objective must
    not pick up the dcm run's step, optimizer and schedule silently."""
    cfg = dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4)
    net = CausalDiT(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ckpt = tmp_path / "checkpoint"
    save_run(ckpt, "consistency-dcm", cfg, {"student": net}, {"student": opt}, [torch.get_rng_state()], {"step": 7, "args": {}})
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert load_run(ckpt, cfg, {"student": net}, {"student": opt}, d, "consistency-dcm")["step"] == 7
    with pytest.raises(CheckpointError, match="stage 'consistency-dcm', not 'consistency-ode'"):
        load_run(ckpt, cfg, {"student": net}, {"student": opt}, d, "consistency-ode")
