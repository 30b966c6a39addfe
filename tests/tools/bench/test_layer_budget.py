"""The default CUDA path of one MoE layer step stays inside a budget a GPU would pay, checked on CPU.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k, R = T*K routed rows.

``tools.bench.layer_budget.count_layer_step`` runs one training forward + backward of the whole
``MoELayer`` (router topk with balance and z losses, dispatch, experts, combine, statistics) in
bf16 on ``meta`` tensors at the reference shapes with ``experts.backend=grouped_mm`` (what
``auto`` picks on a GPU without a measurement table entry) and counts every launched operator.

The minimum glue traffic (derived in ``minimum_glue_bytes``): library grouped GEMMs read their A
operand as contiguous expert-sorted rows and fuse nothing, so a step must at least gather x into
expert order (2RD), apply SwiGLU between the GEMMs (read g and u, write h: 3RF), combine the down
projection's rows into tokens (RD + TD), and in the backward gather dy (2RD), run the SwiGLU
backward (read g, u, dL/dh; write dg, du: 5RF) and combine the dgrad rows into dx (RD + TD):
``6RD + 8RF + 2TD`` bf16 elements. The budget per shape is today's count plus a small margin
(``BUDGETS``): one launch and 0.02 of the minimum, so one redundant R x F pass (0.08-0.20 of the
minimum at these shapes) fails it. The GEMMs must be exactly the nine of the routed SwiGLU
(``18 R D F``) plus the router's three (``6 T D E``).
"""

from __future__ import annotations

import pytest
import torch

from tools.bench.layer_budget import Budget, OpCounter, count_layer_step, minimum_glue_bytes, predicted_ms
from tools.bench.shapes import REFERENCE_SHAPES

BUDGETS: dict[tuple[int, int, int, int, int], tuple[int, float]] = {
    # shape -> (most launches, most glue / minimum glue). Counted on 2026-12-03 (branch moeglue):
    # 53 launches at every shape (9 expert GEMMs, 3 router GEMMs, 41 glue ops: the top-k gates'
    # backward is one kernel and their balance fraction divides by the host-known slot total,
    # top-k routing counts its slots once for the balance loss and dispatch, dispatch's indices
    # after the sort are one kernel, the plan keeps host-known numbers on the host, the weight
    # gradient returns to the slots by a gather) and glue ratios 1.073, 1.147, 1.096, 1.173; the
    # margins are one launch and 0.02.
    (4096, 14336, 8, 2, 8192): (54, 1.093),
    (2048, 1024, 64, 8, 16384): (54, 1.167),
    (1024, 2816, 16, 2, 16384): (54, 1.116),
    (2048, 768, 128, 8, 32768): (54, 1.193),
}


@pytest.fixture(scope="module")
def budgets() -> dict:
    return {shape: count_layer_step(shape) for shape in REFERENCE_SHAPES}


def over_budget(shape: tuple[int, int, int, int, int], b: Budget) -> list[str]:
    """What of the layer step's count exceeds ``BUDGETS`` at ``shape`` (empty: it fits)."""
    D, F, E, K, T = shape
    most_launches, most_ratio = BUDGETS[shape]
    lo = minimum_glue_bytes(shape)
    problems = []
    if b.launches > most_launches:
        problems.append(f"{b.launches} launches > {most_launches}")
    if not lo <= b.glue_bytes <= most_ratio * lo:
        problems.append(f"glue {b.glue_bytes / 1e9:.3f} GB = {b.glue_bytes / lo:.3f} x the minimum {lo / 1e9:.3f} GB, budget {most_ratio}x")
    if b.gemm_flops != 18 * T * K * D * F + 6 * T * D * E:
        problems.append(f"GEMM FLOPs {b.gemm_flops} != 18 T K D F + 6 T D E")
    if b.atomics:
        problems.append(f"atomics {b.atomics}")
    if b.host_syncs:
        problems.append(f"host syncs {b.host_syncs}")
    return problems


@pytest.mark.parametrize("shape", REFERENCE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_step_fits_the_budget(budgets, shape):
    assert over_budget(shape, budgets[shape]) == []


@pytest.mark.parametrize("shape", REFERENCE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_a_redundant_copy_of_the_hidden_rows_breaks_the_budget(monkeypatch, shape):
    """One extra R x F copy (a ``clone`` of the SwiGLU output h in the grouped_mm forward) must
    fail ``test_layer_step_fits_the_budget`` at every shape."""
    import moe.expert_backends.grouped_mm as grouped_mm

    real = grouped_mm.ops.swiglu_act

    class CopyingOps:
        def __getattr__(self, name: str):
            return getattr(ops_module, name)

        @staticmethod
        def swiglu_act(*args):
            return real(*args).clone()

    ops_module = grouped_mm.ops
    monkeypatch.setattr(grouped_mm, "ops", CopyingOps())
    problems = over_budget(shape, count_layer_step(shape))
    assert any(p.startswith("glue") for p in problems), problems


def test_prediction_at_the_mixtral_shape_is_under_the_measured_ceiling(budgets):
    """Predicted time (GEMMs at 680 TFLOP/s, glue at 3 TB/s): at (4096, 14336, 8, 2, 8192) the
    nine GEMMs alone are 25.5 ms and the glue 1.7 ms, under the 27.2 ms the bmm ceiling measured
    on an H200 (tools.bench.layer, 2026-11-27)."""
    b = budgets[(4096, 14336, 8, 2, 8192)]
    assert 25.0 < predicted_ms(b) < 27.2


def test_counter_sees_gathers_in_place_writes_and_atomics():
    """The counter itself: an index_select reads only its rows, an in-place op is read and
    written, and an index_add into a [T, D] tensor is flagged as atomics over rows."""
    with torch.device("meta"):
        x = torch.empty(100, 64, dtype=torch.bfloat16)
        idx = torch.empty(30, dtype=torch.int64)
        y = torch.empty(30, 64, dtype=torch.bfloat16)
    with OpCounter() as counter:
        x.index_select(0, idx)
        x.mul_(2.0)
        x.index_add(0, idx, y)
        x.t()  # a view: no kernel
    gather, scale, scatter = counter.budget.ops
    assert gather.bytes == 30 * 64 * 2 * 2 + 30 * 8  # rows read + rows written + the index
    assert scale.bytes == 100 * 64 * 2 * 2
    assert not gather.atomic_rows and scatter.atomic_rows
