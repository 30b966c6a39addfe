"""Naive per-token MoE reference used by the tests: ``y_t = sum_j w_tj * expert_{e_tj}(x_t)``."""

from __future__ import annotations

import torch
from torch import Tensor


def naive_moe(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, mask_TK: Tensor | None,
              w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor) -> Tensor:
    """One token and one slot at a time, no sorting, no grouping."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for j in range(expert_ids_TK.shape[1]):
            if mask_TK is not None and not bool(mask_TK[t, j]):
                continue
            e = int(expert_ids_TK[t, j])
            h = torch.nn.functional.silu(x_TD[t] @ w_gate_EDF[e]) * (x_TD[t] @ w_up_EDF[e])
            acc = acc + weights_TK[t, j].to(x_TD.dtype) * (h @ w_down_EFD[e])
        rows.append(acc)
    return torch.stack(rows)
