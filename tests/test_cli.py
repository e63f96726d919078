"""Every command line at once: --help shows each default once, the console scripts of pyproject.toml import and
run from any folder, and a bad --seed or --device is one line naming the flag (exit 2), not a traceback."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sysconfig

import pytest

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
MODULES = sorted({target.split(":")[0] for target in SCRIPTS.values()})


class Built(Exception):
    """Raised in place of parse_args: carries the parser a command built."""


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command's parse_args (or main) builds, caught before it parses anything."""
    m = importlib.import_module(module)

    def built(self, *args, **kwargs):
        raise Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", built)
    with pytest.raises(Built) as e:
        (getattr(m, "parse_args", None) or m.main)([])
    return e.value.args[0]


def test_every_parser_is_a_console_script():
    """Each file that builds an ArgumentParser is the module of a console script (so the help test sees it)."""
    files = [p for d in ("train", "envs", "bench") for p in (ROOT / d).rglob("*.py")] + [ROOT / "play.py"]
    with_parser = {str(p.relative_to(ROOT).with_suffix("")).replace(os.sep, ".") for p in files if "ArgumentParser(" in p.read_text()}
    assert with_parser <= set(MODULES), f"commands without a console script in pyproject.toml: {sorted(with_parser - set(MODULES))}"


@pytest.mark.parametrize("module", MODULES)
def test_help_shows_each_default_once(module, monkeypatch):
    p = parser_of(module, monkeypatch)
    assert p.prog.startswith("python -m ") or p.prog == "python play.py", f"{module}: usage reads {p.prog!r}"
    assert p.prog in ("python play.py", f"python -m {module}"), p.prog
    for action in p._actions:
        if action.help == argparse.SUPPRESS or action.default == argparse.SUPPRESS or not action.option_strings:
            continue
        f = p._get_formatter()
        f.add_argument(action)
        text = " ".join(f.format_help().split())  # this option's lines in --help, rewrapped
        flag = action.option_strings[-1]
        assert "(default: None)" not in text, f"{module} {flag}: {text}"
        if action.default is None:
            continue
        shown = re.findall(r"\(default: (.*?)\)(?:$| )", text)
        assert text.count("(default") == 1 and shown in ([str(action.default)], [repr(action.default)]), \
            f"{module} {flag} (default {action.default!r}) should show its default once: {text}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_targets_import(name):
    module, _, attr = SCRIPTS[name].partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), f"{name} = {SCRIPTS[name]!r} is not a callable"


def test_console_scripts_run_from_a_folder_with_a_stray_train_py(tmp_path):
    """`python -m train.collect` puts the current folder first on sys.path, so ./train.py shadows the package;
    a console script does not look there. The player finds the shipped model from any folder."""
    scripts = sysconfig.get_path("scripts")
    for name in ("train", "envs", "bench", "play"):
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the stray {name}.py was imported')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    for script, *args in (("worldmodel-collect", "--help"), ("worldmodel-play", "--headless", "2", "--video", "out.mp4"),
                          ("worldmodel-pipeline", "--out", "run", "--stages", "0", "--tiny")):  # the pipeline's stages are subprocesses too
        path = os.path.join(scripts, script)
        assert os.path.isfile(path), f"no {path}: install the package (pip install -e .)"
        p = subprocess.run([path, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "stray" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert (tmp_path / "out.mp4").stat().st_size > 0 and (tmp_path / "run" / "data" / "meta.json").is_file()


def refused(capsys, main, argv, *wants):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    for want in wants:
        assert want in err, f"{want!r} not in:\n{err}"


SEEDED = {"play": ["--seed"], "envs.record": ["--seed"], "bench.speed": ["--seed"], "bench.soak": ["--seed"], "bench.vector_throughput": ["--seed"],
          "train.evaluate": ["--seed", "--record-seeds"], "train.collect": ["--seed"], "train.tokenizer": ["--seed"], "train.teacher": ["--seed"],
          "train.consistency": ["--seed"], "train.dmd": ["--seed"]}


@pytest.mark.parametrize("module", sorted(SEEDED))
def test_negative_seed_names_the_flag(module, capsys):
    main = importlib.import_module(module).main
    base = ["--model", str(ROOT / "assets" / "breakout"), "--out", "unused"] if module == "train.evaluate" else []
    for flag in SEEDED[module]:
        extra = [] if flag == "--record-seeds" or module != "train.evaluate" else ["--record-seeds", "0"]
        refused(capsys, main, [*base, *extra, flag, "-1"], f"argument {flag}: a seed is an integer >= 0")


@pytest.mark.parametrize("module", ["play", "envs.record", "bench.speed", "bench.vector_throughput"])
@pytest.mark.parametrize("device", ["cuda:99", "warp"])
def test_unusable_device_names_the_flag(module, device, capsys):
    """cuda:99 is refused on any machine (no CUDA in this torch, or fewer GPUs); warp is no device at all."""
    refused(capsys, importlib.import_module(module).main, ["--device", device], "--device", f"{device!r}")
