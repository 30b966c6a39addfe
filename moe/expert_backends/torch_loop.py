"""``experts.backend=torch``: one dense SwiGLU per expert in a Python loop (the reference).

Shape letters: the ``moe`` package legend (R expert-sorted rows, D model dim, F expert ffn dim, E experts).

Slow and obviously correct: every other backend is tested against it. Runs on any device and
dtype; ``counts_E.tolist()`` reads the counts on the host (a synchronisation on a GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe.expert_backends.base import ExpertBackend, ExpertOptions


def swiglu_loop(x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor) -> Tensor:
    """One dense SwiGLU per expert over its contiguous rows (Shazeer 2020)."""
    outs = []
    for e, rows_RD in enumerate(x_RD.split(counts_E.tolist())):  # expert e's rows
        h_RF = nn.functional.silu(rows_RD @ w_gate_EDF[e]) * (rows_RD @ w_up_EDF[e])
        outs.append(h_RF @ w_down_EFD[e])
    if not outs:
        return x_RD.new_zeros(0, w_down_EFD.shape[-1])
    return torch.cat(outs)


class TorchLoopBackend(ExpertBackend):
    name = "torch"

    def grouped(self, x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, options: ExpertOptions) -> Tensor:
        return swiglu_loop(x_RD, counts_E, w_gate_EDF, w_up_EDF, w_down_EFD)
