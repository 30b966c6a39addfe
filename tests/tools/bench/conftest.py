"""The layer bench's tests feed every expert backend, the Triton one interpreted on CPU: they
share the kernel tests' harness (``tests/kernel_harness.py``) and its fixtures."""

from __future__ import annotations

from tests.kernel_harness import device, gen, kc, kernels_runnable  # noqa: F401  (fixtures)
