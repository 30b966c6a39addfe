"""``train.precision``: auto resolves per device; bf16 autocasts the GEMMs and keeps fp32 parameters."""

from __future__ import annotations

import pytest
import torch

from launch.config import JobConfig, TrainConfig
from launch.train import autocast_for, precision_of
from moe.errors import ConfigError
from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers.topk import TopKConfig


def job(precision: str) -> JobConfig:
    return JobConfig(model=None, router=None, experts=None, data=None, optim=None, train=TrainConfig(precision=precision),  # type: ignore[arg-type]
                     logging=None, checkpoint=None, parallel=None, engine=None)  # type: ignore[arg-type]


def test_auto_is_bf16_on_cuda_and_fp32_elsewhere() -> None:
    assert precision_of(job("auto"), torch.device("cuda", 0)) == "bf16"
    assert precision_of(job("auto"), torch.device("cpu")) == "fp32"
    assert precision_of(job("fp32"), torch.device("cuda", 0)) == "fp32"
    assert precision_of(job("bf16"), torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision \('fp16'\) must be one of"):
        TrainConfig(precision="fp16")


def test_bf16_autocast_runs_gemms_in_bf16_with_fp32_parameters() -> None:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(d_model=32, num_layers=2, num_heads=4, num_experts=4, d_ff=32), TopKConfig(k=2), ExpertsConfig())
    model.prepare(torch.device("cpu"))
    x = torch.randint(0, 256, (2, 9))
    with autocast_for("fp32", torch.device("cpu")):
        ref, _ = model(x)
    with autocast_for("bf16", torch.device("cpu")):
        low, _ = model(x)
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # bf16 keeps 8 bits of mantissa: the logits agree to bf16 precision, not to fp32's
    diff = (low.float() - ref).abs().max().item()
    assert 0 < diff < 0.1 * ref.abs().max().item()
