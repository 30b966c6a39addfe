"""The one-launch cast of up to three tensors against ``Tensor.to``, bit for bit.

Shape legend: N elements of a tensor. On CPU the Triton kernel runs in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from kernels.cast_many import BLOCK
from tests.kernel_harness import assert_kernels_run


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "cast_many", "_cast_many_kernel")


def hard_fp32(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random fp32 values over many exponents, with bf16 rounding ties (both parities), signed zeros,
    infinities, NaN and subnormals at the front."""
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39, 65504.0, 3.4e38])
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80C000], dtype=torch.int64).to(torch.int32).view(torch.float32)
    body = torch.randn(max(n - len(special) - len(ties), 0), generator=gen) * torch.exp2(torch.randint(-30, 30, (max(n - 13, 0),), generator=gen).float())
    return torch.cat([special, ties, body])[:n]


@pytest.mark.parametrize("sizes", [(1,), (BLOCK, 7), (BLOCK + 1, 3 * BLOCK - 5, 17), (0, 40, 9)])
@pytest.mark.parametrize("to", [torch.bfloat16, torch.float16])
def test_fp32_to_half_equals_tensor_to_bit_for_bit(kc, gen, sizes, to):
    """bf16 through the kernel; fp16 through the per-tensor casts it falls back to."""
    # Ragged ends of a block, an empty tensor among them, and every kind of value; NaN stays NaN.
    xs = [hard_fp32(n, gen).to(kc.DEVICE) for n in sizes]
    got, want = ops.cast_many(xs, to), reference.cast_many(xs, to)
    for g, w in zip(got, want):
        assert g.dtype == to and g.shape == w.shape and g.is_contiguous()
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        assert torch.equal(g.view(torch.int16)[~torch.isnan(g)], w.view(torch.int16)[~torch.isnan(w)])


def test_half_gradients_back_to_fp32_and_shapes_are_kept(kc, gen):
    """bf16 [E, D, F]-shaped tensors (the backward's direction) become exactly their fp32 values."""
    xs = [torch.randn(s, generator=gen).to(kc.DEVICE, torch.bfloat16) for s in ((3, 5, 7), (3, 5, 7), (3, 7, 5))]
    got = ops.cast_many(xs, torch.float32)
    assert [g.shape for g in got] == [x.shape for x in xs]
    for g, x in zip(got, xs):
        assert g.dtype == torch.float32 and torch.equal(g, x.float())
