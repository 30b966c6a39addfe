"""Shared test setup: one intra-op thread per pytest-xdist worker, so two workers share 2 cores;
tests marked ``gpu`` skip (saying why) where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
