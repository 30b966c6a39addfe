"""launch.torchrun names the rank that failed first from the workers' error files (fast, no ranks)."""

from __future__ import annotations

import json
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from launch.torchrun import first_failure


def _failure(tmp: Path, rank: int, exitcode: int, message: str | None, timestamp: int = 100) -> ProcessFailure:
    path = tmp / f"error_{rank}.json"
    if message is not None:
        path.write_text(json.dumps({"message": message, "timestamp": timestamp}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))


def test_the_rank_the_survivors_name_wins_over_earlier_timestamps(tmp_path: Path) -> None:
    line = "moeforge: rank {r} stopping: rank 2 failed first (no heartbeat for 60.0 s; parallel.heartbeat_s=60); this rank saw: x"
    failures = {0: _failure(tmp_path, 0, 3, line.format(r=0), timestamp=50), 3: _failure(tmp_path, 3, 3, line.format(r=3), timestamp=51)}
    assert first_failure(failures)[:2] == (2, 3)  # the frozen rank had not exited when the agent looked
    failures[2] = _failure(tmp_path, 2, -9, None)
    rank, status, why = first_failure(failures)
    assert (rank, status) == (2, 137) and why.startswith("no heartbeat for 60.0 s")


def test_without_a_named_rank_the_earliest_failure_is_first(tmp_path: Path) -> None:
    failures = {1: _failure(tmp_path, 1, 2, "moeforge: error: bad", timestamp=70), 0: _failure(tmp_path, 0, -15, "x", timestamp=90)}
    assert first_failure(failures) == (1, 2, "its message is above")
