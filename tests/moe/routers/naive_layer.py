"""Slow, obviously-correct reference of a routed MoE layer, for the router tests.

Shape legend: T tokens, D model dim, E experts, K slots.

``y_t = sum over used slots j of w_tj * expert_{e_tj}(x_t)``, one token and one slot at a time,
with each expert's SwiGLU written out from its stacked weights. Compared against
``moe.layer.MoELayer`` (router -> moe.dispatch -> experts -> combine) on the same decision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moe.experts import ExpertsConfig
from moe.layer import MoELayer
from moe.routers import RouterConfig, RouterContext, RoutingDecision


def naive_moe(x_TD: Tensor, decision: RoutingDecision, layer: MoELayer) -> Tensor:
    """Per-token, per-slot loop over the decision's used slots."""
    ex = layer.experts
    mask_TK = decision.valid_mask()
    rows = []
    for t in range(x_TD.shape[0]):
        acc_D = torch.zeros_like(x_TD[t])
        for j in range(decision.num_slots):
            if bool(mask_TK[t, j]):
                e = int(decision.expert_ids_TK[t, j])
                h_F = nn.functional.silu(x_TD[t] @ ex.w_gate_EDF[e]) * (x_TD[t] @ ex.w_up_EDF[e])
                acc_D = acc_D + decision.weights_TK[t, j] * (h_F @ ex.w_down_EFD[e])
        rows.append(acc_D)
    return torch.stack(rows)


def check_layer_matches_naive(
    router_cfg: RouterConfig,
    context: RouterContext,
    num_experts: int = 4,
    d_model: int = 8,
    d_ff: int = 12,
    seed: int = 0,
    prepare: Callable[[MoELayer], None] | None = None,
) -> tuple[Tensor, RoutingDecision]:
    """Run MoELayer (backend torch, float64) and the naive loop on one decision; compare forward and grads.

    The router's randomness (Gumbel noise) is replayed by re-seeding before each call. Returns the
    layer output and the decision so callers can check router-specific facts.
    """
    torch.manual_seed(seed)
    T = context.token_ids_T.shape[0] if context.token_ids_T is not None else context.batch_size * context.seq_len
    layer = MoELayer(d_model, d_ff, num_experts, router_cfg, ExpertsConfig(backend="torch")).double()
    if prepare is not None:
        prepare(layer)
    x_TD = torch.randn(T, d_model, dtype=torch.float64, requires_grad=True)
    probe_TD = torch.randn(T, d_model, dtype=torch.float64)
    params = [p for p in layer.parameters()]

    torch.manual_seed(seed + 1)
    y_TD, aux = layer(x_TD, context)
    loss = (y_TD * probe_TD).sum() + sum(aux.values(), torch.zeros((), dtype=torch.float64))
    grads = torch.autograd.grad(loss, [x_TD, *params], allow_unused=True)

    torch.manual_seed(seed + 1)
    decision = layer.router(x_TD, context)
    y_ref_TD = naive_moe(x_TD, decision, layer)
    loss_ref = (y_ref_TD * probe_TD).sum() + sum(decision.aux_losses.values(), torch.zeros((), dtype=torch.float64))
    grads_ref = torch.autograd.grad(loss_ref, [x_TD, *params], allow_unused=True)

    assert torch.isfinite(y_TD).all()
    torch.testing.assert_close(y_TD, y_ref_TD, rtol=1e-5, atol=1e-6)
    names = ["x", *[n for n, _ in layer.named_parameters()]]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert torch.isfinite(g).all(), name
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
    return y_TD.detach(), decision
