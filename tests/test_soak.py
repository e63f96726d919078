"""The long-play soak harness (bench.soak) on the tiny trained model: bounded cache positions, constant cache
bytes, no memory growth, finite numbers, the CLI's table and JSON, and clear errors on bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.soak import main, soak
from worldmodel.runtime import WorldModel, load_start_frames

from tests.conftest import run

STEPS, EVERY = 300, 50  # the tiny model's window is 3 one-frame chunks: 300 steps wrap the ring 100 times
RSS_FROM = 100  # RSS growth is measured from the row at this step (allocator warm-up is over) to the last row


@pytest.fixture(scope="module")
def latent_step_mib(model) -> float:
    """MiB of one step's generated latents (frames_per_chunk x C x h x w float32): 48 KiB for the tiny model."""
    cfg = WorldModel.load(model).dit.cfg
    return cfg.frames_per_chunk * cfg.in_channels * int(np.prod(cfg.latent_size)) * 4 / 2**20


def rss_bound_mib(latent_step_mib: float) -> float:
    # A leak of one step's latents kept in a python list adds (300 - 100) * 48 KiB = 9.4 MiB between the rows
    # at RSS_FROM and STEPS with the tiny model; measured with such a leak (test_rss_bound_catches_a_latent_leak):
    # +11.3 MiB alone, +9.7 MiB after tests/test_env.py in the same process. Without a leak: 0.0 MiB (VmRSS
    # after gc.collect() and malloc_trim(0) stayed flat to 0.1 MiB from step 50 to 3000, every=50 and 250).
    # Half the leak, 4.7 MiB, is far above that noise and far below the leak; a fixed 20 MiB would miss it.
    # (Without the harness's malloc_trim the same leak showed only +4.8 MiB after test_env.py: it filled
    # freed heap pages that were still resident.)
    return 0.5 * (STEPS - RSS_FROM) * latent_step_mib


@pytest.fixture(scope="module")
def result(model):
    return soak(model, STEPS, EVERY, start=0, seed=0)


def test_cache_positions_bounded_and_bytes_constant(result, model):
    c, s, rows = result["cache"], result["summary"], result["rows"]
    frames, _ = load_start_frames(model / "start_frames.npz")
    ctx_chunks = frames.shape[1] // c["frames_per_chunk"]
    bound = (c["sink_chunks"] + c["window_chunks"] + 1) * c["frames_per_chunk"] - 1
    assert c["max_position_bound"] == s["max_position_bound"] == bound
    assert STEPS * c["frames_per_chunk"] > 10 * c["window_chunks"] * c["frames_per_chunk"]  # the ring wraps many times
    assert c["chunks_played"] == ctx_chunks + STEPS
    assert [r["step"] for r in rows] == list(range(EVERY, STEPS + 1, EVERY))
    for r in rows:
        assert r["max_position"] <= bound
        if ctx_chunks + r["step"] >= c["sink_chunks"] + c["window_chunks"]:  # window full: at the bound, never past it
            assert r["max_position"] == bound
    assert s["max_position"] == bound and s["max_position_within_bound"]  # the max over every single step
    assert s["cache_bytes_constant"] and all(r["cache_bytes"] == s["cache_bytes"] > 0 for r in rows)


def test_rss_flat(result, latent_step_mib):
    rss = {r["step"]: r["rss_mib"] for r in result["rows"]}
    growth = rss[STEPS] - rss[RSS_FROM]
    assert result["rss_source"].startswith("/proc/self/status")
    assert growth < rss_bound_mib(latent_step_mib), f"RSS grew {growth:.1f} MiB from step {RSS_FROM} to {STEPS}: {rss}"
    print(f"RSS growth {RSS_FROM}->{STEPS}: {growth:.1f} MiB, bound {rss_bound_mib(latent_step_mib):.1f} MiB")


def test_rss_bound_catches_a_latent_leak(model, latent_step_mib, monkeypatch):
    """The bound above is not vacuous: the same soak with one step's latents leaked into a list breaks it."""
    leaked = []
    denoise = WorldModel._denoise

    def leaky(self, actions):
        x0, a = denoise(self, actions)
        leaked.append(x0.clone())
        return x0, a

    monkeypatch.setattr(WorldModel, "_denoise", leaky)
    rows = soak(model, STEPS, EVERY, start=0, seed=0)["rows"]
    rss = {r["step"]: r["rss_mib"] for r in rows}
    assert leaked[0].numel() * leaked[0].element_size() / 2**20 == pytest.approx(latent_step_mib)
    assert rss[STEPS] - rss[RSS_FROM] > rss_bound_mib(latent_step_mib), rss
    print(f"RSS growth {RSS_FROM}->{STEPS} with the leak: {rss[STEPS] - rss[RSS_FROM]:.1f} MiB, bound {rss_bound_mib(latent_step_mib):.1f} MiB", rss)


def test_numbers_finite_and_sane(result):
    for r in result["rows"]:
        for k, v in r.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), (r["step"], k, v)
        assert r["frames"] == EVERY * result["cache"]["frames_per_chunk"]
        for k in ("paddle_rate", "ball_rate", "score_rate", "layout_ok_rate", "clean_rate", "ball_clean_rate"):
            assert 0.0 <= r[k] <= 1.0
        assert r["ball_clean_rate"] <= min(r["ball_rate"], r["clean_rate"])
        assert 0 <= r["collapsed"] <= r["frames"] and 0 <= r["ends"] <= EVERY and r["steps_per_s"] > 0 and r["clutter"] >= 0
    s, real = result["summary"], result["real"]
    assert s["overall_frames"] == STEPS * result["cache"]["frames_per_chunk"] and s["wall_s"] > 0
    assert s["rss_1k_mib"] is None and s["rss_growth_1k_to_end_mib"] is None  # no row at 1000 in a 300-step run
    # the real start frames look like the game to the probe
    assert real["paddle_rate"] == 1.0 and real["score_rate"] == 1.0 and real["layout_ok_rate"] == 1.0 and real["collapsed"] == 0
    assert real["clutter"] == 0.0 and real["clean_rate"] == 1.0 and real["ball_clean_rate"] == real["ball_rate"]


def test_clutter_tells_a_strewn_court_from_a_clean_one(model):
    """Stray red blobs on the open court keep the layout (paddle, score, bricks) and give the probe a "ball":
    only the clutter column tells the court from a clean one, in balls of stray red."""
    from bench.soak import frame_stats
    from envs.probe import probe_breakout

    clean = load_start_frames(model / "start_frames.npz")[0][0].copy()  # (T, 64, 64, 3) real frames
    strewn = clean.copy()
    for y, x in ((30, 12), (34, 40), (38, 25)):  # three 2x2 blobs of the ball's red, below the bricks, above the paddle
        strewn[:, y:y + 2, x:x + 2] = (200, 72, 72)
    a, b = frame_stats(probe_breakout, clean, None), frame_stats(probe_breakout, strewn, None)
    assert b["layout"].all() and (a["layout"] == b["layout"]).all() and b["ball"].all()
    assert (a["clutter"] == 0).all() and (b["clutter"] > 1).all()
    # the clean-court rates: the strewn court's "ball" is not counted, the clean court's real one is
    assert a["clean"].all() and not b["clean"].any() and not b["ball_clean"].any()
    assert (a["ball_clean"] == a["ball"]).all()


def test_same_seed_same_run(model):
    keys = ("paddle_rate", "ball_rate", "bricks_mean", "flicker", "pixel_std", "ends", "max_position")
    a, b = (soak(model, 40, 20, start=1, seed=5)["rows"] for _ in range(2))
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_cli_table_and_json(model, tmp_path):
    out, png, sheet = tmp_path / "soak.json", tmp_path / "soak.png", tmp_path / "frames.png"
    p = run("-m", "bench.soak", "--model", str(model), "--steps", "60", "--every", "20", "--out", str(out), "--plot", str(png), "--frames", str(sheet), "--requantize")
    assert "RSS MiB" in p.stdout and "layout" in p.stdout and "real (start frames)" in p.stdout and "== comparison" in p.stdout
    table = [line.split() for line in p.stdout.splitlines() if line.strip() and line.split()[0] in ("20", "40", "60")]
    assert [t[0] for t in table] == ["20", "40", "60"]
    report = json.loads(out.read_text())  # strict JSON (no NaN)
    assert report["config"]["steps"] == 60 and report["torch"] and report["config"]["requantize"] is True
    res = report["models"]["model"]
    assert res["config"]["requantize"] is True  # what the run used, from the runtime
    assert [r["step"] for r in res["rows"]] == [20, 40, 60]
    assert res["summary"]["cache_bytes_constant"] and res["summary"]["max_position_within_bound"]
    assert png.stat().st_size > 0
    import cv2

    assert cv2.imread(str(sheet)).shape == (2 * 64, 2 * 3 * 64, 3)  # one line, a frame per row, scaled 2x


def test_report_rows_include_1000():
    from bench.soak import report_steps

    assert report_steps(2500, 600) == [600, 1000, 1200, 1800, 2400, 2500]
    assert report_steps(10000, 500)[:2] == [500, 1000] and report_steps(10000, 500)[-1] == 10000
    assert report_steps(7, 500) == [7]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--every", "0"], "--every must be >= 1"),
    (["--denoise-steps", "0"], "--denoise-steps must be >= 1"),
    (["--gate", "1"], "--gate must lie in [0, 1)"),
    (["--start", "99"], "--start 99 is out of range"),
    (["--model", "nowhere=/no/such/folder"], "no model folder at '/no/such/folder'"),
])
def test_bad_input_in_process(model, args, message, capsys, tmp_path):
    argv = ["--model", str(model), *args] if "--model" not in args else args
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bad_input_cli_no_traceback(model, tmp_path):
    p = run("-m", "bench.soak", "--model", str(tmp_path / "missing"), "--steps", "10", "--out", str(tmp_path / "x.json"), ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"no model folder at {str(tmp_path / 'missing')!r}" in p.stderr
    p = run("-m", "bench.soak", "--model", str(model), "--start", "99", "--out", str(tmp_path / "x.json"), ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "must be in 0.." in p.stderr


def test_rates_model_against_the_real_game(model, tmp_path, capsys):
    """bench.rates: the real side is a fixed function of the seed and pays rewards and ends under random
    play; the model side counts exactly the steps played, its autoreset steps left out; ratios stay null
    where the real game has no event."""
    from bench.rates import compare, main as rates_main, play_model, play_real

    real = play_real("Breakout", 4, 2, 300, 0)
    again = play_real("Breakout", 4, 2, 300, 0)
    assert {k: v for k, v in real.items() if k != "wall_s"} == {k: v for k, v in again.items() if k != "wall_s"}
    assert real["steps"] == 600 and real["reward_events"] >= 1 and real["episode_ends"] >= 1
    assert real["reward_events_per_1k"] == pytest.approx(1000 * real["reward_events"] / 600)
    ends_always = play_model(model, 2, 15, 0, end_threshold=1e-9, denoise_steps=1)  # every played step ends: each is followed by a reset step
    assert ends_always["steps"] == 30 and ends_always["episode_ends"] == 30
    never = play_model(model, 2, 15, 0, end_threshold=1.0, denoise_steps=1)
    assert never["steps"] == 30 and never["episode_ends"] == 0
    c = compare(never, {**real, "reward_events_per_1k": 0.0}, 2.0)
    assert c["reward_events"] == {"ratio": None, "within_factor": None} and c["episode_ends"]["ratio"] == 0.0 and c["episode_ends"]["within_factor"] is False
    rates = lambda e: {"reward_events_per_1k": e, "reward_sum_per_1k": e, "episode_ends_per_1k": e}  # noqa: E731
    assert compare(rates(1.5), rates(1.0), 2.0)["reward_events"] == {"ratio": 1.5, "within_factor": True}
    assert compare(rates(0.4), rates(1.0), 2.0)["episode_ends"]["within_factor"] is False

    out = tmp_path / "rates.json"
    assert rates_main(["--model", str(model), "--worlds", "2", "--steps", "10", "--denoise-steps", "1", "--out", str(out), "--requantize"]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["requantize"] is True
    assert report["model"]["steps"] == report["real"]["steps"] == 20 and set(report["ratio"]) == {"reward_events", "reward_sum", "episode_ends"}
    assert "model/real episode ends" in capsys.readouterr().out
    for bad, says in ((["--worlds", "0"], "--worlds and --steps must be >= 1"), (["--factor", "0.5"], "--factor must be a number >= 1"),
                      (["--model", str(tmp_path / "nowhere")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            rates_main(["--model", str(model), *bad] if bad[0] != "--model" else bad)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_serving_policy_and_the_real_game_under_it(model, tmp_path):
    """--policy serve FIREs once the frames have shown no ball for its patience; --real-game plays the real
    game with the same policy for as many steps and reports the model's rates as shares of its rates."""
    from envs.breakout import FIRE
    from envs.policies import Serving
    from envs.probe import probe_breakout

    class Still:
        description = "still"

        def reset(self):
            pass

        def __call__(self, obs, ram):
            return 0

    from bench.soak import real_game_reference
    from envs.games import game_frame, make_game, preprocess_frame

    empty = np.zeros((64, 64, 3), dtype=np.uint8)  # no ball in it
    serve = Serving(Still(), probe_breakout, patience=3)
    assert [serve(empty, None) for _ in range(7)] == [0, 0, FIRE, 0, 0, FIRE, 0]
    env = make_game("Breakout")  # a real frame with the ball in play: no FIRE however long it is shown
    env.reset(seed=0)
    frames = [preprocess_frame(game_frame(env, env.step(a)[0]), (64, 64)) for a in [FIRE] + [0] * 12]
    env.close()
    in_play = next(f for f in frames if not np.isnan(probe_breakout(f[None])["ball_x"][0]))
    serve.reset()
    assert [serve(in_play, None) for _ in range(10)] == [0] * 10
    with pytest.raises(ValueError, match="one frame"):
        serve(np.stack([in_play, in_play]), None)
    ball = {k: real_game_reference("Breakout", 4, (64, 64), 300, 0, k, probe_breakout, 1.0)["ball_rate"] for k in ("random", "serve")}
    assert ball["serve"] > ball["random"] + 0.1, ball  # it serves: the ball is in play more often (0.75 against 0.44)

    out = tmp_path / "soak.json"
    p = run("-m", "bench.soak", "--model", str(model), "--steps", "200", "--every", "100", "--policy", "serve", "--real-game", "--out", str(out))
    assert "real game, same policy (200 steps" in p.stdout
    res = json.loads(out.read_text())["models"]["model"]
    g, s = res["real_game"], res["summary"]
    assert g["steps"] == 200 and 0 < g["ball_rate"] < 1 and g["paddle_rate"] > 0.9 and "Serving" in g["policy"] and "Serving" in res["config"]["policy"]
    assert s["ball_rate_vs_real_game"] == pytest.approx(s["overall_ball_rate"] / g["ball_rate"])
    again = soak(model, 200, 100, start=0, seed=0, policy_kind="serve", real_game=True)["real_game"]
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in g.items() if k != "wall_s"}  # the real game is fixed by the seed
