"""Run directories are named the same on every rank and on every relaunch of a job."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from launch.config import conf_dir
from launch.job import register_schemas
from launch.run_dir import register_resolvers, run_id

UUID = "3f1e2d4c-5b6a-4978-8a9b-0c1d2e3f4a5b"


def test_run_id_rules() -> None:
    assert run_id({}) == "local"
    assert run_id({"TORCHELASTIC_RUN_ID": UUID}) == "local"  # torchrun --standalone makes one up per launch
    assert run_id({"TORCHELASTIC_RUN_ID": "none"}) == "local"  # torchrun's default --rdzv-id
    assert run_id({"TORCHELASTIC_RUN_ID": "exp1"}) == "exp1"
    assert run_id({"TORCHELASTIC_RUN_ID": UUID, "MOEFORGE_RUN_ID": "mine"}) == "mine"


def test_repeated_standalone_torchrun_resolves_to_one_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    register_resolvers()
    register_schemas()
    monkeypatch.delenv("MOEFORGE_RUN_ID", raising=False)
    dirs = []
    for made_up in (UUID, UUID.replace("3f", "aa")):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", made_up)
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True)
            dirs.append(cfg.hydra.run.dir)
    assert dirs == ["runs/local", "runs/local"]


def test_sweep_job_names_and_changed_overrides(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from omegaconf import OmegaConf

    from launch.run_dir import changed_overrides, sweep_job_name

    assert sweep_job_name("runs/sweep_local", 3) == "sweep_local/3"
    assert changed_overrides(tmp_path, ["optim.lr=0.001"]) == []  # a fresh job directory
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(["optim.lr=0.001", "train.steps=2"]), tmp_path / ".hydra" / "overrides.yaml")
    assert changed_overrides(tmp_path, ["optim.lr=0.001", "train.steps=2"]) == []  # the same job, resumed
    assert changed_overrides(tmp_path, ["optim.lr=0.002", "router=hash"]) == [
        "optim.lr: 0.001 -> 0.002", "router: (unset) -> hash", "train.steps: 2 -> (unset)"]
