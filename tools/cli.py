"""The command line every moeforge tool shares: argparse options plus Hydra overrides anywhere.

    python -m tools.import_hf hf/mixtral --out runs/cpt data=memmap data.path=tokens/
    python -m tools.import_hf data=memmap hf/mixtral data.path=tokens/ --out runs/cpt     # the same

A word is a Hydra override when it is not an option, not the value of the option before it, and
reads as one in Hydra's grammar (``key=value``, ``+key=value``, ``++key=value``, ``~key``, with a
dotted key). Everything else is parsed by the tool's ``argparse`` parser, so positionals and
options keep their usual meaning and errors. Plain ``argparse`` cannot do this: its ``nargs="*"``
positional only takes the words right after the other positionals.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

import torch

from moe.errors import MoeforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` choices of the tools."""

_OVERRIDE = re.compile(r"^(\+\+|\+|~)?[A-Za-z_][\w\-]*(\.[\w\-@]+)*(@[\w.\-]+)?(=|$)")


def is_override(word: str) -> bool:
    """Whether ``word`` reads as a Hydra override (``~key`` needs no ``=``; the others do)."""
    if word.startswith("-"):
        return False
    match = _OVERRIDE.match(word)
    return bool(match) and ("=" in word or word.startswith("~"))


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """``(options, overrides)``: the tool's options parsed by ``parser``, and the Hydra overrides in
    the order given, wherever they stood on the command line (see the module docstring)."""
    words = list(sys.argv[1:] if argv is None else argv)
    takes_value = {s for a in parser._actions for s in a.option_strings if a.nargs != 0}
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":  # everything after is for argparse
            rest += words[i:]
            break
        if word in takes_value and i + 1 < len(words):
            rest += [word, words[i + 1]]
            i += 2
            continue
        (overrides if is_override(word) else rest).append(word)
        i += 1
    return parser.parse_args(rest), overrides


def cli_status(action: Callable[[], object]) -> int:
    """Run a tool's ``action``: exit status 0, or 2 with one ``moeforge: error:`` line for a MoeforgeError."""
    try:
        action()
    except MoeforgeError as err:
        print(f"moeforge: error: {err}", file=sys.stderr)
        return 2
    return 0
