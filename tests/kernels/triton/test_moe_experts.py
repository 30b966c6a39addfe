"""fused_moe_experts against moe.layer.local_runner (gather -> Experts.grouped_swiglu -> combine).

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots, R routed rows.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.triton.moe_experts as moe_experts
from kernels import reference
from kernels.layout import BlockSizes
from moe.expert_backends import swiglu_loop
from moe.experts import Experts
from moe.layer import local_runner

TINY = BlockSizes(block_m=16, block_n=16, block_k=16, block_r=16)
# Program groups of 3 tiles: with 8 schedule tiles and 2 column blocks the last group is ragged
# (3 + 3 + 2), and the backward kernel runs its own 16-wide column block.
TINY_GROUPED = BlockSizes(block_m=16, block_n=16, block_k=16, block_r=16, group_m=3, bwd_block_n=16)
ROOT = Path(__file__).resolve().parents[3]


def _problem(kc, gen, kind, dtype=torch.float32):
    T, K, E, D, F = (kc.SMALL[k] for k in "TKEDF")
    plan = kc.make_plan(kind, T, K, E, gen)
    x_TD = torch.randn(T, D, generator=gen).to(kc.DEVICE, dtype).requires_grad_()
    weight_R = plan.weight_R.detach().to(kc.DEVICE).requires_grad_()
    plan = dataclasses.replace(plan, **{f.name: getattr(plan, f.name).to(kc.DEVICE) for f in dataclasses.fields(plan)
                                        if isinstance(getattr(plan, f.name), torch.Tensor)})
    return plan, x_TD, weight_R, kc.make_weights(E, D, F, gen, dtype)


def _local_runner(plan, x_TD, weight_R, weights):
    """The model's own path, with our leaf tensors swapped into an Experts module and the plan."""
    E, D, F = weights[0].shape
    experts = Experts(E, D, F, backend="torch").to(x_TD.device, x_TD.dtype)
    experts.w_gate_EDF, experts.w_up_EDF, experts.w_down_EFD = (torch.nn.Parameter(w.detach().clone()) for w in weights)
    x_ref = x_TD.detach().clone().requires_grad_()
    w_ref = weight_R.detach().clone().requires_grad_()
    y = local_runner(experts, x_ref, dataclasses.replace(plan, weight_R=w_ref))
    return y, (x_ref, w_ref, experts.w_gate_EDF, experts.w_up_EDF, experts.w_down_EFD)


@pytest.mark.parametrize(
    "kind,regenerate_preactivations,blocks",
    [("random", False, TINY), ("straddle", True, TINY), ("masked", False, TINY), ("capacity", True, TINY), ("random", False, TINY_GROUPED), ("straddle", True, TINY_GROUPED)],
    ids=["random", "straddle-regenerate", "masked", "capacity-regenerate", "random-group3", "straddle-regenerate-group3"],
)
def test_fused_matches_local_runner(kc, gen, kind, regenerate_preactivations, blocks):
    plan, x_TD, weight_R, weights = _problem(kc, gen, kind)
    K = kc.SMALL["K"]
    y = moe_experts.fused_moe_experts(x_TD, plan.slot_idx_R, weight_R, plan.counts_E, K, *weights, regenerate_preactivations=regenerate_preactivations, blocks=blocks)
    y_ref, ref_leaves = _local_runner(plan, x_TD, weight_R, weights)
    kc.assert_close(y, y_ref, what="y")
    dy = torch.randn(y.shape, generator=gen).to(kc.DEVICE)
    got = torch.autograd.grad(y, (x_TD, weight_R, *weights), dy)
    want = torch.autograd.grad(y_ref, ref_leaves, dy)
    for name, g, w in zip(("dx", "dweight", "dw_gate", "dw_up", "dw_down"), got, want):
        kc.assert_close(g, w, what=name)
    if kind == "masked":  # some tokens keep a single row: their output is that row alone
        assert plan.num_rows < x_TD.shape[0] * K


def test_fused_bf16_close_to_fp32(kc, gen):
    """bf16 inputs, fp32 accumulation: within bf16 tolerance of the fp32 reference.

    Triton 3.9's interpreter converts fp32 to bf16 by truncation (GPUs round to nearest even), so
    each stored bf16 intermediate errs up to 2^-7 instead of 2^-8, always towards zero; the CPU
    tolerance is widened for that (the GPU tests keep 2e-2).
    """
    plan, x_TD, weight_R, weights = _problem(kc, gen, "straddle", torch.bfloat16)
    K, tol = kc.SMALL["K"], (2e-2 if kc.CUDA else 5e-2)
    y = moe_experts.fused_moe_experts(x_TD, plan.slot_idx_R, weight_R, plan.counts_E, K, *weights, blocks=TINY)
    assert y.dtype == torch.bfloat16
    leaves32 = [t.detach().float().requires_grad_() for t in (x_TD, *weights)]
    w32 = weight_R.detach().clone().requires_grad_()
    y32 = reference.moe_experts(leaves32[0], plan.slot_idx_R, w32, plan.counts_E, K, *leaves32[1:])
    kc.assert_close_scaled(y, y32, tol, what="y bf16")
    dy = torch.randn(y.shape, generator=gen).to(kc.DEVICE).bfloat16()  # both sides get the same rounded dy
    got = torch.autograd.grad(y, (x_TD, weight_R, *weights), dy)
    want = torch.autograd.grad(y32, (leaves32[0], w32, *leaves32[1:]), dy.float())
    for name, g, w in zip(("dx", "dweight", "dw_gate", "dw_up", "dw_down"), got, want):
        kc.assert_close_scaled(g, w, tol, what=name)


def test_swiglu_triton_backend_matches_loop(kc, gen):
    """The drop-in for Experts.grouped_swiglu (pre-gathered rows, K=1) equals the torch loop."""
    R, E, D, F = 40, 4, kc.SMALL["D"], kc.SMALL["F"]
    counts_E = torch.tensor([17, 0, 1, 22], device=kc.DEVICE)
    x_RD = torch.randn(R, D, generator=gen).to(kc.DEVICE).requires_grad_()
    weights = kc.make_weights(E, D, F, gen)
    y = moe_experts.swiglu_triton(x_RD, counts_E, *weights)
    y_ref = swiglu_loop(x_RD, counts_E, *weights)
    kc.assert_close(y, y_ref, what="y")
    dy = torch.randn(y.shape, generator=gen).to(kc.DEVICE)
    for name, g, w in zip(("dx", "dw_gate", "dw_up", "dw_down"), torch.autograd.grad(y, (x_RD, *weights), dy), torch.autograd.grad(y_ref, (x_RD, *weights), dy)):
        kc.assert_close(g, w, what=name)


def test_falls_back_to_reference_where_triton_cannot_run(kc, gen, monkeypatch):
    if kc.CUDA:
        pytest.skip("the fallback concerns CPU tensors without the interpreter; this run has CUDA")
    monkeypatch.setattr(moe_experts, "INTERPRETED", False)
    assert not moe_experts.triton_can_run(torch.zeros(1))
    calls = []
    monkeypatch.setattr(reference, "moe_experts", lambda *a: calls.append(a) or a[0] * 3)
    plan, x_TD, weight_R, weights = _problem(kc, gen, "random")
    y = moe_experts.fused_moe_experts(x_TD, plan.slot_idx_R, weight_R, plan.counts_E, 2, *weights)
    assert len(calls) == 1 and torch.equal(y, x_TD * 3)


def test_import_fails_without_triton():
    """``experts.backend=auto`` relies on ``import kernels.triton.moe_experts`` raising ImportError."""
    code = "import sys; sys.modules['triton'] = None\ntry:\n    import kernels.triton.moe_experts\nexcept ImportError as e:\n    print('ImportError', e)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError") and "triton" in out.stdout
