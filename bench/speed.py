"""The speed harness: steps/s, latency, where the time goes, FLOPs and memory of the world model in play.

    python -m bench.speed                                # teacher vs student at 1/2/4 steps, single and N = 1/8/64
    python -m bench.speed --modes single --dtypes float32 bfloat16 --baseline --out speed.json
    python -m bench.speed --teacher '' --student-steps 2 --modes single vec64      # student only

Configurations: the teacher at its own step count and the student at each of `--student-steps`, each in
every mode of `--modes` (`single`: `WorldModelEnv`, one world; `vecN`: `WorldModelVectorEnv` with N worlds
in one batched forward) and every dtype of `--dtypes`. `--baseline` adds the float32 plain path for every
model and mode (rotations recomputed at every forward and the VAE in its default memory layout), so the
fast path's gain over it is measured in the same run.

Timing. Every configuration is loaded and warmed up (`--warmup` untimed steps, enough to fill the rolling
window, since each new key length pays a one-off setup); then `--repeats` rounds, each running a timed
block of `--steps` env steps (`--vec-steps` for vector modes) for every configuration in turn, so slow
drift of a shared machine hits every configuration alike. A figure is the median over the repeats;
latencies are pooled over every timed step (action in, decoded frame out: the env's own `step`; the
vector env's autoresets happen inside it and are included, the single env's rare resets are not). The split into transformer (the denoising passes),
re-cache (the clean t=0 pass that extends the KV cache and reads the reward/end heads) and decoder comes
from `bench.timer.PhaseTimer`; "other" is the rest of the env step (noise, host copies, wrappers).
Ratios (student/teacher, bfloat16/float32, fast/plain) divide medians of the same run.

FLOPs: counted once per configuration with `torch.utils.flop_counter.FlopCounterMode` over one step
(matrix multiplies, convolutions, attention), per env step. The peak is this machine's measured matrix
multiply rate (a 2048^3 product in each dtype, same threads); the fraction is achieved / peak.

Memory: the peak resident set (CPU; `torch.cuda.max_memory_allocated` on CUDA) of a fresh subprocess that
loads the configuration and runs the warm-up block, so configurations do not share a high-water mark.
Prints a table and the goals, and writes everything to JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.memory import maxrss_mib, status_mib
from worldmodel import cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STUDENT = ROOT / "assets" / "breakout"
DEFAULT_TEACHER = ROOT / "assets" / "breakout_teacher"
PHASES = ("denoise", "recache", "decode")


@dataclass(frozen=True)
class Config:
    name: str  # model label: "teacher" or "student"
    path: str
    steps: int | None  # denoising steps (None: the model's own)
    mode: str  # "single" or "vecN"
    dtype: str
    plain: bool = False  # the baseline path

    @property
    def n(self) -> int:
        return 1 if self.mode == "single" else int(self.mode[3:])

    @property
    def label(self) -> str:
        steps = "" if self.steps is None else f"@{self.steps}"
        return f"{self.name}{steps} {self.mode} {self.dtype}{' plain' if self.plain else ''}"


def parse_mode(mode: str) -> str:
    if mode == "single" or (mode.startswith("vec") and mode[3:].isdigit() and int(mode[3:]) >= 1):
        return mode
    raise argparse.ArgumentTypeError(f"a mode is 'single' or 'vecN' with N >= 1 (e.g. vec8), got {mode!r}")


# ----- one configuration -----
class Runner:
    """A loaded env of one configuration with a random action stream."""

    def __init__(self, cfg: Config, device: str, seed: int) -> None:
        from envs.vector_env import WorldModelVectorEnv
        from envs.world_env import WorldModelEnv
        from bench.timer import PhaseTimer
        from worldmodel.tokenizer import FrameTokenizer

        self.cfg = cfg
        if cfg.mode == "single":
            self.env = WorldModelEnv(cfg.path, steps=cfg.steps, device=device, dtype=cfg.dtype)
            self.n_actions = int(self.env.action_space.n)
        else:
            self.env = WorldModelVectorEnv(cfg.n, model=cfg.path, steps=cfg.steps, device=device, dtype=cfg.dtype)
            self.n_actions = int(self.env.single_action_space.n)
        wm = self.env.wm
        if cfg.plain:  # the path before the fast-path work: default VAE layout, rotations at every forward
            wm.tokenizer = FrameTokenizer.load(Path(cfg.path) / "tokenizer", device=device).eval()
            wm.cache.reuse_reads = False
        self.wm = wm
        self.timer = wm.timer = PhaseTimer(device)
        self.sync = torch.device(device).type == "cuda"
        self.rng = np.random.default_rng(seed)
        self.env.reset(seed=seed)

    def actions(self, k: int) -> np.ndarray:
        return self.rng.integers(self.n_actions, size=(k,) if self.cfg.mode == "single" else (k, self.cfg.n))

    def run(self, k: int) -> tuple[float, list[float], dict[str, float]]:
        """k env steps -> (seconds, per-step latencies, per-step median of each phase in seconds)."""
        self.timer.clear()
        lat = []
        for a in self.actions(k):
            t0 = time.perf_counter()
            out = self.env.step(int(a) if self.cfg.mode == "single" else a)
            lat.append(time.perf_counter() - t0)  # the frames come back as numpy: the work is done
            if self.cfg.mode == "single" and (out[2] or out[3]):
                self.env.reset()  # untimed (the vector env's autoresets happen inside step and are timed)
        total = float(np.sum(lat))
        phases = {p: float(np.median(self.timer.times[p])) if self.timer.times[p] else 0.0 for p in PHASES}
        return total, lat, phases

    def flops(self) -> float:
        """Floating-point operations of one step of this configuration (all worlds)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        a = self.actions(1)[0]
        with counter:
            self.env.step(int(a) if self.cfg.mode == "single" else a)
        return float(counter.get_total_flops())

    def close(self) -> None:
        self.env.close()


def matmul_peak(dtype: torch.dtype, device: str, size: int = 2048, reps: int = 10) -> float:
    """Measured matrix-multiply rate in GFLOP/s (median of `reps` products of two size x size matrices)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 2 * size**3 / float(np.median(ts)) / 1e9


def peak_memory(cfg: Config, device: str, warmup: int, seed: int) -> dict:
    """Peak memory of a fresh process that loads `cfg` and runs `warmup` steps."""
    code = ("import json, sys; from bench.speed import memory_child; "
            "print(json.dumps(memory_child(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg)), device, str(warmup), str(seed)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"memory measurement of {cfg.label} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB: VmHWM (reset by exec, unlike ru_maxrss, which a child keeps
    from the parent it was forked from), or ru_maxrss where /proc is absent."""
    hwm = status_mib("VmHWM")
    return hwm if hwm is not None else maxrss_mib()


def memory_child(cfg: dict, device: str, warmup: int, seed: int) -> dict:
    cfg_ = Config(**cfg)
    before = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    r = Runner(cfg_, device, seed)
    r.run(max(1, warmup))  # the peak covers loading, the start context and stepping
    out = {"peak_rss_mib": peak_rss_mib(), "rss_before_load_mib": before,
           "model_mib": sum(p.numel() * p.element_size() for m in (r.wm.dit, r.wm.tokenizer) for p in m.parameters()) / 2**20,
           "kv_cache_mib": r.wm.cache.nbytes() / 2**20}
    if device.startswith("cuda"):
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    r.close()
    return out


# ----- the harness -----
def configs(args) -> list[Config]:
    models = []
    if args.teacher:
        models.append(("teacher", args.teacher, [args.teacher_steps]))
    if args.student:
        models.append(("student", args.student, args.student_steps))
    out = []
    for name, path, steps_list in models:
        for steps in steps_list:
            for mode in args.modes:
                for dtype in args.dtypes:
                    out.append(Config(name, str(path), steps, mode, dtype))
                if args.baseline:
                    out.append(Config(name, str(path), steps, mode, "float32", plain=True))
    return out


def measure(args) -> dict:
    cfgs = configs(args)
    runners = []
    for c in cfgs:
        print(f"loading {c.label}", flush=True)
        runners.append(Runner(c, args.device, args.seed))
    k_of = {c: (args.steps if c.mode == "single" else args.vec_steps) for c in cfgs}
    for r in runners:  # warm-up block (long enough to fill the rolling window: new key lengths cost a first-call setup)
        r.run(args.warmup)
    per = {c: {"seconds": [], "lat": [], "phases": []} for c in cfgs}
    for rep in range(args.repeats):
        for r in runners:
            sec, lat, ph = r.run(k_of[r.cfg])
            per[r.cfg]["seconds"].append(sec)
            per[r.cfg]["lat"].extend(lat)
            per[r.cfg]["phases"].append(ph)
        print(f"round {rep + 1}/{args.repeats} done", flush=True)
    peaks = {dt: matmul_peak(getattr(torch, dt), args.device) for dt in sorted({c.dtype for c in cfgs})}
    rows = []
    for r in runners:
        c = r.cfg
        sec = float(np.median(per[c]["seconds"]))
        k = k_of[c]
        lat = np.asarray(per[c]["lat"]) * 1000
        ph = {p: 1000 * float(np.median([x[p] for x in per[c]["phases"]])) for p in PHASES}
        step_ms = 1000 * sec / k
        flops = r.flops()
        achieved = flops / (step_ms / 1000) / 1e9
        row = {"label": c.label, **asdict(c), "n": c.n, "denoise_steps": r.wm.steps, "frames_per_chunk": r.wm.frames_per_chunk,
               "env_steps_per_s": c.n * k / sec, "frames_per_s": c.n * k * r.wm.frames_per_chunk / sec, "ms_per_step": step_ms,
               "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)), "max": float(lat.max())},
               "phase_ms": {**ph, "other": step_ms - sum(ph.values())},
               "gflop_per_env_step": flops / c.n / 1e9, "achieved_gflops": achieved, "peak_gflops": peaks[c.dtype],
               "fraction_of_peak": achieved / peaks[c.dtype], "runs_s": per[c]["seconds"], "steps_per_run": k}
        rows.append(row)
        r.close()
    if not args.no_memory:
        for row, c in zip(rows, cfgs):
            print(f"memory of {c.label}", flush=True)
            row["memory"] = peak_memory(c, args.device, args.warmup, args.seed)
    return {"rows": rows, "matmul_peak_gflops": peaks}


def ratios(rows: list[dict]) -> list[dict]:
    """Student/teacher (same mode and dtype), bfloat16/float32 and fast/plain (same model, steps, mode)."""
    def key(r, **kw):
        d = {k: r[k] for k in ("name", "steps", "mode", "dtype", "plain")}
        d.update(kw)
        return tuple(sorted(d.items()))

    by = {key(r): r for r in rows}
    out = []
    for r in rows:
        if r["name"] == "student" and not r["plain"]:
            t = next((x for x in rows if x["name"] == "teacher" and x["mode"] == r["mode"] and x["dtype"] == r["dtype"] and not x["plain"]), None)
            if t:
                out.append({"what": f"{r['label']} / {t['label']}", "kind": "student/teacher", "ratio": r["env_steps_per_s"] / t["env_steps_per_s"]})
        if r["dtype"] != "float32" and not r["plain"]:
            base = by.get(key(r, dtype="float32"))
            if base:
                out.append({"what": f"{r['label']} / {base['label']}", "kind": "dtype", "ratio": r["env_steps_per_s"] / base["env_steps_per_s"]})
        if r["plain"]:
            fast = by.get(key(r, plain=False))
            if fast:
                out.append({"what": f"{fast['label']} / {r['label']}", "kind": "fast/plain", "ratio": fast["env_steps_per_s"] / r["env_steps_per_s"]})
    return out


def goals(rows: list[dict], student_default_steps: int) -> list[dict]:
    """The issue's goals, evaluated on this run's rows (float32 unless only other dtypes were run)."""
    def pick(name, mode, steps=None, dtype="float32"):
        return next((r for r in rows if r["name"] == name and r["mode"] == mode and not r["plain"] and r["dtype"] == dtype
                     and (steps is None or r["denoise_steps"] == steps)), None)

    out = []
    s1 = pick("student", "single", student_default_steps)
    if s1:
        ok = s1["env_steps_per_s"] >= 30 and s1["latency_ms"]["p95"] < 50
        out.append({"goal": "single world >= 30 steps/s, p95 < 50 ms (shipped student)", "met": ok,
                    "value": f"{s1['env_steps_per_s']:.1f} steps/s, p95 {s1['latency_ms']['p95']:.1f} ms"})
    t1 = pick("teacher", "single")
    if s1 and t1:
        best = max((r for r in rows if r["name"] == "student" and r["mode"] == "single" and not r["plain"]), key=lambda r: r["env_steps_per_s"])
        ratio = s1["env_steps_per_s"] / t1["env_steps_per_s"]
        out.append({"goal": "student >= 10x teacher steps/s (single world)", "met": ratio >= 10,
                    "value": f"{ratio:.2f}x at {student_default_steps} steps; best student row ({best['label']}) {best['env_steps_per_s'] / t1['env_steps_per_s']:.2f}x"})
    v64 = [r for r in rows if r["name"] == "student" and r["mode"] == "vec64" and not r["plain"] and r["denoise_steps"] == student_default_steps]
    if s1 and v64:
        best = max(v64, key=lambda r: r["env_steps_per_s"])
        ratio = best["env_steps_per_s"] / s1["env_steps_per_s"]
        out.append({"goal": "64 batched worlds >= 10x the single world's steps/s", "met": ratio >= 10,
                    "value": f"{best['env_steps_per_s']:.1f} env steps/s ({best['dtype']}), {ratio:.2f}x the single world"})
    return out


def print_report(report: dict) -> None:
    rows = report["rows"]
    head = (f"{'configuration':<36} {'steps/s':>8} {'frames/s':>9} {'p50':>6} {'p95':>6} {'max':>6} {'transf':>7} {'recache':>7} "
            f"{'decode':>7} {'other':>6} {'GFLOP':>6} {'%peak':>6} {'RSS MiB':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        ph, lat = r["phase_ms"], r["latency_ms"]
        mem = r.get("memory", {})
        mem_s = f"{mem.get('peak_cuda_mib', mem.get('peak_rss_mib', float('nan'))):.0f}" if mem else "-"
        print(f"{r['label']:<36} {r['env_steps_per_s']:>8.1f} {r['frames_per_s']:>9.1f} {lat['p50']:>6.1f} {lat['p95']:>6.1f} {lat['max']:>6.1f} "
              f"{ph['denoise']:>7.1f} {ph['recache']:>7.1f} {ph['decode']:>7.1f} {ph['other']:>6.1f} {r['gflop_per_env_step']:>6.3f} "
              f"{100 * r['fraction_of_peak']:>5.1f}% {mem_s:>8}")
    print("(latency and phases in ms per env step call, i.e. per batched step for vecN; GFLOP per env step;"
          f" matmul peak GFLOP/s: {', '.join(f'{k} {v:.0f}' for k, v in report['matmul_peak_gflops'].items())})")
    if report["ratios"]:
        print("\nratios (env steps/s, same run)")
        for x in report["ratios"]:
            print(f"  {x['ratio']:>6.2f}x  {x['what']}")
    if report["goals"]:
        print("\ngoals")
        for g in report["goals"]:
            print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                                epilog="See the module docstring (python -m pydoc bench.speed) for what is measured and how.")
    p.add_argument("--student", default=str(DEFAULT_STUDENT), help="student world-model folder ('' to leave it out)")
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="teacher world-model folder ('' to leave it out)")
    p.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4], help="student denoising steps to measure")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher denoising steps (default: its own, i.e. full)")
    p.add_argument("--modes", type=parse_mode, nargs="+", default=["single", "vec1", "vec8", "vec64"], help="single and/or vecN")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"], help="precisions to measure")
    p.add_argument("--baseline", action="store_true", help="also measure the float32 plain path (fast/plain ratios)")
    p.add_argument("--steps", type=int, default=40, help="env steps per timed block, single env")
    p.add_argument("--vec-steps", type=int, default=6, help="batched steps per timed block, vector env")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per configuration (medians over them)")
    p.add_argument("--warmup", type=int, default=12, help="untimed steps before timing (enough to fill the rolling window)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N, mps or auto)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seeds the actions and the models' noise")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-memory subprocesses")
    p.add_argument("--out", default="speed.json", help="JSON results file")
    args = p.parse_args(argv)
    if min(args.student_steps) < 1 or (args.teacher_steps is not None and args.teacher_steps < 1):
        p.error("--student-steps and --teacher-steps must be >= 1")
    if args.steps < 1 or args.vec_steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps, --vec-steps and --repeats must be >= 1, --warmup >= 0")
    for flag, path in (("--student", args.student), ("--teacher", args.teacher)):
        if path and not (Path(path) / "config.json").is_file():
            p.error(f"{flag} {path!r} is not a world-model folder (no config.json)")
    if not args.student and not args.teacher:
        p.error("nothing to measure: both --student and --teacher are empty")
    args.device = cli.check_device(p, args.device)

    report = measure(args)
    student_default = None
    if args.student:
        student_default = json.loads((Path(args.student) / "config.json").read_text())["sampling"]["steps"]
    report["ratios"] = ratios(report["rows"])
    report["goals"] = goals(report["rows"], student_default) if student_default else []
    report["setup"] = {"student": args.student, "teacher": args.teacher, "device": args.device, "steps": args.steps, "vec_steps": args.vec_steps,
                       "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
                       "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    print_report(report)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
