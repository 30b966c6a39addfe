"""The run directory's name: the same on every rank and on every relaunch of the same job.

``conf/hydra/moeforge.yaml`` sets ``hydra.run.dir`` to ``runs/${moeforge_run_id:}``:

- ``MOEFORGE_RUN_ID`` when set (the launch scripts set it; ``sbatch`` keeps the job id across requeues);
- else torchrun's run id (``--rdzv-id``), unless torchrun made one up: with ``--standalone`` (and
  on one node without ``--rdzv-id``) it draws a random UUID per launch, and ``--rdzv-id`` defaults
  to ``none``; a relaunch would then never find its checkpoints, so those map to ``local``;
- else ``local``.

Never a timestamp, so every rank of a job agrees and rerunning the same command resumes.
"""

from __future__ import annotations

import os
import re

from omegaconf import OmegaConf

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def run_id(env: dict[str, str] | None = None) -> str:
    """The run id from ``env`` (default: the process environment), by the rules above."""
    env = os.environ if env is None else env
    if env.get("MOEFORGE_RUN_ID"):
        return env["MOEFORGE_RUN_ID"]
    torchrun_id = env.get("TORCHELASTIC_RUN_ID", "")
    if torchrun_id and torchrun_id != "none" and not _UUID.match(torchrun_id):
        return torchrun_id
    return "local"


def register_resolvers() -> None:
    """Make ``${moeforge_run_id:}`` available to the Hydra config."""
    OmegaConf.register_new_resolver("moeforge_run_id", lambda: run_id(), replace=True)
