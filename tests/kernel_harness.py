"""Kernel test harness: build the Triton kernels in interpreter mode when there is no GPU, and the
routing cases and fixtures the kernel tests share (tests/kernels and the layer bench's tests in
tests/tools/bench import them into their conftest.py).

Triton 3.9 reads ``TRITON_INTERPRET`` (``triton.knobs.runtime.interpret``) when ``@triton.jit``
decorates a function, i.e. when a kernel module is imported, and once more when its lazily
imported ``triton.experimental.gluon`` package loads (at the first launch). So on a machine
without CUDA importing this module sets the variable, imports gluon and every kernel module, then
restores the environment: the kernels stay interpreted (the only way they run on CPU) while no
other test file, and no subprocess it starts, sees the variable. triton itself must be *first*
imported with the variable set (its own @jit helpers are built then) and cannot be re-imported;
if another test file imported it earlier in compiled mode, these tests skip and say so.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

KERNEL_MODULES = (
    "kernels.layout", "kernels.triton.tile_matmul", "kernels.triton.route_meta", "kernels.triton.combine", "kernels.triton.grouped_wgrad", "kernels.triton.gather_gmm",
    "kernels.triton.gmm_scatter", "kernels.triton.swiglu_gmm", "kernels.triton.moe_experts", "kernels.swiglu_act", "kernels.unpermute",
    "kernels.cross_entropy", "kernels.rope", "kernels.rms_norm", "kernels.qkv_heads", "kernels.adamw", "kernels.topk_gates", "kernels.cast_many", "kernels.plan_indices",
)
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _import_interpreted() -> str | None:
    """Import the kernels interpreted; returns why that is impossible, or None."""
    if "triton" in sys.modules and not sys.modules["triton"].knobs.runtime.interpret:
        return (
            "triton was imported in compiled mode before tests/kernel_harness.py was imported (no CUDA here), "
            "and its C extension cannot be imported twice; run tests/kernels in its own pytest process or first"
        )
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton.experimental.gluon")
        for name in KERNEL_MODULES:
            importlib.import_module(name)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return None


NO_INTERPRETER = None if CUDA else _import_interpreted()


@pytest.fixture
def kernels_runnable() -> None:
    """Skip (with the reason) only when neither CUDA nor the interpreter is usable in this process."""
    if NO_INTERPRETER is not None:
        pytest.skip(NO_INTERPRETER)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (compiled kernels), else CPU (interpreted kernels)."""
    return DEVICE


# ---------------------------------------------------------------------------------------------
# Routing cases shared by the kernel tests (fresh random data on every call, never zeros).
# Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots, R routed rows.

ROUTINGS = ("random", "straddle", "masked", "capacity")
SMALL = dict(T=32, K=2, E=4, D=24, F=28)  # D, F not multiples of the 16-wide test blocks: masks run


def routing_ids(kind: str, T: int, K: int, E: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [T, K] expert ids with the edge cases every kernel must survive.

    random/masked/capacity: distinct top-K per token; expert E-1 gets no token, expert E-2 one.
    straddle (needs T >= 18, K == 2, E == 4): tokens 0..14 pick experts (0, 1), token 15 picks
    expert 0 twice, so its two rows are expert 0's rows 15 and 16 and straddle the boundary of
    16-row tiles; the last token alone reaches expert 3.
    """
    if kind == "straddle":
        assert T >= 18 and K == 2 and E == 4
        ids = torch.tensor([[1, 2]] * T)
        ids[:15] = torch.tensor([0, 1])
        ids[15] = torch.tensor([0, 0])
        ids[-1] = torch.tensor([2, 3])
        return ids
    scores = torch.rand(T, E, generator=generator)
    scores[:, E - 1] = -1.0  # never chosen
    scores[:, E - 2] = -0.5  # chosen by one token only
    lucky = int(torch.randint(0, T, (1,), generator=generator))
    scores[lucky, E - 2] = 2.0
    return scores.topk(K, dim=-1).indices


def make_plan(kind: str, T: int, K: int, E: int, generator: torch.Generator):
    """A ``moe.dispatch.DispatchPlan`` for ``kind`` (masked: ~30% slots unused; capacity: cf 0.6)."""
    from moe.dispatch import dispatch
    from moe.routers.interface import RoutingDecision

    ids = routing_ids(kind, T, K, E, generator)
    weights = torch.rand(T, K, generator=generator) + 0.1
    mask = None
    if kind == "masked":
        mask = torch.rand(T, K, generator=generator) > 0.3
        mask[:, 0] = True  # every token keeps its first choice; some keep fewer than K rows
        weights = weights * mask
    probs = torch.softmax(torch.randn(T, E, generator=generator), -1)
    decision = RoutingDecision(expert_ids_TK=ids, weights_TK=weights, probs_TE=probs, mask_TK=mask)
    return dispatch(decision, E, 0.6 if kind == "capacity" else None)


def make_weights(E: int, D: int, F: int, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Leaf expert weights (gate, up [E,D,F]; down [E,F,D]) scaled so activations stay O(1)."""
    w = lambda *s, fan: (torch.randn(*s, generator=generator) * fan**-0.5).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return w(E, D, F, fan=D), w(E, D, F, fan=D), w(E, F, D, fan=F)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator: each test draws new data (seed from torch's global RNG)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4, what: str = "") -> None:
    """fp32 comparison at ``tol`` (absolute and relative), with the worst error in the message."""
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float = 2e-2, what: str = "") -> None:
    """Low-precision comparison: max |actual - expected| <= tol * max |expected| (bf16 sums round per row)."""
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert scale > 0 and err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * max |expected| {scale:.3g}"


def assert_kernels_run(device: torch.device, module: str, *kernels: str) -> None:
    """The ops under test run their Triton kernels ``kernels`` of ``kernels.<module>`` on ``device`` (compiled on
    CUDA, interpreted on CPU), not their torch references."""
    from kernels import ops

    probe = torch.zeros(1, device=device)
    mod = ops._kernel_module(module)
    for name in kernels:
        assert ops.triton_runs(probe, mod, name), f"kernels.{module}.{name} would fall back to its reference"


@pytest.fixture
def kc():
    """The helpers above as one object, so test files never import ``conftest`` by name."""
    from types import SimpleNamespace

    return SimpleNamespace(
        DEVICE=DEVICE, CUDA=CUDA, SMALL=SMALL, routing_ids=routing_ids, make_plan=make_plan, make_weights=make_weights, assert_close=assert_close,
        assert_close_scaled=assert_close_scaled,
    )
