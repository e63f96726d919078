"""Plot logged metrics of several training runs against optimizer steps (one PNG per metric).

    python -m train.plot_runs --run dCM=~/runs/cm_dcm --run sCM=~/runs/cm_scm --metric eval/psnr_to_teacher_ode_1step --out docs/media/cm_curves.png

Reads each run's `log.jsonl` (written by every training stage); rows without the metric are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worldmodel import cli


def read_metric(run: Path, metric: str) -> tuple[list[int], list[float]]:
    # A step logged twice is the last row's: logs of runs resumed before train.common.Logger truncated them on
    # resume repeat the steps between the checkpoint and the kill, and the later row is the resumed run's.
    by_step: dict[int, float] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if metric in row and row[metric] is not None:
            by_step[int(row["step"])] = float(row[metric])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot_runs", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a run folder with log.jsonl (repeatable)")
    p.add_argument("--metric", action="append", required=True, help="metric key (repeatable: one panel each)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title", default="", help="figure title (default: %(default)r)")
    args = p.parse_args(argv)
    runs = []
    for item in args.run:
        name, sep, path = item.partition("=")
        run = Path(path if sep else name).expanduser()
        if not (run / "log.jsonl").is_file():
            print(f"error: no log.jsonl in {run}", file=sys.stderr)
            return 2
        runs.append((name if sep else run.name, run))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.metric), figsize=(5 * len(args.metric), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], args.metric):
        found = False
        for i, (name, run) in enumerate(runs):
            steps, values = read_metric(run, metric)
            if steps:
                found = True
                ax.plot(steps, values, marker="o", markersize=3, label=name, color=f"C{i}")  # one colour per run in every panel
        if not found:
            print(f"error: no run logged {metric!r}", file=sys.stderr)
            return 2
        ax.set_xlabel("optimizer steps")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
