"""The chunked head + cross-entropy equals the plain full-logits loss; fused norm and RoPE equal their eager references."""

from __future__ import annotations

import pytest
import torch

from launch.optim import fused_for
from moe.experts import ExpertsConfig
from moe.head_loss import chunk_tokens, head_cross_entropy, head_cross_entropy_reference
from moe.model import ModelConfig, MoETransformer, RMSNorm, apply_rope, apply_rope_reference, rms_norm_reference, rope_tables
from moe.routers.topk import TopKConfig


def _grads(fn, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_grads_equal_the_full_logits_loss_fp32(reduction: str, chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    T, D, V = 61, 24, 37  # 61 tokens: no chunk size below divides it
    x = torch.randn(T, D, generator=g, requires_grad=True)
    w = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    got = _grads(lambda a, b: head_cross_entropy(a, b, y, reduction, chunk=chunk), x, w)
    want = _grads(lambda a, b: head_cross_entropy_reference(a, b, y, reduction), x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert got[0].dtype == torch.float32


def test_chunked_loss_scales_with_the_incoming_gradient_and_adds_to_other_terms() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (20,), generator=g)
    extra = lambda a: (a**2).sum() * 0.01  # noqa: E731 - another loss term on the same input
    got = _grads(lambda a, b: 0.25 * head_cross_entropy(a, b, y, chunk=6) + extra(a), x, w)
    want = _grads(lambda a, b: 0.25 * head_cross_entropy_reference(a, b, y) + extra(a), x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bf16_autocast_loss_and_grads_match_the_plain_path() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 32, generator=g, requires_grad=True)
    w = (torch.randn(67, 32, generator=g) * 0.2).requires_grad_()
    y = torch.randint(0, 67, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda a, b: head_cross_entropy(a, b, y, chunk=16), x, w)
        want = _grads(lambda a, b: head_cross_entropy_reference(a, b, y), x, w)
    assert got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 log-softmax
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)  # dW summed over chunks in fp32, not one bf16 GEMM


def test_no_grad_loss_keeps_nothing_and_rejects_a_bad_reduction() -> None:
    x, w, y = torch.randn(9, 4), torch.randn(5, 4), torch.randint(0, 5, (9,))
    with torch.no_grad():
        got = head_cross_entropy(x, w, y, "sum", chunk=4)
    assert not got.requires_grad
    torch.testing.assert_close(got, head_cross_entropy_reference(x, w, y, "sum"), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reduction 'none'"):
        head_cross_entropy(x, w, y, "none")


def test_chunk_holds_about_256_mib_of_fp32_logits() -> None:
    assert chunk_tokens(50304) == 1334  # 256 MiB / (4 B x 50,304)
    assert chunk_tokens(2**40) == 1


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_with_targets_equals_loss_of_its_logits(tied: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_experts=4, d_ff=32, dense_d_ff=64, tie_embeddings=tied)
    model = MoETransformer(cfg, TopKConfig(k=2), ExpertsConfig())
    x, y = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 9))
    loss, _ = model(x, targets_BS=y)
    got = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    logits, _ = model(x)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    want = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_eager_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(24, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g) + 0.5)
    x = torch.randn(3, 5, 24, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(3, 5, 24, generator=g)
    out = norm(x)
    got = (out, *torch.autograd.grad(out, (x, norm.weight), gy))
    ref = rms_norm_reference(x, norm.weight, 1e-5)
    want = (ref, *torch.autograd.grad(ref, (x, norm.weight), gy))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_without_cat_equals_the_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    cos, sin = rope_tables(11, 16, 10000.0, torch.device("cpu"))
    x = torch.randn(2, 3, 11, 16, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(2, 3, 11, 16, generator=g).to(dtype)
    out = apply_rope(x, cos, sin)
    ref = apply_rope_reference(x, cos, sin)
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(torch.autograd.grad(out, x, gy)[0], torch.autograd.grad(ref, x, gy)[0], rtol=tol, atol=tol)


def test_fused_adamw_only_when_every_parameter_is_on_cuda() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert fused_for({cuda})
    assert not fused_for({cpu})
    assert not fused_for({cuda, cpu})
    assert not fused_for(set())


def test_cpu_model_keeps_the_default_adamw() -> None:
    from launch.config import JobConfig, OptimConfig, TrainConfig
    from launch.optim import build_optimizer

    job = JobConfig(model=None, router=None, experts=None, data=None, optim=OptimConfig(), train=TrainConfig(steps=2),  # type: ignore[arg-type]
                    logging=None, checkpoint=None, parallel=None, engine=None)  # type: ignore[arg-type]
    opt, _ = build_optimizer(torch.nn.Linear(3, 3), job)
    assert all(not g["fused"] for g in opt.param_groups)
    assert all(s["step"].device.type == "cpu" for s in opt.state.values())


def _peak_bytes(fn) -> int:
    """Peak bytes alive during ``fn``'s forward and backward, on fake tensors (nothing allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        T, D, V = 8192, 64, 8192
        x, w = torch.randn(T, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
        y = torch.randint(0, V, (T,))
        tracker = MemTracker()
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            fn(x, w, y).backward()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_chunked_loss_peak_is_under_a_quarter_of_the_full_logits_peak() -> None:
    full = _peak_bytes(head_cross_entropy_reference)
    chunked = _peak_bytes(lambda x, w, y: head_cross_entropy(x, w, y, chunk=512))
    # The full path holds bf16 logits, their fp32 copy, the log-softmax and the logit gradient: >= 4 x T x V x 2.5 B.
    assert full >= 8192 * 8192 * 10
    assert chunked * 4 <= full, (chunked, full)


class _UpcastLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shapes of every conversion to fp32 (``_to_copy``) that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._to_copy.default and kwargs and kwargs.get("dtype") == torch.float32:
            self.copies.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_on_the_gpu_path_no_logits_or_weight_gradient_is_upcast_after_its_gemm() -> None:
    """bf16 operands on ``meta`` (the GPU path, as the step budget runs it): the logits and each chunk's
    dW come out of the GEMM in fp32, so no [C, V] or [V, D] tensor is upcast; on the CPU they are."""
    T, D, V, C = 40, 16, 96, 16

    def upcasts(device: str) -> set[tuple[int, ...]]:
        x = torch.randn(T, D, dtype=torch.bfloat16, device=device, requires_grad=True)
        w = torch.randn(V, D, dtype=torch.bfloat16, device=device, requires_grad=True)
        y = torch.zeros(T, dtype=torch.int64, device=device)
        with _UpcastLog() as log:
            loss = head_cross_entropy(x, w, y, chunk=C)
        assert loss.dtype == torch.float32
        return set(log.copies)

    gemm_outputs = {(C, V), (T - 2 * C, V), (V, D)}  # a chunk's logits (the last one is short), a chunk's dW
    assert upcasts("cpu") >= gemm_outputs
    assert not upcasts("meta") & gemm_outputs


@pytest.mark.gpu
def test_gpu_bf16_loss_and_grads_match_an_fp64_reference_of_the_same_operands() -> None:
    g = torch.Generator().manual_seed(9)
    T, D, V = 300, 64, 1000
    x = torch.randn(T, D, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.1).to("cuda", torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g).cuda()
    got = _grads(lambda a, b: head_cross_entropy(a, b, y, chunk=128), x, w)
    want = _grads(lambda a, b: head_cross_entropy_reference(a.double(), b.double(), y), x, w)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)  # fp32-accumulated logits
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=2e-3)  # logit gradient rounded to bf16
