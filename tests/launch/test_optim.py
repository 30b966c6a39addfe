"""On resume, the config's optimizer values win over the checkpoint's; a plain resume is untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from launch.config import JobConfig, OptimConfig, TrainConfig
from launch.optim import apply_config, build_optimizer


def _job(**optim: float) -> JobConfig:
    """A job whose optim and train groups are set (the only ones the optimizer reads)."""
    return JobConfig(model=None, router=None, experts=None, data=None, optim=OptimConfig(**optim), train=TrainConfig(steps=100),  # type: ignore[arg-type]
                     logging=None, checkpoint=None, parallel=None)  # type: ignore[arg-type]


def test_plain_resume_is_untouched_and_a_changed_lr_is_applied() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt, sched = build_optimizer(model, _job(lr=1.0, warmup_steps=10))
    for _ in range(5):
        sched.step()
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    assert apply_config(opt, sched, _job(lr=1.0, warmup_steps=10)) == []
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    changed = apply_config(opt, sched, _job(lr=0.001, warmup_steps=10))
    assert changed == ["optim.lr: 1.0 -> 0.001"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001 * 6 / 10] * 2, rel=1e-12)  # step 5 of a 10-step warmup
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.001 * 7 / 10] * 2, rel=1e-12)
