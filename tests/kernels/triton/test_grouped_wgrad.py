"""grouped_wgrad (per-expert a^T b over contiguous rows, fp32) vs the reference."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.layout import BlockSizes
from kernels.triton.grouped_wgrad import grouped_wgrad

TINY = BlockSizes(block_m=16, block_n=16, block_k=16, block_r=16)


@pytest.mark.parametrize("a_div,b_div,scaled", [(2, None, False), (None, 2, True), (None, None, False), (1, 1, True)])
def test_grouped_wgrad(kc, gen, a_div, b_div, scaled):
    T, K, E, D, F = (kc.SMALL[k] for k in "TKEDF")
    plan = kc.make_plan("masked", T, K, E, gen)
    R = plan.num_rows
    slot_R = plan.slot_idx_R.to(kc.DEVICE)
    offsets = plan.offsets_E1.to(kc.DEVICE, torch.int32)
    rows = {1: T * K, 2: T, None: R}
    a = torch.randn(rows[a_div], D, generator=gen).to(kc.DEVICE)
    b = torch.randn(rows[b_div], F, generator=gen).to(kc.DEVICE)
    scale = plan.weight_R.to(kc.DEVICE) if scaled else None
    got = grouped_wgrad(a, a_div, b, b_div, slot_R, offsets, scale, blocks=TINY)
    want = reference.grouped_wgrad(a, a_div, b, b_div, slot_R, offsets, scale)
    assert got.shape == (E, D, F)
    kc.assert_close(got, want, what="dW")
    assert torch.count_nonzero(got[E - 1]) == 0  # expert E-1 has no rows: exact zeros


def test_grouped_wgrad_fp32_main_grad_from_bf16(kc, gen):
    """bf16 operands, fp32 output: the per-expert sums are not rounded to bf16."""
    T, K, E, D, F = (kc.SMALL[k] for k in "TKEDF")
    plan = kc.make_plan("random", T, K, E, gen)
    slot_R = plan.slot_idx_R.to(kc.DEVICE)
    offsets = plan.offsets_E1.to(kc.DEVICE, torch.int32)
    a = torch.randn(T, D, generator=gen).to(kc.DEVICE, torch.bfloat16)
    b = torch.randn(plan.num_rows, F, generator=gen).to(kc.DEVICE, torch.bfloat16)
    got = grouped_wgrad(a, K, b, None, slot_R, offsets, blocks=TINY, out_dtype=torch.float32)
    want = reference.grouped_wgrad(a.float(), K, b.float(), None, slot_R, offsets)
    assert got.dtype == torch.float32
    kc.assert_close(got, want, tol=1e-4, what="dW fp32")
