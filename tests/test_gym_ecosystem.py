"""The shipped env as the Gymnasium ecosystem uses it: async vectorization as a user calls it, a short
Stable-Baselines3 PPO run, the Atari-style wrapper chain, the device check, and the vector env against single
envs on the shipped model. Runs that could hang go to subprocesses in their own session, killed on timeout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers import FrameStackObservation, GrayscaleObservation, ResizeObservation

import worldmodel  # noqa: F401  (registers the ids)
from envs.vector_env import WorldModelVectorEnv

from tests.conftest import ENV, ROOT

ID = "worldmodel/Breakout-v0"


def run_script(code: str, timeout: int) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last. A hang past `timeout` s fails the test
    and kills the whole process group (async workers included)."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"hung: no result after {timeout} s\n{out[-2000:]}\n{err[-2000:]}")
    assert p.returncode == 0, f"failed (exit {p.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_async_make_vec_as_a_user_calls_it():
    """Forked workers used to hang forever in torch's first parallel op (the parent has built an env to read
    the spaces, so its OpenMP pool exists). No vector_kwargs: the platform's default start method (Linux up to
    Python 3.13: fork)."""
    got = run_script("""
        import json, multiprocessing
        import gymnasium as gym, numpy as np, torch
        import worldmodel
        torch.set_num_threads(2)  # important: a one-thread parent (OMP_NUM_THREADS=1, as in ENV) has no pool to lose
        envs = gym.make_vec("worldmodel/Breakout-v0", num_envs=2, vectorization_mode="async")
        assert isinstance(envs, gym.vector.AsyncVectorEnv), type(envs)
        obs, info = envs.reset(seed=0)
        frames = [obs]
        for a in ([1, 1], [2, 3], [3, 2], [0, 2]):
            obs, reward, terminated, truncated, info = envs.step(np.array(a))
            frames.append(obs)
        frames = np.stack(frames)
        print(json.dumps({"shape": list(frames.shape), "in_space": bool(obs in envs.observation_space),
                          "moved": bool((frames[1:] != frames[:1]).any()), "rewards": reward.tolist(),
                          "start_method": multiprocessing.get_start_method()}))
        envs.close()
    """, timeout=180)
    assert got["shape"] == [5, 2, 64, 64, 3] and got["in_space"], got
    assert got["moved"] and len(got["rewards"]) == 2, got


def test_stable_baselines3_ppo_trains():
    """The README's snippet: PPO with CnnPolicy on SB3's VecFrameStack of the env (not frame_stack=4, whose
    (4, H, W, 3) observation is no image for CnnPolicy), a few hundred timesteps."""
    got = run_script("""
        import json
        import torch
        from stable_baselines3 import PPO
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecFrameStack
        import worldmodel
        venv = VecFrameStack(make_vec_env("worldmodel/Breakout-v0", n_envs=2, seed=0), n_stack=4)
        model = PPO("CnnPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=0)
        before = [p.detach().clone() for p in model.policy.parameters()]
        model.learn(total_timesteps=256)
        changed = sum(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))
        actions, _ = model.predict(venv.reset(), deterministic=True)
        print(json.dumps({"obs": list(venv.observation_space.shape), "timesteps": model.num_timesteps,
                          "changed": changed, "params": len(before), "actions": actions.tolist()}))
    """, timeout=300)
    assert got["obs"] == [64, 64, 12] and got["timesteps"] >= 256, got
    assert got["changed"] > 0, f"PPO updated none of the {got['params']} policy tensors: {got}"
    assert len(got["actions"]) == 2 and all(0 <= a < 4 for a in got["actions"]), got


def test_atari_style_wrapper_chain():
    """What AtariPreprocessing does (it needs the emulator's `ale`), on the world model: grey, 84x84, 4 stacked;
    no frame skip, one step already is 4 emulator frames."""
    env = FrameStackObservation(ResizeObservation(GrayscaleObservation(gym.make(ID)), (84, 84)), stack_size=4)
    assert env.observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    obs, _ = env.reset(seed=0)
    first = obs
    for a in (1, 2, 2, 3, 3):
        last = obs
        obs, reward, terminated, truncated, info = env.step(a)
        assert obs in env.observation_space and isinstance(reward, float)
        assert (obs[:-1] == last[1:]).all()  # the stack shifts by one frame per step, newest last
    assert (obs[-1] != first[-1]).any()
    assert env.unwrapped.metadata["render_fps"] == 15  # 60 Hz / frameskip 4
    env.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_clear_error():
    with pytest.raises(ValueError, match="asked for CUDA, but this torch"):
        gym.make(ID, device="cuda")
    with pytest.raises(ValueError, match="asked for CUDA, but this torch"):
        gym.make_vec(ID, num_envs=2, vectorization_mode="vector_entry_point", device="cuda")
    with pytest.raises(ValueError, match="asked for CUDA, but this torch"):
        WorldModelVectorEnv(2, device="cuda:0")


def test_unknown_device_is_one_clear_error():
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda'"):
        gym.make(ID, device="tpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda'"):
        WorldModelVectorEnv(2, device="gpu")


def test_vector_env_within_one_grey_level():
    """World b of the batched env against a single env (seed s + b, same actions) on the shipped model: not
    bit-exact (a batched forward rounds differently), but every frame value within one grey level."""
    N, T = 2, 40
    venv = WorldModelVectorEnv(N, end_threshold=1.0)  # no episode ends, so no autoresets to line up
    singles = [gym.make(ID, end_threshold=1.0) for _ in range(N)]
    got, want = [venv.reset(seed=10)[0]], [np.stack([e.reset(seed=10 + b)[0] for b, e in enumerate(singles)])]
    rng = np.random.default_rng(0)
    for _ in range(T):
        actions = rng.integers(4, size=N)
        got.append(venv.step(actions)[0])
        want.append(np.stack([e.step(int(actions[b]))[0] for b, e in enumerate(singles)]))
    diff = np.abs(np.stack(got).astype(int) - np.stack(want).astype(int))  # (T + 1, N, H, W, 3)
    assert diff.max() <= 1, f"a frame value differs by {diff.max()} grey levels (at {np.argwhere(diff > 1)[:4].tolist()})"
    assert (diff == 0).mean() > 0.9999, f"{(diff > 0).sum()} of {diff.size} frame values differ"
    venv.close()
