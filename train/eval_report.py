"""What `train.evaluate` writes besides metrics.json: report.md (tables), plots against horizon, videos, contact sheets."""
from __future__ import annotations

import math
import re
from pathlib import Path

import cv2
import numpy as np

TABLE_HORIZONS = (1, 8, 32, 128)  # the comparison table's columns
PROBE_PLOTS = (("paddle_abs_err", "paddle |dx| (px)"), ("ball_agree", "ball seen/unseen agreement"),
               ("ball_dist", "ball distance (px)"), ("bricks_abs_err", "bricks-left |d|"), ("score_abs_err", "score |d|"))
GLANCE_ROWS = (("ball agree", "ball_agree", True), ("ball match (<= 2 px)", "ball_match", True), ("ball dist (px)", "ball_dist", False), ("paddle abs err (px)", "paddle_abs_err", False),
               ("bricks-left abs err", "bricks_abs_err", False), ("clutter (balls of stray red)", "clutter", False))  # the at-a-glance table: label, probe_exact_at key, as a percentage
SHEET_LABEL_W, SHEET_HEADER_H = 56, 16  # contact sheet: the row-label column and the step-number strip, px
SHEET_ROWS = ("real", "model", "|diff|")


def slug(name: str) -> str:
    """A model name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def side_by_side_video(path: Path, real: np.ndarray, gen: np.ndarray, fps: int = 15, scale: int = 4) -> None:
    """mp4 of (real | generated | |difference|), each frame (H, W, 3) uint8, scaled up nearest-neighbour."""
    T, H, W, _ = real.shape
    diff = np.abs(real.astype(np.int16) - gen.astype(np.int16)).astype(np.uint8)
    size = (3 * W * scale, H * scale)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not vw.isOpened():
        raise RuntimeError(f"OpenCV could not open a video writer for {path}")
    for t in range(T):
        row = np.concatenate([real[t], gen[t], diff[t]], axis=1)
        row = cv2.resize(row, size, interpolation=cv2.INTER_NEAREST)
        vw.write(cv2.cvtColor(row, cv2.COLOR_RGB2BGR))
    vw.release()


def contact_sheet(real: np.ndarray, gen: np.ndarray, scale: int = 2) -> np.ndarray:
    """One image (SHEET_HEADER_H + 3 H scale, SHEET_LABEL_W + T W scale, 3) uint8 of T steps (T, H, W, 3) uint8:
    rows real / generated / |difference|, one column per step (frames scaled up nearest-neighbour), the
    rows labelled on the left and the steps (1..T) numbered on top."""
    if real.shape != gen.shape or real.ndim != 4 or real.shape[-1] != 3:
        raise ValueError(f"a contact sheet needs real and generated frames (T, H, W, 3) of one shape, got {real.shape} and {gen.shape}")
    T, H, W, _ = real.shape
    diff = np.abs(real.astype(np.int16) - gen.astype(np.int16)).astype(np.uint8)
    rows = np.stack([real, gen, diff])  # (3, T, H, W, 3)
    grid = rows.transpose(0, 2, 1, 3, 4).reshape(3 * H, T * W, 3)  # (3 H, T W, 3): row r, column t
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)  # (3 H s, T W s, 3)
    sheet = np.full((SHEET_HEADER_H + grid.shape[0], SHEET_LABEL_W + grid.shape[1], 3), 255, dtype=np.uint8)
    sheet[SHEET_HEADER_H:, SHEET_LABEL_W:] = grid
    font = cv2.FONT_HERSHEY_SIMPLEX
    for r, label in enumerate(SHEET_ROWS):
        cv2.putText(sheet, label, (2, SHEET_HEADER_H + r * H * scale + H * scale // 2 + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for t in range(T):
        cv2.putText(sheet, str(t + 1), (SHEET_LABEL_W + t * W * scale + 2, SHEET_HEADER_H - 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def write_png(path: Path, image: np.ndarray) -> None:
    """An RGB image (H, W, 3) uint8 as a PNG."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise RuntimeError(f"OpenCV could not write {path}")


def _f(v, digits: int = 2, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:.{digits}f}"


def _at(d: dict, h: int):
    """d[h] whether the keys are ints (in memory) or strings (read back from JSON)."""
    return d.get(h, d.get(str(h)))


def report(m: dict) -> str:
    """report.md: one comparison table (a row per model, and hold-last), then each model's details."""
    src = m["source"]
    hs = [h for h in TABLE_HORIZONS if h <= m["horizon"]]
    has_probe = m["probe"] is not None
    where = f"held-out episodes of `{src['data']}`" if src["kind"] == "heldout" else f"episodes recorded from {src['game']} ({src.get('policy', 'behaviour')} policy, seeds {src['seeds']}" + (f"; skipped, ended too soon: {src['skipped_seeds']}" if src.get("skipped_seeds") else "") + ")"
    lines = [
        f"# Evaluation: {', '.join(f'`{n}`' for n in m['models'])}",
        "",
        f"{m['episodes']} {where}; {m['context_frames']} real context frames, then {m['horizon']} steps. "
        "Rollout PSNR/SSIM at step h are of that step's frames (PSNR of the MSE pooled over episodes; SSIM on "
        "the luma, 11x11 gaussian window, sigma 1.5). " + (f"State probe ({m['probe']}): errors at h are pooled over the "
        f"steps after the previous horizon of {m['horizons']} up to h; paddle |dx| in 64-px columns, ball = seen/unseen "
        "agreement, bricks = |bricks left (generated - real)|." if has_probe else "No state probe for this game."),
        "",
    ]
    head = ["model", "1-step PSNR", *[f"PSNR@{h}" for h in hs]]
    if has_probe:
        head += [f"{k}@{h}" for k in ("paddle", "ball", "bricks") for h in hs]
    head += ["NFE/step", "steps/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    hold = m["hold_last"]
    rows = [(name, mm, mm["one_step_psnr"], mm["rollout_psnr_at"], mm.get("probe_at"), mm["nfe_per_step"], mm["single_world_steps_per_s"]) for name, mm in m["models"].items()]
    rows.append(("hold last frame", None, m["one_step_copy_last_psnr"], {h: {"rollout_psnr": v["psnr"]} for h, v in hold["at"].items()}, hold.get("probe_at"), None, None))
    for name, _, one, psnr_at, probe_at, nfe, sps in rows:
        cells = [name, _f(one), *[_f(_at(psnr_at, h)["rollout_psnr"]) for h in hs]]
        if has_probe:
            cells += [_f(_at(probe_at, h)["paddle_abs_err"]) for h in hs]
            cells += [_f(_at(probe_at, h)["ball_agree"], pct=True) for h in hs]
            cells += [_f(_at(probe_at, h)["bricks_abs_err"]) for h in hs]
        cells += [str(nfe) if nfe is not None else "-", _f(sps, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    real = m["real"]
    lines += ["", f"Real game: paddle moves as asked on {_f(real['paddle_response_real_actions'], pct=True)} of LEFT/RIGHT steps "
              f"under the recorded actions, {_f(real['paddle_response_random_actions'], pct=True)} under random actions; "
              f"real frames under random vs recorded actions differ by {_f(real['divergence_random_actions_mean'])} "
              "(mean |pixel difference|, 0-255; '-' without the emulator).", ""]
    for name, mm in m["models"].items():
        lines += _model_details(name, mm, hold, has_probe, m["glance_steps"])
    lines += [f"Speed on {m['device']} ({m['threads']} threads): single world, median step after warm-up, decoder included.", ""]
    return "\n".join(lines)


def _glance(name: str, mm: dict, hold: dict, has_probe: bool, first: int) -> list[str]:
    """Fidelity at a glance: the probe at exact steps against hold-last, reward events and partial denoising
    over the first steps, and the contact sheet."""
    lines = ["**Fidelity at a glance** (free rollout under the real actions from real context; step h exactly, mean over episodes; "
             "hold last = the last context frame held; ball dist where both show a ball):", ""]
    if has_probe:
        hs = list(mm["probe_exact_at"])
        lines += ["| measure | | " + " | ".join(f"h={h}" for h in hs) + " |", "|" + "---|" * (len(hs) + 2)]
        for label, key, pct in GLANCE_ROWS:
            for who, d in ((name, mm["probe_exact_at"]), ("hold last", hold["probe_exact_at"])):
                lines.append(f"| {label if who == name else ''} | {who} | " + " | ".join(_f(_at(d, h)[key], pct=pct) for h in hs) + " |")
        lines.append("")
    r = mm["reward_events_rollout"]
    lines.append(f"- Reward events in the first {first} steps: the model's reward head fires within +-{r['tol']} step of "
                 f"{_f(r['reproduced'], pct=True)} of the {r['real_events']} real events; {_f(r['false_rate'], pct=True)} of its "
                 f"{r['model_events']} events have no real event that near.")
    if mm.get("partial_denoise_ball"):
        cells = [f"s={float(s):g}: {_f(v['survival'], pct=True)} (a ball anywhere {_f(v['seen'], pct=True)}, dist {_f(v['ball_dist'])} px)"
                 for s, v in mm["partial_denoise_ball"].items()]
        n = next(iter(mm["partial_denoise_ball"].values()))["n"]
        lines.append(f"- Partial denoising (the real next frame noised to level s, denoised by the model): the ball survives (found within 2 px of the real one) in {'; '.join(cells)}; "
                     f"{n} cases with a real ball in the first {first} steps.")
    if mm.get("contact_sheet"):
        lines += ["", f"![contact sheet: real / model / |difference|, steps 1-{first} of clip 0]({mm['contact_sheet']})"]
    return [*lines, ""]


def _model_details(name: str, mm: dict, hold: dict, has_probe: bool, first: int) -> list[str]:
    c = mm["controllability"]
    lines = [
        f"## {name}",
        "",
        *_glance(name, mm, hold, has_probe, first),
        f"`{mm['path']}`: denoising steps {mm['denoising_steps']} ({mm['solver']}), guidance {mm['guidance']}, "
        f"{'context noise ' + str(mm['context_noise']) + ', ' if mm.get('context_noise') else ''}"
        f"{mm['nfe_per_step']} network evaluations per step; single world {_f(mm['single_world_steps_per_s'], 1)} steps/s "
        f"({_f(mm['single_world_step_ms_median'], 1)} ms), all episodes batched {_f(mm['batched_steps_per_s'], 1)} steps/s.",
        "",
        f"Tokenizer reconstruction (ceiling) {_f(mm['tokenizer_recon_psnr'])} dB; one-step teacher-forced PSNR "
        f"{_f(mm['one_step_psnr'])} dB, SSIM {_f(mm['one_step_ssim'], 3)}; rollout mean PSNR {_f(mm['rollout_psnr_mean'])} dB.",
        "",
    ]
    head = ["h", "PSNR", "hold PSNR", "SSIM", "hold SSIM"]
    if has_probe:
        head += ["paddle |dx|", "ball agree", "ball dist", "bricks |d|", "score |d|", "hold: paddle / ball / bricks"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for h, v in mm["rollout_psnr_at"].items():
        hv = _at(hold["at"], h)
        cells = [str(h), _f(v["rollout_psnr"]), _f(v["hold_last_psnr"]), _f(_at(mm["rollout_ssim_at"], h), 3), _f(hv["ssim"], 3)]
        if has_probe:
            p, hp = _at(mm["probe_at"], h), _at(hold["probe_at"], h)
            cells += [_f(p["paddle_abs_err"]), _f(p["ball_agree"], pct=True), _f(p["ball_dist"]), _f(p["bricks_abs_err"]), _f(p["score_abs_err"]),
                      f"{_f(hp['paddle_abs_err'])} / {_f(hp['ball_agree'], pct=True)} / {_f(hp['bricks_abs_err'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label, key in (("rollout", "rollout"), ("teacher-forced", "teacher_forced")):
        r, t = mm[f"reward_{key}"], mm[f"termination_{key}"]
        lines.append(f"- Reward events ({label}): precision {_f(r['precision'], pct=True)}, recall {_f(r['recall'], pct=True)} "
                     f"({r['real']} real, {r['predicted']} predicted in {r['steps']} steps), |reward error| {_f(r['abs_err'], 3)}. "
                     f"Episode end: accuracy {_f(t['accuracy'], pct=True)}, recall {_f(t['recall'], pct=True)} ({t['real']} real ends, {t['predicted']} predicted).")
    lines += [
        f"- Controllability: generated frames under random vs real actions differ by {_f(c['divergence_mean'])} "
        f"(real game: {_f(c['real_divergence_mean'])}); paddle moves as asked on {_f(c['paddle_response_real_actions'], pct=True)} "
        f"of LEFT/RIGHT steps under the real actions (real frames {_f(c['real_paddle_response_real_actions'], pct=True)}) and "
        f"{_f(c['paddle_response_random_actions'], pct=True)} under random ones (real {_f(c['real_paddle_response_random_actions'], pct=True)}).",
        "",
    ]
    return lines


def plot_curves(m: dict, out: Path) -> list[Path]:
    """psnr.png, ssim.png (every step), probe.png (per horizon bucket), control.png: one line per model,
    hold-last (or the real game) dashed. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, m["horizon"] + 1)
    paths = []
    for key, hold_key, label, fname in (("psnr_per_step", "psnr_per_step", "PSNR (dB)", "psnr.png"), ("ssim_per_step", "ssim_per_step", "SSIM (luma)", "ssim.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, mm in m["models"].items():
            ax.plot(steps, mm[key], label=name)
        ax.plot(steps, m["hold_last"][hold_key], "k--", label="hold last frame")
        ax.set(xscale="log", xlabel="rollout step", ylabel=label, title=f"{label} against horizon")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / fname))
    if m["probe"] is not None:
        fig, axes = plt.subplots(1, len(PROBE_PLOTS), figsize=(4 * len(PROBE_PLOTS), 3.5))
        for ax, (key, label) in zip(axes, PROBE_PLOTS):
            for name, mm in [*m["models"].items(), ("hold last frame", m["hold_last"])]:
                hs = [int(h) for h in mm["probe_at"]]
                ax.plot(hs, [_at(mm["probe_at"], h)[key] for h in hs], "k--" if name == "hold last frame" else "-o", label=name)
            ax.set(xscale="log", xlabel="horizon", title=label)
        axes[0].legend(fontsize=8)
        paths.append(_save(fig, out / "probe.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, mm in m["models"].items():
        ax.plot(steps, mm["controllability"]["divergence_per_step"], label=name)
    if not np.isnan(np.asarray(m["real"]["divergence_per_step"], dtype=np.float64)).all():
        ax.plot(steps, m["real"]["divergence_per_step"], "k--", label="real game")
    ax.set(xscale="log", xlabel="rollout step", ylabel="mean |pixel difference|", title="random vs real actions")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "control.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
