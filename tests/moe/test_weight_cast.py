"""``moe.expert_backends.weight_cast``: one launch each way, the same bits as ``Tensor.to``."""

from __future__ import annotations

import pytest
import torch

from moe.expert_backends.weight_cast import cast_weights, cast_weights_reference
from tools.bench.op_counter import OpCounter


def stacked_weights(E: int, D: int, F: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((E, D, F), (E, D, F), (E, F, D))
    return tuple((torch.randn(s, generator=g) * 3).to(dtype).requires_grad_() for s in shapes)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_values_and_gradients_equal_the_per_tensor_casts(seed: int, dtype: torch.dtype) -> None:
    weights = stacked_weights(3, 8, 12, seed)
    twins = tuple(w.detach().clone().requires_grad_() for w in weights)
    fast, slow = cast_weights(weights, dtype), cast_weights_reference(twins, dtype)
    assert [t.dtype for t in fast] == [dtype] * 3
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(seed + 10)
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in fast]
    got, want = torch.autograd.grad(fast, weights, grads), torch.autograd.grad(slow, twins, grads)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_only_the_weights_that_need_a_gradient_get_one() -> None:
    weights = stacked_weights(2, 4, 8, 0)
    weights[1].requires_grad_(False)
    out = cast_weights(weights, torch.bfloat16)
    loss = sum(t.float().sum() for t in out)
    gate, down = torch.autograd.grad(loss, [weights[0], weights[2]])
    assert torch.equal(gate, torch.ones_like(gate)) and torch.equal(down, torch.ones_like(down))
    assert weights[1].grad is None


def test_weights_already_in_the_dtype_are_returned_as_they_are() -> None:
    weights = stacked_weights(2, 4, 8, 0, torch.bfloat16)
    out = cast_weights(weights, torch.bfloat16)
    assert all(a is b for a, b in zip(out, weights))


def test_mixed_source_dtypes_fall_back_to_the_per_tensor_casts() -> None:
    w32, w64 = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)
    a, b = cast_weights((w32, w64), torch.bfloat16)
    assert torch.equal(a, w32.to(torch.bfloat16)) and torch.equal(b, w64.to(torch.bfloat16))
    (a.float().sum() + b.float().sum()).backward()
    assert w32.grad.dtype == torch.float32 and w64.grad.dtype == torch.float64


@pytest.mark.parametrize("E,D,F", [(4, 16, 32), (64, 2048, 1024)])
def test_one_launch_forward_and_one_backward_moving_each_element_once(E: int, D: int, F: int) -> None:
    """Three fp32 weights of n elements each (a small layer, and olmoe's 64 x 2048 x 1024 experts):
    forward reads 4n and writes 2n bytes per weight, the backward reads 2n and writes 4n, in one
    launch each way (the three ``Tensor.to`` calls took six)."""
    with torch.device("meta"):
        weights = tuple(torch.empty(s, requires_grad=True) for s in ((E, D, F), (E, D, F), (E, F, D)))
    with OpCounter() as counter:
        out = cast_weights(weights, torch.bfloat16)
        torch.autograd.backward(out, [torch.empty_like(t) for t in out])
    n = E * D * F
    assert [(r.name, r.launches, r.bytes) for r in counter.budget.ops] == [("moeforge.cast_many.default", 1, 3 * n * 6)] * 2
