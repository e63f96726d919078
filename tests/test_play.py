"""The player: the keymap, the pygame loop in-process under SDL's dummy video driver (scripted key events),
`play.py --headless` end to end, and the messages for what a user can get wrong."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from envs.player import keymap
from envs.player.adapter import PlayAdapter
from envs.record import Replay
from envs.recording import load_recording
from envs.world_env import WorldModelEnv

from tests.conftest import ENV, ROOT, run

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
pg = pytest.importorskip("pygame")
import play  # noqa: E402  (the repo-root entry point)

BREAKOUT = ["NOOP", "FIRE", "RIGHT", "LEFT"]
FULL = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT", "UPFIRE", "RIGHTFIRE",
        "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE"]  # ALE's full action set, in its order
NOOP, FIRE, RIGHT, LEFT = range(4)


@pytest.fixture
def sdl_dummy(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")


def adapter_for(model, tmp_path, end_threshold=1.0, policy=None):
    """An adapter stepping as fast as it can; by default the tiny model never ends an episode (its end head is
    untrained: an end probability > 1 never happens)."""
    return PlayAdapter(WorldModelEnv(model, end_threshold=end_threshold), fps=500, record_dir=tmp_path / "rec", policy=policy)


def down(name):
    return pg.event.Event(pg.KEYDOWN, key=getattr(pg, name))


def up(name):
    return pg.event.Event(pg.KEYUP, key=getattr(pg, name))


class Script:
    """Feeds run_window one list of events per loop turn; before each turn notes the adapter's state and the
    window's pixels (what the turn before left on screen). Running out of turns without quitting fails."""

    def __init__(self, adapter, turns):
        self.adapter, self.turns, self.seen = adapter, list(turns), []

    def __call__(self):
        a = self.adapter
        self.seen.append({"total": a.total_steps, "steps": a.steps, "episodes": a.episodes, "frame": a.frame.copy(),
                          "action": a.last_step.action if a.last_step else None, "pixels": pg.surfarray.array3d(pg.display.get_surface())})
        assert self.turns, "the script ran out of turns and the loop did not quit"
        return self.turns.pop(0)


# ----- the keymap -----
def test_keymap_breakout():
    cases = {(): NOOP, ("FIRE",): FIRE, ("RIGHT",): RIGHT, ("LEFT",): LEFT,
             ("RIGHT", "FIRE"): RIGHT, ("LEFT", "FIRE"): LEFT,  # no RIGHTFIRE in Breakout: movement is kept
             ("UP",): NOOP, ("UP", "FIRE"): FIRE, ("DOWN", "LEFT"): LEFT,  # no vertical moves: dropped
             ("LEFT", "RIGHT"): NOOP, ("LEFT", "RIGHT", "FIRE"): FIRE}  # opposite directions cancel
    for held, want in cases.items():
        assert keymap.action_for(held, BREAKOUT) == want, f"{held} -> {BREAKOUT[keymap.action_for(held, BREAKOUT)]}, want {BREAKOUT[want]}"


def test_keymap_full_action_set():
    buttons = ["UP", "DOWN", "LEFT", "RIGHT", "FIRE"]
    got = set()
    for k in range(len(buttons) + 1):
        for held in itertools.combinations(buttons, k):
            a = keymap.action_for(held, FULL)
            assert FULL[a] == keymap.action_name(held), f"{held} -> {FULL[a]}, want {keymap.action_name(held)}"
            got.add(a)
    assert got == set(range(18)), "every action of the full set is reachable from the keys"
    assert FULL[keymap.action_for({"DOWN", "LEFT", "FIRE"}, FULL)] == "DOWNLEFTFIRE"
    assert FULL[keymap.action_for({"UP", "DOWN", "RIGHT"}, FULL)] == "RIGHT"
    pong = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
    assert pong[keymap.action_for({"RIGHT", "FIRE"}, pong)] == "RIGHTFIRE" and pong[keymap.action_for({"UP", "LEFT"}, pong)] == "LEFT"
    assert keymap.action_for({"RIGHT"}, ["A0", "A1", "A2"]) == 0  # names not ALE's: everything is the first action
    with pytest.raises(ValueError, match="held buttons must be among"):
        keymap.action_for({"JUMP"}, FULL)


def test_keymap_is_data_pygame_can_resolve():
    for name in [*keymap.BUTTONS, *keymap.COMMANDS]:
        assert isinstance(getattr(pg, name), int), f"{name} is not a pygame key constant"
    assert not set(keymap.BUTTONS) & set(keymap.COMMANDS), "a key either holds a button or runs a command"
    assert set(keymap.COMMANDS.values()) == {"reset", "pause", "step", "record", "help", "quit"}


# ----- the adapter -----
def test_adapter_goes_on_after_the_model_ends_an_episode(model, tmp_path):
    """end_threshold 0: the model ends every episode; each step then starts a new one from a real start frame,
    the recording marks each start (-1), the score restarts, and the replay goes on rather than restarting."""
    adapter = adapter_for(model, tmp_path, end_threshold=0.0, policy=Replay(np.array([RIGHT, LEFT, FIRE, RIGHT]), "test"))
    try:
        adapter.reset(seed=0)
        adapter.start_recording()
        taken = []
        for _ in range(4):
            taken.append(adapter.next_action())
            assert adapter.step(taken[-1]).ended and adapter.steps == 0 and adapter.score == 0.0
        assert adapter.next_action() is None and adapter.next_action(keys_action=LEFT) == LEFT, "the replay ran out: the keys act"
        assert taken == [RIGHT, LEFT, FIRE, RIGHT] and adapter.episodes == 5 and adapter.total_steps == 4
        assert adapter.latency_ms() > 0 and adapter.latency_ms(0.95) >= adapter.latency_ms(0.5) > 0
        assert adapter.rate() is not None and adapter.rate() > 0
        rec = load_recording(adapter.stop_recording())
        assert rec.actions.tolist() == [-1, RIGHT, -1, LEFT, -1, FIRE, -1, RIGHT, -1] and rec.terminated.sum() == 4
        adapter.reset()
        assert adapter.next_action(keys_action=NOOP) == RIGHT, "reset() starts the replay over"
    finally:
        adapter.close()


# ----- the window -----
def test_window_keys_reach_the_frames_and_record(acting_model, tmp_path, sdl_dummy):
    adapter = adapter_for(acting_model, tmp_path)
    try:
        def hold(key):
            adapter.reset(seed=3)  # same start frame and noise for every run: only the action differs
            script = Script(adapter, [[down(key)], [], [], [down("K_ESCAPE")]])
            assert play.run_window(adapter, scale=2, title="test", events=script) == 0
            return np.stack([s["frame"] for s in script.seen[1:]]), [s["action"] for s in script.seen[1:]]

        right, right_actions = hold("K_RIGHT")
        left, left_actions = hold("K_LEFT")
        assert right_actions == [RIGHT] * 3 and left_actions == [LEFT] * 3
        assert not np.array_equal(right, left), "RIGHT and LEFT from the same start and noise must give different frames"
        np.testing.assert_array_equal(right, hold("K_RIGHT")[0])  # and the same keys the same frames

        # R starts a recording, R stops it; the keys in between are in it, step for step
        adapter.reset(seed=3)
        turns = [[down("K_r"), down("K_RIGHT")], [], [up("K_RIGHT"), down("K_LEFT"), down("K_SPACE")], [up("K_LEFT")], [down("K_r")], [], [down("K_ESCAPE")]]
        assert play.run_window(adapter, scale=2, title="test", events=Script(adapter, turns)) == 0
        (stem,) = {p.with_suffix("") for p in (tmp_path / "rec").iterdir()}
        rec = load_recording(stem)
        assert rec.actions.tolist() == [-1, RIGHT, RIGHT, LEFT, FIRE] and rec.steps == 4
        assert rec.frames.shape == (5, 64, 64, 3) and rec.meta["game"] == "Breakout"
        assert {p.suffix for p in (tmp_path / "rec").iterdir()} == {".mp4", ".npz", ".json"}
    finally:
        adapter.close()


def test_window_pause_step_reset_help(model, tmp_path, sdl_dummy):
    adapter = adapter_for(model, tmp_path)
    turns = [[], [down("K_p")], [], [down("K_PERIOD")], [], [down("K_h")], [down("K_h")], [down("K_p")], [down("K_RETURN")], [down("K_ESCAPE")]]
    script = Script(adapter, turns)
    try:
        assert play.run_window(adapter, scale=2, title="test", seed=0, events=script) == 0
    finally:
        adapter.close()
    total = [s["total"] for s in script.seen]  # steps taken before each turn
    #        start, [], P,  [], .,  [], H,  H,  P,  Enter
    assert total == [0, 1, 1, 1, 2, 2, 2, 2, 3, 4], "paused: no steps; '.': exactly one; P again: stepping resumes"
    assert script.seen[-1]["episodes"] == 2 and script.seen[-1]["steps"] == 1, "Enter starts a new episode (then one step)"
    frame_area = [s["pixels"][:, -128:] for s in script.seen]  # the 64x64 frame at scale 2, below the header
    assert np.array_equal(frame_area[5], frame_area[7]), "paused, help off: the same picture"
    assert not np.array_equal(frame_area[6], frame_area[5]), "H shows the help over the frame"


def test_window_quits_on_close_button_through_the_event_queue(model, tmp_path, sdl_dummy):
    """Events posted to pygame's own queue (the default event source) play like typed ones."""
    adapter = adapter_for(model, tmp_path)
    turn = itertools.count()

    def posted():
        k = next(turn)
        if k == 0:
            pg.event.post(down("K_LEFT"))
        if k == 3:
            pg.event.post(pg.event.Event(pg.QUIT))
        assert k < 10, "the loop did not quit on pygame.QUIT"
        return pg.event.get()

    try:
        assert play.run_window(adapter, scale=2, title="test", seed=0, events=posted) == 0
        assert adapter.total_steps == 3 and adapter.last_step.action == LEFT
    finally:
        adapter.close()


# ----- no window -----
def test_headless_video_speed_record_and_replay(model, tmp_path):
    video, rec = tmp_path / "play.mp4", tmp_path / "rec"
    p = run("play.py", "--model", str(model), "--headless", "6", "--video", str(video), "--record", "--record-dir", str(rec))
    assert "6 steps in" in p.stdout and "steps/s" in p.stdout and "median" in p.stdout and "p95" in p.stdout
    assert video.stat().st_size > 0
    (first,) = {f.with_suffix("") for f in rec.iterdir()}
    recorded = load_recording(first)
    assert recorded.steps == 6 and recorded.actions[0] == -1

    replayed = tmp_path / "replayed"
    p = run("play.py", "--model", str(model), "--headless", "50", "--video", str(tmp_path / "replay.mp4"), "--replay", f"{first}.npz", "--record", "--record-dir", str(replayed))
    assert "the replay ran out after 6 of the 50 steps" in p.stdout
    (again,) = {f.with_suffix("") for f in replayed.iterdir()}
    again = load_recording(again)
    actions = lambda r: r.actions[r.actions >= 0].tolist()  # noqa: E731
    assert actions(again) == actions(recorded) and again.meta["policy"].startswith("replay of 6 actions")


# ----- what a user can get wrong -----
def run_play(*args, **env):
    e = {**ENV, **env}
    for k, v in env.items():
        if v is None:
            del e[k]
    return subprocess.run([sys.executable, "play.py", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def clean_error(p, *wants):
    assert p.returncode == 2, f"exit code {p.returncode}:\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    for want in wants:
        assert want in p.stderr, f"{want!r} not in:\n{p.stderr}"


def test_missing_model_lists_the_shipped_ones(tmp_path):
    p = run_play("--model", str(tmp_path / "missing"), "--headless", "2")
    clean_error(p, "does not exist", "world-model folders in", str(ROOT / "assets" / "breakout"), "--model Breakout")
    (tmp_path / "empty").mkdir()
    clean_error(run_play("--model", str(tmp_path / "empty")), "is not a world-model folder")


def test_model_list_suggests_values_that_work():
    """Every `--model X` the list of shipped models suggests loads the folder on its line."""
    lines = [line for line in play.available_models().splitlines() if "--model " in line]
    assert len(lines) == len(play.shipped_models()) >= 2
    for line in lines:
        folder, suggestion = line.split()[0], line.split("--model ")[1].rstrip(")")
        assert str(play.resolve_model(suggestion)) == folder, line


def test_replay_file_that_is_not_an_array_file(model, tmp_path):
    """Text under an .npz or .npy name is reported as not that kind of file (numpy would say "pickled data")."""
    for suffix, message in ((".npz", "is not an npz archive"), (".npy", "is not a .npy array file")):
        fake = tmp_path / f"actions{suffix}"
        fake.write_text("1 2 3\n")
        p = run_play("--model", str(model), "--headless", "2", "--replay", str(fake))
        clean_error(p, message, str(fake))
        assert "pickle" not in p.stderr, p.stderr


def test_model_by_game_or_run_folder(teacher):
    assert play.resolve_model("Breakout") == play.resolve_model("breakout") == ROOT / "assets" / "breakout"
    assert play.resolve_model(str(teacher)) == teacher / "model"  # a training run: its exported model


def test_no_display(model):
    hint = "--headless"
    clean_error(run_play("--model", str(model), SDL_VIDEODRIVER="nonexistent"), "no display available", hint)
    # no DISPLAY at all: SDL quietly falls back to its offscreen driver, which must not count as a window
    clean_error(run_play("--model", str(model), SDL_VIDEODRIVER=None, DISPLAY=None, WAYLAND_DISPLAY=None), "no display available", hint)


def test_no_pygame(model, tmp_path):
    (tmp_path / "pygame").mkdir()
    (tmp_path / "pygame" / "__init__.py").write_text("raise ImportError('No module named pygame')\n")
    p = run_play("--model", str(model), PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    clean_error(p, "pygame is not installed", "pip install pygame", "--headless")


def test_bad_flags(model, tmp_path):
    clean_error(run_play("--model", str(model), "--headless", "2", "--steps", "0"), "--steps (denoising steps) must be >= 1")
    clean_error(run_play("--model", str(model), "--headless", "0"), "--headless N runs N >= 1 steps")
    clean_error(run_play("--model", str(model), "--fps", "0"), "--fps must be > 0")
    clean_error(run_play("--model", str(model), "--headless", "2", "--replay", str(tmp_path / "nope.npy")), "does not exist")
