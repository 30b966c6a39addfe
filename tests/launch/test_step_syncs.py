"""A training step that neither logs, evaluates nor saves reads nothing from the device, in every layout.

Each rank builds the trainer's pieces exactly as ``launch.train`` does (Hydra compose, runtime,
model, engine, guard, log window, ``TrainStep``), runs two steps (first-use set-up is allowed to
read), and counts host reads in the third with ``tools.bench.host_syncs.HostSyncCounter``. The expert
backend is ``grouped_mm`` (torch's grouped GEMM runs on CPU too and takes offsets on the device);
the ``torch`` reference backend loops over experts and reads their counts on the host.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from launch.config import conf_dir
from launch.engines import build_engine
from launch.log_window import LogWindow
from launch.preemption import AgentWatch, StopSignals
from launch.run_dir import register_resolvers
from launch.step_guard import StepGuard
from launch.job import manifest_of, register_schemas, to_job_config
from launch.train import autocast_for, precision_of
from launch.train_step import TrainStep
from moe.model import MoETransformer
from parallel import setup_runtime
from tests.parallel.dist_harness import run_distributed
from tools.bench.host_syncs import HostSyncCounter

SMALL = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=32", "model.dense_d_ff=64", "model.num_experts=4",
         "train.batch_size=4", "train.seq_len=16", "logging=none", "checkpoint.dir=unused", "experts.backend=grouped_mm"]


def step_syncs(overrides: list[str], steps: int = 3) -> HostSyncCounter:
    """Host reads counted in the last of ``steps`` training steps built from ``overrides``."""
    register_resolvers()
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        job = to_job_config(compose("train", [*SMALL, *overrides]))
    runtime = setup_runtime(job.parallel, "cpu")
    torch.manual_seed(0)
    core = MoETransformer(job.model, job.router, job.experts)
    core.prepare(runtime.device)
    engine = build_engine(job, core, runtime, manifest_of(job))
    guard = StepGuard(runtime, "stop", 0, StopSignals([]), AgentWatch())
    window = LogWindow(runtime)
    step = TrainStep(job, engine, core, runtime, guard, window, autocast_for(precision_of(job, runtime.device), runtime.device))
    g = torch.Generator().manual_seed(runtime.rank)
    for i in range(steps):
        x = torch.randint(0, 256, (job.train.batch_size // runtime.world_size, job.train.seq_len), generator=g)
        counter = HostSyncCounter(core)
        if i == steps - 1:
            with counter:
                step(i, x, torch.roll(x, -1, 1))
        else:
            step(i, x, torch.roll(x, -1, 1))
            guard.settle(i, lambda: "-")
    return counter


def _rank_has_no_syncs(overrides: list[str]) -> None:
    syncs = step_syncs(overrides)
    assert syncs.total == 0, f"rank {torch.distributed.get_rank()}: {syncs.describe()}"


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["parallel=ddp"], ["parallel=fsdp"], ["parallel=fsdp", "optim.moments_dtype=bf16"]], ids=" ".join)
def test_no_host_sync_on_two_ranks(overrides: list[str]) -> None:
    """bf16 moments: ``KernelAdamW`` on FSDP2's DTensor shards obeys the device verdict without reading it."""
    run_distributed(_rank_has_no_syncs, 2, overrides)


def _rank_names_its_exchange_reads(overrides: list[str], expected: dict[str, int]) -> None:
    """Only the named reads, as many as expected: ``{"file (function)": count}``."""
    syncs = step_syncs(overrides)
    got: dict[str, int] = {}
    for site, n in syncs.sites.items():  # "tolist at parallel/token_exchange.py:73 (exchange_and_run) in blocks.0.ffn"
        path, rest = site.split(" at ")[1].split(":", 1)
        key = f"{path} ({rest.split('(')[1].split(')')[0]})" + (f" in {rest.split(' in ')[1]}" if " in " in rest else "")
        got[key] = got.get(key, 0) + n
    assert got == expected, syncs.describe()


@pytest.mark.slow
def test_expert_parallel_reads_only_its_all_to_all_splits_once_per_layer() -> None:
    """EP's all-to-all takes its split sizes on the host: one read per MoE layer (2 layers), nothing else."""
    run_distributed(_rank_names_its_exchange_reads, 2, ["parallel=ep"], {"parallel/token_exchange.py (exchange_and_run) in blocks.0.ffn": 1,
                                                                        "parallel/token_exchange.py (exchange_and_run) in blocks.1.ffn": 1})


@pytest.mark.slow
def test_fssdp_reads_only_its_token_splits_once_per_layer() -> None:
    """FSSDP exchanges routed rows between holders (split sizes on the host, once per layer). Its plan
    takes the routing counts one step late through an asynchronous copy, so planning adds no read."""
    run_distributed(_rank_names_its_exchange_reads, 2, ["parallel=fssdp"],
                    {"parallel/token_exchange.py (exchange_and_run) in blocks.0.ffn": 1,
                     "parallel/token_exchange.py (exchange_and_run) in blocks.1.ffn": 1})


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_no_host_sync_in_one_process(moments: str) -> None:
    syncs = step_syncs(["parallel=none", f"optim.moments_dtype={moments}"])
    assert syncs.total == 0, syncs.describe()


def test_the_torch_backend_reads_expert_counts_and_the_counter_names_it() -> None:
    syncs = step_syncs(["parallel=none", "experts.backend=torch"])
    assert syncs.total > 0
    assert "moe/" in syncs.describe()
