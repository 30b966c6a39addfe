"""Run a function on N gloo ranks on CPU: ``run_distributed(fn, world_size, *args)``.

Ranks are spawned processes (spawn, not fork: fork can deadlock gloo in a big pytest session,
OLMo-core PR #736). Starting a process and importing torch costs seconds on a busy 2-core CI
machine, so the N ranks of a world size are started once per test session and reused: each call
sends them the function (found again by file and name, which works under any pytest import mode)
and a fresh free port; each rank sets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), runs the function, which builds its own process
group through ``parallel.setup_runtime`` exactly as under torchrun, and tears the group down.

A rank that raises fails the test with that rank's traceback; a call that runs past
``timeout_s`` (a hang) kills the ranks and fails the test; the next call starts new ranks.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import queue
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: str) -> Any:
    name = "_dist_target_" + os.path.splitext(os.path.basename(path))[0]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _rank_loop(rank: int, world: int, tasks: Any, results: Any, sys_path: list[str]) -> None:
    sys.path[:] = sys_path
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        port, path, name, args = task
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MOEFORGE_DEVICE="cpu",
        )
        try:
            getattr(_load(path), name)(*args)
            results.put((rank, None))
        except BaseException:  # report every failure, keep serving
            results.put((rank, traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class _Pool:
    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_rank_loop, args=(r, world, self.tasks[r], self.results, list(sys.path)), daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., None], args: tuple, timeout_s: float) -> list[str]:
        port = free_port()
        for q in self.tasks:
            q.put((port, fn.__code__.co_filename, fn.__name__, args))
        errors: list[str] = []
        for _ in range(self.world):
            try:
                rank, err = self.results.get(timeout=timeout_s)
            except queue.Empty:
                if errors:
                    return errors + ["(other ranks stuck after the failure above)"]
                raise
            if err is not None:
                errors.append(f"rank {rank}:\n{err}")
                if len(errors) == 1:  # the others may be stuck in a collective with the failed rank
                    timeout_s = min(timeout_s, 20.0)
        return errors

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()


_POOLS: dict[int, _Pool] = {}


def _close_all() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(_close_all)


def run_distributed(fn: Callable[..., None], world_size: int, *args: Any, timeout_s: float = 120.0) -> None:
    """Run ``fn(*args)`` on ``world_size`` CPU ranks; fail with the ranks' tracebacks or on a hang."""
    pool = _POOLS.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        errors = pool.run(fn, args, timeout_s)
    except queue.Empty:
        pool.close()
        del _POOLS[world_size]
        raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout_s:.0f}s (hang?)") from None
    if errors:
        pool.close()  # a failed rank may have left its peers inside a collective
        del _POOLS[world_size]
        raise AssertionError(f"{fn.__name__} failed on {len(errors)} of {world_size} ranks:\n" + "\n".join(errors))
