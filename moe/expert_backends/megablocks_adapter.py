"""Optional ``experts.backend=megablocks``: MegaBlocks' grouped expert path as a kernel backend.

Shape letters: the ``moe`` package legend (R expert-sorted rows, D model dim, F expert ffn dim, E experts).

MegaBlocks' default ``mlp_impl='grouped'`` runs ``grouped_gemm.ops.gmm(a, b, batch_sizes)``
(tgale96/grouped_gemm; ``b`` is ``[groups, in, out]``, ``batch_sizes`` a CPU int64 tensor) for each
projection of a GLU MLP (Gale et al. 2022, MegaBlocks, arXiv 2211.15841). This adapter does
the same with our stacked ``[E, D, F]`` weights, reached through
``megablocks.grouped_gemm_util.ops``. Note the host synchronisation (``counts_E.cpu()``): it
is MegaBlocks' own contract, kept so benchmarks measure it as users run it.

What ``grouped_gemm.ops.gmm`` runs depends on how grouped_gemm was built (its 0.3.0 sdist:
``setup.py`` adds ``-DGROUPED_GEMM_CUTLASS`` only when the environment variable
``GROUPED_GEMM_CUTLASS=1`` is set at build time; ``csrc/grouped_gemm.cu``): by default
``CublasGroupedGemm``, a host loop of one cuBLAS GEMM per expert; with the flag, CUTLASS's
grouped GEMM kernel (its SM80 configuration, also on Hopper). ``experts.backend=grouped_mm``
is one ``torch._grouped_mm`` call (CUTLASS's grouped GEMM for SM90 on Hopper).

MegaBlocks cannot be installed beside moeforge's torch (>= 2.9); ``RELEASES`` says what each
release on the package index pins (read from each sdist's metadata, or its ``setup.py`` where
metadata needs a CUDA device to be generated). It stays optional and not a dependency:
importing this module never fails; ``UNAVAILABLE_REASON`` is a one-line reason (None when
usable) and calling the backend without it raises ``moe.errors.SetupError`` with that line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe.errors import SetupError


RELEASES = (
    "no MegaBlocks release declares support for torch>=2.9, which moeforge needs: 0.10.0 pins torch 2.7.0, 0.9.0 and 0.8.0 torch 2.6.0, "
    "0.7.0 torch 2.5.1, 0.6.1 torch 2.4.0, 0.5.0 triton 2.1.0 (torch 2.1's); 0.5.1, 0.0.2 and 0.0.1 pin no torch but are "
    "CUDA source builds from before torch 2.9, untested with it; use experts.backend=grouped_mm (torch._grouped_mm)"
)
"""What the package index holds (``pip index versions megablocks``) and what each release pins (see the module docstring)."""


def _probe() -> tuple[object | None, str | None]:
    try:
        from megablocks import grouped_gemm_util
    except Exception as exc:  # ImportError, or a broken compiled extension (undefined symbol)
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
        return None, f"megablocks is not importable ({why}); {RELEASES}"
    if not grouped_gemm_util.grouped_gemm_is_available():
        return None, "megablocks is installed without grouped_gemm (pip install 'megablocks[gg]')"
    return grouped_gemm_util.ops, None


_OPS, UNAVAILABLE_REASON = _probe()


def swiglu_megablocks(x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor) -> Tensor:
    """``moe.experts`` backend: SwiGLU per expert segment through MegaBlocks' grouped GEMM."""
    if _OPS is None:
        raise SetupError(f"experts.backend=megablocks: {UNAVAILABLE_REASON}")
    batch_sizes = counts_E.to("cpu", dtype=torch.int64)
    x_RD = x_RD.contiguous()
    g_RF = _OPS.gmm(x_RD, w_gate_EDF.contiguous(), batch_sizes)
    u_RF = _OPS.gmm(x_RD, w_up_EDF.contiguous(), batch_sizes)
    return _OPS.gmm((F.silu(g_RF) * u_RF).contiguous(), w_down_EFD.contiguous(), batch_sizes)

