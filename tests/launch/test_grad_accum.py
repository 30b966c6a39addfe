"""Gradient accumulation (``train.grad_accum``): N micro-batches make the step of one big batch.

Exact (1e-6) for everything that is a mean over tokens or sequences: cross-entropy, router
z-loss, DeepSeek-V3's sequence-wise balance loss, routing statistics, sigmoid_bias's load counts
and every gradient. Switch's batch-level balance loss (f.P over the batch) is the mean of the
micro-batches' losses, each computed on its micro-batch alone, as in Megatron-Core.
"""

from __future__ import annotations

import copy

import pytest
import torch

from launch.config import DataConfig, JobConfig, OptimConfig, TrainConfig
from launch.engines import build_engine
from launch.engines.native import NativeConfig
from launch.train import autocast_for
from launch.train_step import forward_backward
from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers import RouterConfig
from moe.routers.sigmoid_bias import SigmoidBiasConfig
from moe.routers.topk import TopKConfig
from parallel import ParallelConfig, Runtime

CPU = torch.device("cpu")


def job(grad_accum: int) -> JobConfig:
    return JobConfig(model=None, router=None, experts=None, data=DataConfig(doc_separator=0), optim=OptimConfig(),  # type: ignore[arg-type]
                     train=TrainConfig(batch_size=8, grad_accum=grad_accum), logging=None, checkpoint=None,  # type: ignore[arg-type]
                     parallel=ParallelConfig(), engine=NativeConfig())


def model_for(router: RouterConfig) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_experts=4, d_ff=32, dense_d_ff=64)
    model = MoETransformer(cfg, router, ExpertsConfig())
    model.prepare(CPU)
    return model


def run(model: MoETransformer, grad_accum: int, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=CPU, cfg=ParallelConfig(), mesh=None)
    engine = build_engine(job(grad_accum), model, runtime, manifest={})  # the native engine, as the trainer builds it
    ce, aux = forward_backward(engine, runtime, tokens[:, :-1], tokens[:, 1:], 5, job(grad_accum), autocast_for("fp32", CPU))
    return ce, aux, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n", [2, 4])
def test_micro_batches_equal_one_big_batch(n: int) -> None:
    """sigmoid_bias with its sequence-wise balance loss: every term is a mean over sequences or tokens."""
    tokens = torch.randint(1, 256, (8, 13), generator=torch.Generator().manual_seed(3))
    tokens[:, 6] = 0  # a document boundary inside every sequence
    router = SigmoidBiasConfig(k=2, seq_aux_loss_coef=0.05)
    big, micro = model_for(router), model_for(router)
    ce1, aux1, g1 = run(big, 1, tokens)
    ce_n, aux_n, g_n = run(micro, n, tokens)
    torch.testing.assert_close(ce_n, ce1, rtol=1e-6, atol=1e-6)
    assert aux_n.keys() == aux1.keys() and aux1
    for name in aux1:
        torch.testing.assert_close(aux_n[name], aux1[name], rtol=1e-6, atol=1e-7)
    assert g_n.keys() == g1.keys()
    for name in g1:
        torch.testing.assert_close(g_n[name], g1[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for a, b in zip(micro.router_step_sums(), big.router_step_sums()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats_n = micro.take_routing_metrics(lambda ts: None, lambda ts: None)
    stats_1 = big.take_routing_metrics(lambda ts: None, lambda ts: None)
    assert stats_n.keys() == stats_1.keys()
    for key, value in stats_1.items():
        if key.endswith("/tokens_per_expert"):
            assert stats_n[key] == value
        elif key.endswith(("/aux_loss", "/seq_aux_loss", "/z_loss")):
            continue  # per-forward means of the losses: checked above as the step's aux values
        else:
            assert stats_n[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_switch_balance_loss_is_the_mean_of_micro_batch_losses() -> None:
    tokens = torch.randint(1, 256, (8, 13), generator=torch.Generator().manual_seed(4))
    router = TopKConfig(k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    model = model_for(router)
    twin = copy.deepcopy(model)
    ce, aux, _ = run(model, 4, tokens)
    with torch.no_grad():  # each micro-batch alone through the untouched twin
        parts = [twin(chunk[:, :-1], step=5, doc_ids_BS=None)[1] for chunk in tokens.chunk(4)]
        big_ce = torch.nn.functional.cross_entropy(twin(tokens[:, :-1])[0].flatten(0, 1), tokens[:, 1:].flatten())
    for name in ("aux_loss", "z_loss"):
        torch.testing.assert_close(aux[name], sum(p[name] for p in parts) / 4, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ce, big_ce, rtol=1e-6, atol=1e-6)


def test_batch_must_divide_into_micro_batches() -> None:
    from moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.batch_size \(10\) must be divisible by train\.grad_accum \(4\)"):
        TrainConfig(batch_size=10, grad_accum=4)
