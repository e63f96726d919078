"""Stage 0 data: recording from the real ALE emulator, the shard format, streaming windows, the collect CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from envs.breakout import FIRE, RAM_BALL_X, RAM_BALL_Y, RAM_PADDLE_X
from envs.games import (action_meanings, game_frame, game_ram, make_game, preprocess_frame, resolve_env_id)
from envs.policies import PADDLE_TO_BALL, BreakoutTracker, MixedPolicy, PersistentRandom, make_behaviour_policy
from train.collect import CollectConfig, collect, episode_rng, shard_env_seed
from train.dataset import episodes, iter_windows, list_shards, load_shard, read_meta, write_shard

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
TINY = dict(game="Breakout", steps=500, heldout_steps=150, seed=3, size=SIZE, episodes_per_shard=2,
            max_episode_steps=120)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "breakout"
    collect(CollectConfig(out=out, **TINY))
    return out


def all_arrays(data_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    return {f"{split}/{p.name}": load_shard(p) for split in ("train", "heldout") for p in list_shards(data_dir, split)}


# ---------------------------------------------------------------- recording and the format


def test_shards_hold_whole_episodes_in_the_documented_format(dataset):
    meta = read_meta(dataset)
    assert meta["env_id"] == "ALE/Breakout-v5" and meta["action_meanings"] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    assert meta["frame_size"] == [SIZE, SIZE] and meta["frames_per_step"] == 1
    for split, budget in (("train", TINY["steps"]), ("heldout", TINY["heldout_steps"])):
        shards = list_shards(dataset, split)
        assert [p.name for p in shards] == [s["file"] for s in meta["splits"][split]["shards"]]
        steps = 0
        for path in shards:
            shard = load_shard(path)
            n = len(shard["actions"])
            assert shard["frames"].shape == (n, SIZE, SIZE, 3) and shard["frames"].dtype == np.uint8
            assert shard["ram"].shape == (n, 128) and shard["ram"].dtype == np.uint8
            assert shard["actions"].dtype == np.int64 and shard["rewards"].dtype == np.float32
            for start, stop in episodes(shard):
                assert shard["actions"][start] == 0 and shard["rewards"][start] == 0
                assert len(set(shard["episode"][start:stop])) == 1
                # an episode ends exactly once, on its last row
                ends = shard["terminated"][start:stop] | shard["truncated"][start:stop]
                assert ends[-1] and not ends[:-1].any()
                assert stop - start <= TINY["max_episode_steps"] + 1
            steps += n
        assert budget <= steps < budget + TINY["max_episode_steps"] + 1, "a split stops at the episode past its budget"
        assert steps == meta["splits"][split]["steps"]
    train_ids = np.concatenate([load_shard(p)["episode"] for p in list_shards(dataset, "train")])
    assert len(np.unique(train_ids)) > 2


def test_recorded_episodes_match_an_independent_replay_of_the_emulator(dataset):
    """Replay shard 0's recorded actions in a fresh emulator: same frames, rewards, ends, RAM; same policy actions."""
    shard = load_shard(list_shards(dataset, "train")[0])
    env = make_game("Breakout")
    for j, (start, stop) in enumerate(episodes(shard)):
        obs, _ = env.reset(seed=shard_env_seed(TINY["seed"], "train", 0) if j == 0 else None)
        policy = make_behaviour_policy("Breakout", env.action_space.n, episode_rng(TINY["seed"], "train", 0, j))
        policy.reset()
        np.testing.assert_array_equal(preprocess_frame(obs, (SIZE, SIZE)), shard["frames"][start])
        for i in range(start + 1, stop):
            assert policy(obs, game_ram(env)) == shard["actions"][i], f"policy replay diverged at row {i}"
            obs, reward, terminated, _, _ = env.step(int(shard["actions"][i]))
            np.testing.assert_array_equal(preprocess_frame(obs, (SIZE, SIZE)), shard["frames"][i])
            np.testing.assert_array_equal(game_ram(env), shard["ram"][i])
            assert reward == shard["rewards"][i] and terminated == shard["terminated"][i]
    assert len(np.unique(shard["frames"][:, :, :, 0])) > 2, "frames must show the game, not a blank screen"


def test_same_seed_gives_identical_arrays_and_another_seed_does_not(dataset, tmp_path):
    again = tmp_path / "again"
    collect(CollectConfig(out=again, **TINY))
    first, second = all_arrays(dataset), all_arrays(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].keys() == second[name].keys()
        for key in first[name]:
            np.testing.assert_array_equal(first[name][key], second[name][key], err_msg=f"{name}:{key}")
    other = tmp_path / "other"
    collect(CollectConfig(out=other, **{**TINY, "seed": TINY["seed"] + 1, "heldout_steps": 0}))
    assert not np.array_equal(load_shard(list_shards(other, "train")[0])["actions"],
                              first["train/shard_00000.npz"]["actions"])


def test_resume_rerecords_a_deleted_shard_and_keeps_the_rest(dataset, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shards = list_shards(copy, "train")
    assert len(shards) >= 3, "the tiny dataset must have several shards for this test"
    original = load_shard(shards[1])
    shards[1].unlink()
    kept = {p: p.stat().st_mtime_ns for p in shards if p != shards[1]}
    collect(CollectConfig(out=copy, **TINY))
    for key, value in original.items():
        np.testing.assert_array_equal(load_shard(shards[1])[key], value, err_msg=key)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "complete shards must be kept, not re-recorded"
    capsys.readouterr()
    collect(CollectConfig(out=copy, **TINY))
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="frame_size"):
        collect(CollectConfig(out=copy, **{**TINY, "size": 32}))


# ---------------------------------------------------------------- streaming windows


def test_windows_never_cross_episode_boundaries(dataset):
    paths = list_shards(dataset, "train")
    length = 8
    keys = ("frames", "actions", "episode", "first", "terminated")
    windows = list(iter_windows(paths, length, seed=0, keys=keys, loop=False))
    expected = sum((b - a) // length for p in paths for a, b in episodes(load_shard(p)))
    assert len(windows) == expected > 0
    for w in windows:
        assert w["frames"].shape == (length, SIZE, SIZE, 3) and set(w) == set(keys)
        assert len(set(w["episode"])) == 1, "a window must come from one episode"
        assert not w["first"][1:].any() and not w["terminated"][:-1].any()
    again = list(iter_windows(paths, length, seed=0, keys=keys, loop=False))
    assert all(np.array_equal(a["frames"], b["frames"]) for a, b in zip(windows, again)), "deterministic by seed"
    other = list(iter_windows(paths, length, seed=1, keys=keys, loop=False))
    assert any(not np.array_equal(a["frames"], b["frames"]) for a, b in zip(windows, other))


def synthetic_shards(directory: Path, episode_lengths: list[list[int]]) -> list[Path]:
    """Shards whose `row` key numbers every row globally (a `latents` stand-in, float16 like stage 1 writes)."""
    paths, row, episode = [], 0, 0
    for k, lengths in enumerate(episode_lengths):
        n = sum(lengths)
        first = np.zeros(n, dtype=bool)
        first[np.cumsum([0, *lengths[:-1]])] = True
        ids = np.repeat(np.arange(episode, episode + len(lengths)), lengths)
        episode += len(lengths)
        path = directory / f"shard_{k:05d}.npz"
        write_shard(path, {"row": np.arange(row, row + n), "latents": np.random.default_rng(k).standard_normal(
            (n, 4, 2, 2)).astype(np.float16), "first": first, "episode": ids})
        row += n
        paths.append(path)
    return paths


def rows_seen(windows) -> list[int]:
    return [int(r) for w in windows for r in w["row"]]


def test_ranks_see_disjoint_shards_or_disjoint_windows(tmp_path):
    paths = synthetic_shards(tmp_path, [[20, 3, 17], [9, 30], [12, 12], [25]])
    keys = ("row", "latents", "episode")
    whole = rows_seen(iter_windows(paths, 4, seed=5, keys=keys, loop=False))
    per_rank = [rows_seen(iter_windows(paths, 4, seed=5, rank=r, world_size=2, keys=keys, loop=False)) for r in (0, 1)]
    episode_of = {int(r): int(e) for p in paths for r, e in zip(load_shard(p)["row"], load_shard(p)["episode"])}
    assert {episode_of[r] for r in per_rank[0]}.isdisjoint({episode_of[r] for r in per_rank[1]})
    rank0_episodes = {int(e) for p in paths[0::2] for e in load_shard(p)["episode"]}  # shards 0 and 2
    assert {episode_of[r] for r in per_rank[0]} <= rank0_episodes
    assert len(per_rank[0]) + len(per_rank[1]) == len(whole)

    # fewer shards than ranks: both ranks read the one shard and split its windows
    one = paths[:1]
    whole = rows_seen(iter_windows(one, 4, seed=5, keys=keys, loop=False))
    per_rank = [rows_seen(iter_windows(one, 4, seed=5, rank=r, world_size=2, keys=keys, loop=False)) for r in (0, 1)]
    assert per_rank[0] and per_rank[1] and set(per_rank[0]).isdisjoint(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == len(whole)


def test_windows_stream_epochs_and_skip_short_episodes(tmp_path):
    paths = synthetic_shards(tmp_path, [[5, 2, 6], [3, 7]])
    stream = iter_windows(paths, 5, seed=0, keys=("row", "episode"), shards_in_memory=1)
    windows = [next(stream) for _ in range(12)]  # an epoch has 3 windows (5, 6 and 7 rows; 2 and 3 are too short)
    for w in windows:
        assert len(set(w["episode"])) == 1 and np.array_equal(np.diff(w["row"]), np.ones(4))
        assert int(w["episode"][0]) not in (1, 3), "episodes shorter than the window are skipped"
    epochs = [sorted(int(w["episode"][0]) for w in windows[i:i + 3]) for i in range(0, 12, 3)]
    assert all(e == [0, 2, 4] for e in epochs)
    with pytest.raises(ValueError, match="shorter than 8"):
        next(iter_windows(paths, 8, seed=0, keys=("row",)))
    with pytest.raises(KeyError, match="frames"):
        next(iter_windows(paths, 2, seed=0, keys=("frames",)))


# ---------------------------------------------------------------- games, frames and policies


def test_game_names_resolve_and_bad_games_fail_clearly():
    for name in ("Breakout", "breakout", "BREAKOUT", "ALE/Breakout-v5"):
        assert resolve_env_id(name) == "ALE/Breakout-v5"
    assert resolve_env_id("pong") == "ALE/Pong-v5"
    with pytest.raises(ValueError, match="Breakout"):
        make_game("Breakoutt")
    with pytest.raises(ValueError, match="Discrete"):
        make_game("Pendulum-v1", render_mode="rgb_array")
    with pytest.raises(ValueError, match="RGB"):
        make_game("CartPole-v1")
    cartpole = make_game("CartPole-v1", render_mode="rgb_array", seed=0)
    obs, _ = cartpole.reset(seed=0)
    assert action_meanings(cartpole) == ["A0", "A1"] and game_ram(cartpole) is None
    assert game_frame(cartpole, obs).ndim == 3
    assert make_behaviour_policy("CartPole-v1", 2, np.random.default_rng(0)).scripted is None


def test_preprocess_frame_checks_its_input():
    with pytest.raises(ValueError, match=r"\(h, w, 3\)"):
        preprocess_frame(np.zeros((210, 160), np.uint8), (64, 64))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frame(np.zeros((210, 160, 3), np.float32), (64, 64))
    frame = np.random.default_rng(0).integers(0, 256, (210, 160, 3), dtype=np.uint8)
    small = preprocess_frame(frame, (48, 64))
    assert small.shape == (48, 64, 3) and small.dtype == np.uint8
    assert abs(float(small.mean()) - float(frame.mean())) < 2, "area averaging keeps the mean brightness"


def breakout_ball_pixels(ram: np.ndarray) -> tuple[int, int]:
    """Ball (left, top) on the 160x210 screen from RAM, the mapping policies.py documents."""
    return int(ram[RAM_BALL_X]) - 49, int(ram[RAM_BALL_Y]) + 9


def test_breakout_ram_locates_the_ball_and_it_stays_visible_at_64x64():
    env = make_game("Breakout")
    obs, _ = env.reset(seed=0)
    tracker = BreakoutTracker(np.random.default_rng(0), noise=0.0)
    checked = 0
    for _ in range(300):
        obs, *_ = env.step(tracker(obs, game_ram(env)))
        ram = game_ram(env)
        x, y = breakout_ball_pixels(ram)
        if ram[RAM_BALL_Y] == 0 or not (96 <= y and y + 4 <= 186 and 8 <= x and x + 2 <= 152):
            continue  # no ball, or the ball over the bricks / paddle where other colours surround it
        np.testing.assert_array_equal(obs[y:y + 4, x:x + 2], np.broadcast_to([200, 72, 72], (4, 2, 3)))
        without = obs.copy()
        without[y:y + 4, x:x + 2] = 0
        ball = preprocess_frame(obs, (64, 64)).astype(int) - preprocess_frame(without, (64, 64))
        assert ball.max() >= 40, "the ball must stay distinguishable from the black background at 64x64"
        checked += 1
    assert checked > 100


def test_breakout_tracker_follows_the_ball_and_outscores_random():
    env = make_game("Breakout")
    returns = {}
    for name, policy in (("tracker", BreakoutTracker(np.random.default_rng(0), noise=0.0)),
                         ("random", PersistentRandom(4, np.random.default_rng(0), repeat_prob=0.0))):
        obs, _ = env.reset(seed=0)
        ram, total, toward, far = game_ram(env), 0.0, 0, 0
        for _ in range(400):
            action = policy(obs, ram)
            before = ram
            obs, reward, terminated, truncated, _ = env.step(action)
            ram, total = game_ram(env), total + reward
            offset = int(before[RAM_BALL_X]) - int(before[RAM_PADDLE_X]) + PADDLE_TO_BALL
            if name == "tracker" and before[RAM_BALL_Y] != 0 and abs(offset) > 8:
                far += 1
                toward += np.sign(int(ram[RAM_PADDLE_X]) - int(before[RAM_PADDLE_X])) == np.sign(offset)
            if name == "tracker" and before[RAM_BALL_Y] == 0:
                assert action == FIRE, "no ball in play: the tracker serves"
            if terminated or truncated:
                obs, _ = env.reset()
                ram = game_ram(env)
        returns[name] = total
        if name == "tracker":
            assert far > 50 and toward / far > 0.9, f"paddle moved toward the ball {toward}/{far} times"
    assert returns["tracker"] >= returns["random"] + 8, returns


def test_mixed_policy_draws_epsilon_per_episode_and_is_seeded():
    def actions(seed: int) -> tuple[list[float], list[int]]:
        rng = np.random.default_rng(seed)
        policy = make_behaviour_policy("Breakout", 4, rng)
        assert isinstance(policy, MixedPolicy) and isinstance(policy.scripted, BreakoutTracker)
        ram = np.zeros(128, np.uint8)
        ram[RAM_BALL_Y] = 100
        epsilons, acts = [], []
        for _ in range(20):
            policy.reset()
            epsilons.append(policy.epsilon)
            acts += [policy(None, ram) for _ in range(10)]
        return epsilons, acts

    epsilons, acts = actions(0)
    assert all(0.0 <= e <= 1.0 for e in epsilons) and np.std(epsilons) > 0.1
    assert actions(0) == (epsilons, acts) and actions(1) != (epsilons, acts)
    assert set(acts) == {0, 1, 2, 3}


# ---------------------------------------------------------------- the collect CLI


def run_collect(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "train.collect", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_collect_cli_smoke(tmp_path):
    out = tmp_path / "cli"
    result = run_collect("--game", "Breakout", "--out", str(out), "--steps", "300", "--heldout-steps", "100",
                         "--episodes-per-shard", "2", "--max-episode-steps", "100", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "steps/s" in result.stdout and "mean return" in result.stdout
    meta = read_meta(out)
    assert meta["splits"]["train"]["steps"] >= 300 and meta["splits"]["heldout"]["steps"] >= 100
    assert run_collect("--game", "Breakout", "--out", str(out), "--steps", "300", "--heldout-steps", "100",
                       "--episodes-per-shard", "2", "--max-episode-steps", "100").stdout.count("nothing to do") == 1


@pytest.mark.parametrize("args, message", [
    (["--game", "Breakoutt"], "Breakout"),
    (["--size", "0"], "--size must be positive"),
    (["--steps", "-5"], "--steps must be positive"),
])
def test_collect_cli_rejects_bad_input_without_a_traceback(tmp_path, args, message):
    result = run_collect("--out", str(tmp_path / "bad"), *args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()


def test_missing_or_corrupt_data_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.collect"):
        read_meta(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        list_shards(tmp_path, "test")
    bad = tmp_path / "shard_00000.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt shard"):
        load_shard(bad)
