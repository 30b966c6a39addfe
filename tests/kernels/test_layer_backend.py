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


def test_triton_options_from_config_reach_the_kernels() -> None:
    """experts.recompute and experts.kernel_blocks (Hydra-style '/' string) steer the fused path;
    the layer still equals the torch backend, forward and every gradient."""
    from kernels.layout import BlockSizes

    cfg = ExpertsConfig(backend="triton", recompute=True, kernel_blocks="16/16/16/4/2/16/16")
    assert cfg.blocks() == BlockSizes(block_m=16, block_n=16, block_k=16, block_r=16, num_warps=4, num_stages=2, bwd_block_n=16)
    ref = MoELayer(16, 24, 4, TopKConfig(k=2), ExpertsConfig(backend="torch"))
    fused = MoELayer(16, 24, 4, TopKConfig(k=2), cfg)
    fused.load_state_dict(ref.state_dict())
    fused.resolve_backend(torch.device("cpu"))
    assert fused.experts.recompute and fused.experts.blocks == cfg.blocks()
    compare(ref, fused, torch.randn(19, 16), RouterContext())
    # The gathered-rows seam (ep/fssdp) takes the same options.
    x_RD, counts_E = torch.randn(10, 16), torch.tensor([3, 0, 5, 2])
    torch.testing.assert_close(fused.experts.grouped_swiglu(x_RD, counts_E), ref.experts.grouped_swiglu(x_RD, counts_E), atol=1e-4, rtol=1e-4)


def test_triton_options_are_refused_elsewhere_and_when_malformed() -> None:
    import pytest

    from moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"experts.recompute \(True\) only applies to experts.backend=triton\|auto"):
        ExpertsConfig(backend="grouped_mm", recompute=True)
    with pytest.raises(ConfigError, match=r"experts.kernel_blocks \('64/64'\)"):
        ExpertsConfig(backend="triton", kernel_blocks="64/64")
    with pytest.raises(ConfigError, match=r"experts.kernel_blocks \('48/64/64/4/3'\).*power of two"):
        ExpertsConfig(backend="auto", kernel_blocks="48/64/64/4/3")
