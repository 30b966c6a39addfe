"""On resume, the config's optimizer values win over the checkpoint's; a plain resume is untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from launch.config import JobConfig, OptimConfig, TrainConfig
from launch.optim import apply_config, build_optimizer
from moe.errors import ConfigError


def _job(**optim: float) -> JobConfig:
    """A job whose optim and train groups are set (the only ones the optimizer reads)."""
    return JobConfig(model=None, router=None, experts=None, data=None, optim=OptimConfig(**optim), train=TrainConfig(steps=100),  # type: ignore[arg-type]
                     logging=None, checkpoint=None, parallel=None, engine=None)  # type: ignore[arg-type]


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


def _lrs(steps: int, **optim: object) -> list[float]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt, sched = build_optimizer(model, JobConfig(model=None, router=None, experts=None, data=None,  # type: ignore[arg-type]
                                                  optim=OptimConfig(lr=2.0, **optim), train=TrainConfig(steps=steps),  # type: ignore[arg-type]
                                                  logging=None, checkpoint=None, parallel=None, engine=None))  # type: ignore[arg-type]
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_values() -> None:
    lrs = _lrs(12, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lrs[:2] == pytest.approx([1.0, 2.0])  # (step + 1) / warmup * lr
    # after warmup: lr (m + (1 - m)(1 + cos(pi (s - w) / (S - w))) / 2), m = 0.1, w = 2, S = 12
    expect = [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 10))) for s in range(2, 12)]
    assert lrs[2:] == pytest.approx(expect, rel=1e-12)


def test_wsd_schedule_is_flat_then_decays_linearly_over_the_last_fraction() -> None:
    lrs = _lrs(20, schedule="wsd", warmup_steps=4, decay_fraction=0.25, min_lr_ratio=0.0)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[4:15] == pytest.approx([2.0] * 11)  # stable until step 15 = 20 - 0.25 * 20
    assert lrs[15:] == pytest.approx([2.0 * (1 - i / 5) for i in range(5)])  # linear towards 0 at step 20


def test_constant_schedule_after_warmup() -> None:
    assert _lrs(6, schedule="constant", warmup_steps=2) == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])


def test_unknown_schedule_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"optim\.schedule \('linear'\) must be one of"):
        OptimConfig(schedule="linear")
