"""moeforge's kernels: Triton ops for the expert block and the loss, each beside a pure-torch reference.

Importing this package needs only torch. ``ops`` registers the default path's memory-bound ops:
the ``grouped_mm`` experts' ``swiglu_act`` and ``unpermute``, and the head loss's
``cross_entropy`` (each imports triton itself, and ``ops`` falls back to ``reference`` without
it). ``reference``, ``layout`` (tile schedules, block sizes) and
``errors`` are pure torch. The Triton-only ``experts.backend=triton`` path lives in
``kernels.triton`` (its public entry: ``kernels.triton.moe_experts``). Nothing here imports a
moeforge package above ``kernels``.
"""
