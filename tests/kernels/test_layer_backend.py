"""``experts.backend=triton`` wired into the MoE layer: the fused runner equals the torch backend."""

from __future__ import annotations

import torch

from moe.experts import ExpertsConfig, resolve_backend
from moe.layer import MoELayer, fused_triton_runner
from moe.routers import RouterContext
from moe.routers.dts import DTSConfig
from moe.routers.topk import TopKConfig


def layer_pair(router_cfg: object) -> tuple[MoELayer, MoELayer]:
    ref = MoELayer(16, 24, 4, router_cfg, ExpertsConfig(backend="torch"))
    fused = MoELayer(16, 24, 4, router_cfg, ExpertsConfig(backend="triton"))
    fused.load_state_dict(ref.state_dict())
    fused.resolve_backend(torch.device("cpu"))
    assert fused.runner is fused_triton_runner and fused.experts.backend == "triton"
    return ref, fused


def compare(ref: MoELayer, fused: MoELayer, x: torch.Tensor, context: RouterContext) -> None:
    torch.manual_seed(11)
    y_ref, _ = ref(x, context)
    torch.manual_seed(11)
    y_fused, _ = fused(x, context)
    torch.testing.assert_close(y_fused, y_ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, list(ref.parameters()), g, allow_unused=True)
    grads_fused = torch.autograd.grad(y_fused, list(fused.parameters()), g, allow_unused=True)
    for (name, _), a, b in zip(ref.named_parameters(), grads_ref, grads_fused):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


def test_triton_layer_matches_torch_topk() -> None:
    ref, fused = layer_pair(TopKConfig(k=2))
    compare(ref, fused, torch.randn(19, 16), RouterContext())


def test_triton_layer_matches_torch_variable_experts_per_token() -> None:
    # DTS soft phase: K = E slots with a mask, so R < T*K rows reach the kernels.
    ref, fused = layer_pair(DTSConfig(tau_max=0.3, tau_min=0.3, decay_steps=10, hard_step=None, threshold=0.05))
    compare(ref, fused, torch.randn(13, 16), RouterContext(step=1))


def test_auto_picks_torch_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
