"""The Triton-only path: the kernels of ``experts.backend=triton``, which ``auto`` never picks.

``moe_experts`` is the public entry, the fused expert block (ScatterMoE's design, Tan et al. 2024,
arXiv 2403.08245): ``route_meta`` builds the tile schedule, ``swiglu_gmm`` runs the gathered up
projection with the SwiGLU epilogues, ``gmm_scatter`` the down projection with the router weight
in its epilogue (``gather_gmm`` is the bare gathered GEMM its backward uses), ``combine`` sums each
token's slots, ``grouped_wgrad`` computes the weight gradients, and ``tile_matmul`` holds the
K-loop and tile order they share. Importing this package needs only torch; each module imports
triton itself, so ``import kernels.triton.moe_experts`` raises ImportError where Triton is missing
(``experts.backend=auto`` relies on it). The default ``grouped_mm`` path's kernels stay in
``kernels/`` (``ops``, ``swiglu_act``, ``unpermute``, and the head loss's ``cross_entropy``),
beside ``reference`` and ``layout``.
"""
