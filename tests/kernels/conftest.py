"""Kernel tests: every test runs only where the kernels can (CUDA, or Triton's interpreter, which
``tests/kernel_harness.py`` sets up on import), with the harness's fixtures."""

from __future__ import annotations

import pytest

from tests.kernel_harness import device, gen, kc, kernels_runnable  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def _kernels_runnable(kernels_runnable: None) -> None:  # noqa: F811
    """Skip (with the reason) only when neither CUDA nor the interpreter is usable in this process."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~10 s (interpreter-heavy)")
