"""combine (fp32 sum of each token's K slot rows) vs the reference, forward and gradient."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.triton.combine import combine


@pytest.mark.parametrize("T,K,D", [(5, 1, 16), (9, 3, 24), (4, 8, 40)])
def test_combine_forward_and_grad(kc, gen, T, K, D):
    y_SD = torch.randn(T * K, D, generator=gen).to(kc.DEVICE).requires_grad_()
    got = combine(y_SD, K)
    want = reference.combine(y_SD, K)
    kc.assert_close(got, want, what="y")
    dy = torch.randn(T, D, generator=gen).to(kc.DEVICE)
    kc.assert_close(torch.autograd.grad(got, y_SD, dy)[0], torch.autograd.grad(want, y_SD, dy)[0], what="dy")


def test_combine_accumulates_in_fp32(kc):
    """bf16 slots 1, 2^-8, 2^-8: an fp32 sum gives 1 + 2^-7 (a bf16 value); a bf16 running sum stays at 1."""
    y_SD = torch.tensor([[1.0], [2.0**-8], [2.0**-8]], dtype=torch.bfloat16, device=kc.DEVICE).expand(3, 16).contiguous()
    assert combine(y_SD, 3)[0, 0].item() == 1.0 + 2.0**-7
