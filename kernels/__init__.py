"""moeforge's kernels: Triton ops for the expert block, each beside a pure-torch reference.

Importing this package needs only torch. ``ops`` registers the default ``grouped_mm`` path's
memory-bound ops (``swiglu_act``, ``unpermute``; each imports triton itself, and ``ops`` falls
back to ``reference`` without it). ``reference``, ``layout`` (tile schedules, block sizes) and
``errors`` are pure torch. The Triton-only ``experts.backend=triton`` path lives in
``kernels.triton`` (its public entry: ``kernels.triton.moe_experts``). Nothing here imports a
moeforge package above ``kernels``.
"""
