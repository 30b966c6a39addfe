"""Up to three tensors converted between fp32 and bf16 in one kernel launch.

Shape legend: N the elements of one tensor; BLOCK the elements of one program.

The experts' fp32 master weights become bf16 for the grouped GEMMs every forward and their bf16
gradients fp32 every backward (``moe.expert_backends.weight_cast``): three conversions each way,
one launch each with ``Tensor.to``. Here the programs of one grid walk the three tensors back to
back (the first ``cdiv(N_a, BLOCK)`` programs the first tensor, and so on), each element read once
and written once, converted as ``Tensor.to`` converts it: fp32 to bf16 rounds to nearest even on the bits (the
rule of c10's ``round_to_nearest_even``, so the interpreter that runs the CPU tests, whose own
float casts truncate, gives the same bits as a GPU), bf16 to fp32 is exact. Other dtype pairs
take the per-tensor casts (``kernels.ops``). The bytes are the same as three casts; the launches are one. Pure-torch
twin: ``kernels.reference.cast_many``; the op lives in ``kernels.ops``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096
"""Elements per program: 16 KB of fp32 read, 32 per thread at 4 warps."""
MAX_TENSORS = 3


@triton.jit
def _cast_one(src, dst, n, block, BLOCK: tl.constexpr, DOWN: tl.constexpr):
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src + offs, mask=mask)
    if DOWN:  # fp32 -> bf16, round to nearest even on the bits (c10's round_to_nearest_even), NaN -> 0x7FC0
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        y = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:  # bf16 -> fp32, exact: the 16 bits on top of 16 zero bits
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    tl.store(dst + offs, y, mask=mask)


@triton.jit
def _cast_many_kernel(a, b, c, a_out, b_out, c_out, n_a, n_b, n_c, blocks_a, blocks_ab, BLOCK: tl.constexpr, DOWN: tl.constexpr):
    pid = tl.program_id(0)
    if pid < blocks_a:
        _cast_one(a, a_out, n_a, pid, BLOCK, DOWN)
    elif pid < blocks_ab:
        _cast_one(b, b_out, n_b, pid - blocks_a, BLOCK, DOWN)
    else:
        _cast_one(c, c_out, n_c, pid - blocks_ab, BLOCK, DOWN)


def cast_many_into(sources: list[Tensor], outputs: list[Tensor]) -> None:
    """Launch the kernel: ``outputs[i] = sources[i]`` converted to ``outputs[i]``'s dtype; 1 to 3
    contiguous tensors, fp32 sources and bf16 outputs or the other way round."""
    assert 1 <= len(sources) == len(outputs) <= MAX_TENSORS
    srcs, outs = list(sources), list(outputs)
    sizes = [t.numel() for t in srcs] + [0] * (MAX_TENSORS - len(srcs))
    srcs += [srcs[0]] * (MAX_TENSORS - len(srcs))  # stand-ins of no elements: no program reads them
    outs += [outs[0]] * (MAX_TENSORS - len(outs))
    blocks = [triton.cdiv(n, BLOCK) for n in sizes]
    if sum(blocks) == 0:
        return
    down = srcs[0].dtype == torch.float32
    assert {srcs[0].dtype, outs[0].dtype} == {torch.float32, torch.bfloat16}
    _cast_many_kernel[(sum(blocks),)](*srcs, *outs, *sizes, blocks[0], blocks[0] + blocks[1], BLOCK=BLOCK, DOWN=down, num_warps=4)
