"""Stages 0-4 for one game, in order: real-game data, tokenizer, teacher, consistency student, DMD student.

    python -m train.pipeline --game Breakout --out RUN [--nproc 2] [--preset small] [--extra dmd="--steps 500"]

Each stage runs as its own command (printed before it starts), so a stage can also be run, resumed or
re-tuned by hand. A stage whose output already exists is skipped (`--redo STAGE` runs it again; its own
checkpoint makes that a resume); a killed pipeline picks up where it stopped when re-run. With
`--nproc N > 1` stages 1-4 run under `torchrun --nproc_per_node N` (DDP); stage 0 drives the emulator in
one process. Layout under RUN:

    data/                 stage 0  (train.collect)
    tokenizer/tokenizer/  stage 1  (train.tokenizer)
    teacher/model/        stage 2  (train.teacher; teacher/latents/ is shared by stages 3 and 4)
    consistency/model/    stage 3  (train.consistency)
    dmd/model/            stage 4  (train.dmd): the final few-step student
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from worldmodel import cli
from worldmodel.config import DIT_PRESETS

ROOT = Path(__file__).resolve().parents[1]


def stage_env() -> dict[str, str]:
    """The stages' environment: this checkout first on the path and the working folder left off it (PYTHONSAFEPATH,
    Python 3.11+), so a stray train.py or envs.py in the folder the pipeline runs from cannot shadow the stages."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1"}

STAGES = ("collect", "tokenizer", "teacher", "consistency", "dmd")

# the shipped design (assets/breakout_teacher, docs/ablation.md): 8x8 pixel patches for tokens, and a teacher
# that reads the previous frame, predicts the clean change, weights the changed elements 50x and keeps the
# previous frame's pixels where its change gate (one decision per pixel) says no; the students inherit it. The
# shipped models sample with the gate at threshold 0.1 (config.json sampling.gate), chosen on selection clips
# (docs/ablation.md); the exports here keep the default 0.5
DESIGN = {
    "tokenizer": ["--kind", "patch", "--config", '{"patch": 8}'],
    "teacher": ["--prev-frame", "--delta", "--change-weight", "50", "--predict", "x0", "--change-gate", "--gate-channels", "64", "--lr", "4e-4", "--batch-size", "8", "--frames", "9",
                "--window-chunks", "7"],
}

# --tiny: a few optimizer steps per stage (smoke runs and CI), not a useful model
TINY = {
    "collect": ["--steps", "400", "--heldout-steps", "200", "--episodes-per-shard", "2", "--max-episode-steps", "100"],
    "tokenizer": [],
    "teacher": ["--steps", "2", "--batch-size", "2", "--frames", "4", "--window-chunks", "3", "--sample-steps", "2", "--log-every", "1"],
    "consistency": ["--steps", "2", "--batch-size", "2", "--frames", "4", "--eval-every", "0", "--log-every", "1"],
    "dmd": ["--steps", "2", "--batch-size", "2", "--frames", "4", "--critic-steps", "1", "--eval-every", "0", "--log-every", "1"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.pipeline", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--game", default="Breakout", help="ALE game name or Gymnasium id (see train.collect)")
    p.add_argument("--out", required=True, help="run folder holding every stage's output")
    p.add_argument("--preset", default=None, choices=sorted(DIT_PRESETS), help="DiT size (teacher and students); default small, tiny with --tiny")
    p.add_argument("--variant", default="scm", choices=["dcm", "scm", "ode"], help="stage-3 variant: consistency (dcm, scm) or the causal ODE initialisation (ode)")
    p.add_argument("--nproc", type=int, default=1, help="processes per stage 1-4 (torchrun when > 1)")
    p.add_argument("--stages", default="0-4", help="which stages to run: a range 'A-B' or a comma list '2,3'")
    p.add_argument("--redo", action="append", default=[], choices=STAGES, help="run this stage even if its output exists")
    p.add_argument("--extra", action="append", default=[], metavar="STAGE=ARGS", help="extra arguments for one stage, e.g. dmd=\"--steps 500 --lr 1e-5\"")
    p.add_argument("--tiny", action="store_true", help="a few steps per stage (smoke test)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error("--nproc must be >= 1")
    if args.preset is None:
        args.preset = "tiny" if args.tiny else "small"
    try:
        args.stage_list = parse_stages(args.stages)
    except ValueError as e:
        p.error(str(e))
    args.extra_args = {}
    for item in args.extra:
        stage, sep, rest = item.partition("=")
        if not sep or stage not in STAGES:
            p.error(f"--extra {item!r}: expected STAGE=ARGS with STAGE one of {', '.join(STAGES)}")
        args.extra_args.setdefault(stage, []).extend(shlex.split(rest))
    return args


def parse_stages(spec: str) -> list[int]:
    try:
        if "-" in spec:
            a, b = (int(x) for x in spec.split("-"))
            stages = list(range(a, b + 1))
        else:
            stages = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise ValueError(f"--stages {spec!r}: expected 'A-B' or 'A,B,...' with stage numbers 0-4") from None
    if not stages or min(stages) < 0 or max(stages) > 4:
        raise ValueError(f"--stages {spec!r}: stage numbers run from 0 to 4")
    return stages


def plan(args: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
    """(stage, output that marks it done, module arguments) for every stage, in order."""
    run = Path(args.out).expanduser()
    data, tok, teacher, cm, dmd = run / "data", run / "tokenizer", run / "teacher", run / "consistency", run / "dmd"
    common = ["--data", str(data), "--teacher", str(teacher / "model"), "--latents", str(teacher / "latents")]
    steps = [
        ("collect", data / "meta.json", ["--game", args.game, "--out", str(data)]),
        ("tokenizer", tok / "tokenizer", ["--data", str(data), "--out", str(tok)]),
        ("teacher", teacher / "model", ["--data", str(data), "--tokenizer", str(tok / "tokenizer"), "--out", str(teacher), "--preset", args.preset]),
        ("consistency", cm / "model", [*common, "--out", str(cm), "--variant", args.variant]),
        ("dmd", dmd / "model", [*common, "--init", str(cm / "model"), "--out", str(dmd)]),
    ]
    return [(name, done, [*cmd, *DESIGN.get(name, []), *(TINY[name] if args.tiny else []), *args.extra_args.get(name, [])]) for name, done, cmd in steps]


def collect_done(meta: Path) -> bool:
    import json

    try:
        splits = json.loads(meta.read_text())["splits"]
        return all(s["complete"] for s in splits.values())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for i, (name, done, cmd) in enumerate(plan(args)):
        if i not in args.stage_list:
            continue
        exists = collect_done(done) if name == "collect" else done.exists()
        if exists and name not in args.redo:
            print(f"[stage {i} {name}] {done} exists: skipped", flush=True)
            continue
        launcher = [sys.executable]
        if args.nproc > 1 and name != "collect":
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        full = [*launcher, "-m", f"train.{name}", *cmd]
        print(f"[stage {i} {name}] {shlex.join(full)}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(full, env=stage_env())
        if rc != 0:
            print(f"error: stage {i} ({name}) failed with exit code {rc}; fix the cause and re-run the same command to resume", file=sys.stderr)
            return rc
    final = Path(args.out).expanduser() / "dmd" / "model"
    if not args.dry_run and 4 in args.stage_list:
        print(f"done: the few-step student is in {final}; play it with: python play.py --model {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
