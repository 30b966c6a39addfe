"""Combine: sum each token's K slot rows in fp32, without atomics.

Shape legend: T tokens, D model dim, K slots per token, S slots (T*K), BD the D block.

``y_TD[t] = sum_j y_SD[t*K + j]``. The router weight is already applied by the
``gmm_scatter`` epilogue, and slots without a row hold 0, so this is a plain strided reduction
(MegaBlocks' ``[T, K, D].sum(1)`` idea, fused into one pass that reads each slot row once).
One program per (token, D block); the K rows are added in slot order, so it is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import BlockSizes


@triton.jit
def _combine_kernel(y_ptr, stride_ys, out_ptr, stride_ot, d_dim, K, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d_dim
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(0, K):
        acc += tl.load(y_ptr + (t * K + j) * stride_ys + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def combine_slots(y_SD: Tensor, K: int, blocks: BlockSizes = BlockSizes()) -> Tensor:
    """Launch the combine kernel: ``y_TD[t] = sum_j y_SD[t*K + j]`` (fp32 sum, output in y's dtype)."""
    S, D = y_SD.shape
    assert S % K == 0, "slots must be token-major, K per token"
    y_SD = y_SD if y_SD.stride(1) == 1 else y_SD.contiguous()
    y_TD = torch.empty(S // K, D, dtype=y_SD.dtype, device=y_SD.device)
    block_d = min(1024, max(16, triton.next_power_of_2(D)))
    _combine_kernel[(S // K, triton.cdiv(D, block_d))](y_SD, y_SD.stride(0), y_TD, y_TD.stride(0), D, K, BLOCK_D=block_d, num_warps=blocks.num_warps)
    return y_TD


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SD, K, blocks):  # type: ignore[override]
        ctx.K = K
        return combine_slots(y_SD, K, blocks)

    @staticmethod
    def backward(ctx, dy_TD):  # type: ignore[override]
        T, D = dy_TD.shape
        return dy_TD.unsqueeze(1).expand(T, ctx.K, D).reshape(T * ctx.K, D), None, None


def combine(y_SD: Tensor, K: int, *, blocks: BlockSizes | None = None) -> Tensor:
    """Differentiable combine; the gradient of every slot row is its token's output gradient."""
    return _Combine.apply(y_SD, K, blocks or BlockSizes())
