"""Run directories are named the same on every rank and on every relaunch of a job."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from launch.config import conf_dir, register_schemas
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
