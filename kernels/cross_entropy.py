"""Cross-entropy of one chunk of fp32 logits, with its logit gradient, in one pass per row.

Shape legend: C rows (tokens of one loss chunk), V vocabulary, BV the vocabulary block.

For row ``c`` with logits ``z_c`` and target ``y_c``::

    lse_c  = log sum_v exp(z_cv)                       (online: running max m and sum s)
    loss_c = lse_c - z_{c y_c}
    g_cv   = (exp(z_cv - lse_c) - [v == y_c]) * scale  (d loss / d z, softmax minus one-hot)

The first loop keeps a running maximum and a running sum rescaled whenever the maximum grows,
so one read of the row gives the log-sum-exp (Milakov and Gimelshein 2018, "Online normalizer
calculation for softmax", Algorithm 3). The second loop writes the gradient directly in the
dtype the head's backward GEMMs take (bf16 under autocast), so no fp32 gradient is written and
cast after. One program owns one row: the row's second read (V x 4 bytes, 201 KB at V =
50,304) comes from L2 while the programs in flight fit in it, so HBM sees the logits about once.

This replaces seven torch kernels per chunk (logsumexp, gather, the loss subtraction, sub_,
exp_, scatter_add_, mul_, and the cast to bf16). The pure-torch twin is
``kernels.reference.cross_entropy_rows``; the op and its device choice live in ``kernels.ops``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

BLOCK_V = 4096
"""Vocabulary columns per loop iteration: 16 KB of fp32, 16 per thread at 8 warps."""


@triton.jit
def _cross_entropy_kernel(z_ptr, y_ptr, loss_ptr, g_ptr, V, stride_z, stride_g, scale, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m = -float("inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=-float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    y = tl.load(y_ptr + row)
    tl.store(loss_ptr + row, lse - tl.load(z_row + y))
    if WRITE_GRAD:
        g_row = g_ptr + row * stride_g
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            p = tl.exp(tl.load(z_row + cols, mask=mask, other=0.0) - lse)
            p = tl.where(cols == y, p - 1.0, p)
            tl.store(g_row + cols, (p * scale).to(g_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_into(z_CV: Tensor, y_C: Tensor, scale: float, loss_C: Tensor, g_CV: Tensor | None) -> None:
    """Launch the kernel: ``loss_C`` per row, and ``g_CV`` (any float dtype) when given. ``z_CV``
    has unit-stride columns; ``y_C`` holds valid class indices."""
    C, V = z_CV.shape
    if C == 0:
        return
    grad = g_CV if g_CV is not None else loss_C
    _cross_entropy_kernel[(C,)](
        z_CV, y_C, loss_C, grad, V, z_CV.stride(0), grad.stride(0), scale,
        WRITE_GRAD=g_CV is not None, BLOCK_V=min(BLOCK_V, triton.next_power_of_2(V)), num_warps=8,
    )
