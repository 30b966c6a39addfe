"""Parallel-mode registry: ``parallel.mode`` name -> mode object (each one file in this folder).

``parallel=<name>`` on the command line selects ``conf/parallel/<name>.yaml``, whose ``mode``
field picks the object here; ``ParallelConfig.layout`` returns it. Everything outside this
package asks the object (``distributed``, ``splits_experts``, ``wrap`` ...) instead of comparing
names. Adding a mode: one file with a ``ParallelMode`` subclass, one line below, one YAML.
"""

from __future__ import annotations

from collections.abc import Callable

from parallel.modes.base import ParallelMode, SplitExperts
from parallel.modes.ddp import DataParallel
from parallel.modes.ep import ExpertParallel
from parallel.modes.fsdp import FullySharded
from parallel.modes.fssdp import FullyShardedSparse
from parallel.modes.none import SingleProcess

MODES: dict[str, ParallelMode] = {mode.name: mode for mode in (
    SingleProcess(),
    DataParallel(),
    FullySharded(),
    ExpertParallel(),
    FullyShardedSparse(),
)}


def names_where(fact: Callable[[ParallelMode], bool]) -> list[str]:
    """The names of the registered modes for which ``fact`` holds, in registry order (for messages and checks)."""
    return [name for name, mode in MODES.items() if fact(mode)]


__all__ = ["MODES", "ParallelMode", "SplitExperts", "names_where"]
