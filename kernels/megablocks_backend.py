"""Optional ``experts.backend=megablocks``: MegaBlocks' grouped expert path as a kernel backend.

Shape legend: R expert-sorted rows, D model dim, F expert ffn dim, E experts.

MegaBlocks' default ``mlp_impl='grouped'`` runs ``grouped_gemm.ops.gmm(a, b, batch_sizes)``
(tgale96/grouped_gemm; ``b`` is ``[E, K, N]``, ``batch_sizes`` a CPU int64 tensor) for each
projection of a GLU MLP (Gale et al. 2022, MegaBlocks, arXiv 2211.15841). This adapter does
the same with our stacked ``[E, D, F]`` weights, reached through
``megablocks.grouped_gemm_util.ops``. Note the host synchronisation (``counts_E.cpu()``): it
is MegaBlocks' own contract, kept so benchmarks measure it as users run it.

MegaBlocks is optional and not a dependency: importing this module never fails;
``UNAVAILABLE_REASON`` is a one-line reason (None when usable) and calling the backend without
it raises ``moe.errors.EnvironmentError_`` with that line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe.errors import EnvironmentError_


def _probe() -> tuple[object | None, str | None]:
    try:
        from megablocks import grouped_gemm_util
    except Exception as exc:  # ImportError, or a broken compiled extension (undefined symbol)
        return None, f"megablocks is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not grouped_gemm_util.grouped_gemm_is_available():
        return None, "megablocks is installed without grouped_gemm (pip install 'megablocks[gg]')"
    return grouped_gemm_util.ops, None


_OPS, UNAVAILABLE_REASON = _probe()


def swiglu_megablocks(x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor) -> Tensor:
    """``moe.experts`` backend: SwiGLU per expert segment through MegaBlocks' grouped GEMM."""
    if _OPS is None:
        raise EnvironmentError_(f"experts.backend=megablocks: {UNAVAILABLE_REASON}")
    batch_sizes = counts_E.to("cpu", dtype=torch.int64)
    x_RD = x_RD.contiguous()
    g_RF = _OPS.gmm(x_RD, w_gate_EDF.contiguous(), batch_sizes)
    u_RF = _OPS.gmm(x_RD, w_up_EDF.contiguous(), batch_sizes)
    return _OPS.gmm((F.silu(g_RF) * u_RF).contiguous(), w_down_EFD.contiguous(), batch_sizes)

