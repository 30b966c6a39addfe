"""The expert-backend registry and ``auto``'s measured choice."""

from __future__ import annotations

import pytest
import torch

from moe.errors import ConfigError
from moe.expert_backends import BACKENDS, ExpertBackend, expert_backend, resolve_backend
from moe.expert_backends.auto import DEFAULT_CUDA, MEASURED, Measurement, shape_class
from tools.bench_shapes import REFERENCE_SHAPES


def test_every_backend_is_one_object_behind_one_interface():
    assert set(BACKENDS) == {"torch", "grouped_mm", "triton", "megablocks", "auto"}
    for name, backend in BACKENDS.items():
        assert isinstance(backend, ExpertBackend) and backend.name == name
    with pytest.raises(ConfigError, match=r"experts.backend \('cutlass'\) must be one of"):
        expert_backend("cutlass")


def test_backends_refuse_what_they_cannot_run_naming_the_key():
    with pytest.raises(ConfigError, match=r"model.d_ff \(30\) must be a multiple of 8 for experts.backend=grouped_mm"):
        resolve_backend("grouped_mm", torch.device("cpu"), 64, 30, 4)
    if BACKENDS["megablocks"].unavailable(torch.device("cpu")) is not None:
        with pytest.raises(ConfigError, match=r"experts.backend \('megablocks'\) cannot run on cpu"):
            resolve_backend("megablocks", torch.device("cpu"), 64, 64, 4)


def test_auto_is_torch_on_cpu_and_the_measured_winner_on_a_gpu():
    assert resolve_backend("auto", torch.device("cpu"), 64, 64, 8) is BACKENDS["torch"]
    assert shape_class(8) == "coarse" and shape_class(16) == "coarse" and shape_class(64) == "fine"
    assert DEFAULT_CUDA == "grouped_mm"


def test_measured_table_covers_the_reference_shapes_and_never_picks_a_loser():
    """Each row's winner was measured no slower than the plain grouped_mm layer on each of its
    shapes, and the rows of a card cover every reference shape once, in the class they name."""
    for row in MEASURED:
        assert all(len(t) == len(row.shapes) for t in row.ms.values())
        win = row.ms[row.winner]
        assert all(w <= p for w, p in zip(win, row.ms["plain"]))
        assert all(sum(win) <= sum(t) for n, t in row.ms.items() if n != "plain")
        assert all(shape_class(s[2]) == row.shape_class for s in row.shapes)
    for card in {row.card for row in MEASURED}:
        shapes = [s for row in MEASURED if row.card == card for s in row.shapes]
        assert sorted(shapes) == sorted(REFERENCE_SHAPES)


def test_a_row_whose_backends_all_lose_to_the_plain_layer_falls_back_to_torch():
    row = Measurement("X", "fine", "2026-01-01", ((1, 1, 32, 1, 1),), {"triton": (2.0,), "plain": (1.0,)})
    assert row.winner == "torch"
