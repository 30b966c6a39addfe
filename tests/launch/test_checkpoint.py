"""Checkpoints: atomic publish, verification with fallback, no pickle, no NaN, safe pruning, config mismatch."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launch.checkpoint import (
    MANIFEST,
    CheckpointWriter,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    published_checkpoints,
    save_checkpoint,
    select_checkpoint,
    verify_checkpoint,
)
from launch.checksums import digests
from launch.dcp_io import merge_objects, split_state
from moe.errors import CheckpointError
from parallel import Runtime


def state_for(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
            "optim": {"param_groups": [{"lr": 0.1 * step, "betas": (0.9, 0.95)}]}, "trainer": {"step": step}}


def blank() -> dict:
    return {"model": {"w": torch.zeros(64, 32), "b": torch.zeros(32)}, "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]},
            "trainer": {"step": 0}}


def two_checkpoints(d: Path) -> tuple[Path, Path]:
    return save_checkpoint(d, 1, state_for(1), {}, Runtime(), keep=5), save_checkpoint(d, 2, state_for(2), {}, Runtime(), keep=5)


def moeforge_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "moeforge"]


def rehash(path: Path) -> None:
    """Rewrite the manifest's digests to match the files: a checkpoint crafted by someone else is consistent."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"] = digests(path, sorted(p.name for p in path.iterdir() if p.name != MANIFEST))
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_save_load_roundtrip_keeps_values_and_types(tmp_path: Path) -> None:
    rt = Runtime()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, state_for(step), {"model": {"d": 4}}, rt, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_00000002", "step_00000003"]  # keep=2 pruned step 1
    latest = select_checkpoint(tmp_path, rt)
    assert latest is not None and latest.name == "step_00000003"
    state = blank()
    load_checkpoint(latest, state, rt)
    want = state_for(3)
    assert torch.equal(state["model"]["w"], want["model"]["w"]) and torch.equal(state["model"]["b"], want["model"]["b"])
    assert state["trainer"] == {"step": 3}
    assert state["optim"]["param_groups"] == [{"lr": 0.30000000000000004, "betas": (0.9, 0.95)}]  # tuple again, float exact
    manifest = json.loads((latest / MANIFEST).read_text())
    assert manifest["format"] == 2 and manifest["step"] == 3 and manifest["model"] == {"d": 4}
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "objects.json", "rng_rank0.pt"}


def test_split_and_merge_state() -> None:
    t = torch.ones(2)
    state = {"model": {"w": t}, "sched": {"base_lrs": [0.1], "lr_lambdas": [None]}, "opt": {"groups": [{"betas": (0.9, 0.99)}]}}
    tensors, objects = split_state(state)
    assert tensors == {"model": {"w": t}}
    assert objects == {"sched": {"base_lrs": [0.1], "lr_lambdas": [None]}, "opt": {"groups": [{"betas": (0.9, 0.99)}]}}
    target = {"model": {"w": t}, "sched": {"base_lrs": [0.0], "lr_lambdas": [None]}, "opt": {"groups": [{"betas": (0.0, 0.0)}]}}
    merge_objects(target, json.loads(json.dumps(objects)))
    assert target["opt"]["groups"][0]["betas"] == (0.9, 0.99) and target["model"]["w"] is t


def test_incomplete_checkpoints_are_ignored_and_cleaned(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, state_for(5), {}, Runtime(), keep=3)
    (tmp_path / "step_00000009.tmp-deadbeef").mkdir()   # a save that died mid-write
    (tmp_path / "step_00000004.del-deadbeef").mkdir()   # a prune that died mid-delete
    (tmp_path / "step_00000010").mkdir()                 # no manifest: never completed
    latest = select_checkpoint(tmp_path, Runtime())
    assert latest is not None and latest.name == "step_00000005"
    save_checkpoint(tmp_path, 6, state_for(6), {}, Runtime(), keep=3)
    assert not (tmp_path / "step_00000009.tmp-deadbeef").exists() and not (tmp_path / "step_00000004.del-deadbeef").exists()


def test_rng_state_restored(tmp_path: Path) -> None:
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 1, state_for(1), {}, Runtime(), keep=1)
    expected = torch.rand(5)
    torch.manual_seed(99)
    load_checkpoint(path, blank(), Runtime())
    assert torch.equal(torch.rand(5), expected)


def test_mismatched_config_named(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, state_for(1), {"model": {"num_experts": 8}}, Runtime(), keep=1)
    check_compatible(path, {"model": {"num_experts": 8}})
    with pytest.raises(CheckpointError, match=r"model\.num_experts=8 but this run has model\.num_experts=16"):
        check_compatible(path, {"model": {"num_experts": 16}})


def test_shape_mismatch_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, state_for(1), {}, Runtime(), keep=1)
    state = blank()
    state["model"]["w"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path, state, Runtime())


def _random_bytes_inside(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = os.urandom(min(4096, len(data) - mid))
    p.write_bytes(bytes(data))


CORRUPTIONS = {
    "4 KB of random bytes inside .distcp": ("__0_0.distcp", _random_bytes_inside, "__0_0.distcp does not match its SHA-256"),
    "truncated .distcp": ("__0_0.distcp", lambda p: p.write_bytes(p.read_bytes()[:1000]), "__0_0.distcp has 1000 bytes, the manifest says"),
    "deleted .distcp": ("__0_0.distcp", Path.unlink, "__0_0.distcp is missing"),
    "deleted .metadata": (".metadata", Path.unlink, ".metadata is missing"),
    "empty .metadata": (".metadata", lambda p: p.write_bytes(b""), ".metadata has 0 bytes, the manifest says"),
    "deleted rng_rank0.pt": ("rng_rank0.pt", Path.unlink, "rng_rank0.pt is missing"),
    "edited objects.json": ("objects.json", lambda p: p.write_text(p.read_text().replace('"step": 2', '"step": 7')), "objects.json does not match"),
    "garbled manifest": (MANIFEST, lambda p: p.write_text("{not json"), "moeforge.json is not readable (Expecting property name"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_newest_falls_back_to_older_naming_the_file(tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    _, newest = two_checkpoints(tmp_path)
    name, corrupt, message = CORRUPTIONS[case]
    corrupt(newest / name)
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        chosen = select_checkpoint(tmp_path, Runtime())
    assert chosen is not None and chosen.name == "step_00000001"
    lines = moeforge_lines(caplog)
    assert len(lines) == 1 and f"checkpoint {newest} failed verification: " in lines[0] and message in lines[0], lines
    assert "trying the next older one" in lines[0]
    state = blank()
    load_checkpoint(chosen, state, Runtime())
    assert torch.equal(state["model"]["w"], state_for(1)["model"]["w"])


def test_no_checkpoint_verifies_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    old, new = two_checkpoints(tmp_path)
    (old / "__0_0.distcp").unlink()
    (new / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies \(2 tried"):
        select_checkpoint(tmp_path, Runtime())


def test_checkpoint_without_checksums_is_not_loaded(tmp_path: Path) -> None:
    _, new = two_checkpoints(tmp_path)
    (new / MANIFEST).write_text(json.dumps({"step": 2, "model": {}}))  # what moeforge wrote before format 2
    assert verify_checkpoint(new, Runtime()) == ["it was written before checkpoints carried checksums (format 1, this moeforge writes 2)"]
    assert select_checkpoint(tmp_path, Runtime()).name == "step_00000001"


class Payload:
    """Unpickling this creates the folder ``marker``: proof that a pickle ran its author's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_crafted_rng_pickle_is_refused_without_running(tmp_path: Path) -> None:
    _, new = two_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    for protocol, reason in ((2, "it references posix.mkdir"), (pickle.HIGHEST_PROTOCOL, "Unsupported operand 149")):
        (new / "rng_rank0.pt").write_bytes(pickle.dumps({"cpu": Payload(marker)}, protocol=protocol))
        rehash(new)
        assert verify_checkpoint(new, Runtime()) == []  # consistent: it comes from someone else, not from a disk error
        with pytest.raises(CheckpointError, match=rf"rng_rank0.pt: not a plain RNG state \({reason}\); refused without loading it"):
            load_checkpoint(new, blank(), Runtime())
        assert not marker.exists()


def test_crafted_metadata_pickle_is_refused_without_running(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, new = two_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    (new / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rehash(new)
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        chosen = select_checkpoint(tmp_path, Runtime())
    assert chosen is not None and chosen.name == "step_00000001"
    assert "references posix.mkdir, which DCP metadata never holds" in moeforge_lines(caplog)[0]
    assert not marker.exists()


def test_pickled_dcp_entry_is_refused_without_running(tmp_path: Path) -> None:
    _, new = two_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    evil = {**split_state(state_for(2))[0], "trainer": {"step": Payload(marker)}}
    for p in new.glob("__*.distcp"):
        p.unlink()
    dcp.save(evil, checkpoint_id=str(new), no_dist=True)  # DCP pickles the non-tensor value
    rehash(new)
    problems = verify_checkpoint(new, Runtime())
    assert len(problems) == 1 and "entry 'trainer.step' is a pickled object" in problems[0]
    with pytest.raises(CheckpointError, match="pickled object"):
        load_checkpoint(new, {**blank(), "trainer": {"step": torch.zeros(())}}, Runtime())
    assert not marker.exists()


def test_nonfinite_state_is_never_saved(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path, 1, state_for(1), {}, Runtime(), keep=2)
    bad = state_for(2)
    bad["model"]["b"][3] = float("nan")
    with pytest.raises(CheckpointError, match=rf"refusing to save step 2: model\.b holds NaN/Inf \(1 tensor\(s\) in all\); the newest checkpoint stays {good}"):
        save_checkpoint(tmp_path, 2, bad, {}, Runtime(), keep=2)
    assert [p.name for p in published_checkpoints(tmp_path)] == ["step_00000001"]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_prune_keeps_newest_and_never_touches_newer(tmp_path: Path) -> None:
    """Resumed from step 1 because step 2 is corrupt; saving step 3... with keep=1 must keep what it wrote."""
    two_checkpoints(tmp_path)
    (tmp_path / "step_00000002" / "__0_0.distcp").unlink()
    save_checkpoint(tmp_path, 5, state_for(5), {}, Runtime(), keep=1)  # a later step than the corrupt one
    assert [p.name for p in published_checkpoints(tmp_path)] == ["step_00000005"]
    d2 = tmp_path / "again"
    two_checkpoints(d2)
    (d2 / "step_00000002" / "__0_0.distcp").unlink()
    save_checkpoint(d2, 1, state_for(1), {}, Runtime(), keep=1)  # an older step than the corrupt one: step 2 is left alone
    assert [p.name for p in published_checkpoints(d2)] == ["step_00000002", "step_00000001"]
    assert select_checkpoint(d2, Runtime()).name == "step_00000001"


def test_same_step_republished_over_a_corrupt_one(tmp_path: Path) -> None:
    _, new = two_checkpoints(tmp_path)
    (new / "__0_0.distcp").write_bytes(b"garbage")
    save_checkpoint(tmp_path, 2, state_for(2), {}, Runtime(), keep=2)
    assert select_checkpoint(tmp_path, Runtime()).name == "step_00000002"
    assert latest_checkpoint(tmp_path).name == "step_00000002" and not list(tmp_path.glob("*.del-*"))


def test_async_save_is_published_by_finish_and_stages_a_copy(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, Runtime(), keep=2, manifest={}, async_save=True)
    state = state_for(1)
    want = state["model"]["w"].clone()
    assert writer.save(1, state) is None
    state["model"]["w"].mul_(0)  # training goes on while the shards are written
    assert latest_checkpoint(tmp_path) is None  # not published before finish
    path = writer.finish()
    assert path is not None and verify_checkpoint(path, Runtime()) == []
    loaded = blank()
    load_checkpoint(path, loaded, Runtime())
    assert torch.equal(loaded["model"]["w"], want)
