"""parallel/heartbeat.py in one process: two ranks' heartbeats on a real TCP store (no process group)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from dist_harness import free_port
from parallel.heartbeat import EXIT_PEER_FAILED, Heartbeat, RankFailure, first_line, looks_distributed


def test_gloo_errors_read_as_distributed_and_shorten_to_one_sentence() -> None:
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:26810. This is typically caused by a remote worker crashing. Check the logs of the remote worker.")
    assert looks_distributed(gloo) and not looks_distributed(ValueError("shape mismatch"))
    assert first_line(gloo) == "RuntimeError: Connection closed by peer [127.0.0.1]:26810."


def test_a_posted_failure_is_named_by_the_other_rank_and_own_errors_stay_own() -> None:
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    def pair(attempt: str) -> list[Heartbeat]:  # heartbeat_s 600: the threads never act during the test
        return [Heartbeat(r, 2, 600.0, "127.0.0.1", port, rank0_hosts_store=False, local_ranks=range(0, 2), attempt=attempt) for r in (0, 1)]

    beats = pair("a")
    try:
        assert beats[0].peer_failure(ValueError("bad batch")) is None  # not a peer's fault: posted as rank 0's own
        assert master.get("moeforge/heartbeat/a/failed").decode() == "0|failed with ValueError: bad batch"
    finally:
        for beat in beats:
            beat.stop()
    beats = pair("b")  # a fresh attempt: rank 1 fails first
    try:
        beats[1].post_own(KeyError("x"))
        failure = beats[0].peer_failure(RuntimeError("Connection closed by peer [127.0.0.1]:1."))
        assert isinstance(failure, RankFailure) and failure.failed_rank == 1 and failure.exit_code == EXIT_PEER_FAILED
        assert str(failure) == ("moeforge: rank 0 stopping: rank 1 failed first (failed with KeyError: 'x'); "
                                "this rank saw: RuntimeError: Connection closed by peer [127.0.0.1]:1.")
        beats[1].post_own(OSError("later"))  # the first post wins
        assert master.get("moeforge/heartbeat/b/failed").decode().startswith("1|failed with KeyError")
    finally:
        for beat in beats:
            beat.stop()
