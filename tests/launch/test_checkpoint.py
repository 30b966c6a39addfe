"""Checkpoints: atomic publish, newest-complete lookup, pruning, config mismatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.checkpoint import MANIFEST, check_compatible, latest_checkpoint, load_checkpoint, save_checkpoint
from moe.errors import CheckpointError
from parallel import Runtime


def test_save_load_roundtrip_and_latest(tmp_path: Path) -> None:
    rt = Runtime()
    w = torch.randn(4, 3)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": w * step, "trainer": {"step": step}}, {"model": {"d": 4}}, rt, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_00000002", "step_00000003"]
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_00000003"
    state = {"w": torch.zeros(4, 3), "trainer": {"step": 0}}
    torch.manual_seed(123)
    load_checkpoint(latest, state, rt)
    assert torch.equal(state["w"], w * 3) and state["trainer"]["step"] == 3


def test_incomplete_checkpoints_are_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, {"w": torch.ones(2)}, {}, Runtime(), keep=3)
    (tmp_path / "step_00000009.tmp-deadbeef").mkdir()   # a save that died mid-write
    (tmp_path / "step_00000010").mkdir()                 # no manifest: never completed
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_00000005"
    save_checkpoint(tmp_path, 6, {"w": torch.ones(2)}, {}, Runtime(), keep=3)
    assert not (tmp_path / "step_00000009.tmp-deadbeef").exists()


def test_rng_state_restored(tmp_path: Path) -> None:
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {}, Runtime(), keep=1)
    expected = torch.rand(5)
    torch.manual_seed(99)
    load_checkpoint(path, {"w": torch.zeros(1)}, Runtime())
    assert torch.equal(torch.rand(5), expected)


def test_mismatched_config_named(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"model": {"num_experts": 8}}, Runtime(), keep=1)
    assert (path / MANIFEST).is_file()
    check_compatible(path, {"model": {"num_experts": 8}})
    with pytest.raises(CheckpointError, match=r"model\.num_experts=8 but this run has model\.num_experts=16"):
        check_compatible(path, {"model": {"num_experts": 16}})


def test_shape_mismatch_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {}, Runtime(), keep=1)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path, {"w": torch.zeros(5)}, Runtime())
