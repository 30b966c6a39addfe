"""moeforge's kernels: Triton ops for the expert block, each beside a pure-torch reference.

Importing this package needs only torch; the Triton modules (``route_meta``, ``gather_gmm``,
``gmm_scatter``, ``combine``, ``grouped_wgrad``, ``moe_experts``) import triton themselves, so
``import kernels.moe_experts`` raises ImportError where Triton is missing. ``reference`` and
``layout`` are pure torch. See ``kernels.moe_experts`` for the public entry.
"""
