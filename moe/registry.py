"""One registry line per pluggable part: ``"name": "module:Class"``, imported and checked here.

The router and expert-backend registries (and any later family) list their members as strings so
that adding one is one new file and one line; ``load_classes`` imports each, checks that it is the
family's kind, and fails at import time naming a wrong entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def import_class(path: str) -> type:
    """The object ``"module:Class"`` names, its module imported."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_classes(paths: dict[str, str], kind: type, family: str, check: Callable[[type], bool] = lambda cls: True,
                 need: str = "") -> dict[str, type]:
    """``{name: class}`` from ``{name: "module:Class"}``; a TypeError names an entry that is not a ``kind`` subclass
    (or fails ``check``, described by ``need``)."""
    classes = {}
    for name, path in paths.items():
        cls = import_class(path)
        if not (isinstance(cls, type) and issubclass(cls, kind) and check(cls)):
            raise TypeError(f"{family} {name!r} ({path}) must be a {kind.__name__} subclass{need}")
        classes[name] = cls
    return classes
