"""The player, in three small pieces (as DIAMOND's `game/`): `keymap` (pure data: which key holds which part
of an action, which key runs which command), `adapter` (one world-model env made playable: reset / step,
score, recording, timing) and the pygame loop, which lives in the entry point `play.py` at the repo root.

Neither piece here imports pygame, so the keymap and the adapter are usable (and tested) without a display.
"""
