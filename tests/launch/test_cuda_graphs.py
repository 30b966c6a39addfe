"""train.cuda_graphs=true: one line refusing each layout that cannot be captured; on a GPU, the same losses as eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.cuda_graphs import refusal
from moe.expert_backends import expert_backend
from tests.launch.test_engine_deepspeed import job_of
from tests.launch.test_train import launch, read_metrics

CUDA = torch.device("cuda", 0)  # a device object only: refusal() never touches it for these backends


@pytest.mark.parametrize(("overrides", "device", "backend", "says"), [
    ([], torch.device("cpu"), "triton", "train.cuda_graphs=true needs a CUDA device; this run is on cpu"),
    (["parallel=ep"], CUDA, "triton", "parallel=ep cannot be captured (its all-to-all takes per-layer split sizes"),
    (["parallel=fssdp"], CUDA, "triton", "parallel=fssdp cannot be captured"),
    (["parallel=fsdp"], CUDA, "triton", "parallel=fsdp is not supported"),
    (["experts.capacity_factor=1.25"], CUDA, "triton", "experts.capacity_factor=1.25 drops tokens"),
    ([], CUDA, "torch", "experts.backend resolved to torch, which loops over experts with counts read on the host"),
])
def test_refusals_name_the_layout_and_why(overrides: list[str], device: torch.device, backend: str, says: str) -> None:
    why = refusal(job_of(*overrides), device, expert_backend(backend))
    assert why is not None and says in why and "\n" not in why


@pytest.mark.parametrize("mode", ["none", "ddp"])
def test_capturable_layouts_are_not_refused(mode: str) -> None:
    assert refusal(job_of(f"parallel={mode}"), CUDA, expert_backend("triton")) is None


def test_cpu_run_refuses_with_one_line_before_training(tmp_path: Path) -> None:
    out = launch(tmp_path, "train.cuda_graphs=true", "logging=none", "train.steps=2")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "moeforge: error: train.cuda_graphs=true needs a CUDA device; this run is on cpu" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.gpu
def test_cuda_graph_losses_equal_eager_on_a_gpu(tmp_path: Path) -> None:
    common = ["logging=none", "checkpoint.enabled=false", "train.steps=12", "train.log_every=1", "train.eval_every=12",
              "train.eval_batches=2", "experts.backend=grouped_mm" if torch.cuda.get_device_capability() >= (9, 0) else "experts.backend=triton",
              "train.precision=fp32"]
    eager = launch(tmp_path / "eager", *common, device="cuda")
    graphs = launch(tmp_path / "graphs", *common, "train.cuda_graphs=true", device="cuda")
    assert eager.returncode == 0 and graphs.returncode == 0, (eager.stderr[-2000:], graphs.stderr[-2000:])
    a = [r["loss"] for r in read_metrics(tmp_path / "eager") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "graphs") if "loss" in r]
    assert len(a) == len(b) == 12
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=2e-3, atol=2e-3)
