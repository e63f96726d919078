"""Gymnasium ids for the world models in `assets/` (`import worldmodel` registers them).

Ids. Every world-model folder `assets/<folder>` (config.json with kind "world_model" and its "game") gets
`worldmodel/<Game>-v0` when the folder is named after the game ("breakout" -> `worldmodel/Breakout-v0`, the
shipped model), else `worldmodel/<Game>-<rest>-v0`, where <rest> is the folder name with a leading game name
and separator dropped ("breakout_student" or "student" -> `worldmodel/Breakout-student-v0`). Each id makes
`envs.world_env:WorldModelEnv` with a TimeLimit of `MAX_EPISODE_STEPS`, and `gymnasium.make_vec(id, N,
vectorization_mode="vector_entry_point")` makes `envs.vector_env:WorldModelVectorEnv` (N worlds in one
batched forward); "async" and "sync" work too (a forked async worker runs torch on one thread, see
`envs.world_env.load_world_model`). Registering again is a no-op.

Layering. Entry points are strings, so registering (at `import worldmodel`, as `import ale_py` registers
its ids) imports gymnasium and reads a few small JSON files, but neither `envs/` nor the model code: the env
module loads when an env is made, and ale-py and pygame only when something asks for the emulator or a window.
"""
from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the shipped model folders (data, not code)
NAMESPACE = "worldmodel"
VERSION = "v0"
MAX_EPISODE_STEPS = 2000  # ~2 min of play at 15 steps/s; gymnasium.make(id, max_episode_steps=N) changes it
ENTRY_POINT = "envs.world_env:WorldModelEnv"
VECTOR_ENTRY_POINT = "envs.vector_env:WorldModelVectorEnv"


def env_id(game: str, folder: str) -> str:
    """'Breakout', 'breakout' -> 'worldmodel/Breakout-v0'; 'Breakout', 'breakout_student' -> 'worldmodel/Breakout-student-v0'."""
    rest = folder[len(game):].lstrip("-_") if folder.lower().startswith(game.lower()) else folder
    return f"{NAMESPACE}/{game}-{rest}-{VERSION}" if rest else f"{NAMESPACE}/{game}-{VERSION}"


def model_folders(assets: Path = ASSETS) -> dict[str, Path]:
    """{env id: folder} for every world-model folder in `assets`."""
    found = {}
    for cfg in sorted(assets.glob("*/config.json")):
        try:
            info = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not a model folder we can read; WorldModel.load reports it if someone asks for it
        if isinstance(info, dict) and info.get("kind") == "world_model" and isinstance(info.get("game"), str):
            found[env_id(info["game"], cfg.parent.name)] = cfg.parent
    return found


def register_envs() -> list[str]:
    """Register one id per model folder in assets/ (see the module docstring); returns the ids."""
    import gymnasium as gym

    ids = model_folders()
    for id_, folder in ids.items():
        if id_ not in gym.registry:
            gym.register(id_, entry_point=ENTRY_POINT, vector_entry_point=VECTOR_ENTRY_POINT,
                         max_episode_steps=MAX_EPISODE_STEPS, kwargs={"model": str(folder)})
    return sorted(ids)


def registered_ids() -> list[str]:
    """Every worldmodel/ id in the Gymnasium registry."""
    import gymnasium as gym

    return sorted(i for i in gym.registry if i.startswith(f"{NAMESPACE}/"))
