"""Distillation objectives of stages 3 and 4, written against plain velocity functions.

A velocity function maps (x_s (B, T, ...), s (B, T)) -> v (B, T, ...) under the flow x_s = (1 - s) x0 + s eps
(see `worldmodel.flow`). In training these are closures over the DiT's teacher-forcing pack (fixed clean
context and actions); in the tests they are small MLPs on a known toy distribution. Levels are per frame
(B, T) and every frame is an independent sample, so reductions are per frame.

Stage 3, consistency distillation with the consistency function f(x, s) = x - s F(x, s) (f(x, 0) = x holds
by construction, so no boundary skip is needed):
- `dcm_loss`, discrete time: the teacher takes one Euler step from s_k to s_{k-1} on a grid; the target is
  the student's own (stop-gradient) f at the earlier point.
- `ode_pairs` and `ode_loss`, Causal Forcing's causal ODE initialisation: the teacher (autoregressive,
  under teacher forcing) solves its probability-flow ODE from noise; the student, at the points of that
  trajectory at its own sampling levels, regresses its clean prediction onto the ODE's end.
- `scm_loss`, continuous time: the limit of the same loss. Its gradient is that of
  ||F - sg(F + df/ds)||^2 / 2 with df/ds = dx/ds - F - s dF/ds along the teacher's ODE dx/ds = v_teacher, so
  dF/ds is a Jacobian-vector product with tangents (v_teacher, 1) (`torch.func.jvp`, forward mode). The
  tangent is normalised per sample, g / (||g|| + c), and its JVP term warmed up by a factor r in [0, 1].

Stage 4, distribution matching (DMD): `dmd_loss` moves generated samples along (fake score - real score),
expressed through clean predictions of the re-noised sample, normalised by the mean absolute error of the
teacher's prediction and computed in float64; `critic_loss` trains the fake score by flow matching on the
generator's own samples.

Every DiT stage (2, 3 and 4): `head_loss`, the reward/end heads of the clean stream against the real game's
rewards and terminations; with a change gate (`DiTConfig.change_gate`), `gate_loss`, the gate against the
latent cells that really change.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from worldmodel.dit import Heads, previous_frames
from worldmodel.flow import add_noise, expand, sampling_levels, x0_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def frame_mean(x: torch.Tensor, frame_dims: int = 2) -> torch.Tensor:
    """Mean over all but the first `frame_dims` dims: (B, T, ...) -> (B, T)."""
    return x.flatten(frame_dims).mean(-1)


def masked_mean(per_frame: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_frame.mean()
    m = mask.to(per_frame.dtype)
    return (per_frame * m).sum() / m.sum().clamp(min=1)


def consistency_grid(points: int, shift: float = 1.0) -> torch.Tensor:
    """Increasing levels s_0 = 0 < s_1 < ... < s_points = 1 (float64)."""
    if points < 1:
        raise ValueError(f"the consistency grid needs at least 1 interval, got {points}")
    s = torch.linspace(0.0, 1.0, points + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def dcm_loss(student: VelocityFn, target: VelocityFn, teacher: VelocityFn, x0: torch.Tensor, eps: torch.Tensor, k: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Discrete-time consistency distillation.

    x0/eps (B, T, ...); k (B, T) grid indices in [1, len(grid) - 1]; `target` is the student without
    gradient (same weights). Loss per frame: ||f(x_{s_k}, s_k) - sg(f(x_{s_{k-1}}, s_{k-1}))||^2 / (s_k - s_{k-1}),
    where x_{s_{k-1}} is one Euler step of the teacher from x_{s_k}.
    """
    s = grid.to(x0.device)[k].float()
    s_prev = grid.to(x0.device)[k - 1].float()
    x_s = add_noise(x0, eps, s)
    with torch.no_grad():
        x_prev = x_s + expand(s_prev - s, x_s) * teacher(x_s, s).float()
        f_target = x0_from_velocity(x_prev, target(x_prev, s_prev).float(), s_prev)
    f = x0_from_velocity(x_s, student(x_s, s).float(), s)
    per_frame = frame_mean((f - f_target) ** 2) / (s - s_prev)
    loss = masked_mean(per_frame, mask)
    return loss, {"loss/dcm": loss.item()}


def ode_levels(ode_steps: int, student_steps: int) -> tuple[list[float], list[float]]:
    """The teacher's ODE grid (`ode_steps` uniform Euler steps from 1 to 0, the student's levels joined in) and
    the student's levels above 0 (`student_steps` steps), each of them a point of that grid: a student level
    within 1e-9 of a grid level is that level, so no near-duplicate step is taken."""
    grid = sampling_levels(ode_steps)
    keep = [next((g for g in grid if abs(g - s) < 1e-9), s) for s in sampling_levels(student_steps)[:-1]]
    return sorted(set(grid) | set(keep), reverse=True), keep


def at_levels(points: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Points (K, B, T, ...) of a trajectory and an index k (B, T) into K -> each frame's point (B, T, ...)."""
    B, T = points.shape[1:3]
    return points.movedim(0, 2)[torch.arange(B, device=k.device)[:, None], torch.arange(T, device=k.device)[None], k]


@torch.no_grad()
def ode_pairs(teacher: VelocityFn, eps: torch.Tensor, levels: list[float], keep: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler along the teacher's probability-flow ODE from x = eps at levels[0] = 1 down the decreasing
    `levels` to 0, without gradient. Returns the trajectory's points at the levels in `keep` (each one of
    `levels`, above 0), stacked (K, B, T, ...), and where it ends, the ODE's clean sample (B, T, ...)."""
    if levels[0] != 1 or levels[-1] != 0 or any(a <= b for a, b in zip(levels, levels[1:])):
        raise ValueError(f"the ODE runs on levels decreasing from 1 to 0, got {levels}")
    missing = [s for s in keep if s not in levels or s == 0]
    if missing:
        raise ValueError(f"the levels to keep {missing} are not points of the ODE's levels above 0 {levels}")
    x, points = eps, {}
    for s, s_next in zip(levels[:-1], levels[1:]):
        if s in keep:
            points[s] = x
        x = x + (s_next - s) * teacher(x, torch.full(x.shape[:2], s, device=x.device)).float()
    return torch.stack([points[s] for s in keep]), x


def ode_loss(student: VelocityFn, x_s: torch.Tensor, s: torch.Tensor, x0_ode: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's clean prediction at points x_s (B, T, ...) of the teacher's ODE, levels s (B, T), against
    that ODE's end x0_ode: per-frame mean squared error."""
    f = x0_from_velocity(x_s, student(x_s, s).float(), s)
    loss = masked_mean(frame_mean((f - x0_ode) ** 2), mask)
    return loss, {"loss/ode": loss.item()}


def scm_loss(student: VelocityFn, teacher: VelocityFn, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, warmup: float, mask: torch.Tensor | None = None, norm_const: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Continuous-time consistency distillation (sCM), rectified-flow form; s (B, T) in (0, 1].

    The JVP runs through `student` in forward mode without gradient (`student` must be a pure function of
    its inputs and parameters, with an attention path that supports forward-mode AD: see
    `worldmodel.attention.attention_backend("math")`); a second, ordinary call carries the gradient.
    """
    x_s = add_noise(x0, eps, s)
    with torch.no_grad():
        dx = teacher(x_s, s).float()  # the teacher's ODE: dx/ds
        F_minus, dF = torch.func.jvp(student, (x_s, s), (dx.to(x_s.dtype), torch.ones_like(s)))
        F_minus, dF = F_minus.float(), dF.float()
        g = dx - F_minus - warmup * expand(s, dF) * dF  # df/ds, the JVP term warmed up
        g_norm = g.flatten(2).norm(dim=-1)  # (B, T)
        g = g / expand(g_norm + norm_const, g)
        target = F_minus + g
    F = student(x_s, s).float()
    per_frame = frame_mean((F - target) ** 2)
    loss = masked_mean(per_frame, mask)
    return loss, {"loss/scm": loss.item(), "scm/tangent_norm": masked_mean(g_norm, mask).item()}


def dmd_loss(x0_gen: torch.Tensor, real: VelocityFn, fake: VelocityFn, s: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Distribution-matching loss on generated clean samples x0_gen (B, T, ...) (with gradient to the generator).

    The sample is re-noised at s (B, T); real and fake clean predictions give the gradient
    (fake - real) / mean|x0_gen - real| per frame, which the float64 MSE against a stop-gradient target hands
    to x0_gen unchanged. Frames where the gradient is not finite are zeroed (and counted).
    """
    with torch.no_grad():
        x_s = add_noise(x0_gen.detach().float(), eps, s)
        pred_real = x0_from_velocity(x_s, real(x_s, s).float(), s)
        pred_fake = x0_from_velocity(x_s, fake(x_s, s).float(), s)
        norm = frame_mean((x0_gen.detach().float() - pred_real).abs()).clamp(min=1e-6)  # (B, T)
        grad = (pred_fake - pred_real) / expand(norm, pred_real)
        finite = torch.isfinite(grad).flatten(2).all(-1)  # (B, T)
        grad = torch.where(expand(finite, grad), grad, torch.zeros_like(grad))
    x = x0_gen.double()
    per_frame = 0.5 * frame_mean((x - (x - grad.double()).detach()) ** 2)
    m = finite if mask is None else (mask & finite)
    loss = masked_mean(per_frame, m)
    stats = {"loss/dmd": loss.item(), "dmd/grad_norm": masked_mean(frame_mean(grad.abs()), m).item(), "dmd/nonfinite": float((~finite).sum())}
    return loss, stats


def critic_loss(fake: VelocityFn, x0_gen: torch.Tensor, s: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow matching of the fake score on the generator's samples (detached)."""
    x0 = x0_gen.detach().float()
    x_s = add_noise(x0, eps, s)
    per_frame = frame_mean((fake(x_s, s).float() - (eps - x0)) ** 2)
    loss = masked_mean(per_frame, mask)
    return loss, {"loss/critic": loss.item()}


def head_loss(heads: Heads, rewards: torch.Tensor, terminated: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-event BCE + squared reward value on the steps that paid one + episode-end BCE, on real labels
    (B, T); heads of a guided pass (2B rows, the conditional half first) are cut to the labels' B."""
    B = rewards.shape[0]
    r = rewards.float()
    event = (r != 0).float()
    l_event = F.binary_cross_entropy_with_logits(heads.reward_logit[:B], event)
    l_value = ((heads.reward_value[:B] - r) ** 2 * event).sum() / event.sum().clamp(min=1)
    l_end = F.binary_cross_entropy_with_logits(heads.end_logit[:B], terminated.float())
    total = l_event + l_value + l_end
    return total, {"loss/reward_event": l_event.item(), "loss/reward_value": l_value.item(), "loss/end": l_end.item(), "loss/heads": total.item()}


def gate_loss(logit: torch.Tensor, x0: torch.Tensor, frames_per_chunk: int, threshold: float,
              context: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The change gate's cross-entropy: logits (B, T, G, h, w) against the latent cells of the real window x0
    (B, T, C, h, w) that differ (any of the decision's channels, i % G, by more than `threshold`) from the previous frame the network was
    given: that of `context` (B, T, C, h, w), the clean stream it read (default: x0 itself). Under error
    recycling the context holds the network's own frames, so a cell its own error spoiled is a cell to rewrite,
    as it is at play. Over the frames after the first chunk (the first has no previous frame). Also logs the
    share of cells that change and the gate's recall and precision at probability 0.5."""
    prev = previous_frames(x0 if context is None else context, frames_per_chunk)
    B, T, C, h, w = x0.shape
    G = logit.shape[2]  # the gate's grain (DiTConfig.gate_channels): decision j covers the channels i with i % G == j
    target = ((x0 - prev).abs().reshape(B, T, C // G, G, h, w).amax(dim=2) > threshold)[:, frames_per_chunk:]
    z = logit[:, frames_per_chunk:].float()
    loss = F.binary_cross_entropy_with_logits(z, target.float())
    said = z > 0
    tp = (said & target).sum().item()
    return loss, {"loss/gate": loss.item(), "gate/changed_cells": target.float().mean().item(),
                  "gate/recall": tp / max(target.sum().item(), 1), "gate/precision": tp / max(said.sum().item(), 1)}
