"""The top-k gates' backward kernel against its torch twin and against autograd, on fresh inputs.

Shape legend: T tokens, E experts, K slots per token. On CPU the Triton kernel runs in the
interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from moe.routers.topk_gates import gates
from tests.kernel_harness import assert_kernels_run


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "topk_gates", "_topk_gates_bwd_kernel")


def routed(T: int, E: int, K: int, gen: torch.Generator, device: torch.device):
    """Softmax probabilities, their top-k (renormalised) weights, ids and sums, and the per-expert fractions."""
    logits = torch.randn(T, E, generator=gen) * 2
    probs = torch.softmax(logits, dim=-1)
    v, ids = probs.topk(K, dim=-1)
    sums = v.sum(-1)
    f = torch.bincount(ids.reshape(-1), minlength=E).float() / (T * K)
    return [t.to(device) for t in (logits, probs, v / sums[:, None], ids, sums, f, torch.logsumexp(logits, -1))]


@pytest.mark.parametrize("T,E,K", [(1, 2, 1), (37, 11, 3), (130, 64, 8), (9, 300, 2)])
@pytest.mark.parametrize("parts", ["all", "gates_only", "no_renorm", "losses_only", "with_dprobs"])
def test_kernel_equals_the_reference(kc, gen, T, E, K, parts):
    """E = 11 and 300 leave masked columns of a power-of-two block; 130 rows several programs."""
    logits, probs, w, ids, sums, f, lse = routed(T, E, K, gen, kc.DEVICE)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(kc.DEVICE)  # noqa: E731
    dw, dprobs, daux, dz = rnd(T, K), rnd(T, E), rnd(()), rnd(())
    args = {
        "all": (dw, sums, None, f, daux, lse, dz),
        "gates_only": (dw, sums, None, None, None, None, None),
        "no_renorm": (dw, None, None, f, daux, lse, dz),
        "losses_only": (None, None, None, f, daux, lse, dz),
        "with_dprobs": (dw, sums, dprobs, f, daux, None, None),
    }[parts]
    got = ops.topk_gates_bwd(probs, w, ids, *args, 0.37, 0.011)
    want = reference.topk_gates_bwd(probs, w, ids, *args, 0.37, 0.011)
    assert got.dtype == torch.float32 and got.shape == (T, E)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kernel_is_autograds_gradient_of_the_router_losses(kc, gen):
    """Through ``gates`` in fp64 (the top-k chain, the Switch loss with coefficient 0.02, the z-loss
    with 0.003): the kernel's dlogits for the same output gradients equal autograd's."""
    T, E, K, c_a, c_z = 45, 13, 4, 0.02, 0.003
    logits = (torch.randn(T, E, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    out = gates(logits, K, True, c_a, c_z)
    dw, daux, dz = torch.randn(T, K, generator=gen, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    (want,) = torch.autograd.grad([out.weights_TK, out.aux, out.z], [logits], [dw, daux, dz])
    d = lambda t: t.float().to(kc.DEVICE)  # noqa: E731
    got = ops.topk_gates_bwd(d(out.probs_TE.detach()), d(out.weights_TK.detach()), out.ids_TK.to(kc.DEVICE), d(dw), d(out.sum_TK1.detach().reshape(T)),
                             None, d(out.f_E), d(daux), d(out.lse_T.detach()), d(dz), c_a * E / T, 2 * c_z / T)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
