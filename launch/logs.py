"""Where moeforge's messages go: the console (rank 0 only) and ``train_rank{r}.log`` (every rank).

``conf/hydra/moeforge.yaml`` configures Python logging through Hydra's ``job_logging``: one
console handler on stderr, filtered by ``ConsoleFilter``, and one file handler per rank. Code
logs to the ``moeforge`` logger; a record with ``extra={"console": False}`` (the per-save lines,
progress written as a terminal bar) goes to the file only.
"""

from __future__ import annotations

import logging
import os


class ConsoleFilter(logging.Filter):
    """Pass records to the console on rank 0 only, and never those marked ``console=False``;
    records marked ``every_rank=True`` (a rank's one line saying why it stops because another
    rank failed, parallel/heartbeat.py) pass on every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "every_rank", False):
            return True
        return os.environ.get("RANK", "0") == "0" and getattr(record, "console", True)


FILE_ONLY = {"console": False}
"""``extra=`` for records meant for the per-rank log file only."""
