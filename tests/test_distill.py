"""Distillation objectives on problems with a known answer.

The toy data is a 2-D Gaussian mixture, for which the exact flow velocity v(x, s) = E[eps - x0 | x_s] is
known in closed form: it plays the many-step teacher. Consistency distillation must make a 1-step sampler
land where the teacher's ODE lands from the same noise; DMD must move a generator onto the data
distribution while the critic tracks the generator. And the JVP through the tiny DiT matches finite
differences.
"""
from __future__ import annotations

import dataclasses

import math

import pytest
import torch
import torch.nn as nn

from train.objectives import at_levels, consistency_grid, critic_loss, dcm_loss, dmd_loss, ode_levels, ode_loss, ode_pairs, scm_loss
from worldmodel.attention import attention_backend
from worldmodel.config import dit_config
from worldmodel.dit import CausalDiT
from worldmodel.flow import sampling_levels


class GaussianMixture:
    """Isotropic components N(mu_k, sigma_k^2 I) with weights w_k, and the exact rectified-flow velocity."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor) -> None:
        self.mu, self.sigma, self.w = mu.double(), sigma.double(), w.double() / w.sum()

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.w, n, replacement=True, generator=g)
        return self.mu[k] + self.sigma[k, None] * torch.randn(n, self.mu.shape[1], generator=g, dtype=torch.float64)

    def velocity(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), s (B, T) -> E[eps - x0 | x_s = x] (B, T, d)."""
        xd, sd = x.double()[..., None, :], s.double()[..., None, None]  # (B, T, 1, d), (B, T, 1, 1)
        mu, var0 = self.mu, self.sigma[:, None] ** 2  # (K, d), (K, 1)
        var = (1 - sd) ** 2 * var0 + sd**2  # (B, T, K, 1)
        r = xd - (1 - sd) * mu  # (B, T, K, d)
        logp = torch.log(self.w)[:, None] - 0.5 * (r**2 / var).sum(-1, keepdim=True) - 0.5 * mu.shape[1] * torch.log(var)
        post = torch.softmax(logp, dim=-2)  # (B, T, K, 1)
        e_x0 = mu + (1 - sd) * var0 / var * r
        e_eps = sd / var * r
        return (post * (e_eps - e_x0)).sum(-2).to(x.dtype)


MIXTURE = GaussianMixture(torch.tensor([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]]), torch.tensor([0.3, 0.4, 0.3]), torch.tensor([0.3, 0.3, 0.4]))


# sCM needs a time embedding of low frequency (the sCM paper makes the same point): with features up to
# ~200 rad per unit of s the JVP term dominates and continuous-time training diverges on this toy.
FREQ_SCALE = 0.05


class VelocityMLP(nn.Module):
    """(x (B, T, d), s (B, T)) -> velocity (B, T, d)."""

    def __init__(self, d: int = 2, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        f = torch.arange(8, dtype=x.dtype, device=x.device)
        ang = s[..., None] * (2.0 ** f) * math.pi / 2 * FREQ_SCALE
        return self.net(torch.cat([x, ang.sin(), ang.cos()], dim=-1))


def ode_sample(v, eps: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler along the teacher's ODE from s = 1 to 0."""
    x = eps
    lv = torch.linspace(1, 0, steps + 1)
    for s, s2 in zip(lv[:-1], lv[1:]):
        x = x + (s2 - s) * v(x, torch.full(x.shape[:2], float(s), dtype=x.dtype))
    return x


@torch.no_grad()
def one_step_error(student: VelocityMLP, eps: torch.Tensor, ode: torch.Tensor) -> float:
    """Mean squared distance from the student's 1-step samples of `eps` to where the teacher's ODE takes them."""
    x0 = eps - student(eps, torch.ones(eps.shape[:2]))
    return float(((x0 - ode) ** 2).sum(-1).mean())


def pretrain_flow(model: VelocityMLP, steps: int, g: torch.Generator) -> None:
    """The student starts from (a cheap copy of) the teacher, as in stage 3: fit the exact velocity."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = MIXTURE.sample(256, g).float()[:, None]
        eps = torch.randn(x0.shape, generator=g)
        s = torch.rand(256, 1, generator=g)
        x_s = (1 - s[..., None]) * x0 + s[..., None] * eps
        loss = ((model(x_s, s) - MIXTURE.velocity(x_s, s)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("variant", ["dcm", "scm"])
def test_consistency_distillation_makes_one_step_match_the_teacher_ode(variant):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    student = VelocityMLP()
    pretrain_flow(student, 300, g)
    teacher = MIXTURE.velocity
    eps_test = torch.randn(2048, 1, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ode = ode_sample(teacher, eps_test, 200)  # where the teacher's ODE takes each noise

    before = one_step_error(student, eps_test, ode)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    grid = consistency_grid(48)
    for it in range(1500):
        x0 = MIXTURE.sample(512, g).float()[:, None]
        eps = torch.randn(x0.shape, generator=g)
        if variant == "dcm":
            k = torch.randint(1, len(grid), (512, 1), generator=g)
            loss, _ = dcm_loss(student, lambda x, s: student(x, s), teacher, x0, eps, k, grid)
        else:
            s = torch.rand(512, 1, generator=g).clamp(min=0.02)
            loss, _ = scm_loss(student, teacher, x0, eps, s, warmup=min(1.0, it / 500))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = one_step_error(student, eps_test, ode)
    with torch.no_grad():
        naive = float(((ode_sample(teacher, eps_test, 1) - ode) ** 2).sum(-1).mean())  # the teacher at 1 step
    # the distilled 1-step map lands far closer to the teacher's ODE than the teacher's own 1 step, or the start
    assert after < 0.2 * naive and after < 0.3 * before, (variant, before, after, naive)


def test_ode_initialisation_learns_the_teacher_ode_map():
    """Causal Forcing's ODE initialisation on the toy: pairs (noise, where the teacher's ODE takes it) and the
    ODE's point at the student's second level; the 2-step student regresses onto the ODE's end from both."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    student = VelocityMLP()
    pretrain_flow(student, 300, g)
    teacher = MIXTURE.velocity
    keep = [1.0, 0.5]
    eps_pairs = torch.randn(8192, 1, 2, generator=g)
    points, x0_ode = ode_pairs(teacher, eps_pairs, sampling_levels(100), keep)
    eps_test = torch.randn(2048, 1, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ode = ode_sample(teacher, eps_test, 200)
        assert torch.equal(points[0], eps_pairs)  # the trajectory starts at the noise,
        x = eps_pairs[:4]
        for i in range(50):  # passes 0.5 after 50 of its 100 steps,
            x = x - 0.01 * teacher(x, torch.full((4, 1), 1 - 0.01 * i))
        torch.testing.assert_close(points[1, :4], x, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x0_ode[:4], ode_sample(teacher, points[0, :4], 100), atol=1e-4, rtol=1e-4)  # and ends where the ODE does

    before = one_step_error(student, eps_test, ode)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(1000):
        i = torch.randint(0, 8192, (512,), generator=g)
        k = torch.randint(0, 2, (512, 1), generator=g)
        x_s = points[k[:, 0], i]
        loss, parts = ode_loss(student, x_s, torch.tensor(keep)[k], x0_ode[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = one_step_error(student, eps_test, ode)
    with torch.no_grad():
        naive = float(((ode_sample(teacher, eps_test, 1) - ode) ** 2).sum(-1).mean())
        mid = points[1, :2048]
        second = float(((mid - 0.5 * student(mid, torch.full((2048, 1), 0.5)) - x0_ode[:2048]) ** 2).sum(-1).mean())
    assert after < 0.2 * naive and after < 0.3 * before, (before, after, naive)
    assert second < 0.2 * naive and "loss/ode" in parts
    with pytest.raises(ValueError, match="not points of the ODE"):
        ode_pairs(teacher, eps_test, sampling_levels(4), [0.6])


def test_ode_levels_and_the_gather_of_trajectory_points():
    """ode_levels joins the student's levels to the teacher's grid without near-duplicates; at_levels gives
    every frame the trajectory point of its own level (one level per chunk of 2 frames here)."""
    levels, keep = ode_levels(16, 4)
    assert keep == [1.0, 0.75, 0.5, 0.25] and levels == sampling_levels(16)  # already grid points
    levels, keep = ode_levels(16, 3)
    assert len(levels) == 17 + 2 and all(s in levels for s in keep) and all(a > b for a, b in zip(levels, levels[1:]))
    for ode_steps, student_steps in ((15, 3), (30, 3), (35, 5), (98, 2)):  # grids whose levels differ from the student's by ~1e-16
        levels, keep = ode_levels(ode_steps, student_steps)
        assert len(levels) == ode_steps + 1 and all(s in levels for s in keep), (ode_steps, student_steps)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(4, 3, 6, 2, 5, generator=g)  # (K, B, T, ...)
    k = torch.randint(0, 4, (3, 3), generator=g).repeat_interleave(2, 1)  # (B, T): chunks of 2 frames share a level
    got = at_levels(points, k)
    for b in range(3):
        for t in range(6):
            assert torch.equal(got[b, t], points[k[b, t], b, t])


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def test_dmd_moves_a_generator_to_the_data_and_the_critic_tracks_it():
    """One-step generator G(z) = MLP(z) starts off the data; DMD with the exact real score and an online
    critic pulls it onto the mixture. The critic, trained only on generator samples, must denoise them
    better than the real score does (it tracks the generator, not the data)."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    gen = nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
    with torch.no_grad():  # start as a narrow blob away from the data
        gen[-1].weight.mul_(0.1)
        gen[-1].bias.copy_(torch.tensor([0.5, 4.0]))
    critic = VelocityMLP()
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(critic.parameters(), lr=2e-3)
    data = MIXTURE.sample(2048, torch.Generator().manual_seed(5)).float()
    z_test = torch.randn(2048, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        start = energy_distance(gen(z_test), data)

    def levels(n: int) -> torch.Tensor:
        return torch.rand(n, 1, generator=g) * 0.96 + 0.02

    for it in range(1500):
        for _ in range(4):  # several critic updates per generator update
            with torch.no_grad():
                x = gen(torch.randn(256, 2, generator=g))[:, None]
            loss_c, _ = critic_loss(critic, x, levels(256), torch.randn(x.shape, generator=g))
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
        x = gen(torch.randn(256, 2, generator=g))[:, None]
        loss, stats = dmd_loss(x, MIXTURE.velocity, critic, levels(256), torch.randn(x.shape, generator=g))
        assert loss.dtype == torch.float64 and stats["dmd/nonfinite"] == 0
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    with torch.no_grad():
        samples = gen(z_test)
        end = energy_distance(samples, data)
        # the critic tracks the generator: on generator samples it denoises better than the data's score
        x = samples[:, None]
        s = levels(2048)
        eps = torch.randn(x.shape, generator=g)
        c_loss, _ = critic_loss(critic, x, s, eps)
        r_loss, _ = critic_loss(MIXTURE.velocity, x, s, eps)
    assert end < 0.1 * start, (start, end)
    assert end < 0.05, end
    assert c_loss <= r_loss * 1.05, (c_loss, r_loss)
    # every mode is reached
    near = torch.cdist(samples, MIXTURE.mu.float()).argmin(1)
    assert set(near.tolist()) == {0, 1, 2}


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    x = torch.randn(3, 2, 4, requires_grad=True)
    s = torch.full((3, 2), 0.5)
    eps = torch.randn(3, 2, 4)
    real = lambda xs, s: torch.zeros_like(xs)  # noqa: E731  (pred_real = x_s)
    fake = lambda xs, s: torch.ones_like(xs)  # noqa: E731  (pred_fake = x_s - s)
    loss, _ = dmd_loss(x, real, fake, s, eps)
    loss.backward()
    x_s = 0.5 * x.detach() + 0.5 * eps
    norm = (x.detach() - x_s).abs().mean(-1, keepdim=True)
    want = (-0.5 / norm).expand(3, 2, 4) / (3 * 2 * 4)  # (fake - real) / norm, averaged over elements
    torch.testing.assert_close(x.grad, want.float())


def test_dit_jvp_matches_finite_differences():
    """sCM's tangent: the forward-mode JVP of the tiny DiT's pack (math attention) against central
    differences in float64."""
    torch.manual_seed(0)
    cfg = dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, sink_chunks=1, window_chunks=2)
    model = CausalDiT(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    B, T = 2, 5  # past sinks + window: the dual-rotation path is in play too
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(B, T, 4, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(B, T, 4, 4, 4, generator=g, dtype=torch.float64)
    s = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.8 + 0.1
    a = torch.randint(0, 4, (B, T), generator=g)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ds = torch.ones_like(s)

    def f(x_, s_):
        return model.forward_pack(clean, x_, torch.zeros_like(s_), s_, a)[0]

    with attention_backend("math"), torch.no_grad():
        _, jvp = torch.func.jvp(f, (x, s), (dx, ds))
        h = 1e-7
        fd = (f(x + h * dx, s + h * ds) - f(x - h * dx, s - h * ds)) / (2 * h)
    scale = float(fd.abs().max())  # large: the time embedding runs at 1000 s (see the sCM note above)
    assert scale > 1e-2  # not trivially zero
    torch.testing.assert_close(jvp, fd, atol=1e-6 * scale, rtol=1e-5)


def test_low_time_scale_keeps_the_level_derivative_small():
    """DiTConfig.time_scale: with the same weights, the network's derivative in the noise level (sCM's tangent
    term) is far smaller at time_scale 1 than at DiT's 1000, while its outputs still depend on the level."""
    torch.manual_seed(0)
    cfg = dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, sink_chunks=1, window_chunks=2)
    fast = CausalDiT(cfg).double().eval()
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0, 0.3)
    slow = CausalDiT(dataclasses.replace(cfg, time_scale=1.0)).double().eval()
    slow.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(1)
    clean, x = (torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    s = torch.rand(2, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1
    a = torch.randint(0, 4, (2, 3), generator=g)

    def d_ds(model):
        with attention_backend("math"), torch.no_grad():
            out, tangent = torch.func.jvp(lambda s_: model.forward_pack(clean, x, torch.zeros_like(s_), s_, a)[0], (s,), (torch.ones_like(s),))
        return out, float(tangent.abs().max())

    (_, fast_d), (out_slow, slow_d) = d_ds(fast), d_ds(slow)
    assert slow_d * 50 < fast_d and slow_d > 0
    with torch.no_grad():
        other = slow.forward_pack(clean, x, torch.zeros_like(s), s * 0.5, a)[0]
    assert (other - out_slow).abs().max() > 1e-3  # the level is still read
    with pytest.raises(ValueError, match="time_scale"):
        dataclasses.replace(cfg, time_scale=0.0)
