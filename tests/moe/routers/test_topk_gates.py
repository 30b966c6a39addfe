"""``moe.routers.topk_gates``: the fused top-k gates node against autograd through the same ops.

The forward is the same ops, so every output (probabilities, weights, expert ids, slot counts,
balance and z losses) must be equal bit for bit; the closed-form backward must match autograd's
gradient of the logits to fp32 rounding, on fresh random inputs, for every combination of
renormalisation and loss coefficients, and with a cross-rank count sum.
"""

from __future__ import annotations

import pytest
import torch

from moe.routers import RouterContext
from moe.routers.topk import TopKConfig, TopKRouter
from moe.routers.topk_gates import fused_gates, gates
from tools.bench.op_counter import OpCounter

OUTPUTS = ("probs_TE", "weights_TK", "ids_TK", "counts_E", "aux", "z")


def both(T: int, E: int, K: int, renorm: bool, aux: float, z: float, seed: int, sum_counts=None, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * scale).requires_grad_()
    twin = logits.detach().clone().requires_grad_()
    return logits, twin, gates(logits, K, renorm, aux, z, sum_counts), fused_gates(twin, K, renorm, aux, z, sum_counts), g


def loss_of(out, g_w: torch.Tensor, c_aux: float, c_z: float) -> torch.Tensor:
    """A loss that reaches every differentiable output: weighted gates plus scaled aux losses."""
    loss = (out.weights_TK * g_w).sum()
    if out.aux is not None:
        loss = loss + c_aux * out.aux
    if out.z is not None:
        loss = loss + c_z * out.z
    return loss


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("aux,z", [(0.01, 0.001), (0.0, 0.001), (0.3, 0.0), (0.0, 0.0)])
def test_fused_gates_forward_is_the_same_bits_and_backward_matches_autograd(seed: int, renorm: bool, aux: float, z: float) -> None:
    T, E, K = 67, 11, 3
    logits, twin, want, got, g = both(T, E, K, renorm, aux, z, seed)
    for name in OUTPUTS:
        a, b = getattr(want, name), getattr(got, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    g_w = torch.randn(T, K, generator=g)
    (d_want,) = torch.autograd.grad(loss_of(want, g_w, 1.7, 0.6), logits)
    (d_got,) = torch.autograd.grad(loss_of(got, g_w, 1.7, 0.6), twin)
    torch.testing.assert_close(d_got, d_want, rtol=1e-5, atol=1e-6)
    assert d_want.abs().max() > 1e-3  # the comparison sees a real gradient


def test_fused_gates_take_the_gradient_of_the_probabilities_and_a_cross_rank_count_sum() -> None:
    """A gradient arriving at ``probs_TE`` itself adds into the softmax backward; the balance loss's
    ``f`` from counts summed over ranks (here: doubled, as two identical ranks would give)."""
    T, E, K = 40, 6, 2
    logits, twin, want, got, g = both(T, E, K, True, 0.05, 0.01, 7, sum_counts=lambda c: c * 2)
    assert torch.equal(want.aux, got.aux)
    g_w, g_p = torch.randn(T, K, generator=g), torch.randn(T, E, generator=g)
    (d_want,) = torch.autograd.grad(loss_of(want, g_w, 1.0, 1.0) + (want.probs_TE * g_p).sum(), logits)
    (d_got,) = torch.autograd.grad(loss_of(got, g_w, 1.0, 1.0) + (got.probs_TE * g_p).sum(), twin)
    torch.testing.assert_close(d_got, d_want, rtol=1e-5, atol=1e-6)


def test_router_uses_the_fused_node_off_the_cpu_and_autograd_on_it() -> None:
    """On ``meta`` (the budget's stand-in for a GPU) the top-k router's gates are the fused node;
    on the CPU, autograd through the same forward ops."""
    cfg = TopKConfig(k=4)
    with torch.device("meta"):
        meta = TopKRouter(cfg, d_model=32, num_experts=16)(torch.empty(128, 32, requires_grad=True), RouterContext())
    cpu = TopKRouter(cfg, d_model=32, num_experts=16)(torch.randn(128, 32, requires_grad=True), RouterContext())
    assert meta.weights_TK.grad_fn.name() == "_FusedGatesBackward"
    assert cpu.weights_TK.grad_fn.name() == "DivBackward0"  # the renormalisation, as autograd records it


def test_fused_backward_is_one_kernel() -> None:
    """Gates to logits, every loss on: one ``moeforge::topk_gates_bwd`` launch (autograd took about 25),
    reading the probabilities, gates, ids, their gradient and sums, f, lse and the two loss gradients
    once and writing the fp32 logit gradient once."""
    T, E, K = 256, 16, 4
    with torch.device("meta"):
        logits = torch.empty(T, E, requires_grad=True)
        out = fused_gates(logits, K, True, 0.01, 0.001)
        seeds = [torch.empty(T, K), torch.empty(()), torch.empty(())]
    with OpCounter() as counter:
        torch.autograd.grad([out.weights_TK, out.aux, out.z], [logits], seeds)
    (op,) = counter.budget.ops
    assert (op.name, op.launches) == ("moeforge.topk_gates_bwd.default", 1)
    assert op.bytes == 2 * T * E * 4 + T * K * (4 + 8 + 4) + T * 4 + E * 4 + T * 4 + 2 * 4
