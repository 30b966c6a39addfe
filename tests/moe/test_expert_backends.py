"""The expert-backend registry and ``auto``'s measured choice."""

from __future__ import annotations

import pytest
import torch

from moe.errors import ConfigError
from moe.expert_backends import BACKENDS, ExpertBackend, expert_backend, resolve_backend
from moe.expert_backends.auto import DEFAULT_CUDA, MEASURED, Measurement, shape_class
from tools.bench.shapes import REFERENCE_SHAPES


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


@pytest.mark.parametrize(("card", "capability", "experts", "triton_ok", "backend", "says"), [
    ("cpu", None, 8, False, "torch", "pure-torch reference"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 64, True, "triton", "sm_80, below sm_90"),
    ("NVIDIA L40S", (8, 9), 8, True, "triton", "read them on the device (no host sync)"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 64, False, "grouped_mm", "install triton for a step without host syncs"),
    ("Tesla V100", (7, 0), 8, False, "torch", "sm_70, below sm_90"),
    ("NVIDIA H200", (9, 0), 64, True, "grouped_mm", "measured 2026-11-27"),
    ("NVIDIA H100 80GB HBM3", (9, 0), 8, True, "grouped_mm", "no measurement for NVIDIA H100 80GB HBM3 (sm_90)"),
])
def test_auto_choice_below_sm90_is_sync_free_and_says_why(card: str, capability: tuple[int, int] | None, experts: int, triton_ok: bool,
                                                          backend: str, says: str) -> None:
    from moe.expert_backends.auto import choice_for

    choice = choice_for(card, capability, experts, triton_ok)
    assert choice.backend == backend
    assert says in choice.reason


def test_auto_names_its_choice_for_the_start_up_line_and_concrete_backends_do_not() -> None:
    from moe.expert_backends import expert_backend

    assert expert_backend("auto").choice_note(torch.device("cpu"), 8) == "experts.backend=auto: torch (the CPU runs the pure-torch reference)"
    assert expert_backend("grouped_mm").choice_note(torch.device("cpu"), 8) is None


def test_the_registry_refuses_an_entry_that_is_not_a_backend() -> None:
    from moe.registry import load_classes

    with pytest.raises(TypeError, match=r"^expert backend 'gate' \(moe\.routers\.gate:normal_gate\) must be a ExpertBackend subclass$"):
        load_classes({"gate": "moe.routers.gate:normal_gate"}, ExpertBackend, "expert backend")
    assert load_classes({"torch": "moe.expert_backends.torch_loop:TorchLoopBackend"}, ExpertBackend, "expert backend") == {"torch": type(BACKENDS["torch"])}
