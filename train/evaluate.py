"""Hold world models against the real game, all on the same real clips, step by step out to a horizon.

    python -m train.evaluate --model teacher=assets/breakout@8 --model student=~/runs/student/model@1 \\
        --data DATA --out EVAL_DIR [--episodes 8] [--context 4] [--horizon 128]
    python -m train.evaluate --model assets/breakout --record-seeds 0 1 2 3 [--policy scripted] --out EVAL_DIR

Models: `--model SPEC`, repeatable; SPEC is PATH, PATH@STEPS or NAME=PATH@STEPS (STEPS overrides the model's
denoising steps; NAME labels it in the tables, default the SPEC itself), optionally ending in #DTYPE
(bfloat16 or float16; float32 by default) to evaluate the model in that precision. Clips: `--episodes` held-out
episodes of a dataset (`--data`; a random window of each), or episodes recorded now from the real emulator
(`--record-seeds`, game from the models or `--game`): a policy seeded by s plays from `env.reset(seed=s)`,
frames preprocessed as in the dataset, and the clip starts after a warm-up of 0-100 steps drawn from s.
`--policy` picks it: behaviour (the default, train.collect's mix of random and scripted play), scripted (the
ball-keeping BreakoutTracker, Breakout only) or random (PersistentRandom: random actions that persist); a
clip is fixed by its seed and policy. Each clip is `--context` real frames, then `--horizon` steps under its
real actions.

Every model starts from the same contexts with the same noise seed (world b of the batch: seed + b), so what
differs between models, and between a model's rollouts under two action sequences, comes from the model
and the actions. Per model:
- one-step, teacher-forced: the model sees the real past and predicts the next frame; PSNR and SSIM
  against the real frame (baseline: copy the last real frame);
- rollout: the model feeds on its own frames under the real actions. PSNR (of the MSE pooled over
  episodes, 0-255) and SSIM (luma 0-255, 11x11 gaussian window sigma 1.5, valid positions; see
  train.eval_metrics.ssim) at each step; baseline: hold the last context frame;
- state probe (envs.probe, for games that have one): read paddle, ball, bricks and score from the real and
  the generated frame at each step; errors pooled over the steps of each horizon bucket (1, 2-8, 9-16, ...):
  paddle |dx| (64-px columns, where both show a paddle), ball agreement (both or neither show a ball) and
  distance (where both do), |bricks left| difference, |score| difference (where both are readable);
- fidelity at a glance (`probe_exact_at`): the same probe's ball agreement, ball distance, paddle |dx| and
  |bricks left| difference at exactly step h, for h in 1, 4, 8, 16, 32, ... and the horizon (not pooled),
  beside the same for the held last context frame (`hold_last.probe_exact_at`);
- reward and episode end from the model's heads: after each generated step `wm.reward` (nonzero = a reward
  event) and `wm.end_prob` (> 0.5 = an episode end) against the real rewards / terminations of that step:
  precision, recall, accuracy (ends are rare: read recall and the counts). Also after each teacher-forced
  step (the heads then see the real frame). Reward events reproduced (`reward_events_rollout`): of the real
  events in the first 16 steps of each clip, the fraction the rollout's head also fires for within +-1
  step, and the fraction of the head's events with no real event that near;
- partial denoising (`partial_denoise_ball`, games with a probe): at each of the first 16 steps, from the
  cache after the real past, the real next frame's latent is noised to level s (1, 0.4, 0.2) and denoised
  back to 0 by the model (8 Euler steps, its guidance); of the cases whose real frame shows a ball, the
  fraction where the probe still finds one ('survival') and its distance to the real one (low s: does the
  model keep a ball it is given; s = 1: a fresh sample);
- controllability: from the same context and noise, roll out under the real actions and under uniform
  random actions (the same random sequence for every model). (a) Divergence: mean |pixel difference|
  (0-255) between the two generated rollouts, next to the same between the real frames and the real
  emulator replayed from the same seed under the random actions (recorded clips only; null for a dataset).
  (b) Paddle response: on steps whose action moves left or right (by `action_meanings`), the fraction
  after which the probe sees the paddle move (> 0.25 px) that way; the same on the real frames gives the
  reference (the Breakout paddle has momentum and stops at the walls, so the real game is not at 100%);
- cost: network evaluations per step (steps x (2 with guidance, else 1) + 1 re-cache) and single-world
  steps/s (median step after 8 warm-up steps, decoder included); the tokenizer's reconstruction PSNR is
  the ceiling of any model on it.

Writes to EVAL_DIR: metrics.json (everything; null = undefined), report.md (a comparison table, then per model
the at-a-glance table and the detailed ones), psnr.png, ssim.png, probe.png, control.png (against horizon,
one line per model plus hold-last / the real game), {model}_contact.png (clip 0, rows real / generated /
|difference|, columns steps 1-16 of the rollout), {model}_rollout_{k}.mp4 and
{model}_teacher_forced_{k}.mp4 (real | generated | difference), rollouts.npz. Models with more than one
frame per chunk are not supported here.

The pieces are importable: `evaluate_models(specs, clips, actions, rewards, terminated, context=...)` (and per
model `evaluate_model`, and `partial_denoise_ball(wm, ref)` on a `reference`), the clips in train.eval_clips
(`heldout_clips`, `record_clips`, `replay_emulator`), the measures in train.eval_metrics (`psnr_of`, `mse`, `ssim`,
`probe_exact_at`, `events_reproduced`, ...), `report`, the plots and `contact_sheet` in train.eval_report.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from envs.games import resolve_env_id
from envs.probe import probe_for
from train.common import write_json
from train.dataset import read_meta
from train.eval_clips import POLICIES, heldout_clips, random_actions, record_clips, replay_emulator
from train.eval_metrics import (BALL_MATCH_PX, action_directions, events_reproduced, exact_horizons, mean_abs_diff, mse, nanmean, paddle_response,
                                pooled, probe_errors, probe_exact_at, psnr_of, reward_scores, ssim, termination_scores)
from train.eval_report import contact_sheet, plot_curves, report, side_by_side_video, slug, write_png
from worldmodel import cli
from worldmodel.checkpoint import CheckpointError, read_config
from worldmodel.device import DTYPES
from worldmodel.flow import add_noise
from worldmodel.runtime import WorldModel
from worldmodel.sampler import denoise, randn_worlds

__all__ = ["HORIZONS", "ModelSpec", "parse_spec", "heldout_clips", "record_clips", "replay_emulator", "random_actions", "Reference",
           "reference", "partial_denoise", "partial_denoise_ball", "evaluate_model", "evaluate_models", "report", "mse", "psnr_of", "ssim",
           "side_by_side_video", "main"]

HORIZONS = (1, 8, 16, 32, 64, 128, 256)
SPEED_STEPS, SPEED_WARMUP = 48, 8
GLANCE_STEPS = 16  # the first steps of each clip that reward events, partial denoising and the contact sheet look at
EVENT_TOL = 1  # steps a model's reward event may be off the real one and still reproduce it
PARTIAL_LEVELS, PARTIAL_STEPS = (1.0, 0.4, 0.2), 8  # partial denoising: noise levels of the real next frame, Euler steps back to 0


# ----- models -----
@dataclass(frozen=True)
class ModelSpec:
    """One --model: a world-model folder, its denoising steps (None: the model's own), a label, the
    precision it runs in, its context-noise level, its action guidance scale, its change-gate threshold and
    whether generated frames re-enter the context as shown (requantize) (None: the model's own)."""

    name: str
    path: Path
    steps: int | None = None
    dtype: str = "float32"
    context_noise: float | None = None
    guidance: float | None = None
    gate: float | None = None
    requantize: bool | None = None


def parse_spec(text: str) -> ModelSpec:
    """'PATH', 'PATH@STEPS' or 'NAME=PATH@STEPS', each optionally ending in '#DTYPE' (float32, the default,
    bfloat16 or float16) -> ModelSpec (PATH may start with ~)."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    rest, hashed, dtype = rest.partition("#")
    if hashed and dtype not in DTYPES:
        raise ValueError(f"bad --model {text!r}: DTYPE after '#' must be one of {sorted(DTYPES)}, got {dtype!r}")
    path, at, steps = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if sep and not name.strip():
        raise ValueError(f"bad --model {text!r}: empty NAME before '='")
    if not path.strip():
        raise ValueError(f"bad --model {text!r}: no PATH (use PATH, PATH@STEPS or NAME=PATH@STEPS)")
    if at and not (steps.isdigit() and int(steps) >= 1):
        raise ValueError(f"bad --model {text!r}: STEPS after '@' must be an integer >= 1, got {steps!r}")
    return ModelSpec(name=name.strip() or text, path=Path(path).expanduser(), steps=int(steps) if at else None, dtype=dtype if hashed else "float32")


def check_specs(specs: Sequence[ModelSpec]) -> dict:
    """Every spec names an existing world-model folder, the names are distinct and the models agree on game,
    frame size and actions. Returns the first model's config.json."""
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"need at least one --model, with distinct names (label them NAME=PATH), got {names}")
    infos = []
    for s in specs:
        if not (s.path / "config.json").is_file():
            parent = next((p for p in [s.path, *s.path.parents] if p.is_dir()), None)
            held = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir())[:20] if parent else []
            raise FileNotFoundError(f"no world-model folder at {s.path} (no config.json); {parent} holds: {', '.join(held) or 'nothing'}")
        infos.append(read_config(s.path))
    for s, info in zip(specs[1:], infos[1:]):
        for key in ("game", "frame_size", "action_meanings"):
            if info.get(key) != infos[0].get(key):
                raise ValueError(f"models disagree on {key}: {specs[0].name} has {infos[0].get(key)!r}, {s.name} {info.get(key)!r}")
    return infos[0]


def load_model(spec: ModelSpec, batch: int) -> WorldModel:
    """The spec's world model for `batch` worlds, at its denoising steps; one frame per chunk only."""
    wm = WorldModel.load(spec.path, steps=spec.steps, batch=batch, dtype=spec.dtype, context_noise=spec.context_noise, guidance=spec.guidance, gate=spec.gate,
                         requantize=spec.requantize)
    if wm.frames_per_chunk != 1:
        raise ValueError(f"{spec.name}: evaluate drives one action per step and supports models with one frame per chunk; this one has {wm.frames_per_chunk}")
    return wm


# ----- running a model -----
def rollout(wm: WorldModel, ctx_f: np.ndarray, ctx_a: np.ndarray, actions: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The model on its own frames under actions (E, H): frames (E, H, ...), reward and end_prob (E, H), seconds."""
    E, H = actions.shape
    wm.reset(ctx_f, ctx_a, seed=seed)
    frames = np.zeros((E, H, *ctx_f.shape[2:]), dtype=np.uint8)
    reward, end = np.zeros((E, H)), np.zeros((E, H))
    t0 = time.perf_counter()
    for i in range(H):
        frames[:, i] = wm.step_batch(actions[:, i])[:, 0]
        reward[:, i], end[:, i] = wm.reward, wm.end_prob
    return frames, reward, end, time.perf_counter() - t0


def teacher_forced(wm: WorldModel, ctx_f: np.ndarray, ctx_a: np.ndarray, real: np.ndarray, actions: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At every step the model sees the real past: predicted frames (E, H, ...); reward and end_prob (E, H) of
    the heads after observing the real frame of that step."""
    E, H = actions.shape
    wm.reset(ctx_f, ctx_a, seed=seed)
    frames = np.zeros_like(real)
    reward, end = np.zeros((E, H)), np.zeros((E, H))
    for i in range(H):
        frames[:, i] = wm.predict_batch(actions[:, i])[:, 0]
        wm.observe(real[:, i:i + 1], actions[:, i:i + 1])
        reward[:, i], end[:, i] = wm.reward, wm.end_prob
    return frames, reward, end


@torch.no_grad()
def partial_denoise(wm: WorldModel, ref: Reference, levels: Sequence[float] = PARTIAL_LEVELS, steps: int = PARTIAL_STEPS,
                    seed: int = 0) -> dict[float, np.ndarray]:
    """At each of the first GLANCE_STEPS steps, from the cache after the real past (as `teacher_forced`): the real
    next frame encoded, noised to level s (x_s = (1 - s) x0 + s eps, the same eps for every s; world b's noise
    seeded seed + b), denoised back to 0 in `steps` Euler steps under its real action (the model's guidance) and
    decoded: {s: frames (E, n, H, W, 3) uint8}. s = 1 is a fresh sample; s = 0 the tokenizer's round trip."""
    E, horizon = ref.actions.shape
    if wm.batch != E or wm.frames_per_chunk != 1:
        raise ValueError(f"partial denoising needs a one-frame-per-chunk model for the {E} clips, got batch {wm.batch}, {wm.frames_per_chunk} frames per chunk")
    if steps < 1 or not levels or not all(0 <= s <= 1 for s in levels):
        raise ValueError(f"partial denoising needs steps >= 1 and levels in [0, 1], got steps={steps}, levels={list(levels)}")
    n = min(GLANCE_STEPS, horizon)
    gens = [torch.Generator(device=wm.device).manual_seed(seed + b) for b in range(E)]
    got = {float(s): np.zeros((E, n, *ref.real.shape[2:]), dtype=np.uint8) for s in levels}  # (E, n, H, W, 3) per level
    wm.reset(ref.ctx_frames, ref.ctx_actions, seed=seed)
    for i in range(n):
        x0 = wm.tokenizer.encode(torch.from_numpy(ref.real[:, i]).to(wm.device)).float()[:, None]  # (E, 1, C, h, w)
        eps = randn_worlds(tuple(x0.shape), gens, wm.device)
        a = torch.from_numpy(ref.actions[:, i:i + 1]).to(wm.device)  # (E, 1)
        for s in got:
            x_s = add_noise(x0, eps, torch.full((E, 1), s, device=wm.device)).to(wm.dtype)
            x = denoise(wm.dit, wm.cache, a, x_s, np.linspace(s, 0.0, steps + 1).tolist(), wm.guidance, "euler")
            got[s][:, i] = wm.tokenizer.decode(x[:, 0].float()).cpu().numpy()
        wm.observe(ref.real[:, i:i + 1], ref.actions[:, i:i + 1])
    return got


def partial_denoise_ball(wm: WorldModel, ref: Reference, levels: Sequence[float] = PARTIAL_LEVELS, steps: int = PARTIAL_STEPS,
                         seed: int = 0) -> dict[float, dict[str, float]]:
    """Does the model keep a ball it is given? `partial_denoise`, then over the cases whose real frame shows a
    ball: {s: {'survival': the fraction where the probe finds one within BALL_MATCH_PX of the real one,
    'seen': the fraction where it finds one anywhere (noise read as a ball counts here), 'ball_dist': its mean
    distance (px) to the real ball, 'n': the cases}}."""
    if ref.probe is None:
        raise ValueError("partial_denoise_ball reads the ball with the game's state probe; this game has none")
    got = partial_denoise(wm, ref, levels, steps, seed)
    n = next(iter(got.values())).shape[1]
    real = {k: v[:, :n] for k, v in ref.real_probe.items()}
    has_ball = ~np.isnan(real["ball_x"])  # (E, n)
    out = {}
    for s, frames in got.items():
        gen = ref.probe(frames)
        found = ~np.isnan(gen["ball_x"])
        dist = probe_errors(real, gen)["ball_dist"]  # NaN unless both show a ball
        out[s] = {"survival": float((dist[has_ball] <= BALL_MATCH_PX).mean()) if has_ball.any() else math.nan,
                  "seen": float(found[has_ball].mean()) if has_ball.any() else math.nan,
                  "ball_dist": float(nanmean(dist[has_ball])), "n": int(has_ball.sum())}
    return out


def single_world_speed(spec: ModelSpec, ctx_f: np.ndarray, ctx_a: np.ndarray, actions: np.ndarray, seed: int) -> float:
    """Median ms per step of one world (decoder included), after warm-up steps."""
    one = load_model(spec, batch=1)
    one.reset(ctx_f, ctx_a, seed=seed)
    lat = []
    for i in range(min(len(actions), SPEED_STEPS)):
        t0 = time.perf_counter()
        one.step(int(actions[i]))
        lat.append(time.perf_counter() - t0)
    one.close()
    return float(np.median(lat[SPEED_WARMUP:] if len(lat) > 2 * SPEED_WARMUP else lat) * 1000)


def per_horizon(values: np.ndarray, horizons: Sequence[int]) -> dict[int, float]:
    """The mean over episodes of values (E, H) at each horizon h: the measure of step h."""
    return {h: float(values[:, h - 1].mean()) for h in horizons}


# ----- the evaluation -----
@dataclass
class Reference:
    """The real side of the clips, which every model is held against (built once by `reference`)."""

    ctx_frames: np.ndarray  # (E, context, H, W, 3) uint8
    ctx_actions: np.ndarray  # (E, context)
    real: np.ndarray  # (E, horizon, H, W, 3) uint8: what followed the context
    actions: np.ndarray  # (E, horizon): the actions that produced `real`
    rewards: np.ndarray  # (E, horizon)
    terminated: np.ndarray  # (E, horizon)
    rand_actions: np.ndarray  # (E, horizon): the controllability sequence
    horizons: list[int]
    hold_mse: np.ndarray  # (E, horizon): holding the last context frame
    directions: np.ndarray  # (num_actions,): +1 right, -1 left, 0 neither
    probe: Callable[[np.ndarray], dict[str, np.ndarray]] | None
    real_probe: dict[str, np.ndarray] | None  # the probe on `real`, {key: (E, horizon)}
    start_paddle: np.ndarray | None  # (E,): the probe's paddle on the last context frame
    exact_horizons: list[int]  # the steps of probe_exact_at: 1, 4, 8, 16, ... and the horizon


def reference(info: dict, clips: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, context: int,
              rand_actions: np.ndarray, real_random: np.ndarray | None) -> tuple[Reference, dict]:
    """The Reference, and the metrics that need no model: baselines (copy / hold the last frame) and the real
    game's own paddle response and divergence under the random actions."""
    E, T = actions.shape
    horizon = T - context
    ctx_f, real, fut_a = clips[:, :context], clips[:, context:], actions[:, context:]
    horizons = [h for h in HORIZONS if h <= horizon] + ([horizon] if horizon not in HORIZONS else [])
    probe = probe_for(info["game"])
    real_probe = probe(real) if probe else None
    hold = np.repeat(ctx_f[:, -1:], horizon, axis=1)  # (E, horizon, H, W, 3)
    hold_probe = probe(hold) if probe else None
    start = hold_probe["paddle_x"][:, 0] if probe else None
    ref = Reference(ctx_f, actions[:, :context], real, fut_a, rewards[:, context:], terminated[:, context:], rand_actions, horizons,
                    mse(hold, real), action_directions(info["action_meanings"]), probe, real_probe, start, exact_horizons(horizon))

    hold_ssim = ssim(hold, real)
    prev = np.concatenate([ctx_f[:, -1:], real[:, :-1]], axis=1)
    real_divergence = mean_abs_diff(real_random, real) if real_random is not None else np.full((E, horizon), np.nan)
    base = {
        "one_step_copy_last_psnr": psnr_of(mse(prev, real)), "one_step_copy_last_ssim": float(ssim(prev, real).mean()),
        "hold_last": {
            "at": {h: {"psnr": psnr_of(ref.hold_mse[:, h - 1]), "ssim": float(hold_ssim[:, h - 1].mean())} for h in horizons},
            "psnr_per_step": [psnr_of(ref.hold_mse[:, i]) for i in range(horizon)], "ssim_per_step": hold_ssim.mean(0).tolist(),
            "probe_at": pooled(probe_errors(real_probe, hold_probe), horizons) if probe else None,
            "probe_exact_at": probe_exact_at(real_probe, hold_probe, ref.exact_horizons) if probe else None,
        },
        "real": {
            "paddle_response_real_actions": paddle_response(real_probe["paddle_x"], start, fut_a, ref.directions) if probe else math.nan,
            "paddle_response_random_actions": paddle_response(probe(real_random)["paddle_x"], start, rand_actions, ref.directions)
            if probe and real_random is not None else math.nan,
            "divergence_random_actions_mean": float(real_divergence.mean()), "divergence_per_step": real_divergence.mean(0).tolist(),
            "divergence_at": per_horizon(real_divergence, horizons),
        },
    }
    return ref, base


def evaluate_model(spec: ModelSpec, ref: Reference, real_game: dict, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """One model's metrics (see the module docstring) and its generated frames (E, horizon, H, W, 3):
    {'rollout', 'teacher_forced', 'rollout_random'}. `real_game`: the real game's side (the 'real' metrics)."""
    E, horizon = ref.actions.shape
    hs = ref.horizons
    wm = load_model(spec, batch=E)
    with torch.inference_mode():  # the tokenizer's own round trip: the ceiling of any model on it
        flat = torch.from_numpy(ref.real.reshape(-1, *ref.real.shape[2:]))  # (E*horizon, H, W, 3)
        recon = torch.cat([wm.tokenizer.decode(wm.tokenizer.encode(flat[i:i + 256])) for i in range(0, len(flat), 256)]).numpy()
    tf_gen, tf_r, tf_e = teacher_forced(wm, ref.ctx_frames, ref.ctx_actions, ref.real, ref.actions, seed)
    gen, gen_r, gen_e, seconds = rollout(wm, ref.ctx_frames, ref.ctx_actions, ref.actions, seed)
    rand_gen, _, _, _ = rollout(wm, ref.ctx_frames, ref.ctx_actions, ref.rand_actions, seed)  # same noise, other actions
    ms = single_world_speed(spec, ref.ctx_frames[0], ref.ctx_actions[0], ref.actions[0], seed)
    gen_mse, gen_ssim, divergence = mse(gen, ref.real), ssim(gen, ref.real), mean_abs_diff(rand_gen, gen)
    response = {"paddle_response_real_actions": math.nan, "paddle_response_random_actions": math.nan}
    probe_at = probe_exact = partial = None
    if ref.probe:
        gen_probe = ref.probe(gen)
        probe_at = pooled(probe_errors(ref.real_probe, gen_probe), hs)
        probe_exact = probe_exact_at(ref.real_probe, gen_probe, ref.exact_horizons)
        partial = partial_denoise_ball(wm, ref, seed=seed)
        response = {"paddle_response_real_actions": paddle_response(gen_probe["paddle_x"], ref.start_paddle, ref.actions, ref.directions),
                    "paddle_response_random_actions": paddle_response(ref.probe(rand_gen)["paddle_x"], ref.start_paddle, ref.rand_actions, ref.directions)}
    m = {
        "path": str(spec.path), "denoising_steps": wm.steps, "guidance": wm.guidance, "solver": wm.sampling.solver, "context_noise": wm.sampling.context_noise,
        "change_gate": wm.gate, "requantize": wm.sampling.requantize,
        "nfe_per_step": wm.steps * (2 if wm.guidance != 1 else 1) + 1,
        "tokenizer_recon_psnr": psnr_of(mse(recon, flat.numpy())),
        "one_step_psnr": psnr_of(mse(tf_gen, ref.real)), "one_step_ssim": float(ssim(tf_gen, ref.real).mean()),
        "rollout_psnr_mean": psnr_of(gen_mse), "rollout_ssim_mean": float(gen_ssim.mean()),
        "rollout_psnr_at": {h: {"rollout_psnr": psnr_of(gen_mse[:, h - 1]), "hold_last_psnr": psnr_of(ref.hold_mse[:, h - 1])} for h in hs},
        "rollout_ssim_at": per_horizon(gen_ssim, hs),
        "psnr_per_step": [psnr_of(gen_mse[:, i]) for i in range(horizon)], "ssim_per_step": gen_ssim.mean(0).tolist(),
        "probe_at": probe_at, "probe_exact_at": probe_exact, "partial_denoise_ball": partial,
        "reward_rollout": reward_scores(gen_r, ref.rewards), "reward_teacher_forced": reward_scores(tf_r, ref.rewards),
        "reward_events_rollout": events_reproduced(gen_r != 0, ref.rewards != 0, tol=EVENT_TOL, first=GLANCE_STEPS),
        "termination_rollout": termination_scores(gen_e, ref.terminated), "termination_teacher_forced": termination_scores(tf_e, ref.terminated),
        "controllability": {
            "divergence_mean": float(divergence.mean()), "divergence_per_step": divergence.mean(0).tolist(), "divergence_at": per_horizon(divergence, hs),
            "real_divergence_mean": real_game["divergence_random_actions_mean"], **response,
            "real_paddle_response_real_actions": real_game["paddle_response_real_actions"],
            "real_paddle_response_random_actions": real_game["paddle_response_random_actions"],
        },
        "batched_steps_per_s": E * horizon / seconds, "single_world_step_ms_median": ms, "single_world_steps_per_s": 1000 / ms,
        "device": str(wm.device),
    }
    wm.close()
    return m, {"rollout": gen, "teacher_forced": tf_gen, "rollout_random": rand_gen}


def evaluate_models(specs: Sequence[ModelSpec | str], clips: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, *,
                    context: int, seed: int = 0, rand_actions: np.ndarray | None = None, real_random: np.ndarray | None = None,
                    source: dict | None = None, out: Path | None = None, videos: int = 0) -> dict:
    """Evaluate every model on the same clips (E, context + horizon, H, W, 3) with their actions, rewards and
    terminations (E, context + horizon); see the module docstring for the measures. `rand_actions` (E, horizon):
    the controllability sequence (default: uniform, from seed); `real_random` (E, horizon, H, W, 3): the real
    frames under it, if an emulator gave them. Writes everything to `out` when given. Returns the metrics."""
    specs = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    info = check_specs(specs)
    E, T = actions.shape
    horizon = T - context
    if clips.shape[:2] != (E, T) or rewards.shape != (E, T) or terminated.shape != (E, T):
        raise ValueError(f"clips {clips.shape[:2]}, actions {actions.shape}, rewards {rewards.shape} and terminated {terminated.shape} must all be (episodes, steps)")
    if not 1 <= context < T:
        raise ValueError(f"context ({context}) must leave at least one step of the {T}-step clips")
    if list(clips.shape[2:4]) != list(info["frame_size"]):
        raise ValueError(f"the clips' frames are {clips.shape[2]}x{clips.shape[3]}, the models' {info['frame_size']}")
    if rand_actions is None:
        rand_actions = random_actions(E, horizon, len(info["action_meanings"]), seed)
    if rand_actions.shape != (E, horizon) or (real_random is not None and real_random.shape != (E, horizon, *clips.shape[2:])):
        raise ValueError(f"random actions {rand_actions.shape} (and their real frames) must cover the {E} x {horizon} steps after the context")
    ref, base = reference(info, clips, actions, rewards, terminated, context, rand_actions, real_random)
    metrics: dict = {"source": source or {"kind": "arrays"}, "episodes": E, "context_frames": context, "horizon": horizon,
                     "horizons": ref.horizons, "exact_horizons": ref.exact_horizons, "glance_steps": min(GLANCE_STEPS, horizon), "seed": seed,
                     "probe": info["game"] if ref.probe else None, **base, "models": {}}
    arrays = {"real": ref.real, "actions": ref.actions, "random_actions": rand_actions, "model_names": np.array([s.name for s in specs])}
    if real_random is not None:
        arrays["real_random"] = real_random
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for k, spec in enumerate(specs):
        m, frames = evaluate_model(spec, ref, base["real"], seed)
        metrics["models"][spec.name] = m
        arrays.update({f"{key}_{k}": v for key, v in frames.items()})
        m["contact_sheet"] = f"{slug(spec.name)}_contact.png" if out is not None else None
        if out is not None:  # clip 0, the first GLANCE_STEPS steps
            write_png(out / m["contact_sheet"], contact_sheet(ref.real[0, :GLANCE_STEPS], frames["rollout"][0, :GLANCE_STEPS]))
        for e in range(min(videos, E) if out is not None else 0):
            side_by_side_video(out / f"{slug(spec.name)}_rollout_{e:02d}.mp4", ref.real[e], frames["rollout"][e])
            side_by_side_video(out / f"{slug(spec.name)}_teacher_forced_{e:02d}.mp4", ref.real[e], frames["teacher_forced"][e])
    metrics.update(device=metrics["models"][specs[-1].name]["device"], threads=torch.get_num_threads())
    if out is not None:
        np.savez_compressed(out / "rollouts.npz", **arrays)
        write_json(out / "metrics.json", cli.jsonable(metrics))
        (out / "report.md").write_text(report(metrics))
        plot_curves(metrics, out)
    return metrics


# ----- command line -----
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="SPEC", help="PATH, PATH@STEPS or NAME=PATH@STEPS (a world-model folder), optionally ending in #bfloat16 or #float16; repeat for more models")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset folder: clips from its held-out split")
    src.add_argument("--record-seeds", type=cli.seed, nargs="+", metavar="SEED", help="record one episode per seed from the real emulator")
    p.add_argument("--game", default=None, help="with --record-seeds: the game (default: the models')")
    p.add_argument("--policy", choices=POLICIES, default=None, help="with --record-seeds: who plays the clips (default behaviour: "
                   "train.collect's mix; scripted: the ball-keeping Breakout tracker; random: persistent random actions)")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=8, help="with --data: clips (one per held-out episode)")
    p.add_argument("--context", type=int, default=4, help="real frames the models start from")
    p.add_argument("--horizon", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="denoising steps of models whose SPEC has no @STEPS (default: the model's)")
    p.add_argument("--context-noise", type=float, default=None, metavar="LEVEL", help="commit every chunk to the models' caches noised to LEVEL in [0, 1) "
                   "(GameNGen's context noise at play time, for models trained with --ctx-noise; default: the model's, 0 unless set)")
    p.add_argument("--guidance", type=float, default=None, metavar="SCALE", help="action guidance scale of every model (1: none; default: the model's)")
    p.add_argument("--gate", type=float, default=None, metavar="P", help="change-gate threshold of every model trained with one (train.teacher "
                   "--change-gate): a latent cell whose probability of changing is below P is the previous frame's; 0: off (default: the model's, 0.5)")
    p.add_argument("--requantize", action=argparse.BooleanOptionalAction, default=None, help="in every model, each generated chunk enters the context as the frames shown, encoded again like real ones "
                   "(--no-requantize: the generated latents themselves; default: the model's)")
    p.add_argument("--videos", type=int, default=2, help="side-by-side videos per model")
    p.add_argument("--seed", type=cli.seed, default=0, help="seeds the clips of --data, the controllability actions and the models' noise")
    args = p.parse_args(argv)
    if args.episodes <= 0 or args.horizon <= 0 or args.context <= 0 or args.videos < 0:
        p.error("--episodes, --horizon and --context must be positive, --videos >= 0")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number, got {args.guidance}")
    if args.context_noise is not None and not 0 <= args.context_noise < 1:
        p.error(f"--context-noise must lie in [0, 1), got {args.context_noise}")
    if args.gate is not None and not 0 <= args.gate < 1:
        p.error(f"--gate must lie in [0, 1) (0: off), got {args.gate}")
    if args.game is not None and args.data is not None:
        p.error("--game goes with --record-seeds (a dataset names its game)")
    if args.policy is not None and args.data is not None:
        p.error("--policy goes with --record-seeds (a dataset was played by its own policy)")
    try:
        specs = [parse_spec(s) for s in args.model]
        specs = [ModelSpec(s.name, s.path, s.steps if s.steps is not None else args.steps, s.dtype, args.context_noise, args.guidance, args.gate, args.requantize) for s in specs]
        info = check_specs(specs)
        length = args.context + args.horizon
        if args.data is not None:
            meta = read_meta(args.data)
            if meta["game"] != info["game"] or meta["action_meanings"] != info["action_meanings"]:
                raise ValueError(f"the data is {meta['game']} with actions {meta['action_meanings']}, the models {info['game']} with {info['action_meanings']}")
            clips, actions, rewards, terminated = heldout_clips(Path(args.data), args.episodes, length, args.seed)
            source, real_random, rand = {"kind": "heldout", "data": str(args.data)}, None, None
        else:
            game = args.game or info["game"]
            if resolve_env_id(game) != resolve_env_id(info["game"]):
                raise ValueError(f"--game {game} is not the models' game {info['game']}")
            size, frameskip = tuple(info["frame_size"]), int(info.get("frameskip", 4))
            policy = args.policy or "behaviour"
            rec = record_clips(game, args.record_seeds, length, size=size, frameskip=frameskip, policy=policy)
            clips, actions, rewards, terminated = rec.frames, rec.actions, rec.rewards, rec.terminated
            rand = random_actions(len(clips), args.horizon, len(info["action_meanings"]), args.seed)
            real_random = replay_emulator(game, rec, args.context, rand, size=size, frameskip=frameskip)
            source = {"kind": "recorded", "game": game, "policy": policy, "seeds": rec.seeds, "skipped_seeds": rec.skipped, "frameskip": frameskip}
        m = evaluate_models(specs, clips, actions, rewards, terminated, context=args.context, seed=args.seed, rand_actions=rand,
                            real_random=real_random, source=source, out=Path(args.out), videos=args.videos)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
