"""The layers point one way: the model core `worldmodel/` imports nothing from `envs/`, `train/`, `bench/`,
ale-py or pygame (gymnasium only to register), and `import worldmodel` registers the Gymnasium ids (string entry points).
Each check runs in a fresh interpreter, since this test session has long imported everything."""
from __future__ import annotations

import ast
import json

import pytest

from tests.conftest import ROOT, run

CORE = ("worldmodel", "worldmodel.runtime", "worldmodel.dit", "worldmodel.sampler", "worldmodel.flow", "worldmodel.cache",
        "worldmodel.attention", "worldmodel.tokenizer", "worldmodel.config", "worldmodel.checkpoint", "worldmodel.device",
        "worldmodel.cli", "worldmodel.registration")
OUTSIDE = ("envs", "train", "bench", "gymnasium", "ale_py", "pygame")
REGISTERS = {"gymnasium"}  # what `import worldmodel` loads on purpose: the registry it registers the ids in


def loaded_after(code: str) -> dict[str, bool]:
    """Run `code` in a fresh interpreter; which of OUTSIDE (and envs.world_env) are in sys.modules after it."""
    names = [*OUTSIDE, "envs.world_env"]
    p = run("-c", f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {names!r}}}))")
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_core_imports_nothing_outside_it():
    loaded = loaded_after("import " + ", ".join(CORE))
    assert not any(v for m, v in loaded.items() if m not in REGISTERS), f"importing the model core loaded {[m for m, v in loaded.items() if v]}"


@pytest.mark.parametrize("path", sorted((ROOT / "worldmodel").glob("*.py")), ids=lambda p: p.name)
def test_core_source_names_nothing_outside_it(path):
    """Every import statement in worldmodel/, function-level ones too (those the import check above never runs);
    only the registration names gymnasium, inside the functions that register."""
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0]
    allowed = REGISTERS if path.name == "registration.py" else set()
    bad = [m for m in names if m.split(".")[0] in set(OUTSIDE) - allowed]
    assert not bad, f"{path.name} imports {bad}: the model core must not depend on them"


@pytest.mark.parametrize("first", ["worldmodel", "gymnasium"])
def test_import_worldmodel_registers_the_ids(first):
    """After only `import worldmodel` (before or after gymnasium), gym.make works; the env module, ale-py and
    pygame load only when the env is made (and the world-model env needs neither of the last two)."""
    second = "gymnasium" if first == "worldmodel" else "worldmodel"
    code = f"""
import {first}, {second}
import gymnasium as gym
import sys
assert "worldmodel/Breakout-v0" in gym.registry, sorted(gym.registry)[-5:]
assert not any(m in sys.modules for m in ("envs", "ale_py", "pygame")), "registering imported the env code"
env = gym.make("worldmodel/Breakout-v0")
obs, _ = env.reset(seed=0)
obs, reward, terminated, truncated, info = env.step(1)
assert obs.shape == (64, 64, 3) and env.spec.max_episode_steps == 2000
env.close()"""
    loaded = loaded_after(code)
    assert loaded["envs.world_env"] and loaded["gymnasium"]
    assert not loaded["ale_py"] and not loaded["pygame"] and not loaded["train"] and not loaded["bench"]
