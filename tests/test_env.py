"""The Gymnasium env, its registration and the batched vector env, on the tiny trained model (and Gymnasium's
checker on the shipped one)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import worldmodel  # noqa: F401  (registers the ids)
from envs.vector_env import WorldModelVectorEnv
from envs.world_env import WorldModelEnv
from worldmodel.registration import env_id, model_folders, register_envs, registered_ids

from tests.conftest import ENV, ROOT, run

ID = "worldmodel/Breakout-v0"


@pytest.fixture
def no_display(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # render_mode="human" opens its window on a dummy display


def rollout(env, seed, actions, **reset_kw):
    obs, _ = env.reset(seed=seed, **reset_kw)
    out = [obs]
    for a in actions:
        out.append(env.step(a)[0])
    return np.stack(out)


# ----- registration -----
def test_registration_ids_and_idempotence():
    assert ID in registered_ids() and ID in register_envs()
    spec = gym.spec(ID)
    assert spec.entry_point == "envs.world_env:WorldModelEnv" and spec.vector_entry_point == "envs.vector_env:WorldModelVectorEnv"
    assert spec.max_episode_steps == 2000 and spec.kwargs["model"].endswith("assets/breakout")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_envs()
        register_envs()
    # importing the package registers without importing the model code
    code = "import sys, worldmodel, gymnasium; assert 'worldmodel/Breakout-v0' in gymnasium.registry; print(sorted(m for m in ('torch', 'envs.world_env', 'ale_py') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr


def test_id_per_model_folder(tmp_path):
    assert env_id("Breakout", "breakout") == "worldmodel/Breakout-v0"
    assert env_id("Breakout", "breakout_student") == env_id("Breakout", "student") == "worldmodel/Breakout-student-v0"
    for folder, game in (("breakout", "Breakout"), ("breakout-student", "Breakout"), ("pong", "Pong")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps({"kind": "world_model", "game": game}))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"kind": "tokenizer"}))
    found = model_folders(tmp_path)
    assert {k: v.name for k, v in found.items()} == {"worldmodel/Breakout-v0": "breakout", "worldmodel/Breakout-student-v0": "breakout-student", "worldmodel/Pong-v0": "pong"}


# ----- Gymnasium's checker -----
def test_check_env_every_registered_id(model, no_display):
    for id_ in registered_ids():
        for frame_stack in (1, 3):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the checker reports problems as warnings: none allowed
                env = gym.make(id_, model=str(model), frame_stack=frame_stack)
                check_env(env.unwrapped)
                env.reset(seed=0)
                env.step(env.action_space.sample())  # through the passive checker gymnasium.make adds
                env.close()


def test_check_env_shipped_model(no_display):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make(ID)
        check_env(env.unwrapped)
        obs, info = env.reset(seed=0)
        assert obs.shape == (64, 64, 3) and env.unwrapped.get_action_meanings() == ["NOOP", "FIRE", "RIGHT", "LEFT"]
        obs, reward, terminated, truncated, info = env.step(1)
        assert isinstance(reward, float) and 0 <= info["end_prob"] <= 1 and 0 <= info["reward_prob"] <= 1
        assert env.metadata["render_fps"] == 15
        env.close()


# ----- the single env -----
def test_seed_determinism(model):
    actions = [1, 2, 2, 3, 0, 1]
    a, b = WorldModelEnv(model), WorldModelEnv(model)
    first = rollout(a, 7, actions)
    np.testing.assert_array_equal(first, rollout(b, 7, actions))  # same seed, same actions: same frames
    np.testing.assert_array_equal(first, rollout(a, 7, actions))  # and again on a used env
    assert not np.array_equal(first[1:], rollout(b, 8, actions)[1:])  # another seed samples other frames
    for action in (np.int64(2), np.array(2, dtype=np.int32)):  # numpy integers are actions too
        a.step(action)


def test_reset_with_a_given_context(model, starts, data):
    from train.dataset import list_shards, load_shard

    shard = load_shard(list_shards(data, "heldout")[0])
    env = WorldModelEnv(model)
    frames, actions = shard["frames"][5:8], shard["actions"][5:8]  # real frames the start contexts do not hold
    obs, info = env.reset(seed=1, options={"frames": frames, "actions": actions})
    np.testing.assert_array_equal(obs, frames[-1])
    np.testing.assert_array_equal(info["frames"], frames[-1:])
    step = env.step(1)[0]
    env.reset(seed=1, options={"frames": frames, "actions": actions})
    np.testing.assert_array_equal(env.step(1)[0], step)
    # the last 2 frames of a shipped context, in a stack of 4 padded with the older of them
    short = WorldModelEnv(model, context=2, frame_stack=4)
    obs, _ = short.reset(seed=0)
    k = [i for i, f in enumerate(starts[0]) if np.array_equal(obs[-1], f[-1])]
    assert obs.shape == (4, 64, 64, 3) and len(k) >= 1
    np.testing.assert_array_equal(obs[:3], np.repeat(starts[0][k[0]][-2:-1], 3, axis=0))


def test_frame_stack_holds_the_newest_frames(model):
    env = WorldModelEnv(model, frame_stack=3)
    obs, info = env.reset(seed=2)
    assert obs.shape == (3, 64, 64, 3) and env.observation_space.shape == (3, 64, 64, 3)
    seen = [obs[-1]]
    for a in (1, 2, 3, 0):
        obs, _, _, _, info = env.step(a)
        np.testing.assert_array_equal(obs[-1], info["frames"][-1])
        seen.append(obs[-1])
    np.testing.assert_array_equal(obs, np.stack(seen[-3:]))


def test_render_modes(model, no_display):
    env = WorldModelEnv(model, render_mode="rgb_array")
    assert env.render() is None  # nothing to show before reset
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(env.render(), obs)
    obs = env.step(1)[0]
    np.testing.assert_array_equal(env.render(), obs)
    human = WorldModelEnv(model, render_mode="human")
    human.reset(seed=0)
    human.step(0)
    assert human._window is not None and human._window.get_size() == (64 * 8, 64 * 8)
    human.close()
    human.close()  # closing twice is allowed
    with pytest.raises(RuntimeError, match="closed"):
        human.reset()


def test_time_limit_truncates(model):
    env = gym.make(ID, model=str(model), max_episode_steps=3, end_threshold=1.0)  # never terminates by the head
    env.reset(seed=0)
    assert [env.step(0)[3] for _ in range(3)] == [False, False, True]


def test_bad_input_is_refused_clearly(model, starts):
    env = WorldModelEnv(model)
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        env.step(0)
    with pytest.raises(gym.error.ResetNeeded):
        gym.make(ID, model=str(model)).step(0)  # gymnasium.make's order check says it too
    env.reset(seed=0)
    for bad in (4, -1, 1.0, np.float32(1), np.array([1]), "1", None):
        with pytest.raises(ValueError, match=r"not in the action space Discrete\(4\): want one integer in \[0, 3\]"):
            env.step(bad)
    frames, actions = starts[0][0], starts[1][0]
    with pytest.raises(ValueError, match=r"options\['frames'\] must be uint8 of shape \(T, 64, 64, 3\)"):
        env.reset(options={"frames": frames[:, :32], "actions": actions})
    with pytest.raises(ValueError, match=r"options\['frames'\] must be uint8"):
        env.reset(options={"frames": frames.astype(np.float32), "actions": actions})
    with pytest.raises(ValueError, match="got T = 0"):
        env.reset(options={"frames": frames[:0], "actions": actions[:0]})
    with pytest.raises(ValueError, match=r"options\['actions'\] must be integers of shape \(4,\)"):
        env.reset(options={"frames": frames, "actions": actions[:2]})
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
        env.reset(options={"frames": frames, "actions": actions + 4})
    with pytest.raises(ValueError, match="exactly 'frames' and 'actions'"):
        env.reset(options={"frames": frames})
    for context in (0, 5, 1.5):
        with pytest.raises(ValueError, match="context must be a whole number of 1-frame chunks between 1 and the 4 start frames"):
            WorldModelEnv(model, context=context)
    with pytest.raises(ValueError, match="frame_stack must be an integer >= 1"):
        WorldModelEnv(model, frame_stack=0)
    with pytest.raises(ValueError, match="render_mode must be None or one of"):
        WorldModelEnv(model, render_mode="ansi")
    with pytest.raises(gym.error.NameNotFound):
        gym.make("worldmodel/Pong-v0")


# ----- the vector env -----
def test_make_vec_gives_the_batched_env(model):
    venv = gym.make_vec(ID, num_envs=3, vectorization_mode="vector_entry_point", model=str(model), frame_stack=2)
    assert isinstance(venv, WorldModelVectorEnv) and venv.max_episode_steps == 2000
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    assert venv.single_action_space == gym.spaces.Discrete(4) and venv.action_space == gym.spaces.MultiDiscrete([4, 4, 4])
    assert venv.single_observation_space.shape == (2, 64, 64, 3) and venv.observation_space.shape == (3, 2, 64, 64, 3)
    obs, info = venv.reset(seed=0)
    assert obs in venv.observation_space and info["frames"].shape == (3, 1, 64, 64, 3)
    obs, rewards, terminated, truncated, info = venv.step(np.array([0, 1, 2]))
    assert obs in venv.observation_space and rewards.shape == terminated.shape == truncated.shape == (3,)
    assert terminated.dtype == truncated.dtype == bool and info["_end_prob"].all()
    venv.close()


def test_vector_env_equals_single_envs(model):
    """World i of a vector env reset with seed s follows a single env reset with seed s + i, through autoresets
    (max_episode_steps 3 forces them), given the same actions."""
    N, T = 3, 9
    venv = WorldModelVectorEnv(N, model=model, max_episode_steps=3)
    singles = [gym.make(ID, model=str(model), max_episode_steps=3) for _ in range(N)]
    vobs, _ = venv.reset(seed=10)
    sobs = [e.reset(seed=10 + i)[0] for i, e in enumerate(singles)]
    got, want, ends = [vobs], [np.stack(sobs)], 0
    done = [False] * N
    rng = np.random.default_rng(0)
    for _ in range(T):
        actions = rng.integers(4, size=N)
        vobs, vrew, vterm, vtrunc, _ = venv.step(actions)
        for i, e in enumerate(singles):
            if done[i]:  # next-step autoreset: a plain reset, no seed
                sobs[i], _ = e.reset()
                rew, term, trunc = 0.0, False, False
            else:
                sobs[i], rew, term, trunc, _ = e.step(int(actions[i]))
            done[i] = term or trunc
            ends += done[i]
            assert (bool(vterm[i]), bool(vtrunc[i])) == (term, trunc)
            assert vrew[i] == pytest.approx(rew, abs=1e-3)
        got.append(vobs)
        want.append(np.stack(sobs))
    assert ends >= N  # every world ended (and was reset) at least once
    got, want = np.stack(got).astype(int), np.stack(want).astype(int)
    # batched and single forwards may round differently; a frame pixel may differ by a level or so
    assert (got == want).mean() > 0.999 and np.abs(got - want).max() <= 2


@pytest.mark.parametrize("solver,context_noise", [("euler", None), ("consistency", None), ("euler", 0.2)])
def test_runtime_worlds_have_their_own_noise(model, starts, solver, context_noise):
    """WorldModel(batch=N) seeded s samples world b exactly as WorldModel(batch=1) seeded s + b (the runtime
    keeps one noise generator per world), for both solvers (consistency re-noises at every level) and with
    context noise (each committed chunk noised from its world's stream)."""
    from worldmodel.runtime import WorldModel

    frames, actions = starts
    batched = WorldModel.load(model, batch=3, steps=3, context_noise=context_noise)
    batched.sampling.solver = solver
    batched.reset(frames[[0, 1, 2]], actions[[0, 1, 2]], seed=20)
    got = np.stack([batched.step_batch([1, 2, 3]) for _ in range(3)], axis=1)  # (3, steps, F, H, W, 3)
    for b in range(3):
        single = WorldModel.load(model, steps=3, context_noise=context_noise)
        single.sampling.solver = solver
        single.reset(frames[b], actions[b], seed=20 + b)
        np.testing.assert_allclose(np.stack([single.step(b + 1) for _ in range(3)]), got[b], atol=2)
    other = WorldModel.load(model, batch=3, steps=3, context_noise=context_noise)
    other.sampling.solver = solver
    other.reset(frames[[0, 1, 2]], actions[[0, 1, 2]], seed=[20, 21, 99])  # per-world seeds; only world 2 changes
    again = np.stack([other.step_batch([1, 2, 3]) for _ in range(3)], axis=1)
    np.testing.assert_array_equal(again[:2], got[:2])
    assert not np.array_equal(again[2], got[2])
    if context_noise:  # the setting is used: a clean cache samples other frames from the same seeds
        clean = WorldModel.load(model, batch=3, steps=3)
        clean.reset(frames[[0, 1, 2]], actions[[0, 1, 2]], seed=20)
        assert not np.array_equal(np.stack([clean.step_batch([1, 2, 3]) for _ in range(3)], axis=1), got)
        twin = WorldModel.load(model, batch=3, steps=3, context_noise=context_noise)
        twin.reset(frames[[0, 1, 2]], actions[[0, 1, 2]], seed=[20, 21, 99])
        for _ in range(3):
            twin.step_batch([1, 2, 3])
        other.reset_worlds([1], frames[[1]], actions[[1]], seeds=[21])  # the reset draws only from world 1's stream
        single = WorldModel.load(model, steps=3, context_noise=context_noise)
        single.reset(frames[1], actions[1], seed=21)
        after = other.step_batch([1, 2, 3])
        np.testing.assert_allclose(after[1], single.step(2), atol=2)
        np.testing.assert_array_equal(after[[0, 2]], twin.step_batch([1, 2, 3])[[0, 2]])  # the other worlds' streams go on untouched


def test_context_noise_through_the_envs(model):
    """`context_noise` reaches the runtime from both envs and play.py; with it a seed still fixes the frames;
    a level outside [0, 1) is refused by name."""
    from play import make_adapter, parse_args
    from worldmodel.runtime import WorldModel

    env = WorldModelEnv(model, context_noise=0.2)
    assert env.wm.gate is None  # a network without a change gate reports none
    assert env.wm.sampling.context_noise == 0.2 and WorldModelVectorEnv(2, model=model, context_noise=0.2).wm.sampling.context_noise == 0.2
    actions = [1, 2, 3]
    first = rollout(env, 7, actions)
    np.testing.assert_array_equal(first, rollout(env, 7, actions))
    assert not np.array_equal(first[1:], rollout(WorldModelEnv(model), 7, actions)[1:])
    adapter = make_adapter(parse_args(["--model", str(model), "--context-noise", "0.1"]), model, random_policy=True)
    assert adapter.env.wm.sampling.context_noise == 0.1 and adapter.meta["context_noise"] == 0.1
    adapter.env.close()
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match=r"context-noise level must be a number in \[0, 1\)"):
            WorldModel.load(model, context_noise=bad)
    with pytest.raises(SystemExit):
        parse_args(["--context-noise", "1"])


def test_vector_autoreset_next_step(model, starts):
    venv = WorldModelVectorEnv(2, model=model, max_episode_steps=2, end_threshold=1.0)  # ends by the time limit only
    venv.reset(seed=[3, 4])
    first = venv.step(np.array([1, 1]))
    assert not first[3].any()
    obs, rewards, terminated, truncated, info = venv.step(np.array([2, 3]))
    assert truncated.all() and not terminated.any()
    obs, rewards, terminated, truncated, info = venv.step(np.array([3, 3]))  # the reset step: actions ignored
    assert (rewards == 0).all() and not terminated.any() and not truncated.any()
    shipped_last = starts[0][:, -1]
    for i in range(2):
        assert any(np.array_equal(obs[i], f) for f in shipped_last)  # a new start frame
        np.testing.assert_array_equal(info["frames"][i, -1], obs[i])
    obs, rewards, terminated, truncated, info = venv.step(np.array([0, 0]))
    assert not truncated.any()  # the time limit counts again from the reset
    # a list of seeds equals int seeds s + i
    a, b = WorldModelVectorEnv(2, model=model), WorldModelVectorEnv(2, model=model)
    a.reset(seed=5)
    b.reset(seed=[5, 6])
    np.testing.assert_array_equal(a.step([1, 2])[0], b.step([1, 2])[0])
    assert a.render() is None  # no render mode
    r = WorldModelVectorEnv(2, model=model, render_mode="rgb_array")
    obs, _ = r.reset(seed=0)
    frames = r.render()
    assert isinstance(frames, tuple) and len(frames) == 2 and np.array_equal(np.stack(frames), obs)


def test_vector_env_refuses_bad_input(model, starts):
    venv = WorldModelVectorEnv(2, model=model)
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        venv.step([0, 0])
    venv.reset(seed=0)
    for bad in ([0, 4], [0], [[0, 1]], np.array([0.0, 1.0]), [-1, 0]):
        with pytest.raises(ValueError, match=r"actions must be integers of shape \(2,\) in \[0, 3\]"):
            venv.step(bad)
    with pytest.raises(ValueError, match="one per world"):
        venv.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match=r"options\['frames'\] must be uint8 of shape \(2, T, 64, 64, 3\)"):
        venv.reset(options={"frames": starts[0][0], "actions": starts[1][0]})
    obs, _ = venv.reset(options={"frames": starts[0][:2], "actions": starts[1][:2]})
    np.testing.assert_array_equal(obs, starts[0][:2, -1])
    with pytest.raises(ValueError, match="num_envs must be an integer >= 1"):
        WorldModelVectorEnv(0, model=model)
    with pytest.raises(ValueError, match="renders only to 'rgb_array'"):
        WorldModelVectorEnv(1, model=model, render_mode="human")
    with pytest.raises(ValueError, match="max_episode_steps must be an integer >= 1 or None"):
        WorldModelVectorEnv(1, model=model, max_episode_steps=0)
    venv.close()
    with pytest.raises(RuntimeError, match="closed"):
        venv.step([0, 0])


def test_vector_throughput_bench(model, tmp_path):
    out = tmp_path / "vec.json"
    p = run("-m", "bench.vector_throughput", "--model", str(model), "--n", "1", "2", "--steps", "2", "--repeats", "2", "--warmup", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert [r["n"] for r in report["results"]] == [1, 2] and all(r["env_steps_per_s"] > 0 for r in report["results"])
    assert "env steps/s" in p.stdout


def test_human_render_without_a_display_is_a_clear_error(model, monkeypatch):
    """With no display SDL silently falls back to an invisible driver; the env must say so, not draw nowhere."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
    env = WorldModelEnv(model, render_mode="human")
    with pytest.raises(RuntimeError, match="needs a display"):
        env.reset(seed=0)
    env.close()
