"""Runs started by the ``deepspeed`` launcher (``deepspeed --num_gpus 8 --module launch.train ...``), in torchrun's terms.

The launcher sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun does, appends ``--local_rank=N``
to the command line and names the local world size ``LOCAL_SIZE``. Any engine runs under it; the
trainer strips its argument before Hydra reads the overrides.
"""

from __future__ import annotations

import os
from typing import Any


def from_deepspeed_launcher(argv: list[str], environ: dict[str, str] | Any = os.environ) -> list[str]:
    """``argv`` without the ``--local_rank=N`` (or ``--local_rank N``) the ``deepspeed`` launcher appends.

    Hydra would refuse it as an override; the launcher also sets ``LOCAL_RANK``, which
    ``setup_runtime`` reads. Its ``LOCAL_SIZE`` becomes ``LOCAL_WORLD_SIZE`` (torchrun's name) when
    that is unset. Anything else passes through unchanged.
    """
    if "LOCAL_SIZE" in environ and "LOCAL_WORLD_SIZE" not in environ:
        environ["LOCAL_WORLD_SIZE"] = environ["LOCAL_SIZE"]
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            out.append(arg)
    return out
