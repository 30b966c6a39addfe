"""One AdamW step of one parameter tensor as one kernel: fp32 parameter and gradient, moments in bf16 or fp32.

Shape legend: N elements of the parameter (the kernel sees every tensor flat), BLOCK elements per program.

Per element, in fp32 (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2,
with the bias corrections of Kingma & Ba 2015, Algorithm 1; the order of ``torch.optim.AdamW``)::

    g  = grad / grad_scale                       (grad_scale: the clipping divisor; 1 when absent)
    p  = p * (1 - lr * weight_decay)
    m  = lerp(m, g, 1 - beta1)                   v = beta2 * v + (1 - beta2) * g * g
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

``t`` is the step count after this step (a device tensor the optimizer advances). The moments are
read in their storage dtype, updated in fp32 and stored rounded to nearest even (as torch's
``.to(torch.bfloat16)``); the parameter update uses the fp32 moments of this step. BF16 moments with fp32 master
weights and gradients are DeepSeek-V3's recipe (DeepSeek-AI 2024, arXiv 2412.19437, sec. 3.3.3,
"Low-Precision Optimizer States"): 20 bytes of traffic per parameter instead of 28.

``found_inf`` (a device scalar, nonzero: skip): every load and store is masked off, so a
non-finite step writes nothing, without the host reading the flag. The pure-torch twin is
``kernels.reference.adamw_``; the op lives in ``kernels.ops``.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048
"""Elements per program: 8 per thread at 8 warps, 16-byte fp32 loads."""


@triton.jit
def _store_rounded(ptr, offs, x, mask):
    """Store fp32 ``x`` in ``ptr``'s dtype; into bf16 rounded to nearest even by integer arithmetic on the bits
    (add 0x7FFF plus the lowest kept bit, clear the low 16), so the rounding is the same compiled and
    interpreted (Triton's interpreter truncates). NaN and inf keep their class."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # exactly representable in bf16: the cast below is exact
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, scale_ptr, skip_ptr, N, lr, decay_keep, beta1, beta2, log2_beta1, log2_beta2, eps,
                  HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if HAS_SKIP:  # a skipped step masks every element off
        N = tl.where(tl.load(skip_ptr) == 0, N, 0)
    mask = offs < N
    t = tl.load(step_ptr).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * decay_keep
    w = 1.0 - beta1
    if w < 0.5:  # torch.lerp's two forms (the one that is exact at its nearer end)
        m = m + w * (g - m)
    else:
        m = g - (g - m) * (1.0 - w)
    v = v * beta2 + (1.0 - beta2) * g * g
    step_size = lr / (1.0 - tl.exp2(t * log2_beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    _store_rounded(m_ptr, offs, m, mask)
    _store_rounded(v_ptr, offs, v, mask)


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else float("-inf")


def adamw_into(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Launch the kernel over contiguous ``p``, ``g``, ``m``, ``v`` of equal size (updated in place).

    ``step``: the step count after this step (0-dim, device); ``grad_scale``/``found_inf``: 0-dim device
    tensors or None. ``1 - lr * weight_decay`` and ``log2(beta)`` are formed here in double, as torch forms
    its scalars."""
    N = p.numel()
    if N == 0:
        return
    _adamw_kernel[(triton.cdiv(N, BLOCK),)](
        p, g, m, v, step, grad_scale if grad_scale is not None else step, found_inf if found_inf is not None else step, N,
        lr, 1.0 - lr * weight_decay, beta1, beta2, _log2(beta1), _log2(beta2), eps,
        HAS_SCALE=grad_scale is not None, HAS_SKIP=found_inf is not None, BLOCK=BLOCK, num_warps=8,
    )
