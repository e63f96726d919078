"""Env steps per second of the batched vector env against the number of worlds N.

    python -m bench.vector_throughput                       # N = 1, 2, 4, ..., 64 on the shipped model
    python -m bench.vector_throughput --n 1 4 --steps 10 --repeats 3 --out vec.json

For each N: make `WorldModelVectorEnv(N)`, reset, take `--warmup` steps, then time `--repeats` runs of
`--steps` batched steps under uniform random actions; env steps/s = N * steps / seconds, median over the
runs. Autoresets (the model's own episode ends) happen as they would for an agent and are in the timing.
Prints a table and writes JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from envs.vector_env import WorldModelVectorEnv
from envs.world_env import DEFAULT_MODEL
from worldmodel import cli

DEFAULT_N = (1, 2, 4, 8, 16, 32, 64)


def measure(model: str, n: int, steps: int, repeats: int, warmup: int, denoise_steps: int | None, device: str, seed: int) -> dict:
    env = WorldModelVectorEnv(n, model=model, steps=denoise_steps, device=device)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    for _ in range(warmup):
        env.step(rng.integers(env.single_action_space.n, size=n))
    runs = []
    for _ in range(repeats):
        actions = rng.integers(env.single_action_space.n, size=(steps, n))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for a in actions:
            env.step(a)  # returns numpy frames, so the device work is done when it returns
        runs.append(time.perf_counter() - t0)
    env.close()
    sec = float(np.median(runs))
    return {"n": n, "env_steps_per_s": n * steps / sec, "batch_steps_per_s": steps / sec, "ms_per_batch_step": 1000 * sec / steps,
            "runs_s": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vector_throughput", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="world-model folder")
    p.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_N), help="numbers of worlds to measure")
    p.add_argument("--steps", type=int, default=20, help="batched steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per N (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--denoise-steps", type=int, default=None, help="denoising steps per chunk (default: the model's)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N, mps or auto)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seeds the actions and the model's noise")
    p.add_argument("--out", default="vector_throughput.json", help="JSON results file")
    args = p.parse_args(argv)
    if min(args.n) < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--n values, --steps and --repeats must be >= 1, --warmup >= 0")
    args.device = cli.check_device(p, args.device)
    results = []
    print(f"{'N':>4} {'env steps/s':>12} {'batch steps/s':>14} {'ms/batch step':>14}")
    for n in args.n:
        r = measure(args.model, n, args.steps, args.repeats, args.warmup, args.denoise_steps, args.device, args.seed)
        results.append(r)
        print(f"{n:>4} {r['env_steps_per_s']:>12.1f} {r['batch_steps_per_s']:>14.2f} {r['ms_per_batch_step']:>14.1f}", flush=True)
    report = {"model": args.model, "device": args.device, "denoise_steps": args.denoise_steps, "steps": args.steps, "repeats": args.repeats,
              "warmup": args.warmup, "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "machine": platform.processor() or platform.machine(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
