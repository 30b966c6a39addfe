"""``torchrun`` without the launcher's traceback: ``python -m launch.torchrun <torchrun arguments>``.

Takes exactly torchrun's arguments (it runs ``torch.distributed.run``). When a worker fails,
torchrun raises ``ChildFailedError`` and prints a report of about 30 lines after the worker's own
message; moeforge's workers already said what went wrong (rank 0, one line on stderr, every rank
in its ``train_rank<r>.log``; a rank stopped by another's failure says which, parallel/heartbeat.py).
This entry point prints one line naming the rank that failed first (the rank the others named,
else torchrun's earliest failure) and exits with that worker's status: 2 for a bad config, data
or checkpoint, 128 + N after a worker was stopped by signal N (143: preempted by SIGTERM,
checkpoint saved; 137: killed, or frozen and ended by a peer), 3 when the named rank had not
exited yet. When the agent itself gets
a stop signal, it forwards it to the workers (they finish the step and save) and exits with
128 + that signal, also without a traceback.

It also sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (unless set): when the workers share the
rendezvous store, a worker group restarted by ``--max-restarts`` can read the previous attempt's
addresses and fail to connect (pytorch/pytorch#135712; seen here with gloo on torch 2.13).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

from parallel.heartbeat import EXIT_PEER_FAILED

_NAMED = re.compile(r"rank (\d+) failed first \((.*?)\); this rank saw")


def exit_status(failure: ProcessFailure) -> int:
    """A worker's exit status as a shell reports it (128 + N when killed by signal N)."""
    return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode


def first_failure(failures: dict[int, ProcessFailure]) -> tuple[int, int, str]:
    """``(rank, exit status, what happened)`` of the rank that failed first.

    Ranks that stopped because another rank failed wrote a line ``... rank F failed first (...)``
    into torchrun's error file (parallel/heartbeat.py); the rank they name wins, even when it is
    still running or was ended after them (a frozen rank). Otherwise the earliest failure torchrun
    recorded (its error-file timestamp, else when the agent saw it) is the first one.
    """
    named: dict[int, str] = {}
    for failure in failures.values():
        found = _NAMED.search(str(failure.message))
        if found:
            named.setdefault(int(found.group(1)), found.group(2))
    if named:
        rank, reason = next(iter(named.items()))
        failure = failures.get(rank)
        status = exit_status(failure) if failure is not None else EXIT_PEER_FAILED
        return rank, status, f"{reason}; the others stopped with status {EXIT_PEER_FAILED}"
    rank = min(failures, key=lambda r: failures[r].timestamp)
    failure = failures[rank]
    code = exit_status(failure)
    how = f"killed by signal {-failure.exitcode}" if failure.exitcode < 0 else "its message is above"
    return rank, code, how


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; returns the exit status described above."""
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's C++ warnings repeat the ranks' one-line reasons
    args = parse_args(argv)
    # Its "closing signal" / "failed (exitcode ...)" lines repeat what the line printed below says.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as err:
        rank, code, why = first_failure(err.failures)
        print(f"moeforge: torchrun: rank {rank} failed first, {why}, exit status {code} (every rank's log is "
              f"train_rank<r>.log in the run directory)", file=sys.stderr)
        return code
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
