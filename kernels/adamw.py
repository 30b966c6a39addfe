"""One AdamW step of a list of parameter tensors as one kernel: fp32 parameters and gradients, moments in bf16 or fp32.

Shape legend: N elements of one parameter (the kernel sees every tensor flat), BLOCK elements per program and iteration.

One launch serves every tensor of a param group (as torch's fused AdamW does, through its multi-tensor
apply): the kernel reads each tensor's addresses and size from a small int64 table (``pointer_table``),
so a model of a hundred small tensors costs one launch, not a hundred (a launch costs the host ~50 us).

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

The master variant (``adamw_into(..., master=True)``, ``optim.master_weights``): ``p`` is the fp32 master copy of a
parameter the model holds in bf16, the gradient is bf16, and the pass also stores the updated master rounded to
nearest even into the bf16 parameter (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.1; Megatron-LM's
bf16 parameters with fp32 main parameters): per parameter it reads master 4 + gradient 2 + the moments and writes
master 4 + the moments + parameter 2: 20 bytes with bf16 moments (10 read, 10 written), 28 with fp32 ones. The
forward's weight cast and the backward's gradient cast, 12 bytes per parameter, are gone.

``found_inf`` (a device scalar, nonzero: skip): every load and store is masked off, so a
non-finite step writes nothing, without the host reading the flag. The pure-torch twin is
``kernels.reference.adamw_``; the op lives in ``kernels.ops``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048
"""Elements per program and loop iteration: 8 per thread at 8 warps, 16-byte fp32 loads."""
MAX_PROGRAMS_PER_TENSOR = 1024
"""Programs per tensor at most (about 8 per SM of an H100 for one large tensor); each loops over its blocks."""
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _store_rounded(ptr, offs, x, mask, MASKED: tl.constexpr):
    """Store fp32 ``x`` in ``ptr``'s dtype; into bf16 rounded to nearest even by integer arithmetic on the bits
    (add 0x7FFF plus the lowest kept bit, clear the low 16), so the rounding is the same compiled and
    interpreted (Triton's interpreter truncates). NaN and inf keep their class."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # exactly representable in bf16: the cast below is exact
    if MASKED:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty))


@triton.jit
def _update_block(p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, offs, mask, scale, decay_keep, w, beta2, step_size, bc2_sqrt, eps,
                  HAS_SCALE: tl.constexpr, MASKED: tl.constexpr, MASTER: tl.constexpr):
    """One block of the update in fp32. Unmasked blocks of 16-byte-aligned tensors load and store 16 bytes at a time.
    ``MASTER``: ``p`` is the fp32 master, the gradient is read in its own dtype (bf16) and the updated master is also
    stored, rounded to nearest even, into the model's bf16 parameter ``q_ptr``."""
    if MASKED:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs).to(tl.float32)
        p = tl.load(p_ptr + offs)
        m = tl.load(m_ptr + offs).to(tl.float32)
        v = tl.load(v_ptr + offs).to(tl.float32)
    if HAS_SCALE:
        g = g / scale
    p = p * decay_keep
    if w < 0.5:  # torch.lerp's two forms (the one that is exact at its nearer end)
        m = m + w * (g - m)
    else:
        m = g - (g - m) * (1.0 - w)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    if MASKED:
        tl.store(p_ptr + offs, p, mask=mask)
    else:
        tl.store(p_ptr + offs, p)
    _store_rounded(m_ptr, offs, m, mask, MASKED)
    _store_rounded(v_ptr, offs, v, mask, MASKED)
    if MASTER:
        _store_rounded(q_ptr, offs, p, mask, MASKED)


@triton.jit
def _adamw_kernel(table_ptr, scale_ptr, skip_ptr, lr, decay_keep, beta1, beta2, log2_beta1, log2_beta2, eps,
                  MOMENTS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
                  MASTER: tl.constexpr = False):
    # Program (i, c): tensor i of the table, its full blocks c, c + C, c + 2C, ... (C = the grid's second size)
    # without masks; program (i, 0) also takes the partial last block. ``pointer_table`` guarantees 16-byte alignment.
    row = table_ptr + tl.program_id(0).to(tl.int64) * (7 if MASTER else 6)  # pointer_table's six (seven) columns
    p_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.float32)), 16)
    if MASTER:  # bf16 gradients, and the model's bf16 parameter in column 7
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.bfloat16)), 16)
        q_ptr = tl.multiple_of(tl.load(row + 6).to(tl.pointer_type(tl.bfloat16)), 16)
    else:
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.float32)), 16)
        q_ptr = p_ptr
    m_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(MOMENTS)), 16)
    v_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(MOMENTS)), 16)
    N = tl.load(row + 4)
    t = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))
    if HAS_SKIP:  # a skipped step touches no element
        N = tl.where(tl.load(skip_ptr) == 0, N, 0)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    step_size = lr / (1.0 - tl.exp2(t * log2_beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    w = 1.0 - beta1
    full = (N // BLOCK) * BLOCK
    for start in range(tl.program_id(1).to(tl.int64) * BLOCK, full, tl.num_programs(1) * BLOCK):
        offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
        _update_block(p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, offs, None, scale, decay_keep, w, beta2, step_size, bc2_sqrt, eps, HAS_SCALE, False,
                      MASTER)
    if tl.program_id(1) == 0 and full < N:
        offs = full + tl.arange(0, BLOCK)
        _update_block(p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, offs, offs < N, scale, decay_keep, w, beta2, step_size, bc2_sqrt, eps, HAS_SCALE, True,
                      MASTER)


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else float("-inf")


def pointer_table(p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], step: list[Tensor],
                  out: list[Tensor] | None = None) -> Tensor:
    """The kernel's table, one int64 row per tensor: addresses of p, g, m, v (contiguous, each 16-byte aligned, as
    every allocation of torch's is; ``kernels.ops`` sends other tensors to the reference), the element count, the address of
    the step count, and with ``out`` (the master variant) a seventh column: the address of the bf16 parameter.
    Built on the host and copied to the device without waiting (pinned memory on CUDA): gradients
    are new tensors every step, so their addresses are too."""
    rows = [[a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr(), a.numel(), s.data_ptr()] for a, b, c, d, s in zip(p, g, m, v, step)]
    if out is not None:
        rows = [row + [q.data_ptr()] for row, q in zip(rows, out)]
    dev = p[0].device
    table = torch.tensor(rows, dtype=torch.int64, pin_memory=dev.type == "cuda")
    return table.to(dev, non_blocking=True)


def programs_per_tensor(max_numel: int) -> int:
    """The grid's second size: enough programs for the largest tensor, at most ``MAX_PROGRAMS_PER_TENSOR``
    (each then loops over its blocks); smaller tensors' extra programs find nothing to do."""
    return max(1, min(triton.cdiv(max_numel, BLOCK), MAX_PROGRAMS_PER_TENSOR))


def adamw_into(table: Tensor, n_tensors: int, max_numel: int, moments: torch.dtype, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None, master: bool = False) -> None:
    """Launch the kernel over the ``n_tensors`` rows of ``table`` (``pointer_table``: contiguous fp32 parameters and
    gradients, moments in ``moments``, updated in place); ``max_numel``: the largest tensor's size. ``master``: the
    table has ``out``'s seventh column, the gradients are bf16, and each updated fp32 master is also written,
    rounded to nearest even, into its bf16 parameter (Micikevicius et al. 2018, "Mixed Precision Training",
    sec. 3.1: fp32 master weights, half-precision weights and gradients in the forward and backward).

    ``grad_scale``/``found_inf``: 0-dim device tensors or None. ``1 - lr * weight_decay`` and ``log2(beta)`` are
    formed here in double, as torch forms its scalars."""
    if n_tensors == 0 or max_numel == 0:
        return
    _adamw_kernel[(n_tensors, programs_per_tensor(max_numel))](
        table, grad_scale if grad_scale is not None else table, found_inf if found_inf is not None else table,
        lr, 1.0 - lr * weight_decay, beta1, beta2, _log2(beta1), _log2(beta2), eps,
        MOMENTS=_TL_DTYPES[moments], HAS_SCALE=grad_scale is not None, HAS_SKIP=found_inf is not None, BLOCK=BLOCK, MASTER=master,
        num_warps=8,
    )
