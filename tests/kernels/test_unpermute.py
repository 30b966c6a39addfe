"""The unpermute op (token-order sum of expert-sorted rows by inverse permutation) against its reference.

Shape legend: T tokens, K slots, S slots, R rows, D model dim. Every routing case of the kernel
tests: idle and single-token experts, rows straddling tiles, masked slots, capacity drops.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from tests.kernel_harness import assert_kernels_run


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "unpermute", "_unpermute_kernel")


def _naive(y_RD, y2_RD, slot_idx_R, T, K, s_R):
    """Loop over rows: token slot_idx // K gets s * (y + y2) (fp64)."""
    out = torch.zeros(T, y_RD.shape[1], dtype=torch.float64)
    for r, slot in enumerate(slot_idx_R.tolist()):
        row = y_RD[r].double() + (0 if y2_RD is None else y2_RD[r].double())
        out[slot // K] += row * (1.0 if s_R is None else float(s_R[r]))
    return out


@pytest.mark.parametrize("kind", ["random", "straddle", "masked", "capacity"])
@pytest.mark.parametrize("second,scaled", [(False, False), (True, False), (False, True)])
def test_unpermute_matches_naive_loop(kc, gen, kind, second, scaled):
    T, K, E, D = 32, 2, 4, 40
    plan = kc.make_plan(kind, T, K, E, gen)
    R = plan.num_rows
    y, y2 = (torch.randn(R, D, generator=gen) for _ in range(2))
    s = torch.rand(R, generator=gen) + 0.1
    args = (y, y2 if second else None, plan.row_of_slot_A, K, s if scaled else None)
    want = _naive(y, y2 if second else None, plan.slot_idx_R, T, K, s if scaled else None)
    on_dev = [None if t is None else t.to(kc.DEVICE) if isinstance(t, torch.Tensor) else t for t in args]
    kc.assert_close(ops.unpermute(*on_dev).cpu(), want, tol=1e-5, what="kernel")
    kc.assert_close(reference.unpermute(*args), want, tol=1e-5, what="reference")


@pytest.mark.parametrize("K", [1, 8])
def test_unpermute_k1_and_k8_wide_rows(kc, gen, K):
    """D=1100 spans two 1024-wide column blocks; K=8 adds eight rows per token."""
    T, E, D = 9, 8, 1100
    scores = torch.rand(T, E, generator=gen)
    from moe.dispatch import dispatch
    from moe.routers.interface import RoutingDecision

    w, ids = scores.topk(K, -1)
    plan = dispatch(RoutingDecision(expert_ids_TK=ids, weights_TK=w, probs_TE=scores.softmax(-1)), E)
    y = torch.randn(plan.num_rows, D, generator=gen)
    got = ops.unpermute(y.to(kc.DEVICE), None, plan.row_of_slot_A.to(kc.DEVICE), K, None).cpu()
    kc.assert_close(got, _naive(y, None, plan.slot_idx_R, T, K, None), tol=1e-5, what="y")


def test_unpermute_accumulates_in_fp32(kc):
    """bf16 rows 1, 2^-8, 2^-8 of one token: an fp32 sum gives 1 + 2^-7; a bf16 running sum stays 1."""
    y = torch.tensor([[1.0], [2.0**-8], [2.0**-8]], dtype=torch.bfloat16).expand(3, 16).contiguous().to(kc.DEVICE)
    pos = torch.tensor([2, 0, 1], dtype=torch.int32, device=kc.DEVICE)
    assert ops.unpermute(y, None, pos, 3, None)[0, 0].item() == 1.0 + 2.0**-7
