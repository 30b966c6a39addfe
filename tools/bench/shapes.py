"""The expert-block shapes moeforge's kernels are measured and profiled at.

``(D, F, E, K, T)``: model dim, expert ffn dim, experts, top-k, tokens. The four reference
shapes are the kernel issue's: Mixtral-like coarse experts (4096, 14336, 8, 2) and three
fine-grained layouts with many small experts, where grouped GEMMs leave the most behind.
``tools/bench/layer.py`` times them; ``tools.bench.compile_check`` profiles their compiled kernels.
"""

from __future__ import annotations

Shape = tuple[int, int, int, int, int]

REFERENCE_SHAPES: list[Shape] = [(4096, 14336, 8, 2, 8192), (2048, 1024, 64, 8, 16384), (1024, 2816, 16, 2, 16384), (2048, 768, 128, 8, 32768)]
QUICK_SHAPES: list[Shape] = [(512, 1024, 8, 2, 2048), (256, 256, 32, 4, 4096)]
