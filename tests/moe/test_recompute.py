"""Activation checkpointing (moe/recompute.py) and per-block compile leave training unchanged.

A checkpointed block runs its forward again in the backward; the step must give the same loss,
gradients and routing records as without checkpointing (statistics and router load counts
counted once). Full recomputation keeps only block inputs and runs the forward GEMMs again;
selective keeps the GEMM outputs and recomputes only the cheap ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import set_checkpoint_early_stop

from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers.sigmoid_bias import SigmoidBiasConfig
from moe.routers.topk import TopKConfig

ROUTERS = {"topk": TopKConfig(k=2, jitter=0.1), "sigmoid_bias": SigmoidBiasConfig(k=2)}


def build(router: str, mode: str, **kw: object) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"d_model": 32, "num_layers": 3, "num_heads": 4, "num_experts": 4, "d_ff": 48, "dense_d_ff": 64,
                         "moe_every": 1, "num_shared_experts": 1, **kw})
    model = MoETransformer(cfg, ROUTERS[router], ExpertsConfig())
    model.prepare(torch.device("cpu"))
    model.set_activation_checkpointing(mode)
    return model


GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default, torch.ops.aten._grouped_mm.default}


class OpCounter(TorchDispatchMode):
    """Counts the ops that run while it is active: GEMMs and all others."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in GEMMS:
            self.gemms += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Step:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    saved_bytes: int
    """Bytes autograd kept for the backward through saved-tensor hooks (a checkpointed region
    keeps its inputs there; selective checkpointing's kept outputs are held elsewhere)."""
    backward: OpCounter


def step(model: MoETransformer, tokens: torch.Tensor) -> Step:
    """One training forward and backward."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # the jitter draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, aux = model(tokens[:, :-1], step=3)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + sum(aux.values())
    with OpCounter() as ops:
        loss.backward()
    return Step(loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved), ops)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_checkpointing_keeps_loss_gradients_and_routing_records(router: str) -> None:
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(2))
    steps, sums, step_sums = {}, {}, {}
    for mode in ("none", "full", "selective"):
        model = build(router, mode)
        steps[mode] = step(model, tokens)
        sums[mode] = model.routing_sums()
        step_sums[mode] = [t.clone() for t in model.router_step_sums()]
    ref = steps["none"]
    for mode in ("full", "selective"):
        torch.testing.assert_close(steps[mode].loss, ref.loss, rtol=0, atol=0)
        assert steps[mode].grads.keys() == ref.grads.keys()
        for name, g in steps[mode].grads.items():
            torch.testing.assert_close(g, ref.grads[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{mode} {name}: {m}")
        for i, (layer_sums, _) in sums[mode].items():  # statistics recorded once, not again by the recomputation
            for key, value in layer_sums.items():
                torch.testing.assert_close(value, sums["none"][i][0][key], rtol=0, atol=0, msg=lambda m: f"{mode} layer {i} {key}")
        for a, b in zip(step_sums[mode], step_sums["none"]):  # sigmoid_bias's load counts for its bias update
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # full keeps only each block's input and recomputes every forward GEMM in the backward;
    # selective keeps the GEMM outputs and recomputes only the cheap ops.
    assert steps["full"].saved_bytes < ref.saved_bytes / 3
    assert steps["full"].backward.gemms > ref.backward.gemms
    assert steps["selective"].backward.gemms == ref.backward.gemms
    assert steps["selective"].backward.others > ref.backward.others


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_run_to_the_end_records_routing_once(mode: str) -> None:
    """With early stop off, torch's recomputation runs the whole block again, past the statistics
    update; the layer's ``is_recomputing`` guard keeps that second pass from counting (without it
    ``full`` counts every forward twice and ``selective`` fails on an in-place add it never saved).
    With torch's default early stop the recomputation ends at the experts' last saved tensor."""
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(2))
    want = build("topk", "none")
    step(want, tokens)
    model = build("topk", mode)
    with set_checkpoint_early_stop(False):
        step(model, tokens)
    for i, (sums, _) in model.routing_sums().items():
        assert float(sums["forwards"]) == 1.0
        for key, value in sums.items():
            torch.testing.assert_close(value, want.routing_sums()[i][0][key], rtol=0, atol=0, msg=lambda m: f"layer {i} {key}: {m}")


def test_unknown_checkpointing_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="activation checkpointing mode 'some'"):
        build("topk", "some")


@pytest.mark.slow
def test_compiled_blocks_match_eager() -> None:
    """torch.compile (inductor, CPU) of every block: same loss and gradients within float tolerance."""
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(4))
    ref = step(build("topk", "none", num_layers=2), tokens)
    compiled = build("topk", "none", num_layers=2)
    compiled.compile_blocks()
    out = step(compiled, tokens)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert out.grads.keys() == ref.grads.keys()
    for name, g in out.grads.items():
        torch.testing.assert_close(g, ref.grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
