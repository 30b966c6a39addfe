"""kernels.triton.tile_matmul.grouped_program: the grouped program order visits every (row block,
column block) exactly once, in groups of GROUP_M row blocks.

Shape legend: M row blocks, N column blocks, G rows per group.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.triton.tile_matmul import grouped_program


def _order_kernel(monkeypatch, cuda: bool):
    """A kernel writing each program's (row block, column block); built interpreted on CPU."""
    if not cuda:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    @triton.jit
    def order(out_ptr, m_blocks, n_blocks, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        m, n = grouped_program(pid, m_blocks, n_blocks, GROUP_M)
        tl.store(out_ptr + 2 * pid, m)
        tl.store(out_ptr + 2 * pid + 1, n)

    return order


@pytest.mark.parametrize("M,N,G", [(8, 2, 3), (7, 5, 8), (1, 4, 2), (16, 1, 4), (9, 3, 1)])
def test_grouped_program_is_a_grouped_permutation(kc, monkeypatch, M, N, G):
    order = _order_kernel(monkeypatch, kc.CUDA)
    out = torch.full((M * N, 2), -1, dtype=torch.int32, device=kc.DEVICE)
    order[(M * N,)](out, M, N, GROUP_M=G)
    pairs = [tuple(p) for p in out.cpu().tolist()]
    assert sorted(pairs) == [(m, n) for m in range(M) for n in range(N)]  # each block exactly once
    for start in range(0, M * N, G * N):  # each group: its G (or fewer) row blocks, all columns
        rows = {m for m, _ in pairs[start:start + G * N]}
        assert rows == set(range(start // N, min(M, start // N + G))), (start, rows)
    if M >= 2 and N >= 1 and G >= 2:  # row block varies fastest inside a group
        assert pairs[0] == (0, 0) and pairs[1] == (1, 0)
