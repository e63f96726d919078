"""One generation path for training and play: the Self Forcing rollout (`train.dmd.rollout`) runs the same
sampler as the runtime (`worldmodel.sampler.denoise` / `recache`). With gradients off and the exit step at
the last step it plays exactly what `WorldModel.step_batch` plays; with gradients on, each generated chunk
carries the gradient of its exit step only, and the cache is detached between chunks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.dmd import rollout
from worldmodel.config import TokenizerConfig, dit_config
from worldmodel.dit import CausalDiT
from worldmodel.flow import sampling_levels, x0_from_velocity
from worldmodel.runtime import WorldModel
from worldmodel.sampler import denoise, recache, solver_step
from worldmodel.tokenizer import FrameTokenizer

EXACT = dict(atol=0.0, rtol=0.0)  # the same functions on the same numbers in the same order
TOK = TokenizerConfig(kind="patch", frame_size=(8, 8), patch=2)  # no weights: (8, 8, 3) frames <-> (12, 4, 4) latents


def make_dit(frames_per_chunk: int = 1, seed: int = 0) -> CausalDiT:
    """A tiny DiT on the patch tokenizer's latents, every weight random (adaLN-Zero would make a fresh one
    ignore its input), with a window short enough that the rollouts below slide past it."""
    torch.manual_seed(seed)
    cfg = dit_config("tiny", in_channels=TOK.channels, latent_size=TOK.latent_size, num_actions=4, frames_per_chunk=frames_per_chunk, sink_chunks=1, window_chunks=2)
    model = CausalDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def reference_rollout(student: CausalDiT, latents: torch.Tensor, actions: torch.Tensor, context: int, levels: list[float], g: torch.Generator, grad: bool) -> torch.Tensor:
    """The Self Forcing loop as train.dmd wrote it by hand before it called the sampler (the slow reference)."""
    Fc = student.cfg.frames_per_chunk
    B, T = actions.shape
    cache = student.new_cache(B)
    out = [latents[:, :context].float()]
    with torch.no_grad():
        for i in range(0, context, Fc):
            student.forward_cached(latents[:, i:i + Fc].float(), torch.zeros(B, Fc), actions[:, i:i + Fc], cache, commit=True)
    K = len(levels) - 1
    for i in range(context, T, Fc):
        a = actions[:, i:i + Fc]
        x = torch.randn(B, Fc, student.cfg.in_channels, *student.cfg.latent_size, generator=g)
        exit_step = int(torch.randint(0, K, (1,), generator=g))
        with torch.no_grad():
            for k in range(exit_step):
                v, _ = student.forward_cached(x, torch.full(a.shape, levels[k]), a, cache)
                x = solver_step(x, v, levels[k], levels[k + 1], "consistency", g)
        t = torch.full(a.shape, levels[exit_step])
        with torch.set_grad_enabled(grad):
            v, _ = student.forward_cached(x, t, a, cache)
            x0 = x0_from_velocity(x.float(), v.float(), t)
        out.append(x0)
        with torch.no_grad():
            student.forward_cached(x0.detach(), torch.zeros(a.shape), a, cache, commit=True)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("steps,frames_per_chunk", [(1, 1), (3, 1), (4, 2)])
def test_rollout_at_the_last_exit_step_plays_like_the_runtime(steps, frames_per_chunk):
    """Same model, context, actions and noise (the rollout's generator seeded like the runtime's world 0):
    the rollout's generated latents equal the runtime's chunk by chunk, and so do the decoded frames."""
    dit = make_dit(frames_per_chunk)
    tok = FrameTokenizer(TOK)
    Fc, context, n_chunks, seed = frames_per_chunk, 2 * frames_per_chunk, 5, 11  # 2 + 5 chunks: past sinks + window
    rng = np.random.default_rng(0)
    ctx_frames = rng.integers(0, 256, (1, context, *TOK.frame_size, 3), dtype=np.uint8)
    ctx_actions = rng.integers(0, 4, (1, context))
    chunk_actions = rng.integers(0, 4, n_chunks)

    wm = WorldModel(dit, tok, {"sampling": {"steps": steps, "guidance": 1.0, "solver": "consistency"}})
    played_latents = []
    runtime_denoise = wm._denoise

    def spy(actions):
        x0, a = runtime_denoise(actions)
        played_latents.append(x0)
        return x0, a

    wm._denoise = spy
    wm.reset(ctx_frames, ctx_actions, seed=seed)
    played = np.concatenate([wm.step_batch([int(a)]) for a in chunk_actions], axis=1)  # (1, n*F, H, W, 3)
    played_latents = torch.cat(played_latents, dim=1)  # (1, n*F, C, h, w)

    latents = tok.encode(ctx_frames[0])[None]  # (1, context, C, h, w), as the runtime encodes its context
    actions = torch.cat([torch.as_tensor(ctx_actions), torch.as_tensor(chunk_actions).repeat_interleave(Fc)[None]], dim=1)  # (1, T)
    levels = sampling_levels(steps)
    gen = rollout(dit, latents, actions, context, levels, torch.Generator().manual_seed(seed), grad=False, exit_step=steps - 1)
    assert not gen.requires_grad  # grad=False alone keeps the graph off (the DiT's parameters do require grad)
    torch.testing.assert_close(gen[:, :context], latents, **EXACT)
    torch.testing.assert_close(gen[:, context:], played_latents, **EXACT)
    frames = tok.decode(gen[0, context:]).numpy()  # (n*F, H, W, 3)
    np.testing.assert_array_equal(frames, played[0])

    # not vacuous: the chunks are not noise-free copies of each other, and another exit step plays other latents
    assert (played_latents[:, Fc:] - played_latents[:, :-Fc]).abs().max() > 1e-2
    if steps > 1:
        with torch.no_grad():
            early = rollout(dit, latents, actions, context, levels, torch.Generator().manual_seed(seed), grad=False, exit_step=0)
        assert (early[:, context:] - played_latents).abs().max() > 1e-3


@pytest.mark.parametrize("frames_per_chunk", [1, 2])
def test_rollout_equals_the_hand_written_self_forcing_loop(frames_per_chunk):
    """Random exit steps drawn per chunk (training): the same values, the same draws from the generator and
    the same parameter gradients as the loop train.dmd had before it called the sampler."""
    B, context, T, levels = 2, 2, 10, sampling_levels(4)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(B, T, TOK.channels, *TOK.latent_size, generator=g)
    actions = torch.randint(0, 4, (B, T), generator=g)
    results = []
    for fn in (reference_rollout, rollout):
        model = make_dit(frames_per_chunk).train()
        gen = torch.Generator().manual_seed(7)
        out = fn(model, latents, actions, context, levels, gen, grad=True)
        (out[:, context:] ** 2).mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, torch.randn(4, generator=gen)))
    (want, want_grads, want_next), (got, got_grads, got_next) = results
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(got_next, want_next, **EXACT)  # the generator was drawn from exactly as often
    assert [n for n, d in got_grads.items() if d is None] == [n for n, d in want_grads.items() if d is None]  # the heads: not in this loss
    assert all(got_grads[n] is not None for n, _ in make_dit().blocks.named_parameters(prefix="blocks"))
    for n, d in want_grads.items():
        if d is not None:
            torch.testing.assert_close(got_grads[n], d, **EXACT, msg=n)


@pytest.mark.parametrize("exit_step", [0, 2, 3])
def test_only_the_exit_step_carries_the_gradient_and_chunks_are_detached(exit_step):
    """With gradients on: of every chunk's denoiser calls only the exit step's output needs a gradient, its
    input does not (the steps before it are cut off), the context and re-cache passes run without one, and a
    chunk gets no gradient through the cache from the chunks before it (detached between chunks)."""
    model = make_dit().train()
    B, context, n_chunks, levels = 2, 2, 3, sampling_levels(4)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(B, context, TOK.channels, *TOK.latent_size, generator=g)
    actions = torch.randint(0, 4, (B, context + n_chunks), generator=g)
    calls = []  # (level, commit, input needs grad, output)
    orig = model.forward_cached

    def spy(x, t, a, cache, commit=False, gate=False):
        v, heads = orig(x, t, a, cache, commit, gate)
        calls.append((float(t[0, 0]), commit is not False, x.requires_grad, v))
        return v, heads

    model.forward_cached = spy
    out = rollout(model, latents, actions, context, levels, torch.Generator().manual_seed(1), grad=True, exit_step=exit_step)
    model.forward_cached = orig

    assert [c[1] for c in calls[:context]] == [True] * context and all(c[3] is None for c in calls[:context])  # commit passes: no output
    per_chunk = exit_step + 2  # steps before the exit, the exit step, the re-cache pass
    assert len(calls) == context + n_chunks * per_chunk
    exits = []
    for j in range(n_chunks):
        chunk = calls[context + j * per_chunk:context + (j + 1) * per_chunk]
        assert [c[0] for c in chunk] == [*levels[:exit_step + 1], 0.0] and [c[1] for c in chunk] == [False] * (exit_step + 1) + [True]
        assert [c[3].requires_grad for c in chunk[:-1]] == [False] * exit_step + [True], f"chunk {j}: only the exit step needs a gradient"
        assert chunk[-1][3] is None  # the re-cache pass
        assert not chunk[exit_step][2], f"chunk {j}: the exit step's input must come from the chain without gradient"
        exits.append(chunk[exit_step][3])
    torch.testing.assert_close(out[:, :context], latents, **EXACT)
    for j in range(n_chunks):  # chunk j + 1 reads chunk j through the cache: a gradient there would be non-zero
        mine = torch.autograd.grad(out[:, context + j].sum(), exits, retain_graph=True)
        assert [bool(d.abs().sum() > 0) for d in mine] == [i == j for i in range(n_chunks)], f"chunk {j} must get its gradient from its own exit step only"
    (out[:, context:] ** 2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks.parameters())


def test_denoise_exit_step_is_checked():
    model = make_dit()
    levels = sampling_levels(2)
    x = torch.randn(1, 1, TOK.channels, *TOK.latent_size)
    a = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        last, whole = (denoise(model, model.new_cache(1), a, x, levels, solver="consistency", generator=torch.Generator().manual_seed(0), exit_step=k)
                       for k in (1, None))
        torch.testing.assert_close(last, whole, **EXACT)
        with pytest.raises(ValueError, match="exit_step must index one of the 2 steps"):
            denoise(model, model.new_cache(1), a, x, levels, exit_step=2)
        with pytest.raises(ValueError, match="levels must end at 0"):
            denoise(model, model.new_cache(1), a, x, [1.0, 0.5], exit_step=0)
        _, heads = recache(model, model.new_cache(1), x, a)
    assert not heads.end_logit.requires_grad  # the caller's no_grad holds inside the sampler
