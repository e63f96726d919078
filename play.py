"""Play a world model with the keyboard: `python play.py` opens a pygame window on the shipped model.

Arrows move, space fires (each game's own action names decide the mapping, `envs.player.keymap`); no key
held is a no-op. Enter resets, P pauses, `.` steps once while paused, R starts / stops a recording (to
--record-dir, in `envs.recording`'s format), H shows the keys, Esc (or closing the window) quits. The game
runs at its real pace (Atari: 15 steps/s) when the machine keeps up; the header says so when it does not.

    python play.py                                   # the shipped Breakout model
    python play.py --model ~/runs/teacher/model --steps 4
    python play.py --replay recordings/breakout_20250101-120000.npz
    python play.py --headless 300                    # no window: 300 random-policy steps -> play.mp4, speed

This file is the pygame loop; the keymap and the adapter to the env are in `envs/player/`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from envs.player import keymap
from envs.player.adapter import PlayAdapter
from envs.world_env import DEFAULT_MODEL, start_display
from worldmodel import cli
from worldmodel.registration import ASSETS, model_folders

NO_WINDOW_HINT = "play without a window: python play.py --headless 300 (writes play.mp4 and prints the speed)"

# the window
FONT_SIZE = 20
PAD = 6
MIN_WIDTH = 480  # room for the header when --scale is small
SLOW = 0.9  # achieved below this fraction of the real pace: the header says play is slower than real time
MESSAGE_S = 3.0  # how long a message (recording saved, episode ended) stays up
TEXT, DIM, OK, WARN, RED, BG = (230, 230, 230), (150, 150, 150), (120, 220, 120), (255, 170, 40), (255, 80, 80), (20, 20, 24)


class PlayError(Exception):
    """A problem the user can fix (no display, no model, no pygame, a bad replay file): one message, exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python play.py", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="world-model folder, a training run holding model/, or a game (Breakout) or folder name in assets/")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per frame (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="action guidance scale (default: the model's)")
    p.add_argument("--context-noise", type=float, default=None, metavar="LEVEL", help="noise level in [0, 1) every frame enters the model's context at, the start frames included "
                   "(GameNGen's context noise, for models trained with it; default: the model's)")
    p.add_argument("--gate", type=float, default=None, metavar="P", help="change-gate threshold in [0, 1) for models trained with one (a latent cell whose "
                   "probability of changing is below P stays the previous frame's; 0: off; default: the model's)")
    p.add_argument("--requantize", action=argparse.BooleanOptionalAction, default=None, help="each generated frame enters the model's context as the "
                   "frame shown, encoded again like a real one (--no-requantize: the generated latents themselves; default: the model's)")
    p.add_argument("--fps", type=float, default=None, help="agent steps per second (default: the game's real pace, 15 for Atari)")
    p.add_argument("--scale", type=int, default=8, help="window (and --headless video) pixels per model pixel, nearest-neighbour")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed of the start frames and the model's noise")
    p.add_argument("--replay", default=None, metavar="FILE", help="replay a saved action list (.npy, .txt, .json, or a recording's .npz), then the keys take over")
    p.add_argument("--headless", type=int, default=None, metavar="N", help="no window: run N steps of a random policy (or --replay), write --video, print the speed")
    p.add_argument("--video", default="play.mp4", help="video written by --headless")
    p.add_argument("--record", action="store_true", help="record from the start (the window: R toggles; --headless: also write a recording)")
    p.add_argument("--record-dir", default="recordings", help="where recordings go (FOLDER/<game>_<time>.mp4/.npz/.json)")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:N, mps, or auto: CUDA when torch sees a GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="precision of the model (bfloat16: faster on CPUs with native bf16 and on GPUs)")
    args = p.parse_args(argv)
    args.command = " ".join(["python play.py", *(sys.argv[1:] if argv is None else argv)])  # noted in recordings
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps (denoising steps) must be >= 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number, got {args.guidance}")
    if args.context_noise is not None and not 0 <= args.context_noise < 1:
        p.error(f"--context-noise must lie in [0, 1), got {args.context_noise}")
    if args.gate is not None and not 0 <= args.gate < 1:
        p.error(f"--gate must lie in [0, 1) (0: off), got {args.gate}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        p.error(f"--fps must be > 0, got {args.fps}")
    if args.scale < 1:
        p.error(f"--scale must be >= 1, got {args.scale}")
    if args.headless is not None and args.headless < 1:
        p.error(f"--headless N runs N >= 1 steps, got {args.headless}")
    args.device = cli.check_device(p, args.device)
    return args


# ----- the model -----
def shipped_models() -> list[tuple[Path, str]]:
    """(folder, game) of every world-model folder in assets/."""
    return [(folder, json.loads((folder / "config.json").read_text())["game"]) for folder in model_folders(ASSETS).values()]


def resolve_model(spec: str) -> Path:
    """--model -> a world-model folder: the folder itself, a training run's model/, or a folder / game in assets/."""
    path = Path(spec).expanduser()
    for folder in (path, path / "model"):
        if (folder / "config.json").is_file():
            return folder
    if not path.exists() and len(path.parts) == 1:  # a bare name: a folder in assets/, or a game
        if (ASSETS / spec / "config.json").is_file():
            return ASSETS / spec
        folder = game_folder(spec, shipped_models())
        if folder is not None:
            return folder
    why = "does not exist" if not path.exists() else "is not a world-model folder (no config.json)"
    raise PlayError(f"no world model at {spec!r}: the folder {why}, and it is not a game or folder name in assets/\n{available_models()}")


def game_folder(game: str, models: list[tuple[Path, str]]) -> Path | None:
    """The folder --model GAME loads: of the shipped models of that game, the folder named after it first
    (breakout, then breakout_teacher), else the first by name."""
    folders = [folder for folder, g in models if g.lower() == game.lower()]
    return min(folders, key=lambda f: (f.name.lower() != game.lower(), f.name)) if folders else None


def available_models() -> str:
    models = shipped_models()
    if not models:
        return f"no world-model folders in {ASSETS}; train one (README: Train it yourself) and pass --model FOLDER"
    # suggest the game name only for the folder it loads; the folder's own name works for every one
    return f"world-model folders in {ASSETS}:\n" + "\n".join(
        f"  {folder}  ({game}: --model {game if game_folder(game, models) == folder else folder.name})" for folder, game in models)


def make_adapter(args: argparse.Namespace, model: Path, random_policy: bool = False) -> PlayAdapter:
    """Load the model into a WorldModelEnv and wrap it. Actions come from the --replay file when given, else
    from a random player (`random_policy`, for --headless), else from the keys."""
    from envs.policies import PersistentRandom
    from envs.record import Replay, load_actions
    from envs.world_env import WorldModelEnv
    from worldmodel.checkpoint import CheckpointError

    try:
        env = WorldModelEnv(model, steps=args.steps, guidance=args.guidance, device=args.device, dtype=args.dtype, context_noise=args.context_noise, gate=args.gate,
                             requantize=args.requantize)
    except (CheckpointError, ValueError, OSError) as e:
        raise PlayError(f"cannot load the world model in {str(model)!r}: {e}\n{available_models()}") from None
    policy = PersistentRandom(int(env.action_space.n), np.random.default_rng(args.seed)) if random_policy else None
    try:
        if args.replay is not None:
            policy = Replay(load_actions(args.replay, int(env.action_space.n)), args.replay)
    except ValueError as e:
        env.close()
        raise PlayError(str(e)) from None
    meta = {"model": str(model), "seed": args.seed, "denoising_steps": env.wm.steps, "guidance": env.wm.guidance, "context_noise": env.wm.sampling.context_noise, "gate": env.wm.gate, "requantize": env.wm.sampling.requantize,
            "policy": "keyboard" if policy is None else policy.description + ("" if args.headless else ", then keyboard"),
            "command": args.command}
    return PlayAdapter(env, fps=args.fps or env.metadata["render_fps"], record_dir=args.record_dir, policy=policy, meta=meta)


def model_name(model: Path, info: dict[str, Any]) -> str:
    """'breakout (teacher)': the folder, and the training stage when the model card says."""
    stage = info.get("trained", {}).get("stage")
    return f"{model.name} ({stage})" if stage else model.name


# ----- no window -----
def headless(args: argparse.Namespace, model: Path) -> int:
    from envs.recording import write_video

    adapter = make_adapter(args, model, random_policy=True)
    try:
        adapter.reset(seed=args.seed)
        if args.record:
            adapter.start_recording()
        frames = [adapter.frame]
        start = time.perf_counter()
        for _ in range(args.headless):
            action = adapter.next_action()
            if action is None:
                break  # the replay ran out
            adapter.step(action)
            frames.append(adapter.frame)
        wall = time.perf_counter() - start
        ran_out = adapter.policy_done and adapter.total_steps < args.headless
        n, wm = adapter.total_steps, adapter.env.wm
        try:
            Path(args.video).parent.mkdir(parents=True, exist_ok=True)
            write_video(args.video, np.stack(frames), adapter.fps, args.scale)
        except OSError as e:
            raise PlayError(f"cannot write the video {args.video!r}: {e}") from None
        recording = adapter.stop_recording()
    finally:
        adapter.close()
    import torch

    pace = "real time or faster" if n / wall >= adapter.fps else "slower than real time"
    print(f"{n} steps in {wall:.1f} s: {n / wall:.1f} steps/s ({pace}; the game's pace is {adapter.fps:g}/s); latency per step "
          f"median {np.median(adapter.latencies) * 1000:.1f} ms, p95 {np.quantile(adapter.latencies, 0.95) * 1000:.1f} ms "
          f"({wm.steps} denoising steps, decoder included; {args.device}, {torch.get_num_threads()} threads)")
    print(f"video: {args.video} ({len(frames)} frames at {adapter.fps:g} fps, {adapter.policy.description}"
          + (f"; the replay ran out after {n} of the {args.headless} steps asked)" if ran_out else ")"))
    if recording is not None:
        print(f"recording: {recording}.mp4/.npz/.json")
    return 0


# ----- the window -----
def import_pygame():
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import pygame
    except ImportError as e:
        raise PlayError(f"pygame is not installed ({e}): pip install pygame (or pip install -e . in this repo); or {NO_WINDOW_HINT}") from None
    return pygame


def open_display(pygame) -> None:
    """Start SDL's video; a PlayError when there is no display to show a window on."""
    try:
        start_display(pygame)
    except pygame.error as e:
        pygame.display.quit()
        raise PlayError(f"no display available ({e}); {NO_WINDOW_HINT}") from None


@dataclasses.dataclass
class Screen:
    """What the loop shows besides the frame: pause, help, a passing message."""

    paused: bool = False
    help: bool = False
    message: str = ""
    message_until: float = 0.0

    def say(self, text: str) -> None:
        self.message, self.message_until = text, time.perf_counter() + MESSAGE_S


class Window:
    """The pygame window: a three-line header over the frame, scaled up nearest-neighbour, and the help overlay."""

    def __init__(self, pygame, adapter: PlayAdapter, scale: int, title: str) -> None:
        self.pg, self.adapter, self.title = pygame, adapter, title
        H, W, _ = adapter.env.wm.frame_shape
        pygame.font.init()
        self.font = pygame.font.Font(None, FONT_SIZE)
        self.line = self.font.get_linesize()
        header = 3 * self.line + 2 * PAD
        self.frame_size = (W * scale, H * scale)
        width = max(W * scale, MIN_WIDTH)
        self.frame_at = ((width - W * scale) // 2, header)
        try:
            self.surface = pygame.display.set_mode((width, header + H * scale))
        except pygame.error as e:
            raise PlayError(f"cannot open a window ({e}); {NO_WINDOW_HINT}") from None
        pygame.display.set_caption(f"world model: {adapter.game}")

    def draw(self, screen: Screen) -> None:
        pg, a = self.pg, self.adapter
        self.surface.fill(BG)
        frame = pg.surfarray.make_surface(np.ascontiguousarray(a.frame.transpose(1, 0, 2)))  # pygame surfaces are (W, H)
        self.surface.blit(pg.transform.scale(frame, self.frame_size), self.frame_at)  # nearest-neighbour
        wm = a.env.wm
        self._text([(f"{a.game}", TEXT), (f"model {self.title}", DIM), (f"{wm.steps} denoising steps", DIM), ("H: help", DIM)], 0)
        rate = a.rate()
        if screen.paused:
            pace = ("paused (P resumes, . steps)", WARN)
        elif rate is None:
            pace = (f"-/{a.fps:g} steps/s", DIM)
        elif rate < SLOW * a.fps:
            pace = (f"slower than real time ({rate:.1f}/{a.fps:g} steps/s)", WARN)
        else:
            pace = (f"{rate:.1f}/{a.fps:g} steps/s", OK)
        action = a.meanings[a.last_step.action] if a.last_step else "-"
        self._text([(f"step {a.steps}", TEXT), (f"score {a.score:g}", TEXT), pace, (f"{a.latency_ms():.0f} ms/step", TEXT), (action, DIM)], 1)
        status = []
        if a.recording:
            status.append((f"REC {a.recorded_steps} steps", RED))
        if a.policy is not None:
            # in the window the only policy is a replay (envs.record.Replay)
            status.append(("keyboard (replay done)" if a.policy_done else f"replay: {a.policy.t}/{len(a.policy.actions)}", DIM))
        if screen.message and time.perf_counter() < screen.message_until:
            status.append((screen.message, TEXT))
        self._text(status, 2)
        if screen.help:
            self._help()

    def _text(self, parts: list[tuple[str, tuple[int, int, int]]], row: int) -> None:
        x = PAD
        for text, colour in parts:
            surf = self.font.render(text, True, colour)
            self.surface.blit(surf, (x, PAD + row * self.line))
            x += surf.get_width() + 2 * PAD

    def _help(self) -> None:
        pg = self.pg
        overlay = pg.Surface(self.frame_size, pg.SRCALPHA)
        overlay.fill((0, 0, 0, 210))
        lines = [(keys, what) for keys, what in keymap.HELP] + [("", ""), ("actions", ", ".join(self.adapter.meanings))]
        for i, (keys, what) in enumerate(lines):
            overlay.blit(self.font.render(keys, True, OK), (2 * PAD, 2 * PAD + i * self.line))
            overlay.blit(self.font.render(what, True, TEXT), (2 * PAD + 70, 2 * PAD + i * self.line))
        self.surface.blit(overlay, self.frame_at)


def run_window(adapter: PlayAdapter, *, scale: int, title: str, seed: int | None = None, record: bool = False,
               events: Callable[[], Iterable[Any]] | None = None) -> int:
    """The game loop: read keys, step at the adapter's pace (unless paused), draw. Returns 0 on quit.

    `events` (default `pygame.event.get`) is called once per loop turn and returns that turn's pygame events;
    tests pass a script. Held keys are tracked from KEYDOWN / KEYUP events, not `pygame.key.get_pressed()`,
    so scripted and posted events play exactly as typed ones."""
    pg = import_pygame()
    open_display(pg)
    buttons = {getattr(pg, name): button for name, button in keymap.BUTTONS.items()}
    commands = {getattr(pg, name): command for name, command in keymap.COMMANDS.items()}
    events = events or pg.event.get
    try:
        window = Window(pg, adapter, scale, title)
        if adapter.frame is None:
            adapter.reset(seed=seed)
        if record:
            adapter.start_recording()
        screen, held, clock = Screen(), set(), pg.time.Clock()
        while True:
            todo = []
            for ev in events():
                if ev.type == pg.QUIT:
                    todo.append("quit")
                elif ev.type == pg.KEYDOWN and ev.key in buttons:
                    held.add(buttons[ev.key])
                elif ev.type == pg.KEYUP and ev.key in buttons:
                    held.discard(buttons[ev.key])
                elif ev.type == pg.KEYDOWN and ev.key in commands:
                    todo.append(commands[ev.key])
                elif ev.type == pg.WINDOWFOCUSLOST:
                    held.clear()  # key releases in another window never reach this one
            steps = 0 if screen.paused else 1
            for command in todo:
                if command == "quit":
                    return 0
                if command == "reset":
                    adapter.reset()
                    screen.say("reset to a real start frame")
                elif command == "pause":
                    screen.paused = not screen.paused
                    steps = 0 if screen.paused else 1
                elif command == "step" and screen.paused:
                    steps += 1
                elif command == "record":
                    screen.say(_toggle_recording(adapter))
                elif command == "help":
                    screen.help = not screen.help
            for _ in range(steps):
                done = adapter.step(adapter.next_action(keymap.action_for(held, adapter.meanings)))
                if done.ended:
                    screen.say(f"the model ended the episode: new start (score {adapter.score:g} before)")
            window.draw(screen)
            pg.display.flip()
            clock.tick(adapter.fps)
    finally:
        if adapter.recording:
            print(_toggle_recording(adapter))
        pg.display.quit()


def _toggle_recording(adapter: PlayAdapter) -> str:
    if not adapter.recording:
        return f"recording to {adapter.start_recording()}"
    steps, path = adapter.recorded_steps, adapter.stop_recording()
    return f"recorded {steps} steps: {path}.mp4/.npz/.json"


def play(args: argparse.Namespace, model: Path) -> int:
    pg = import_pygame()
    open_display(pg)  # before the (slow) model load: fail fast with no display
    adapter = make_adapter(args, model)
    try:
        return run_window(adapter, scale=args.scale, title=model_name(model, adapter.env.wm.info), seed=args.seed, record=args.record)
    finally:
        adapter.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = resolve_model(args.model)
        return headless(args, model) if args.headless else play(args, model)
    except PlayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # worldmodel.runtime.NonFiniteError: the model broke mid-play; say so instead of drawing black frames
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C in the terminal: a recording in progress was written on the way out
        return 130


if __name__ == "__main__":
    sys.exit(main())
