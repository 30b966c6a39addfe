"""The performance wing: what a layer step and a whole training step cost, measured and counted.

Measured on a GPU: ``layer`` benchmarks one MoE layer per expert backend at the ``shapes``, and
``profile_layer`` splits its time per kernel. Counted without a GPU: ``layer_budget`` (one layer
step) and ``step_budget`` (a whole configured step, as ``step_parallel`` does past one GPU and
``step_tables`` does for the README's tables) run the code on ``meta`` tensors (``meta_cuda``)
under one operator counter (``op_counter``) and turn the count into time with ``card_rates``;
``compile_check`` compiles every Triton kernel for sm_90 and reports its registers and spills, and
``host_syncs`` counts where the host would wait for the device. ``tools/gpu_session.sh`` runs the
GPU side of all this in one lease.
"""
