"""What the command lines share: the --help layout, checks of --seed and --device values that name the
flag, instead of a traceback from deep inside numpy or torch, and their reports as strict JSON."""
from __future__ import annotations

import argparse
import copy
import math
from typing import Any

import numpy as np


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help showing every option's default once, as argparse's "(default: X)", with the description's and
    epilog's line breaks kept. A None default is not shown: the option's help says what leaving it out means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action = copy.copy(action)  # argparse shows nothing, so no default either, for an option without help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def seed(text: str) -> int:
    """argparse type of a seed: an integer >= 0 (numpy's generators take no negative seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0 (numpy's generators take no negative seed), got {value}")
    return value


def check_device(parser: argparse.ArgumentParser, device: str, flag: str = "--device") -> str:
    """The device `worldmodel.device.resolve_device` makes of a --device value ("auto" becomes cuda or cpu), as a
    string; parser.error (exit 2, naming the flag) when this torch cannot use it."""
    from worldmodel.device import resolve_device

    try:
        return str(resolve_device(device))
    except ValueError as e:
        parser.error(f"{flag}: {e}")


def jsonable(x: Any) -> Any:
    """A report as strict JSON (`json.dumps(..., allow_nan=False)` takes it): numpy scalars to Python, NaN and
    inf to None (JSON has neither), keys to strings, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x
