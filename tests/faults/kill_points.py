"""Kill a checkpoint save (and the prune it ends with) at every filesystem operation; check nothing is lost.

Run as ``python -m tests.faults.kill_points [--async] [--writes N]``; prints one JSON summary line.

Setup: checkpoints of steps 1 and 2 (``keep=2``) of a small model-and-optimizer state. Then, for
each kill point, a fresh copy of that directory, and a forked child that saves step 3, which
publishes step 3 and prunes step 1, and that SIGKILLs itself at the chosen operation
(``tests/faults/fs_ops.py``). The parent then checks:

- the newest checkpoint that verifies is step 3 if the kill came after its publishing rename, else
  step 2, and it loads back exactly the tensors and values saved for that step;
- a checkpoint is "lost" if that is not so (the summary counts them; the test wants 0);
- a new save of step 3 into the killed directory succeeds and leaves exactly steps 2 and 3 (keep=2),
  with no ``.tmp-``/``.del-`` folder left over.

Kill points: every operation that is not a write (mkdir, open, rename, unlink, rmdir, ...), plus
``--writes`` writes spread evenly over the save's writes (each a torn write: half the bytes, then
SIGKILL). With ``--async`` the shards are written by DCP's async_save thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

from launch.checkpoint import CheckpointWriter, load_checkpoint, select_checkpoint  # noqa: E402
from parallel import Runtime  # noqa: E402
from tests.faults.fs_ops import FsOps  # noqa: E402

MANIFEST = {"model": {"d": 8}}


def make_state(step: int) -> dict[str, Any]:
    """A model + optimizer + scheduler + trainer state whose every value depends on ``step``."""
    g = torch.Generator().manual_seed(step)
    model = {f"blocks.{i}.{n}": torch.randn(32, 16, generator=g) for i in range(3) for n in ("w1", "w2")}
    optim = {k: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(32, 16, generator=g)} for k in model}
    return {
        "model": model,
        "optim": {"state": optim, "param_groups": [{"lr": 1e-3 * step, "betas": (0.9, 0.95)}]},
        "scheduler": {"last_epoch": step, "base_lrs": [1e-3]},
        "trainer": {"step": step, "window": {"loss": [0.5 * step, 1.0]}},
    }


def template() -> dict[str, Any]:
    """A state of the same shapes, zeroed, to load into."""
    state = make_state(0)
    for sub in (state["model"], *state["optim"]["state"].values()):
        for t in sub.values():
            t.zero_()
    return state


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def save(directory: Path, step: int, async_save: bool, ops: FsOps | None = None) -> None:
    writer = CheckpointWriter(directory, Runtime(), keep=2, manifest=MANIFEST, async_save=async_save)
    if ops is None:
        writer.save(step, make_state(step))
        writer.finish()
        return
    with ops.armed():
        writer.save(step, make_state(step))
        writer.finish()


def run_child(directory: Path, kill_at: int | None, async_save: bool, trace: Path | None = None) -> int:
    """Fork; the child saves step 3 with the kill point armed. Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ops = FsOps(kill_at)
            ops.install()
            save(directory, 3, async_save, ops)
            ops.uninstall()
            if trace is not None:
                trace.write_text(json.dumps(ops.names))
        except BaseException as err:  # noqa: BLE001 - report, never fall back into the parent's code
            sys.stderr.write(f"child failed: {type(err).__name__}: {err}\n")
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def check(directory: Path, expected_step: int) -> str | None:
    """None if the newest verified checkpoint is ``expected_step`` and loads exactly; else what is wrong."""
    try:
        path = select_checkpoint(directory, Runtime())
    except Exception as err:  # noqa: BLE001
        return f"select_checkpoint raised {type(err).__name__}: {err}"
    if path is None or int(path.name.split("_")[1]) != expected_step:
        return f"newest verified is {path}, expected step {expected_step}"
    state = template()
    load_checkpoint(path, state, Runtime())
    if not same(state, make_state(expected_step)):
        return f"{path} does not load back the state saved for step {expected_step}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--async", dest="async_save", action="store_true", help="write shards with DCP async_save")
    parser.add_argument("--writes", type=int, default=8, help="how many of the save's writes to kill at (torn writes)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="moeforge_kill_"))
    base = root / "base"
    save(base, 1, args.async_save)
    save(base, 2, args.async_save)

    trace = root / "trace.json"
    dry = root / "dry"
    shutil.copytree(base, dry)
    status = run_child(dry, None, args.async_save, trace)
    if status != 0:
        raise SystemExit(f"the uninterrupted save failed (wait status {status})")
    names: list[str] = json.loads(trace.read_text())
    publish = next(i for i, n in enumerate(names, 1) if n.startswith("rename") and ".tmp-" in n and n.endswith("step_00000003"))
    writes = [i for i, n in enumerate(names, 1) if n.startswith("write")]
    picked = sorted({writes[round(j * (len(writes) - 1) / max(args.writes - 1, 1))] for j in range(args.writes)}) if writes else []
    points = sorted({i for i, n in enumerate(names, 1) if not n.startswith("write")} | set(picked))

    results = []
    for k in points:
        d = root / f"k{k}"
        shutil.copytree(base, d)
        status = run_child(d, k, args.async_save)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        problem = None if killed else f"child was not killed (wait status {status})"
        problem = problem or check(d, 3 if k > publish else 2)
        if problem is None:  # the next save recovers: publishes step 3, keeps 2 and 3, leaves no debris
            save(d, 3, args.async_save)
            left = sorted(p.name for p in d.iterdir() if p.name != "moeforge.lock")
            if left != ["step_00000002", "step_00000003"]:
                problem = f"after a new save the directory holds {left}"
        results.append({"point": k, "op": names[k - 1], "problem": problem})
        shutil.rmtree(d)
    shutil.rmtree(root)
    lost = [r for r in results if r["problem"]]
    print(json.dumps({"async": args.async_save, "ops_in_save": len(names), "writes_in_save": len(writes), "points": len(results),
                      "prune_points": sum(1 for r in results if r["point"] > publish), "lost": len(lost), "failures": lost[:5],
                      "ops": [r["op"] for r in results]}))


if __name__ == "__main__":
    main()
