"""Dispatch's index bookkeeping kernel against its torch twin, bit for bit.

Shape legend: A slots, R kept rows, K slots per token. On CPU the Triton kernel runs in the
interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from tests.kernel_harness import assert_kernels_run


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "plan_indices", "_plan_indices_kernel")


@pytest.mark.parametrize("T,K,dropped", [(1, 1, 0), (37, 3, 0), (700, 2, 0), (700, 2, 333), (50, 4, 200)])
def test_kernel_equals_the_reference(kc, gen, T, K, dropped):
    """A random permutation of the slots (a sort's order) with the last ``dropped`` entries not kept
    (masked or over capacity: -1 in the inverse permutation); 1,400 slots span two programs."""
    A = T * K
    order = torch.randperm(A, generator=gen).to(kc.DEVICE)
    weights = torch.rand(A, generator=gen).to(kc.DEVICE)
    R = A - dropped
    got, want = ops.plan_indices(order, weights, K, R), reference.plan_indices(order, weights, K, R)
    for g, w, dtype in zip(got, want, (torch.int32, torch.int64, torch.float32)):
        assert g.dtype == dtype and torch.equal(g, w)
    row_of_slot = got[0]
    assert int((row_of_slot == -1).sum()) == dropped
    assert torch.equal(row_of_slot[order[:R]], torch.arange(R, dtype=torch.int32, device=kc.DEVICE))
