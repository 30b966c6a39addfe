"""A step the device flags as non-finite changes no weight and no optimizer state; a finite one is a plain step."""

from __future__ import annotations

import pytest
import torch

from launch.masked_update import clip_scale, masked_step, takes_found_inf
from launch.optim import init_adamw_state
from launch.preemption import AgentWatch, StopSignals
from launch.step_guard import NonFiniteError, StepGuard
from parallel import Runtime


def _model_and_optimizer(fused: bool) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)
    if not fused:
        init_adamw_state(opt)
    return model, opt


def _grads(model: torch.nn.Module, scale: float = 1.0) -> None:
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, scale * (i + 1)) + torch.arange(p.numel(), dtype=p.dtype).view_as(p) * 0.01


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [v.clone() for st in opt.state.values() for v in st.values()]


@pytest.mark.parametrize("fused", [False, True])
def test_nan_step_updates_no_weight_and_no_optimizer_state(fused: bool) -> None:
    model, opt = _model_and_optimizer(fused)
    assert takes_found_inf(opt) == fused
    for _ in range(2):  # moments and step counts are non-trivial before the NaN step
        _grads(model)
        masked_step(opt, torch.tensor(True))
    before = _snapshot(model, opt)
    _grads(model, float("nan"))
    masked_step(opt, torch.tensor(False))
    after = _snapshot(model, opt)
    assert len(after) == len(before) == 4 + 4 * 3
    for a, b in zip(after, before):
        assert torch.equal(a, b)
    _grads(model)  # and training goes on as if the NaN step never happened
    masked_step(opt, torch.tensor(True))
    twin, twin_opt = _model_and_optimizer(fused)
    for _ in range(3):
        _grads(twin)
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_finite_step_equals_a_plain_step() -> None:
    model, opt = _model_and_optimizer(False)
    twin, twin_opt = _model_and_optimizer(False)
    _grads(model), _grads(twin)
    masked_step(opt, torch.tensor(True))
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_clipping_folded_into_fused_adamw_equals_clip_then_step() -> None:
    model, opt = _model_and_optimizer(True)
    twin, twin_opt = _model_and_optimizer(True)
    _grads(model, 30.0), _grads(twin, 30.0)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(norm) > 1.0
    masked_step(opt, torch.tensor(True), clip_scale(norm, 1.0))
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert clip_scale(norm, 0.0) is None
    assert float(clip_scale(torch.tensor(0.5), 1.0)) == 1.0


def test_grad_scale_needs_an_optimizer_that_applies_it() -> None:
    _, opt = _model_and_optimizer(False)
    with pytest.raises(ValueError, match="grad_scale needs an optimizer that applies it"):
        masked_step(opt, torch.tensor(True), torch.tensor(2.0))


def _guard(policy: str) -> StepGuard:
    return StepGuard(Runtime(), policy, 1, StopSignals([]), AgentWatch())


def test_guard_settles_posted_steps_in_order_one_step_late() -> None:
    g = _guard("stop")
    assert bool(g.post(0, torch.tensor(2.0), torch.tensor(1.0)))
    ok = g.post(1, torch.tensor(float("nan")), torch.tensor(1.0))
    assert not bool(ok)
    finished: list[str] = []
    g.settle(0, lambda: "ckpt/step_00000001", before_stop=lambda: finished.append("finish"))  # step 0: finite, nothing happens
    assert finished == []
    with pytest.raises(NonFiniteError, match=r"^step 2: loss nan, gradient norm 1 \(rank 0\) is not finite; stopped before the optimizer "
                                             r"step \(train.on_nonfinite=stop\), nothing saved after ckpt/step_00000001"):
        g.settle(1, lambda: "ckpt/step_00000001", before_stop=lambda: finished.append("finish"))
    assert finished == ["finish"]  # a pending async save is published first


def test_guard_skip_policy_counts_and_stops_past_the_limit() -> None:
    g = _guard("skip")
    nan = torch.tensor(float("nan"))
    for step in range(3):
        g.post(step, nan if step != 1 else torch.tensor(1.0), torch.tensor(1.0))
    g.settle(2, lambda: "-")
    assert (g.skipped_total, g.consecutive) == (2, 1)
    g.post(3, nan, nan)
    with pytest.raises(NonFiniteError, match="1 steps in a row were already skipped"):
        g.settle(3, lambda: "-")
