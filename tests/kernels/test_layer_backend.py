"""Every fast expert backend wired into the MoE layer equals the torch backend, forward and every gradient.

Runs on the GPU where there is one (compiled kernels), else on the CPU (Triton interpreted).
"""

from __future__ import annotations

import pytest
import torch

from moe.expert_backends import BACKENDS, resolve_backend
from moe.experts import ExpertsConfig
from moe.layer import MoELayer
from moe.routers import RouterConfig, RouterContext
from moe.routers.dts import DTSConfig
from moe.routers.topk import TopKConfig

FAST = ("triton", "grouped_mm")


def layer_pair(router_cfg: RouterConfig, cfg: ExpertsConfig, device: torch.device, d_model: int = 16, d_ff: int = 24, num_experts: int = 4) -> tuple[MoELayer, MoELayer]:
    ref = MoELayer(d_model, d_ff, num_experts, router_cfg, ExpertsConfig(backend="torch", capacity_factor=cfg.capacity_factor)).to(device)
    fast = MoELayer(d_model, d_ff, num_experts, router_cfg, cfg).to(device)
    fast.load_state_dict(ref.state_dict())
    fast.resolve_backend(device)
    assert fast.experts.backend is BACKENDS[cfg.backend]
    return ref, fast


def compare(ref: MoELayer, fast: MoELayer, x: torch.Tensor, context: RouterContext) -> None:
    torch.manual_seed(11)
    y_ref, _ = ref(x, context)
    torch.manual_seed(11)
    y_fast, _ = fast(x, context)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g, allow_unused=True)
    grads_fast = torch.autograd.grad(y_fast, [x, *fast.parameters()], g, allow_unused=True)
    for name, a, b in zip(["x"] + [n for n, _ in ref.named_parameters()], grads_ref, grads_fast):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("k,num_experts", [(1, 4), (2, 4), (4, 4), (8, 12)])
def test_fast_layer_matches_torch_topk(device, backend, k, num_experts) -> None:
    """19 tokens over up to 12 experts: some experts idle or with a single row."""
    ref, fast = layer_pair(TopKConfig(k=k), ExpertsConfig(backend=backend), device, num_experts=num_experts)
    compare(ref, fast, torch.randn(19, 16, device=device, requires_grad=True), RouterContext())


@pytest.mark.parametrize("backend", FAST)
def test_fast_layer_matches_torch_variable_experts_per_token(device, backend) -> None:
    # DTS soft phase: K = E slots with a mask, so R < T*K rows reach the kernels.
    router = DTSConfig(tau_max=0.3, tau_min=0.3, decay_steps=10, hard_step=None, threshold=0.05)
    ref, fast = layer_pair(router, ExpertsConfig(backend=backend), device)
    compare(ref, fast, torch.randn(13, 16, device=device, requires_grad=True), RouterContext(step=1))


@pytest.mark.parametrize("backend", FAST)
def test_fast_layer_matches_torch_with_capacity_drops(device, backend) -> None:
    ref, fast = layer_pair(TopKConfig(k=2), ExpertsConfig(backend=backend, capacity_factor=0.5), device)
    compare(ref, fast, torch.randn(23, 16, device=device, requires_grad=True), RouterContext())


def test_auto_picks_torch_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu"), 16, 24, 4) is BACKENDS["torch"]


def test_triton_options_from_config_reach_the_kernels(device) -> None:
    """experts.regenerate_preactivations and experts.kernel_blocks (Hydra-style '/' string) steer the fused path;
    the layer still equals the torch backend, forward and every gradient."""
    from kernels.layout import BlockSizes

    cfg = ExpertsConfig(backend="triton", regenerate_preactivations=True, kernel_blocks="16/16/16/4/2/16/16")
    assert cfg.blocks() == BlockSizes(block_m=16, block_n=16, block_k=16, block_r=16, num_warps=4, num_stages=2, bwd_block_n=16)
    ref, fused = layer_pair(TopKConfig(k=2), cfg, device)
    assert fused.experts.options.regenerate_preactivations and fused.experts.options.blocks == cfg.blocks()
    compare(ref, fused, torch.randn(19, 16, device=device, requires_grad=True), RouterContext())
    # The gathered-rows seam (ep/fssdp) takes the same options.
    x_RD, counts_E = torch.randn(10, 16, device=device), torch.tensor([3, 0, 5, 2], device=device)
    torch.testing.assert_close(fused.experts.grouped_swiglu(x_RD, counts_E), ref.experts.grouped_swiglu(x_RD, counts_E), atol=1e-5, rtol=1e-5)


def test_the_old_name_of_regenerate_preactivations_is_read() -> None:
    """Configs and checkpoints written before the rename say experts.recompute; it sets the new key."""
    assert ExpertsConfig(backend="triton", recompute=True).options().regenerate_preactivations is True
    assert ExpertsConfig(backend="triton", recompute=False).options().regenerate_preactivations is False
    assert ExpertsConfig(backend="triton").options().regenerate_preactivations is False


def test_triton_options_are_refused_elsewhere_and_when_malformed() -> None:
    from moe.errors import ConfigError

    for key in ("regenerate_preactivations", "recompute"):  # the option's name before the rename is still read
        with pytest.raises(ConfigError, match=r"experts.regenerate_preactivations \(True\) only applies to experts.backend=auto\|triton"):
            ExpertsConfig(backend="grouped_mm", **{key: True})
    with pytest.raises(ConfigError, match=r"experts.kernel_blocks \('64/64'\)"):
        ExpertsConfig(backend="triton", kernel_blocks="64/64")
    with pytest.raises(ConfigError, match=r"experts.kernel_blocks \('48/64/64/4/3'\).*power of two"):
        ExpertsConfig(backend="auto", kernel_blocks="48/64/64/4/3")
    with pytest.raises(ConfigError, match=r"experts.backend \('cuda'\) must be one of"):
        ExpertsConfig(backend="cuda")


def test_grouped_mm_refuses_a_second_backward_through_freed_activations(device) -> None:
    layer = MoELayer(16, 24, 4, TopKConfig(k=2), ExpertsConfig(backend="grouped_mm")).to(device)
    y, _ = layer(torch.randn(9, 16, device=device), RouterContext())
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.sum().backward()


@pytest.mark.parametrize("backend", FAST)
def test_grouped_rows_seam_matches_the_loop(device, backend) -> None:
    """The seam EP and FSSDP call (rows already sorted by expert): forward and every gradient
    against the per-expert loop, with an idle expert and a single-row expert."""
    from moe.expert_backends import ExpertOptions, swiglu_loop

    counts = torch.tensor([3, 0, 1, 6, 2], device=device)
    x = torch.randn(12, 16, device=device, requires_grad=True)
    w = [(torch.randn(5, *s, device=device) * 0.3).requires_grad_() for s in ((16, 24), (16, 24), (24, 16))]
    y = BACKENDS[backend].grouped(x, counts, *w, ExpertOptions())
    y_ref = swiglu_loop(x, counts, *w)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), torch.autograd.grad(y, [x, *w], g), torch.autograd.grad(y_ref, [x, *w], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
