"""The causal DiT and its KV cache: cached generation equals the full-sequence forward; causality; long play."""
from __future__ import annotations

import pytest
import torch

from worldmodel.config import dit_config
from worldmodel.dit import CausalDiT
from worldmodel.flow import sampling_levels
from worldmodel.sampler import generate_chunk

TOL = dict(atol=5e-5, rtol=1e-4)  # float32, different summation orders (x0 outputs are divided by levels down to 0.05)


def make_model(seed: int = 0, **over) -> CausalDiT:
    torch.manual_seed(seed)
    cfg = dit_config("tiny", **{"in_channels": 4, "latent_size": (4, 4), "num_actions": 4, **over})
    model = CausalDiT(cfg).eval()
    # adaLN-Zero makes a fresh model ignore most of its input: randomise every weight so the tests bite
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        if model.refiner is not None:  # convolutions of fan-in 90 (10 channels, 3x3): smaller, or float32 rounding dominates
            for p in model.refiner.parameters():
                p.normal_(0, 0.1)
    return model


INPUTS = {"plain": {}, "prev": dict(prev_frame=True), "delta": dict(delta=True), "prev+delta": dict(prev_frame=True, delta=True),
          "x0": dict(predict="x0"), "x0+prev+delta": dict(predict="x0", prev_frame=True, delta=True),
          "edm": dict(predict="edm"), "edm+prev+delta": dict(predict="edm", prev_frame=True, delta=True, sigma_data=0.1),
          # the pixel refiner: latents of 2x2 pixel patches (12 channels), 8x8 pixels per frame
          "edm+prev+delta+out": dict(predict="edm", prev_frame=True, delta=True, sigma_data=0.1, out_hidden=24),  # the MLP output layer
          # previous frames stacked (DIAMOND): 2 and 3 frames before each chunk, with one- and two-frame chunks
          "x0+prev2+delta": dict(predict="x0", prev_frame=True, prev_stack=2, delta=True),
          "edm+prev3+delta": dict(predict="edm", prev_frame=True, prev_stack=3, delta=True, sigma_data=0.1),
          "x0+refine": dict(predict="x0", in_channels=12, pixel_patch=2, refine=4),
          "edm+prev+delta+refine": dict(predict="edm", prev_frame=True, delta=True, sigma_data=0.1, in_channels=12, pixel_patch=2, refine=4)}


@pytest.mark.parametrize("frames_per_chunk,sinks,window,inputs", [(1, 1, 3, "plain"), (2, 2, 2, "plain"), (1, 0, 2, "plain"),
                                                                   (1, 1, 3, "prev"), (2, 2, 2, "prev+delta"), (1, 1, 3, "delta"),
                                                                   (1, 1, 3, "x0"), (2, 1, 2, "x0+prev+delta"),
                                                                   (1, 1, 3, "edm"), (2, 1, 2, "edm+prev+delta"),
                                                                   (1, 1, 3, "x0+refine"), (2, 1, 2, "edm+prev+delta+refine"),
                                                                   (2, 1, 2, "edm+prev+delta+out"),
                                                                   (1, 1, 3, "x0+prev2+delta"), (2, 1, 2, "x0+prev2+delta"),
                                                                   (1, 1, 3, "edm+prev3+delta"), (2, 1, 2, "edm+prev3+delta")])
def test_cached_generation_equals_full_forward(frames_per_chunk, sinks, window, inputs):
    """Generate chunk by chunk with the cache (sinks + window active well past the window), record every
    denoiser call, then replay the same inputs through the teacher-forcing pack in one forward. With the
    previous-frame inputs this also checks that the cache keeps the same previous frame as the pack."""
    model = make_model(frames_per_chunk=frames_per_chunk, sink_chunks=sinks, window_chunks=window, **INPUTS[inputs])
    cfg = model.cfg
    n_chunks, Fc, B = sinks + window + 5, frames_per_chunk, 2
    g = torch.Generator().manual_seed(1)
    actions = torch.randint(0, cfg.num_actions, (B, n_chunks * Fc), generator=g)
    levels = sampling_levels(3)
    cache = model.new_cache(B)
    calls: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (chunk, level, input, output)
    orig = model.forward_cached

    def spy(x, t, a, c, commit=False, gate=False):
        v, h = orig(x, t, a, c, commit, gate)
        if not commit:
            calls.append((int(c.n_chunks[0]), float(t[0, 0]), x.clone(), v.clone()))
        return v, h

    model.forward_cached = spy
    clean, heads_cached = [], []
    for i in range(n_chunks):
        noise = torch.randn(B, Fc, cfg.in_channels, *cfg.latent_size, generator=g)
        x0, heads = generate_chunk(model, cache, actions[:, i * Fc:(i + 1) * Fc], noise, levels)
        clean.append(x0)
        heads_cached.append(heads.end_logit)
    model.forward_cached = orig
    clean = torch.cat(clean, dim=1)  # (B, T, C, h, w)
    assert cache.max_position() < (sinks + window + 1) * Fc

    for step, s in enumerate(levels[:-1]):
        step_calls = [c for c in calls if abs(c[1] - s) < 1e-6]
        assert len(step_calls) == n_chunks
        noisy = torch.cat([c[2] for c in step_calls], dim=1)
        want = torch.cat([c[3] for c in step_calls], dim=1)
        t_noisy = torch.full(actions.shape, s)
        with torch.no_grad():
            v, heads = model.forward_pack(clean, noisy, torch.zeros(actions.shape), t_noisy, actions)
        torch.testing.assert_close(v, want, **TOL)
    torch.testing.assert_close(heads.end_logit, torch.cat(heads_cached, dim=1), **TOL)


@pytest.mark.parametrize("inputs", ["plain", "prev+delta", "edm+prev+delta+refine", "x0+prev2+delta"])
def test_context_noise_at_play_equals_the_pack_with_noised_context(inputs):
    """Chunks committed noised to a context-noise level L (GameNGen's noise at play time) are what the pack
    sees as its clean stream at s_clean = L: the same velocities and heads, previous frame included (at data
    scale, x_L / (1 - L)). The committed chunk is noised, the returned one is clean."""
    model = make_model(frames_per_chunk=1, sink_chunks=1, window_chunks=3, **INPUTS[inputs])
    cfg = model.cfg
    B, n, L = 2, 7, 0.3
    g = torch.Generator().manual_seed(2)
    actions = torch.randint(0, cfg.num_actions, (B, n), generator=g)
    levels = sampling_levels(2)
    cache = model.new_cache(B)
    committed, calls, heads_cached, clean = [], [], [], []
    orig = model.forward_cached

    def spy(x, t, a, c, commit=False, gate=False):
        v, h = orig(x, t, a, c, commit, gate)
        if commit is not False:
            assert v is None  # a commit pass runs neither the output layer nor the refiner
            committed.append((float(t[0, 0]), x.clone()))
        else:
            calls.append((float(t[0, 0]), x.clone(), v.clone()))
        return v, h

    model.forward_cached = spy
    for i in range(n):
        noise = torch.randn(B, 1, cfg.in_channels, *cfg.latent_size, generator=g)
        x0, heads = generate_chunk(model, cache, actions[:, i:i + 1], noise, levels, generator=g, context_noise=L)
        clean.append(x0)
        heads_cached.append(heads.end_logit)
    model.forward_cached = orig
    assert all(abs(t - L) < 1e-6 for t, _ in committed)
    ctx = torch.cat([x for _, x in committed], dim=1)
    x0s = torch.cat(clean, dim=1)
    assert (ctx - (1 - L) * x0s).abs().max() > 1e-2  # noise was added, and the clean chunk came back
    for s in levels[:-1]:
        step = [c for c in calls if abs(c[0] - s) < 1e-6]
        noisy, want = torch.cat([c[1] for c in step], dim=1), torch.cat([c[2] for c in step], dim=1)
        with torch.no_grad():
            v, heads = model.forward_pack(ctx, noisy, torch.full(actions.shape, L), torch.full(actions.shape, s), actions)
        torch.testing.assert_close(v, want, **TOL)
    torch.testing.assert_close(heads.end_logit, torch.cat(heads_cached, dim=1), **TOL)
    with pytest.raises(ValueError, match="context-noise level"):
        generate_chunk(model, model.new_cache(B), actions[:, :1], noise, levels, context_noise=1.0)


@pytest.mark.parametrize("inputs", ["plain", "prev+delta", "x0+prev+delta", "edm+prev+delta", "edm+prev+delta+refine", "edm+prev+delta+out", "edm+prev3+delta"])
def test_causality_of_pack(inputs):
    """A noisy chunk's output depends on neither later clean chunks nor its own clean copy; earlier
    outputs never depend on a later chunk's input or action."""
    model = make_model(frames_per_chunk=1, sink_chunks=1, window_chunks=8, **INPUTS[inputs])
    cfg = model.cfg
    B, T = 2, 6
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(B, T, cfg.in_channels, *cfg.latent_size, generator=g)
    noisy = torch.randn_like(clean)
    t = torch.rand(B, T, generator=g)
    a = torch.randint(0, cfg.num_actions, (B, T), generator=g)
    with torch.no_grad():
        v, h = model.forward_pack(clean, noisy, torch.zeros(B, T), t, a)
        k = 3
        clean2 = clean.clone()
        clean2[:, k:] += 1.0  # change clean chunks at and after k
        v2, _ = model.forward_pack(clean2, noisy, torch.zeros(B, T), t, a)
        torch.testing.assert_close(v2[:, : k + 1], v[:, : k + 1])  # noisy chunk k does not see clean k
        assert (v2[:, k + 1 :] - v[:, k + 1 :]).abs().max() > 1e-3
        noisy3, a3 = noisy.clone(), a.clone()
        noisy3[:, k:] += 1.0
        a3[:, k:] = (a3[:, k:] + 1) % cfg.num_actions
        v3, h3 = model.forward_pack(clean, noisy3, torch.zeros(B, T), t, torch.where(torch.arange(T) >= k, a3, a), a3)
        torch.testing.assert_close(v3[:, :k], v[:, :k])
        torch.testing.assert_close(h3.end_logit[:, :k], h.end_logit[:, :k])
        assert (v3[:, k:] - v[:, k:]).abs().max() > 1e-3


def test_causality_of_cached_generation():
    model = make_model(frames_per_chunk=1, sink_chunks=1, window_chunks=3)
    cfg = model.cfg
    levels = sampling_levels(2)

    def rollout(actions, first_noise_bump=0.0):
        g = torch.Generator().manual_seed(5)
        cache = model.new_cache(1)
        out = []
        for i in range(actions.shape[1]):
            noise = torch.randn(1, 1, cfg.in_channels, *cfg.latent_size, generator=g)
            x0, _ = generate_chunk(model, cache, actions[:, i : i + 1], noise, levels)
            out.append(x0)
        return torch.cat(out, 1)

    a = torch.tensor([[0, 1, 2, 3, 1, 0]])
    b = a.clone()
    b[0, 4:] = 2
    ra, rb = rollout(a), rollout(b)
    torch.testing.assert_close(ra[:, :4], rb[:, :4])
    assert (ra[:, 4:] - rb[:, 4:]).abs().max() > 1e-3


def test_long_play_bounded():
    """Thousands of chunks: positions stay bounded and the cache never grows."""
    model = make_model(frames_per_chunk=1, sink_chunks=1, window_chunks=4)
    cfg = model.cfg
    cache = model.new_cache(1)
    nbytes = cache.nbytes()
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr())
    g = torch.Generator().manual_seed(0)
    levels = sampling_levels(1)
    max_pos = 0
    for i in range(2000):
        noise = torch.randn(1, 1, cfg.in_channels, *cfg.latent_size, generator=g)
        a = torch.randint(0, cfg.num_actions, (1, 1), generator=g)
        x0, _ = generate_chunk(model, cache, a, noise, levels)
        max_pos = max(max_pos, cache.max_position())
        assert torch.isfinite(x0).all()
    assert int(cache.n_chunks[0]) == 2000
    assert max_pos <= cfg.sink_chunks + cfg.window_chunks
    assert cache.nbytes() == nbytes and (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs
    # the slots hold the sinks and the last W chunks
    held = sorted(cache.slot_chunk[0, 1:].tolist())
    assert held == [0] + list(range(2000 - cfg.window_chunks, 2000))


def test_bad_inputs():
    model = make_model()
    cfg = model.cfg
    cache = model.new_cache(1)
    x = torch.randn(1, 1, cfg.in_channels, *cfg.latent_size)
    with pytest.raises(ValueError, match="actions must lie"):
        model.forward_cached(x, torch.zeros(1, 1), torch.tensor([[cfg.num_actions + 1]]), cache)
    with pytest.raises(ValueError, match="expected latents of shape"):
        model.forward_cached(torch.randn(1, 1, cfg.in_channels + 1, *cfg.latent_size), torch.zeros(1, 1), torch.tensor([[0]]), cache)
    with pytest.raises(ValueError, match="batch of 2 worlds"):
        model.forward_cached(x.repeat(2, 1, 1, 1, 1), torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_config("huge")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_block_mask_matches_sdpa():
    """The block mask handed to flex attention on CUDA encodes the same pack mask (checked here on CPU)."""
    from worldmodel.attention import attention, attention_backend
    from worldmodel.dit import pack_block_mask

    model = make_model(sink_chunks=1, window_chunks=2)
    mask, _, _ = model.pack_mask(5, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, mask.shape[0], 16, generator=g).unbind(0)
    want = attention(q, k, v, mask=mask)
    with attention_backend("flex"):
        got = attention(q, k, v, mask=mask, block_mask=pack_block_mask(mask))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with attention_backend("math"):
        torch.testing.assert_close(attention(q, k, v, mask=mask), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("inputs", ["plain", "prev+delta"])
def test_bfloat16_forwards_run(inputs):
    """Reduced precision keeps q, k and v in one dtype (rotary maths runs in float32 and comes back), with
    and without context noise on the commit."""
    model = make_model(sink_chunks=1, window_chunks=2, **INPUTS[inputs]).to(torch.bfloat16)
    cfg = model.cfg
    x = torch.randn(1, 3, cfg.in_channels, *cfg.latent_size, dtype=torch.bfloat16)
    a = torch.randint(0, cfg.num_actions, (1, 3))
    with torch.no_grad():
        v, _ = model.forward_pack(x, x, torch.zeros(1, 3), torch.rand(1, 3), a)
        assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()
        cache = model.new_cache(1)
        x0, heads = generate_chunk(model, cache, a[:, :1], x[:, :1], sampling_levels(2))
        assert x0.dtype == torch.bfloat16 and torch.isfinite(heads.end_logit).all()
        x0, heads = generate_chunk(model, cache, a[:, 1:2], x[:, 1:2], sampling_levels(2), generator=torch.Generator().manual_seed(0), context_noise=0.3)
        assert x0.dtype == torch.bfloat16 and torch.isfinite(heads.end_logit).all()
        if cache.prev is not None:
            assert cache.prev.dtype == torch.bfloat16


def test_grad_through_cached_generation():
    """Self Forcing trains through forward_cached: with grad on, outputs equal the no-grad path, backward
    works after later chunks overwrite the cache, and no gradient leaks into earlier (detached) chunks."""
    model = make_model(frames_per_chunk=1, sink_chunks=1, window_chunks=2)
    cfg = model.cfg
    B, n = 2, 6
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(B, 1, cfg.in_channels, *cfg.latent_size, generator=g) for _ in range(n)]
    a = torch.randint(0, cfg.num_actions, (B, 1), generator=g)
    t = torch.full((B, 1), 0.5)
    ref_cache, cache = model.new_cache(B), model.new_cache(B)
    losses = []
    for x in xs:
        with torch.no_grad():
            want, _ = model.forward_cached(x, t, a, ref_cache)
            model.forward_cached(x, torch.zeros(B, 1), a, ref_cache, commit=True)
        xg = x.clone().requires_grad_(True)
        got, _ = model.forward_cached(xg, t, a, cache)
        torch.testing.assert_close(got, want, **TOL)
        losses.append((got ** 2).mean())
        with torch.no_grad():
            model.forward_cached(x, torch.zeros(B, 1), a, cache, commit=True)  # overwrites the scratch slot
    sum(losses).backward()  # would fail if an in-place cache write had invalidated the graph
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_commit_only_some_worlds():
    """Committing a subset of worlds (vector env autoreset) leaves the others' caches untouched, and a reset
    world then generates exactly what a fresh single world does from the same context."""
    model = make_model(frames_per_chunk=1, sink_chunks=1, window_chunks=2)
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    lat = lambda b: torch.randn(b, 1, cfg.in_channels, *cfg.latent_size, generator=g)  # noqa: E731
    a = torch.zeros(2, 1, dtype=torch.long)
    z = torch.zeros(2, 1)
    cache = model.new_cache(2)
    with torch.no_grad():
        for _ in range(4):
            model.forward_cached(lat(2), z, a, cache, commit=True)
        k_before = cache.k[:, 0, :, 1:].clone()  # world 0, all but the scratch slot
        cache.reset([1])
        ctx = lat(2)
        model.forward_cached(ctx, z, a, cache, commit=torch.tensor([False, True]))
        assert cache.n_chunks.tolist() == [4, 1]
        torch.testing.assert_close(cache.k[:, 0, :, 1:], k_before)  # world 0 untouched
        x = lat(2)
        v2, _ = model.forward_cached(x, torch.full((2, 1), 0.7), a, cache)
        one = model.new_cache(1)
        model.forward_cached(ctx[1:], z[1:], a[1:], one, commit=True)
        v1, _ = model.forward_cached(x[1:], torch.full((1, 1), 0.7), a[1:], one)
    torch.testing.assert_close(v2[1:], v1, **TOL)
    with pytest.raises(ValueError, match="bool mask"):
        cache.commit(torch.tensor([0, 1]))


def test_solvers_agree_at_one_step_and_differ_after():
    from worldmodel.sampler import denoise

    model = make_model(frames_per_chunk=1, sink_chunks=1, window_chunks=2)
    cfg = model.cfg
    noise = torch.randn(2, 1, cfg.in_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(0))
    a = torch.ones(2, 1, dtype=torch.long)
    out = {}
    for solver in ("euler", "consistency"):
        for steps in (1, 3):
            out[solver, steps] = denoise(model, model.new_cache(2), a, noise, sampling_levels(steps), solver=solver, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out["euler", 1], out["consistency", 1])
    assert not torch.allclose(out["euler", 3], out["consistency", 3])


@pytest.mark.parametrize("delta", [False, True])
def test_x0_prediction_gives_the_exact_velocity_for_the_exact_frame(delta):
    """predict="x0": a network that outputs the clean frame (or its change from prev) yields v = eps - x0."""
    model = make_model(predict="x0", delta=delta, prev_frame=True)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, cfg.in_channels, *cfg.latent_size)
    x0, eps, prev = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.tensor([[0.9, 0.5, 0.2], [1.0, 0.3, 0.06]])
    x_t = (1 - t[..., None, None, None]) * x0 + t[..., None, None, None] * eps
    out = model.patchify(x0 - prev if delta else x0)  # what a perfect network would output
    torch.testing.assert_close(model.velocity_out(out, x_t, t, prev), eps - x0, atol=1e-5, rtol=1e-5)
    # below the clip level the division is by X0_MIN_LEVEL, so v stays finite at t = 0 (the re-cache pass)
    v0 = model.velocity_out(out, x0, torch.zeros(2, 3), prev)
    assert torch.isfinite(v0).all() and v0.abs().max() < 1e-5


def test_pack_previous_frame_is_the_context_frame_at_data_scale():
    """With context noise t_clean, the previous frame in the pack is clean / (1 - t_clean): a model of the
    change then sees at play time (t = 0) frames of the scale it was trained on."""
    model = make_model(prev_frame=True, delta=True, predict="x0")
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(2, 4, cfg.in_channels, *cfg.latent_size, generator=g)
    noisy = torch.randn_like(clean)
    t_clean = torch.full((2, 4), 0.1)
    t = torch.rand(2, 4, generator=g) * 0.8 + 0.1
    a = torch.randint(0, cfg.num_actions, (2, 4), generator=g)
    with torch.no_grad():
        v_noised, _ = model.forward_pack(clean, noisy, t_clean, t, a)
        seen = {}
        orig = model.tokens

        def spy(x, tt, prev, older=None):
            seen["prev"] = prev
            return orig(x, tt, prev, older)

        model.tokens = spy
        model.forward_pack(clean, noisy, t_clean, t, a)
        model.tokens = orig
    torch.testing.assert_close(seen["prev"][:, 1:], clean[:, :-1] / 0.9)
    assert (seen["prev"][:, 0] == 0).all() and torch.isfinite(v_noised).all()


@pytest.mark.parametrize("frames_per_chunk", [1, 2])
def test_stacked_previous_frames_are_the_frames_before_each_chunk(frames_per_chunk):
    """prev_stack K: each frame's tokens carry the K frames before its chunk's first frame, nearest first,
    zeros before the sequence; the cache keeps the same frames, and resetting a world forgets them."""
    Fc, K = frames_per_chunk, 3
    model = make_model(frames_per_chunk=Fc, prev_frame=True, prev_stack=K, delta=True, predict="x0", window_chunks=8)
    cfg = model.cfg
    T = 4 * Fc
    x = torch.arange(1, T + 1, dtype=torch.float32)[None, :, None, None, None].expand(2, T, cfg.in_channels, *cfg.latent_size)
    prev, older = model.previous_frames(x), model.older_frames(x)
    assert older.shape == (2, T, K - 1, cfg.in_channels, *cfg.latent_size)
    stack = torch.cat([prev[:, :, None], older], dim=2)[0, :, :, 0, 0, 0]  # (T, K): frame number, 0 for none
    for t in range(T):
        start = t - t % Fc  # first frame of t's chunk (frame numbers count from 1)
        assert stack[t].tolist() == [float(max(start - k + 1, 0)) for k in range(1, K + 1)], t
    cache = model.new_cache(2)
    a = torch.zeros(2, Fc, dtype=torch.long)
    with torch.no_grad():
        for i in range(3):
            model.forward_cached(x[:, i * Fc:(i + 1) * Fc], torch.zeros(2, Fc), a, cache, commit=True)
    want = stack[3 * Fc]  # what the fourth chunk's frames carry
    assert cache.prev[0, 0, 0, 0] == want[0] and cache.older[0, :, 0, 0, 0].tolist() == want[1:].tolist()
    cache.reset([1])
    assert (cache.prev[1] == 0).all() and (cache.older[1] == 0).all() and (cache.older[0] != 0).all()
    with pytest.raises(ValueError, match="needs prev_frame"):
        dit_config("tiny", prev_stack=2)
    with pytest.raises(ValueError, match="prev_stack must be >= 1"):
        dit_config("tiny", prev_frame=True, prev_stack=0)


def test_mlp_output_layer_writes_what_a_linear_one_cannot():
    """A linear output layer from a dim-wide feature reaches only a dim-dimensional subspace of a token's outputs:
    asked for every one-pixel spike (the identity on 32 outputs) from 8-wide features, its least-squares best
    leaves a residual of at least (32 - 8) / 32 per output. The MLP layer (DiTConfig.out_hidden) fits them. Both
    start at zero output, as DiT's adaLN-Zero output layer does."""
    from worldmodel.dit import FinalLayer
    torch.manual_seed(0)
    dim, out = 8, 32
    feats = torch.randn(out, 1, 1, dim)  # (B, T, N, dim): one token per target spike
    cond = torch.zeros(out, 1, dim)  # (B, T, dim), the adaLN condition
    want = torch.eye(out)[:, None, None]
    lin, mlp = FinalLayer(dim, out), FinalLayer(dim, out, hidden=128)
    for layer in (lin, mlp):
        torch.nn.init.zeros_(layer.linear.weight)
        torch.nn.init.zeros_(layer.linear.bias)
        torch.nn.init.zeros_(layer.ada[-1].weight)
        torch.nn.init.zeros_(layer.ada[-1].bias)
        assert layer(feats, cond).abs().max() == 0
    x = torch.nn.functional.layer_norm(feats[:, 0, 0], (dim,), eps=1e-6)
    X = torch.cat([x, torch.ones(out, 1)], dim=1)  # the linear layer's best: least squares with its bias
    lin_best = ((X @ torch.linalg.lstsq(X, want[:, 0, 0]).solution - want[:, 0, 0]) ** 2).sum() / out
    assert lin_best >= (out - dim - 1) / out - 1e-4
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(1500):
        loss = ((mlp(feats, cond) - want) ** 2).sum() / out
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * lin_best


@pytest.mark.parametrize("grain", [1, 2])
def test_change_gate_keeps_the_previous_frames_cells_and_is_the_plain_network_when_off(grain):
    """DiTConfig.change_gate: off (threshold 0), cached generation equals the pack, the gate's logits included;
    on, the clean prediction of every latent the gate calls unchanged is the previous frame's, exactly, and the
    others are the network's as before; the first chunk of play, which has no previous frame, is never gated.
    With gate_channels G, latent channel i follows decision i % G."""
    model = make_model(predict="edm", prev_frame=True, delta=True, sigma_data=0.1, change_gate=True, window_chunks=3, gate_channels=grain)
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    B, n = 2, 6
    actions = torch.randint(0, cfg.num_actions, (B, n), generator=g)
    clean = torch.randn(B, n, cfg.in_channels, *cfg.latent_size, generator=g)
    noisy = torch.randn_like(clean)
    s = torch.rand(B, n, generator=g) * 0.9 + 0.05
    with torch.no_grad():
        v_pack, heads = model.forward_pack(clean, noisy, torch.zeros(B, n), s, actions)
        assert heads.change_logit.shape == (B, n, grain, *cfg.latent_size)
        prev = model.previous_frames(clean)
        for threshold in (0.0, 0.5):
            model.gate_threshold = threshold
            cache = model.new_cache(B)
            for i in range(n):
                sl = slice(i, i + 1)
                v, h = model.forward_cached(noisy[:, sl], s[:, sl], actions[:, sl], cache, gate=True)
                torch.testing.assert_close(h.change_logit, heads.change_logit[:, sl], **TOL)
                x0 = noisy[:, sl] - s[:, sl, None, None, None] * v  # the clean prediction (s above the x0 clip level)
                x0_plain = noisy[:, sl] - s[:, sl, None, None, None] * v_pack[:, sl]
                said = torch.sigmoid(h.change_logit) < threshold  # (B, 1, G, h, w)
                keep = torch.stack([said[:, :, c % grain] for c in range(cfg.in_channels)], dim=2) & (i > 0)
                if threshold == 0:
                    torch.testing.assert_close(v, v_pack[:, sl], **TOL)
                else:
                    torch.testing.assert_close(x0[keep], prev[:, sl].expand_as(x0)[keep], **TOL)
                    torch.testing.assert_close(x0[~keep], x0_plain[~keep], **TOL)
                model.forward_cached(clean[:, sl], torch.zeros(B, 1), actions[:, sl], cache, commit=True)
            if threshold:
                assert 0 < keep.float().mean() < 1  # the gate kept some cells of the last chunk and not others
                if grain > 1:  # and the decisions of one cell differ somewhere
                    assert (said.any(dim=2) != said.all(dim=2)).any()


def test_change_gate_needs_a_change_target_and_a_clean_frame_output():
    gated = dict(change_gate=True, delta=True, prev_frame=True, predict="x0")
    for bad in (dict(**gated, gate_channels=3), dict(**gated, gate_channels=0), dict(gate_channels=2, delta=True, predict="x0")):
        with pytest.raises(ValueError, match="gate_channels"):
            dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, **bad)
    for bad in (dict(change_gate=True), dict(change_gate=True, delta=True), dict(change_gate=True, predict="x0")):
        with pytest.raises(ValueError, match="change_gate"):
            dit_config("tiny", in_channels=4, latent_size=(4, 4), num_actions=4, **bad)


def test_the_sampler_gates_only_its_last_step_and_the_chunk_keeps_the_previous_frames_cells():
    """denoise asks for the change gate on its last step only (at high noise the gate cannot see where the ball
    goes); the chunk it returns holds the previous frame's latents exactly in the cells the gate kept."""
    from worldmodel.sampler import denoise
    model = make_model(predict="x0", prev_frame=True, delta=True, change_gate=True)
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    B = 3
    a = torch.randint(0, cfg.num_actions, (B, 1), generator=g)
    ctx = torch.randn(B, 1, cfg.in_channels, *cfg.latent_size, generator=g)
    noise = torch.randn_like(ctx)
    orig, seen = model.forward_cached, []

    def spy(x, t, aa, c, commit=False, gate=False):
        v, h = orig(x, t, aa, c, commit, gate)
        seen.append((float(t[0, 0]), gate, h.change_logit))
        return v, h

    with torch.no_grad():
        for centre in (False, True):  # the second pass moves the gate's bias so that its logits straddle the threshold
            if centre:
                model.gate[-1].bias -= seen[-1][2].median()
                seen.clear()
            cache = model.new_cache(B)
            model.forward_cached(ctx, torch.zeros(B, 1), a, cache, commit=True)
            model.forward_cached = spy
            x0 = denoise(model, cache, a, noise, sampling_levels(3))
            model.forward_cached = orig
    assert [gate for _, gate, _ in seen] == [False, False, True]
    keep = (torch.sigmoid(seen[-1][2]) < model.gate_threshold).expand_as(x0)
    assert 0 < keep.float().mean() < 1
    torch.testing.assert_close(x0[keep], ctx.expand_as(x0)[keep], **TOL)
