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
from pathlib import Path

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


def sweep_job_name(sweep_dir: str, job_num: int) -> str:
    """A sweep job's W&B run name when ``logging.run_name`` is unset: ``<sweep folder>/<job number>``."""
    return f"{Path(sweep_dir).name}/{job_num}"


def changed_overrides(job_dir: Path, overrides: list[str]) -> list[str]:
    """The overrides recorded in ``job_dir/.hydra/overrides.yaml`` by an earlier job that differ from
    ``overrides`` (``key: old -> new``); empty for a fresh directory or the same job.

    Sweep job N always runs in ``<sweep dir>/N``, so rerunning a sweep resumes each job; a different
    sweep under the same id lands in the same folders, and this says so.
    """
    recorded = job_dir / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        return []
    old = dict(_split(o) for o in OmegaConf.load(recorded))
    new = dict(_split(o) for o in overrides)
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]


def _split(override: str) -> tuple[str, str]:
    key, _, value = str(override).partition("=")
    return key, value
