"""The player's keymap, pure data plus the one rule that turns held keys into a game action.

Keys are named as pygame names its key constants (`pygame.K_RIGHT` -> "K_RIGHT"), so this module imports
nothing; the loop resolves the names with `getattr(pygame, name)`.

Actions are found by name, as the real game names them (ALE's `get_action_meanings()`: NOOP, FIRE, UP,
RIGHT, LEFT, DOWN, UPRIGHT, ..., DOWNLEFTFIRE): the held buttons spell a name, vertical part first, then
horizontal, then FIRE (Up + Right + Space -> "UPRIGHTFIRE"). Opposite directions held together cancel. A game
with a smaller action set (Breakout: NOOP, FIRE, RIGHT, LEFT) may lack the spelled name; then parts are
dropped, keeping as many as the game has, horizontal before vertical before FIRE (Right + Space in Breakout
-> RIGHT). Nothing held, or nothing the game has, is NOOP (action 0 for a game whose actions are not named
the ALE way).
"""
from __future__ import annotations

from typing import Iterable, Sequence

# Held keys -> the part of the action they hold.
BUTTONS: dict[str, str] = {"K_UP": "UP", "K_DOWN": "DOWN", "K_LEFT": "LEFT", "K_RIGHT": "RIGHT", "K_SPACE": "FIRE"}

# Pressed keys -> the player's commands.
COMMANDS: dict[str, str] = {
    "K_RETURN": "reset",
    "K_KP_ENTER": "reset",
    "K_p": "pause",
    "K_PERIOD": "step",
    "K_r": "record",
    "K_h": "help",
    "K_ESCAPE": "quit",
}

# The help overlay, one (keys, what they do) per line.
HELP: list[tuple[str, str]] = [
    ("arrows", "move"),
    ("space", "fire"),
    ("Enter", "reset to a real start frame"),
    ("P", "pause / resume"),
    (".", "one step while paused"),
    ("R", "start / stop recording"),
    ("H", "show / hide this help"),
    ("Esc", "quit"),
]

NOOP = "NOOP"
PARTS = (("UP", "DOWN"), ("RIGHT", "LEFT"), ("FIRE",))  # vertical, horizontal, fire: the order of ALE names
# When the game lacks the full name: the parts to keep, (vertical, horizontal, fire), best first.
KEEP = ((1, 1, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 1))


def action_name(held: Iterable[str]) -> str:
    """The ALE name the held buttons spell: {"UP", "RIGHT", "FIRE"} -> "UPRIGHTFIRE", {} -> "NOOP"."""
    return _spell(_parts(held), (1, 1, 1))


def action_for(held: Iterable[str], meanings: Sequence[str]) -> int:
    """Held buttons (values of BUTTONS) -> the index of the game's action for them (see the module docstring)."""
    parts = _parts(held)
    for keep in KEEP:
        name = _spell(parts, keep)
        if name in meanings:
            return list(meanings).index(name)
    return list(meanings).index(NOOP) if NOOP in meanings else 0


def _parts(held: Iterable[str]) -> tuple[str, str, str]:
    held = set(held)
    unknown = held - {b for axis in PARTS for b in axis}
    if unknown:
        raise ValueError(f"held buttons must be among {sorted(set(BUTTONS.values()))}, got {sorted(unknown)}")
    # one part per axis; both directions of an axis held cancel out
    return tuple(next(iter(held & set(axis))) if len(held & set(axis)) == 1 else "" for axis in PARTS)  # type: ignore[return-value]


def _spell(parts: tuple[str, str, str], keep: tuple[int, int, int]) -> str:
    return "".join(p for p, k in zip(parts, keep) if k) or NOOP
