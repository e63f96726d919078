"""What the command lines share: the --help layout, and checks of --seed and --device values that name the
flag, instead of a traceback from deep inside numpy or torch."""
from __future__ import annotations

import argparse
import copy


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
    """The device `worldmodel.runtime.resolve_device` makes of a --device value ("auto" becomes cuda or cpu), as a
    string; parser.error (exit 2, naming the flag) when this torch cannot use it."""
    from worldmodel.runtime import resolve_device

    try:
        return str(resolve_device(device))
    except ValueError as e:
        parser.error(f"{flag}: {e}")
