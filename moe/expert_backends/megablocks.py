"""``experts.backend=megablocks``: MegaBlocks' grouped GEMM (optional; see ``moe.expert_backends.megablocks_adapter``)."""

from __future__ import annotations

import torch
from torch import Tensor

from moe.expert_backends.base import ExpertBackend, ExpertOptions


class MegaBlocksBackend(ExpertBackend):
    name = "megablocks"

    def unavailable(self, device: torch.device) -> str | None:
        from moe.expert_backends.megablocks_adapter import UNAVAILABLE_REASON

        return UNAVAILABLE_REASON

    def grouped(self, x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, options: ExpertOptions) -> Tensor:
        from moe.expert_backends.megablocks_adapter import swiglu_megablocks

        return swiglu_megablocks(x_RD, counts_E, w_gate_EDF, w_up_EDF, w_down_EFD)
