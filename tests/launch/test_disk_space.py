"""Free-space checks before a checkpoint save, and the one-line message of a write that fails anyway.

Unit tests fake ``os.statvfs``; the end-to-end test mounts a size-limited tmpfs (needs root and
``mount``; it says so when it cannot) and fills it with real checkpoints.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launch import disk_space
from launch.checkpoint import CheckpointWriter, published_checkpoints
from launch.disk_space import DiskFullError, describe_write_error
from moe.errors import CheckpointError
from parallel import Runtime

REPO = Path(__file__).resolve().parents[2]


def fake_statvfs(free: int, read_only: bool = False):  # noqa: ANN201
    def statvfs(path: object) -> SimpleNamespace:
        return SimpleNamespace(f_bavail=free // 512, f_frsize=512, f_flag=os.ST_RDONLY if read_only else 0)
    return statvfs


def state() -> dict:
    return {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "trainer": {"step": 1}}


def test_warns_when_two_do_not_fit_and_stops_before_writing_when_one_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    writer = CheckpointWriter(tmp_path, Runtime(), keep=5, manifest={})
    first = writer.save(1, state())
    size = sum(p.stat().st_size for p in first.iterdir())
    assert size > 4096 * 4  # the tensor's bytes and the small files

    monkeypatch.setattr(os, "statvfs", fake_statvfs(int(1.5 * size)))
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        assert writer.save(2, state()) is not None
    warned = [r.getMessage() for r in caplog.records if "room for fewer than two" in r.getMessage()]
    assert len(warned) == 1 and f"{size:,} bytes" in warned[0]

    monkeypatch.setattr(os, "statvfs", fake_statvfs(size // 2))
    before = {p.name: sorted(f.read_bytes() for f in p.iterdir()) for p in published_checkpoints(tmp_path)}
    with pytest.raises(DiskFullError) as info:
        writer.save(3, state())
    msg = str(info.value)
    assert "\n" not in msg and "step 3" in msg and f"{size // 2 // 512 * 512:,} bytes" in msg and "step_00000002" in msg
    after = {p.name: sorted(f.read_bytes() for f in p.iterdir()) for p in published_checkpoints(tmp_path)}
    assert after == before and sorted(after) == ["step_00000001", "step_00000002"]
    assert not list(tmp_path.glob("*.tmp-*"))  # nothing was even started


def test_first_save_is_not_checked_in_advance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "statvfs", fake_statvfs(0))
    assert CheckpointWriter(tmp_path, Runtime(), keep=2, manifest={}).save(1, state()) is not None


@pytest.mark.parametrize("code,name,text", [(errno.ENOSPC, "ENOSPC", "No space left on device"),
                                            (errno.EDQUOT, "EDQUOT", "Disk quota exceeded"),
                                            (errno.EROFS, "EROFS", "Read-only file system")])
def test_write_error_names_the_os_error_from_the_exception_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 code: int, name: str, text: str) -> None:
    monkeypatch.setattr(os, "statvfs", fake_statvfs(12_288))
    try:
        try:
            raise OSError(code, os.strerror(code))
        except OSError as inner:
            raise RuntimeError("wrapped by a library") from inner
    except RuntimeError as err:
        line = describe_write_error(err, 7, tmp_path, 5_000_000)
    assert line == (f"could not write checkpoint step 7 into {tmp_path}: {text} ({name}); needs about 5,000,000 bytes (4.77 MiB), "
                    f"12,288 bytes (12.00 KiB) free")


def test_write_error_without_errno_is_read_from_the_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's zip writer reports ``unexpected pos`` without the OS error: statvfs tells which."""
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(os, "statvfs", fake_statvfs(1024))
    assert "No space left on device (ENOSPC); needs about 4,096 bytes" in describe_write_error(err, 1, tmp_path, 4096)
    monkeypatch.setattr(os, "statvfs", fake_statvfs(10**9, read_only=True))
    assert "Read-only file system (EROFS)" in describe_write_error(err, 1, tmp_path, 4096)
    monkeypatch.setattr(os, "statvfs", fake_statvfs(10**9))
    assert "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598;" in describe_write_error(err, 1, tmp_path, 4096)


def test_failed_write_removes_its_partial_folder_and_keeps_older_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = CheckpointWriter(tmp_path, Runtime(), keep=5, manifest={})
    writer.save(1, state())
    original = torch.save

    def full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as info:
        writer.save(2, state())
    monkeypatch.setattr(torch, "save", original)
    assert "No space left on device (ENOSPC)" in str(info.value) and "the newest checkpoint stays step_00000001" in str(info.value)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["step_00000001"]
    assert isinstance(info.value.__cause__, type(None))  # raised ``from None``: main prints one line, no chained traceback


def _two_rank_worker(directory: str) -> None:
    from parallel import ParallelConfig, setup_runtime

    rt = setup_runtime(ParallelConfig(mode="ddp", timeout_s=60))
    real = os.statvfs  # the ranks are reused by later tests: put it back
    try:
        writer = CheckpointWriter(directory, rt, keep=5, manifest={})
        writer.save(1, state())
        if rt.rank == 1:  # only rank 1 sees a full disk (a node-local checkpoint.dir, say)
            os.statvfs = fake_statvfs(100)
        try:
            writer.save(2, state())
        except DiskFullError as err:
            assert ("rank 1: not enough space" in str(err)) == (rt.rank == 1), str(err)
        else:
            raise AssertionError(f"rank {rt.rank} went on to write")
        rt.barrier()
        assert [p.name for p in published_checkpoints(directory)] == ["step_00000001"]
    finally:
        os.statvfs = real
        rt.shutdown()


def test_the_stop_is_agreed_by_every_rank(tmp_path: Path) -> None:
    from tests.parallel.dist_harness import run_distributed

    run_distributed(_two_rank_worker, 2, str(tmp_path))


def _can_mount(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


SMALL = ["model.num_layers=2", "model.d_model=64", "model.d_ff=64", "model.dense_d_ff=128", "model.num_experts=4",
         "train.batch_size=8", "train.seq_len=64", "logging=none", "train.threads=1", "data.max_bytes=400000",
         "train.steps=8", "checkpoint.every=2", "train.log_every=2", "train.eval_every=8", "checkpoint.keep=2"]


@pytest.mark.slow
def test_full_tmpfs_warns_stops_and_resumes_after_space_is_freed(tmp_path: Path) -> None:
    """A tmpfs with room for a bit under two checkpoints of the small model (2.2 MB each): the save of
    step 4 warns, step 6 stops before writing (exit 2, one line, no traceback); grown to 20 MB the
    same command resumes from step 4 and finishes. A 1 MB tmpfs makes the first save fail with ENOSPC."""
    ck = tmp_path / "ck"
    if not _can_mount(ck):
        pytest.skip("cannot mount a tmpfs here (needs root); the fake-statvfs tests above cover the logic")
    env = {**os.environ, "MOEFORGE_DEVICE": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "launch.train", f"hydra.run.dir={tmp_path}", f"checkpoint.dir={ck}", *SMALL]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(ck)], check=True)
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
        errors = [line for line in out.stderr.splitlines() if "moeforge: error:" in line]
        assert len(errors) == 1 and "not enough space for checkpoint step 6" in errors[0] and "step_00000004" in errors[0]
        assert "room for fewer than two more checkpoints" in out.stderr
        assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]
        subprocess.run(["mount", "-o", "remount,size=20m", str(ck)], check=True)
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert "resumed from" in again.stderr and "step_00000004 at step 4" in again.stderr
        assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]
    finally:
        subprocess.run(["umount", str(ck)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ck)], check=True)
    try:
        out = subprocess.run([*cmd, "hydra.run.dir=" + str(tmp_path / "second")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        errors = [line for line in out.stderr.splitlines() if "moeforge: error:" in line]
        assert len(errors) == 1, out.stderr
        assert "could not write checkpoint step 2" in errors[0] and "No space left on device (ENOSPC)" in errors[0]
        assert "needs about" in errors[0] and "free" in errors[0] and "no checkpoint was published yet" in errors[0]
        assert not [p for p in ck.iterdir() if p.is_dir()]
    finally:
        subprocess.run(["umount", str(ck)], check=True)
