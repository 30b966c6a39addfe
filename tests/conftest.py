"""Shared test setup: one intra-op thread per pytest-xdist worker, so two workers share 2 cores."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
