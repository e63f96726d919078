"""One table and one plot for an ablation: models evaluated by train.evaluate on the same clips, next to
what their training runs cost.

    python -m train.ablation --eval EVAL_A --eval EVAL_B --out docs/ablation

Each --eval folder is a train.evaluate output (metrics.json); every folder must hold the same clips (source,
seeds, policy, context, horizon), so the rows compare. A model exported by a training stage lives in RUN/model:
its run's checkpoint/state.json (steps, wall time) and log.jsonl (steps/s) fill the training columns, and its
model card's command is listed under the table. Writes OUT/table.md and OUT/ablation.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from worldmodel import cli

CLIP_KEYS = ("source", "episodes", "context_frames", "horizon")
AT = (1, 4, 8)


def run_of(model_path: str) -> Path | None:
    """The training run folder a model folder was exported into (RUN/model), if it is one."""
    run = Path(model_path).expanduser().resolve().parent
    return run if (run / "checkpoint" / "state.json").is_file() else None


def training(run: Path | None) -> dict:
    if run is None:
        return {"steps": None, "wall_min": None, "steps_per_s": None}
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    rates = [r["steps_per_s"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "steps_per_s" in r]
    return {"steps": state.get("step"), "wall_min": state.get("wall_s", 0.0) / 60, "steps_per_s": statistics.median(rates) if rates else None}


def command(model_path: str) -> str | None:
    card = Path(model_path).expanduser() / "README.md"
    if not card.is_file():
        return None
    return next((line.strip() for line in card.read_text().splitlines() if line.strip().startswith("python -m train.")), None)


def rows(evals: list[Path]) -> tuple[list[dict], dict]:
    metrics = [json.loads((e / "metrics.json").read_text()) for e in evals]
    first = metrics[0]
    for e, m in zip(evals[1:], metrics[1:]):
        diff = [k for k in CLIP_KEYS if m.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"{e} was evaluated on other clips than {evals[0]} ({', '.join(diff)} differ); rerun it on the same clips")
    out = []
    for m in metrics:
        for name, mm in m["models"].items():
            out.append({"name": name, "path": mm["path"], "m": mm, **training(run_of(mm["path"])), "command": command(mm["path"])})
    return out, first


def fmt(v, pct: bool = False, nd: int = 2) -> str:
    if v is None or v != v:
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:.{nd}f}"


def table(rs: list[dict], first: dict) -> str:
    """One row per model and one for the last context frame held. The brick and stray-red columns are read at
    step 1 and at the last exact step of the clips (16 for a 16-step horizon); the reward events are those of
    the first steps of the clips (`train.evaluate`'s GLANCE_STEPS); "keys" is how often the paddle moves as
    the LEFT/RIGHT actions ask (the real game's figure is under the table)."""
    last = str(max(first["exact_horizons"]))
    head = (["row", "train steps", "wall min", "train steps/s", "sampling"] + [f"ball match @{h}" for h in AT] + [f"ball agree @{h}" for h in AT]
            + [f"ball px @{h}" for h in AT] + [f"paddle px @{h}" for h in AT] + [f"bricks @{last}", "clutter @1", f"clutter @{last}"]
            + [f"partial s={s}" for s in ("1", "0.4", "0.2")] + ["reward events / false", "keys", "1-step PSNR", "PSNR @8", "play steps/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        m, at = r["m"], r["m"]["probe_exact_at"]
        pd = m.get("partial_denoise_ball") or {}
        ev = m.get("reward_events_rollout") or {}
        cells = [r["name"], fmt(r["steps"], nd=0), fmt(r["wall_min"], nd=1), fmt(r["steps_per_s"]), sampling(m)]
        cells += [fmt(at[str(h)]["ball_match"], pct=True) for h in AT] + [fmt(at[str(h)]["ball_agree"], pct=True) for h in AT]
        cells += [fmt(at[str(h)]["ball_dist"]) for h in AT] + [fmt(at[str(h)]["paddle_abs_err"]) for h in AT]
        cells += [fmt(at[last]["bricks_abs_err"]), fmt(at["1"].get("clutter"), nd=1), fmt(at[last].get("clutter"), nd=1)]
        cells += [fmt(pd.get(s, {}).get("survival"), pct=True) for s in ("1.0", "0.4", "0.2")]
        cells += [f"{round(ev['reproduced'] * ev['real_events'])} of {ev['real_events']} / {ev['false_events']}" if ev.get("real_events") else "-"]
        cells += [fmt(m["controllability"].get("paddle_response_real_actions"), pct=True)]
        cells += [fmt(m["one_step_psnr"]), fmt(m["rollout_psnr_at"]["8"]["rollout_psnr"]), fmt(m["single_world_steps_per_s"], nd=1)]
        lines.append("| " + " | ".join(cells) + " |")
    hold = first["hold_last"]["probe_exact_at"]
    cells = ["hold last frame", "-", "-", "-", "-"] + [fmt(hold[str(h)]["ball_match"], pct=True) for h in AT] + [fmt(hold[str(h)]["ball_agree"], pct=True) for h in AT]
    cells += [fmt(hold[str(h)]["ball_dist"]) for h in AT] + [fmt(hold[str(h)]["paddle_abs_err"]) for h in AT]
    cells += [fmt(hold[last]["bricks_abs_err"]), fmt(hold["1"].get("clutter"), nd=1), fmt(hold[last].get("clutter"), nd=1)] + ["-"] * 5
    cells += [fmt(first["one_step_copy_last_psnr"]), fmt(first["hold_last"]["at"]["8"]["psnr"]), "-"]
    lines.append("| " + " | ".join(cells) + " |")
    real = first.get("real") or {}
    if real.get("paddle_response_real_actions") is not None:
        lines += ["", f"Real game: the paddle moves as the keys ask on {fmt(real['paddle_response_real_actions'], pct=True)} of the LEFT/RIGHT steps of these clips."]
    return "\n".join(lines)


def sampling(m: dict) -> str:
    """A model's sampling settings in one cell: denoising steps and solver, plus guidance and context noise when set,
    the change gate's threshold for a network that has one, and "requantized" when generated frames re-enter the
    context as shown."""
    parts = [f"{m['denoising_steps']} {m['solver']}"]
    if m.get("guidance", 1.0) != 1.0:
        parts.append(f"guidance {m['guidance']:g}")
    if m.get("context_noise"):
        parts.append(f"context noise {m['context_noise']:g}")
    if m.get("change_gate") is not None:
        parts.append(f"gate {m['change_gate']:g}" if m["change_gate"] else "gate off")
    if m.get("requantize"):
        parts.append("requantized")
    return ", ".join(parts)


def plot(rs: list[dict], first: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = [int(h) for h in first["exact_horizons"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax in axes:  # one colour per row, up to 20 rows
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    panels = (("ball_match", "ball match (<= 2 px, or both absent)"), ("paddle_abs_err", "paddle |dx| (px)"))
    for ax, (key, label) in zip(axes, panels):
        for r in rs:
            ax.plot(hs, [r["m"]["probe_exact_at"][str(h)][key] for h in hs], marker="o", label=r["name"])
        ax.plot(hs, [first["hold_last"]["probe_exact_at"][str(h)][key] for h in hs], "k--", label="hold last frame")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="horizon (steps)", title=label)
    for r in rs:
        pd = r["m"].get("partial_denoise_ball") or {}
        levels = sorted(pd, key=float)
        axes[2].plot([float(s) for s in levels], [pd[s]["survival"] for s in levels], marker="o", label=r["name"])
    axes[2].set(xlabel="noise level s of the real next frame", title="ball survives partial denoising")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ablation", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--eval", action="append", required=True, metavar="DIR", help="a train.evaluate output folder (repeatable; same clips)")
    p.add_argument("--out", required=True, help="folder for table.md and ablation.png")
    args = p.parse_args(argv)
    evals = [Path(e).expanduser() for e in args.eval]
    missing = [str(e) for e in evals if not (e / "metrics.json").is_file()]
    if missing:
        print(f"error: --eval: no metrics.json in {', '.join(missing)} (run train.evaluate there first)", file=sys.stderr)
        return 2
    try:
        rs, first = rows(evals)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    src = first["source"]
    text = [f"Clips: {json.dumps(src)}; {first['context_frames']} real context frames, {first['horizon']} steps.", "", table(rs, first), "", "Commands:", ""]
    text += [f"- {r['name']}: `{r['command'] or r['path']}`" for r in rs]
    (out / "table.md").write_text("\n".join(text) + "\n")
    plot(rs, first, out / "ablation.png")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
