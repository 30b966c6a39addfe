"""``torchrun`` without the launcher's traceback: ``python -m launch.torchrun <torchrun arguments>``.

Takes exactly torchrun's arguments (it runs ``torch.distributed.run``). When a worker fails,
torchrun raises ``ChildFailedError`` and prints a report of about 30 lines after the worker's own
message; moeforge's workers already said what went wrong (rank 0, one line on stderr, every rank
in its ``train_rank<r>.log``). This entry point prints one line naming the failed rank instead and
exits with that worker's status: 2 for a bad config, data or checkpoint, 128 + N after a worker
was stopped by signal N (143: preempted by SIGTERM, checkpoint saved). When the agent itself gets
a stop signal, it forwards it to the workers (they finish the step and save) and exits with
128 + that signal, also without a traceback.

It also sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (unless set): when the workers share the
rendezvous store, a worker group restarted by ``--max-restarts`` can read the previous attempt's
addresses and fail to connect (pytorch/pytorch#135712; seen here with gloo on torch 2.13).
"""

from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; returns the exit status described above."""
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = parse_args(argv)
    # Its "closing signal" / "failed (exitcode ...)" lines repeat what the line printed below says.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # -N: killed by signal N
        print(f"moeforge: torchrun: rank {rank} exited with status {code} (its message is above; every rank's log is "
              f"train_rank<r>.log in the run directory)", file=sys.stderr)
        return code
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
