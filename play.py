"""Play the world model with the keyboard: `python play.py` opens a pygame window on the shipped model.

Arrows move, space fires (each game's own action names decide the mapping); no key held is a no-op.
Enter resets, P pauses, Esc quits. `--headless N` runs N steps with no window and writes a video.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "breakout"


def action_for_keys(meanings: list[str], left: bool, right: bool, up: bool, down: bool, fire: bool) -> int:
    """The game's action whose name matches the held keys (ALE names: NOOP, FIRE, RIGHT, LEFTFIRE, ...)."""
    want = ("UP" if up and not down else "DOWN" if down and not up else "") + ("RIGHT" if right and not left else "LEFT" if left and not right else "")
    for name in ((want + "FIRE") if fire else want, want, "FIRE" if fire else "NOOP", "NOOP"):
        if name in meanings:
            return meanings.index(name)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="world-model folder")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="action guidance scale (default: the model's)")
    p.add_argument("--fps", type=float, default=15.0, help="agent steps per second (Atari: 15)")
    p.add_argument("--scale", type=int, default=8, help="window pixels per model pixel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--headless", type=int, default=0, metavar="N", help="no window: run N random-policy steps, write --video, print the speed")
    p.add_argument("--video", default="play.mp4", help="video file written by --headless")
    args = p.parse_args(argv)
    if args.headless < 0 or (args.steps is not None and args.steps < 1) or args.fps <= 0 or args.scale < 1:
        p.error("--headless must be >= 0, --steps >= 1, --fps > 0 and --scale >= 1")
    return args


def load(args: argparse.Namespace):
    from worldmodel.checkpoint import CheckpointError
    from worldmodel.runtime import WorldModel, load_start_frames

    try:
        wm = WorldModel.load(args.model, steps=args.steps, guidance=args.guidance)
        frames, actions = load_start_frames(Path(args.model) / "start_frames.npz")
    except (CheckpointError, ValueError) as e:
        avail = sorted(str(d) for d in DEFAULT_MODEL.parent.glob("*/config.json"))
        sys.exit(f"error: {e}\nshipped models: {[str(Path(a).parent) for a in avail] or 'none'}")
    return wm, frames, actions


def headless(args: argparse.Namespace) -> int:
    import cv2

    wm, frames, actions = load(args)
    rng = np.random.default_rng(args.seed)
    k = int(rng.integers(len(frames)))
    wm.reset(frames[k], actions[k], seed=args.seed)
    out, lat = [], []
    for _ in range(args.headless):
        t0 = time.perf_counter()
        out.append(wm.step(int(rng.integers(wm.num_actions)))[-1])
        lat.append(time.perf_counter() - t0)
    H, W, _ = out[0].shape
    vw = cv2.VideoWriter(args.video, cv2.VideoWriter_fourcc(*"mp4v"), args.fps, (W * 4, H * 4))
    for f in out:
        vw.write(cv2.cvtColor(cv2.resize(f, (W * 4, H * 4), interpolation=cv2.INTER_NEAREST), cv2.COLOR_RGB2BGR))
    vw.release()
    ms = float(np.median(lat)) * 1000
    print(f"{args.headless} steps, median {ms:.1f} ms/step ({1000 / ms:.1f} steps/s, decoder included); video: {args.video}")
    return 0


def play(args: argparse.Namespace) -> int:
    try:
        import pygame
    except ImportError:
        sys.exit("error: pygame is not installed (pip install pygame), or run with --headless N")
    if os.environ.get("SDL_VIDEODRIVER") != "dummy" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        sys.exit("error: no display available; run `python play.py --headless 300` to generate a video instead")
    wm, frames, actions = load(args)
    meanings = wm.info["action_meanings"]
    H, W, _ = wm.frame_shape
    pygame.display.init()  # display and fonts only: no audio device is needed
    pygame.font.init()
    header = 28
    screen = pygame.display.set_mode((W * args.scale, H * args.scale + header))
    pygame.display.set_caption(f"world model: {wm.info['game']}")
    font = pygame.font.Font(None, 22)
    clock = pygame.time.Clock()
    rng = np.random.default_rng(args.seed)

    def reset():
        k = int(rng.integers(len(frames)))
        wm.reset(frames[k], actions[k], seed=int(rng.integers(2**31)))
        return frames[k][-1], 0, 0.0

    frame, step, score = reset()
    paused, running, latency = False, True, 0.0
    while running:
        for ev in pygame.event.get():
            if ev.type == pygame.QUIT or (ev.type == pygame.KEYDOWN and ev.key == pygame.K_ESCAPE):
                running = False
            elif ev.type == pygame.KEYDOWN and ev.key == pygame.K_RETURN:
                frame, step, score = reset()
            elif ev.type == pygame.KEYDOWN and ev.key == pygame.K_p:
                paused = not paused
        if not paused and running:
            k = pygame.key.get_pressed()
            a = action_for_keys(meanings, k[pygame.K_LEFT], k[pygame.K_RIGHT], k[pygame.K_UP], k[pygame.K_DOWN], k[pygame.K_SPACE])
            t0 = time.perf_counter()
            frame = wm.step(a)[-1]
            latency = time.perf_counter() - t0
            step += 1
            score += float(wm.reward[0])
        surf = pygame.surfarray.make_surface(np.ascontiguousarray(frame.transpose(1, 0, 2)))
        screen.fill((0, 0, 0))
        screen.blit(pygame.transform.scale(surf, (W * args.scale, H * args.scale)), (0, header))
        text = f"{wm.info['game']}  step {step}  score {score:.0f}  {clock.get_fps():.1f} fps  {latency * 1000:.0f} ms/step  {wm.steps} denoising steps" + ("  [paused]" if paused else "")
        screen.blit(font.render(text, True, (230, 230, 230)), (6, 6))
        pygame.display.flip()
        clock.tick(args.fps)
    pygame.quit()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return headless(args) if args.headless else play(args)


if __name__ == "__main__":
    sys.exit(main())
