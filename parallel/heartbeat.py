"""Peer liveness through the rendezvous store: which rank failed first, told in one line.

Every rank runs one daemon thread (``Heartbeat``) that talks to the job's TCP store (the one
``init_process_group`` rendezvoused through: ``MASTER_ADDR:MASTER_PORT``) with its own client,
whose timeout is ``parallel.heartbeat_s``. Every ``heartbeat_s / 20`` seconds it

1. adds 1 to its own counter ``hb/<rank>``;
2. reads its ring neighbour's (rank + 1) counter; when that has not moved for ``heartbeat_s``, or
   the neighbour runs on this host and its process is gone, it posts the neighbour as failed;
3. checks the one ``failed`` key. Whoever posts first wins (compare-and-set), so every rank names
   the same rank, the one that failed first.

A rank that raises an error posts itself (``post_own``) before it stops, so its peers, which then
see a collective fail ("Connection closed by peer" on gloo) or hang (NCCL), name it at once; the
trainer's main thread turns such an error into one ``RankFailure`` line (``peer_failure``). A
frozen rank (SIGSTOP, a stalled host) posts nothing: its watcher posts it after ``heartbeat_s``,
ends it when it runs on the same host (SIGKILL, so the launcher is not kept waiting for a process
that can never finish), and every rank, whose main thread may be stuck in a collective with it,
logs the line and exits with status ``EXIT_PEER_FAILED`` from this thread. When the store does not
answer for ``heartbeat_s`` and rank 0 hosts it (the store of ``init_process_group`` under
``launch.torchrun``), rank 0 is the one named; so that this never blames a healthy rank 0, rank 0
stays up, when it stops, until every other rank has read the failure (at most ``heartbeat_s``).

Only process liveness is watched: a rank whose process runs but whose main thread is stuck in a
device call still beats, and is caught by the process-group timeout (``parallel.timeout_s``).
Store traffic: three small requests per rank per interval, whatever the world size.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from moe.errors import MoeforgeError

log = logging.getLogger("moeforge")

EXIT_PEER_FAILED = 3
"""Exit status of a rank that stopped because another rank failed or stopped responding."""

POLLS_PER_TIMEOUT = 20
"""The thread wakes ``POLLS_PER_TIMEOUT`` times per ``heartbeat_s``."""

_DISTRIBUTED_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "timeout",
                      "process group", "collective", "socket", "peer")


class RankFailure(MoeforgeError):
    """This rank stops because another rank failed: ``line`` names it and says what this rank saw."""

    exit_code = EXIT_PEER_FAILED

    def __init__(self, line: str, failed_rank: int) -> None:
        super().__init__(line)
        self.failed_rank = failed_rank


def looks_distributed(err: BaseException) -> bool:
    """True for the errors a collective raises when a peer is gone (gloo/NCCL/store errors)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, ConnectionError, TimeoutError)) and any(w in text for w in _DISTRIBUTED_WORDS)


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` on this host exists and is not a zombie."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError, PermissionError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def first_line(err: BaseException) -> str:
    """``Type: first sentence`` of ``err`` (gloo's source-location prefix and advice dropped)."""
    lines = str(err).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else "")
    if len(text) > 100 and ". " in text:
        text = text[: text.index(". ") + 1]
    return f"{type(err).__name__}: {text}".strip()


class Heartbeat:
    """The liveness thread of one rank (module docstring). ``stop()`` ends it."""

    def __init__(self, rank: int, world: int, heartbeat_s: float, host: str, port: int, rank0_hosts_store: bool,
                 local_ranks: range, attempt: str = "0") -> None:
        self.rank, self.world, self.heartbeat_s = rank, world, float(heartbeat_s)
        self.interval = self.heartbeat_s / POLLS_PER_TIMEOUT
        self.rank0_hosts_store = rank0_hosts_store
        self.local_ranks = local_ranks
        self.hostname = socket.gethostname()
        timeout = timedelta(seconds=max(self.heartbeat_s, 1.0))
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
        self.store = dist.PrefixStore(f"moeforge/heartbeat/{attempt}", store)  # keys: <prefix>/<key>
        self.store.set(f"pid/{rank}", f"{self.hostname}:{os.getpid()}")
        self.store.add(f"hb/{rank}", 1)
        self._pids: dict[int, int] = {}
        self._lock = threading.Lock()
        self._reported = False  # one line per rank, from whichever thread gets there first
        self.handling = False  # the main thread is turning an error into a RankFailure
        self._stop = threading.Event()
        self._group = dist.group.WORLD  # the thread ends with this process group (destroyed or replaced)
        self._thread = threading.Thread(target=self._run, name="moeforge-heartbeat", daemon=True)
        self._thread.start()

    # -- what the main thread uses -------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def post_own(self, err: BaseException) -> None:
        """Post this rank as the failed one (first post wins), before it stops with ``err``."""
        self._post(self.rank, f"failed with {first_line(err)}")
        self._linger()

    def _acknowledge(self) -> None:
        """Count this rank among those that read the failure; the store's host then lingers."""
        try:
            self.store.add("read", 1)
        except Exception:  # noqa: BLE001
            pass
        self._linger()

    def _linger(self) -> None:
        """On the rank whose process hosts the store (rank 0 under launch.torchrun): stay up until
        every other survivor has read the failure (at most ``heartbeat_s``), so none of them finds
        the store gone and blames rank 0 instead."""
        if not (self.rank0_hosts_store and self.rank == 0):
            return
        deadline = time.monotonic() + self.heartbeat_s
        while time.monotonic() < deadline:
            try:
                if self.store.add("read", 0) >= self.world - 1:
                    return
            except Exception:  # noqa: BLE001
                return
            time.sleep(min(self.interval, 0.1))

    def peer_failure(self, err: BaseException) -> RankFailure | None:
        """The ``RankFailure`` that explains ``err`` when another rank failed first; None when this
        rank's own error is the first failure (it is then posted for the others)."""
        self.handling = True
        if not looks_distributed(err):  # this rank's own error (also when every rank meets the same one)
            self.post_own(err)
            return None
        deadline = time.monotonic() + self.heartbeat_s * 1.2 + 2 * self.interval
        while True:
            dead = self._dead_local_peer()
            if dead is not None:  # post it, then read back: the first post wins, so every rank names the same one
                self._post(*dead)
            found = self._read_posted() or dead
            if found is not None and found[0] != self.rank:
                failed, reason = found
                self._acknowledge()
                return RankFailure(self._line(failed, reason, err), failed)
            if found is not None or time.monotonic() >= deadline:
                break
            time.sleep(self.interval)
        return RankFailure(self._line(None, "no rank was named within the heartbeat timeout", err), -1)

    def claim_report(self) -> bool:
        """True for the one caller allowed to print this rank's failure line."""
        with self._lock:
            if self._reported:
                return False
            self._reported = True
            return True

    # -- the thread ----------------------------------------------------------------------------

    def _line(self, failed: int | None, reason: str, seen: BaseException | str) -> str:
        saw = seen if isinstance(seen, str) else first_line(seen)
        who = f"rank {failed} failed first ({reason})" if failed is not None else reason
        return f"moeforge: rank {self.rank} stopping: {who}; this rank saw: {saw[:300]}"

    def _post(self, failed: int, reason: str) -> None:
        try:
            self.store.compare_set("failed", "", f"{failed}|{reason}")
        except Exception:  # noqa: BLE001 - the store may be gone; peers then find out by themselves
            pass

    def _read_posted(self) -> tuple[int, str] | None:
        try:
            if not self.store.check(["failed"]):
                return None
            value = self.store.get("failed").decode()
        except Exception:  # noqa: BLE001
            return (0, "the rendezvous store it hosts does not answer") if self.rank0_hosts_store and self.rank != 0 else None
        rank, _, reason = value.partition("|")
        return (int(rank), reason) if rank.lstrip("-").isdigit() else None

    def _pid(self, rank: int) -> int | None:
        """Process id of ``rank`` when it runs on this host (read once from the store)."""
        if rank not in self.local_ranks or rank == self.rank:
            return None
        if rank not in self._pids:
            try:
                if not self.store.check([f"pid/{rank}"]):  # not started yet: ask again later
                    return None
                host, _, pid = self.store.get(f"pid/{rank}").decode().rpartition(":")
            except Exception:  # noqa: BLE001
                return None
            if host != self.hostname:
                return None
            self._pids[rank] = int(pid)
        return self._pids[rank]

    def _dead_local_peer(self) -> tuple[int, str] | None:
        for rank in self.local_ranks:
            pid = self._pid(rank)
            if pid is not None and not pid_alive(pid):
                return rank, f"its process {pid} is gone"
        return None

    def _ended(self) -> bool:
        """Stopped, or the process group it watches is gone (a test that destroyed it without ``stop``)."""
        return self._stop.is_set() or dist.group.WORLD is not self._group

    def _run(self) -> None:
        neighbour = (self.rank + 1) % self.world
        last_value, last_change = -1, time.monotonic()
        while not self._stop.wait(self.interval):
            if self._ended():
                return
            try:
                for rank in self.local_ranks:  # learn the local peers' pids while the store is up
                    self._pid(rank)
                self.store.add(f"hb/{self.rank}", 1)
                value = self.store.add(f"hb/{neighbour}", 0)
                now = time.monotonic()
                if value != last_value:
                    last_value, last_change = value, now
                pid = self._pid(neighbour)
                if pid is not None and not pid_alive(pid):
                    self._post(neighbour, f"its process {pid} is gone")
                elif now - last_change >= self.heartbeat_s:
                    self._post(neighbour, f"no heartbeat for {now - last_change:.1f} s; parallel.heartbeat_s={self.heartbeat_s:g}")
                    if pid is not None:
                        self._end(pid)
                posted = self._read_posted()
            except Exception:  # noqa: BLE001 - the store did not answer within heartbeat_s
                if self._ended():
                    return
                posted = (0, f"the rendezvous store it hosts did not answer for {self.heartbeat_s:g} s") if self.rank0_hosts_store and self.rank != 0 else None
                if posted is None:
                    posted = (-1, f"the rendezvous store did not answer for {self.heartbeat_s:g} s")
                pid = self._pid(0) if posted[0] == 0 else None
                if pid is not None:
                    self._end(pid)
            if posted is not None and posted[0] != self.rank:
                self._stop_from_thread(*posted)

    def _end(self, pid: int) -> None:
        try:
            os.kill(pid, 9)
        except (ProcessLookupError, PermissionError):
            pass

    def _stop_from_thread(self, failed: int, reason: str) -> None:
        """A peer failed: give the main thread one interval to report it (it is in a collective
        that failed), else report it here and end the process (it is stuck in one that never will)."""
        time.sleep(2 * self.interval)
        if self.handling or self._ended() or not self.claim_report():
            return
        self._acknowledge()
        line = self._line(failed if failed >= 0 else None, reason, "its heartbeat thread; the main thread was still waiting")
        report_failure(line)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os._exit(EXIT_PEER_FAILED)


def report_failure(line: str) -> None:
    """Log ``line`` (console on every rank, and the rank's log), and hand it to the torchrun agent
    through ``TORCHELASTIC_ERROR_FILE`` so the launcher's summary can name the first failed rank."""
    log.error(line, extra={"every_rank": True})
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json

        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass


def start_heartbeat(heartbeat_s: float, rank: int, world: int, local_rank: int, local_world: int) -> Heartbeat | None:
    """The running ``Heartbeat`` of this rank, or None in one process, with ``heartbeat_s`` 0, or
    without a TCP store address (``MASTER_ADDR``/``MASTER_PORT``)."""
    if world <= 1 or heartbeat_s <= 0 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    base = rank - local_rank
    rank0_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    return Heartbeat(rank, world, heartbeat_s, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank0_hosts,
                     range(base, base + local_world), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
