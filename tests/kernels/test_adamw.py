"""The AdamW kernel against its pure-torch reference on fresh random tensors, bf16 and fp32 moments.

Shape legend: N elements of one parameter tensor. On CPU the Triton kernel runs in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from kernels.adamw import BLOCK
from tests.kernel_harness import assert_kernels_run


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "adamw", "_adamw_kernel")


def _state(gen: torch.Generator, shape: tuple[int, ...], moments: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """p, g, m, v with moments as after a few steps (v >= 0)."""
    p, g, m = (torch.randn(shape, generator=gen) for _ in range(3))
    v = torch.rand(shape, generator=gen) * 0.1
    return [p.to(device), (3 * g).to(device), (0.1 * m).to(moments).to(device), v.to(moments).to(device)]


SHAPES = [(1,), (BLOCK + 3,), (37, 61), (3, BLOCK)]
"""One element, one block and a masked tail, 2,257 (not a multiple of the block), exactly three blocks."""



HYPER = (3e-3, 0.9, 0.95, 1e-8, 0.1)
"""lr, beta1, beta2, eps, weight decay of the kernel-vs-reference tests."""


def _launch_inputs(gen, make, moments, scaled, device):
    """One launch's tensors (``make`` per shape of ``SHAPES``), random step counts, the optional clip divisor,
    a copy for the reference and each tensor's first state before the step."""
    tensors = [make(gen, shape, moments, device) for shape in SHAPES]
    steps = [torch.tensor(float(torch.randint(1, 50, (1,), generator=gen)), device=device) for _ in SHAPES]
    scale = torch.tensor(2.5, device=device) if scaled else None
    return tensors, steps, scale, [[t.clone() for t in ts] for ts in tensors], [ts[0].clone() for ts in tensors]

@pytest.mark.parametrize("moments", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scaled", [False, True])
def test_adamw_kernel_equals_the_reference(kc, gen, moments, scaled, monkeypatch):
    """Four tensors of different sizes and step counts in one launch; with 2 programs per tensor the large ones
    loop over their blocks."""
    from kernels import adamw

    monkeypatch.setattr(adamw, "MAX_PROGRAMS_PER_TENSOR", 2)
    tensors, steps, scale, want, before = _launch_inputs(gen, _state, moments, scaled, kc.DEVICE)
    hyper = HYPER
    ops.adamw_(*([ts[i] for ts in tensors] for i in range(4)), steps, *hyper, scale, torch.tensor(0.0, device=kc.DEVICE))
    for (p, g, m, v), (wp, wg, wm, wv), t, p0 in zip(tensors, want, steps, before):
        reference.adamw_(wp, wg, wm, wv, t, *hyper, scale, None)
        assert m.dtype == v.dtype == moments
        torch.testing.assert_close(p, wp, rtol=1e-6, atol=1e-6)
        assert torch.equal(g, wg)  # the gradient is only read
        # Moments: the same fp32 value up to the last bits of the lerp's cancellation (values ~0.3), then
        # rounded to nearest even (bf16: such a last-bit difference may flip one rounding, one bf16 step).
        rtol, atol = (2.0**-7, 1e-7) if moments == torch.bfloat16 else (1e-6, 1e-7)
        torch.testing.assert_close(m.float(), wm.float(), rtol=rtol, atol=atol)
        torch.testing.assert_close(v.float(), wv.float(), rtol=rtol, atol=atol)
        # The update is ~1e-3 per element (1e-6 checked above), so an element the kernel skipped (a masked tail, a
        # looped block) would fail the comparison; an element's update may cancel its decay, so no "every p moved".
        assert (wp - p0).abs().max() > 1e-4 or p.numel() == 1


def _one(kc, p, g, m, v, step, *hyper):
    """``ops.adamw_`` on one tensor."""
    ops.adamw_([p], [g], [m], [v], [torch.tensor(step, device=kc.DEVICE)], *hyper)


def test_adamw_kernel_rounds_moments_to_nearest_even(kc):
    """m = (1 - beta1) g from zero: bf16 stores exactly fp32's value rounded to nearest even, ties to even."""
    g = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-9, -(1.0 + 2.0**-7 + 2.0**-9)], device=kc.DEVICE)
    p, m, v = torch.zeros_like(g), torch.zeros_like(g, dtype=torch.bfloat16), torch.zeros_like(g, dtype=torch.bfloat16)
    _one(kc, p, g, m, v, 1.0, 1e-3, 0.0, 0.0, 1e-8, 0.0, None, None)  # beta1 = 0: m = g, v = g^2
    assert m.float().tolist() == [1.0, 1.0 + 2.0**-6, 1.0, -(1.0 + 2.0**-7)]  # ties go to the even mantissa; below half rounds down


def test_adamw_kernel_skips_everything_when_found_inf(kc, gen):
    p, g, m, v = _state(gen, (BLOCK + 5,), torch.bfloat16, kc.DEVICE)
    g[3] = float("nan")
    before = [t.clone() for t in (p, m, v)]
    _one(kc, p, g, m, v, 4.0, 1e-2, 0.9, 0.95, 1e-8, 0.1, None, torch.tensor(1.0, device=kc.DEVICE))
    for a, b in zip((p, m, v), before):
        assert torch.equal(a, b)


def test_tensors_the_kernel_cannot_take_go_through_the_reference(kc, gen):
    """Non-contiguous and not 16-byte-aligned parameters in the list are updated by the reference, the rest by the
    kernel; all equal the reference."""
    p, g, m, v = _state(gen, (8, 6), torch.bfloat16, kc.DEVICE)
    q, h, n, w = (t.t() for t in _state(gen, (6, 8), torch.bfloat16, kc.DEVICE))  # transposed views
    a, b, c, d = (t[1:] for t in _state(gen, (41,), torch.bfloat16, kc.DEVICE))  # 4 or 2 bytes past an allocation
    assert a.data_ptr() % 16 and c.data_ptr() % 16
    want = [t.clone() for t in (p, g, m, v, q, h, n, w, a, b, c, d)]
    step = torch.tensor(2.0, device=kc.DEVICE)
    ops.adamw_([p, q, a], [g, h, b], [m, n, c], [v, w, d], [step] * 3, 1e-2, 0.9, 0.95, 1e-8, 0.1, None, None)
    for i in (0, 4, 8):
        reference.adamw_(*want[i : i + 4], step, 1e-2, 0.9, 0.95, 1e-8, 0.1, None, None)
    torch.testing.assert_close(p, want[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(q, want[4]) and torch.equal(a, want[8])  # the same function ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_adamw_kernel_at_olmoe_expert_size_equals_the_reference(gen):
    """One launch over an OLMoE expert weight (64 x 2048 x 1024, 134M elements: 65,536 blocks, 64 per program),
    a 2048-wide norm and a bias-sized tensor, bf16 moments, clipping and a finite verdict as the trainer passes them."""
    cuda = torch.device("cuda")
    tensors = [_state(gen, shape, torch.bfloat16, cuda) for shape in [(64, 2048, 1024), (2048,), (7,)]]
    want = [[t.clone() for t in ts] for ts in tensors]
    step, scale = torch.tensor(3.0, device=cuda), torch.tensor(1.7, device=cuda)
    ops.adamw_(*([ts[i] for ts in tensors] for i in range(4)), [step] * 3, 1e-3, 0.9, 0.95, 1e-8, 0.1, scale, torch.tensor(0.0, device=cuda))
    for (p, _, m, v), (wp, wg, wm, wv) in zip(tensors, want):
        reference.adamw_(wp, wg, wm, wv, step, 1e-3, 0.9, 0.95, 1e-8, 0.1, scale, None)
        torch.testing.assert_close(p, wp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.float(), wm.float(), rtol=2.0**-7, atol=1e-7)
        torch.testing.assert_close(v.float(), wv.float(), rtol=2.0**-7, atol=1e-7)


def _master_state(gen: torch.Generator, shape: tuple[int, ...], moments: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """master, bf16 parameter (the master rounded), bf16 gradient, m, v."""
    p, g, m, v = _state(gen, shape, moments, device)
    return [p, p.to(torch.bfloat16), g.to(torch.bfloat16), m, v]


@pytest.mark.parametrize("moments", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scaled", [False, True])
def test_adamw_master_kernel_equals_the_reference(kc, gen, moments, scaled, monkeypatch):
    """The master variant (fp32 master, bf16 gradient, bf16 parameter written) over four tensors in one launch, against
    ``reference.adamw_master_``: the masters as the fp32 update, the bf16 parameters their nearest-even rounding."""
    from kernels import adamw

    monkeypatch.setattr(adamw, "MAX_PROGRAMS_PER_TENSOR", 2)
    tensors, steps, scale, want, before = _launch_inputs(gen, _master_state, moments, scaled, kc.DEVICE)
    hyper = HYPER
    ops.adamw_master_(*([ts[i] for ts in tensors] for i in range(5)), steps, *hyper, scale, torch.tensor(0.0, device=kc.DEVICE))
    for (p, q, g, m, v), (wp, wq, wg, wm, wv), t, p0 in zip(tensors, want, steps, before):
        reference.adamw_master_(wp, wq, wg, wm, wv, t, *hyper, scale, None)
        assert q.dtype == g.dtype == torch.bfloat16 and p.dtype == torch.float32
        torch.testing.assert_close(p, wp, rtol=1e-6, atol=1e-6)
        assert torch.equal(q, p.to(torch.bfloat16))  # the kernel's own master, rounded to nearest even
        assert torch.equal(g, wg)
        rtol, atol = (2.0**-7, 1e-7) if moments == torch.bfloat16 else (1e-6, 1e-7)
        torch.testing.assert_close(m.float(), wm.float(), rtol=rtol, atol=atol)
        torch.testing.assert_close(v.float(), wv.float(), rtol=rtol, atol=atol)
        assert (q.float() - wq.float()).abs().max() <= 2.0**-7 * wq.float().abs().max()  # at most one bf16 step apart
        assert (wp - p0).abs().max() > 1e-4 or p.numel() == 1  # every element was updated (see the test above)


def test_adamw_master_kernel_rounds_the_parameter_to_nearest_even(kc):
    """lr 1, beta1 = beta2 = 0, no decay, step 1: p' = p - g / (|g| + eps) = p - sign(g), so masters chosen a tie, just
    below and just above half a bf16 step from a bf16 value after the update show the rounding of the bf16 store
    (eps 1e-30 vanishes beside |g| = 1 in fp32)."""
    base = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-9, 2.0 + 2.0**-7 + 2.0**-9], device=kc.DEVICE)
    p = base + 1.0  # minus sign(g) = 1 gives back ``base`` exactly
    g = torch.ones_like(p, dtype=torch.bfloat16)
    q, m, v = torch.zeros_like(g), torch.zeros_like(p), torch.zeros_like(p)
    ops.adamw_master_([p], [q], [g], [m], [v], [torch.tensor(1.0, device=kc.DEVICE)], 1.0, 0.0, 0.0, 1e-30, 0.0, None, None)
    assert p.tolist() == base.tolist()
    assert q.float().tolist() == [1.0, 1.0 + 2.0**-6, 1.0, 2.0 + 2.0**-6]  # ties to even, below half down, above half up


def test_adamw_master_kernel_writes_nothing_when_found_inf(kc, gen):
    p, q, g, m, v = _master_state(gen, (BLOCK + 5,), torch.bfloat16, kc.DEVICE)
    g[3] = float("nan")
    q.zero_()  # not the master's rounding: a write would show
    before = [t.clone() for t in (p, q, m, v)]
    ops.adamw_master_([p], [q], [g], [m], [v], [torch.tensor(4.0, device=kc.DEVICE)], 1e-2, 0.9, 0.95, 1e-8, 0.1, None,
                      torch.tensor(1.0, device=kc.DEVICE))
    for a, b in zip((p, q, m, v), before):
        assert torch.equal(a, b)


def test_adamw_master_tensors_the_kernel_cannot_take_go_through_the_reference(kc, gen):
    p, q, g, m, v = _master_state(gen, (8, 6), torch.bfloat16, kc.DEVICE)
    a, b, c, d, e = (t.t() for t in _master_state(gen, (6, 8), torch.bfloat16, kc.DEVICE))  # transposed views
    want = [t.clone() for t in (p, q, g, m, v, a, b, c, d, e)]
    step = torch.tensor(2.0, device=kc.DEVICE)
    ops.adamw_master_([p, a], [q, b], [g, c], [m, d], [v, e], [step] * 2, 1e-2, 0.9, 0.95, 1e-8, 0.1, None, None)
    for i in (0, 5):
        reference.adamw_master_(*want[i : i + 5], step, 1e-2, 0.9, 0.95, 1e-8, 0.1, None, None)
    torch.testing.assert_close(p, want[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(q, p.to(torch.bfloat16))
    assert torch.equal(a, want[5]) and torch.equal(b, want[6])  # the same function ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_adamw_master_kernel_at_olmoe_expert_size_equals_the_reference(gen):
    """The master variant over an OLMoE expert weight (64 x 2048 x 1024) and a small tensor in one launch, bf16
    moments, clipping and a finite verdict as the trainer passes them: masters as the reference's, bf16 weights their
    rounding, bit for bit."""
    cuda = torch.device("cuda")
    tensors = [_master_state(gen, shape, torch.bfloat16, cuda) for shape in [(64, 2048, 1024), (7,)]]
    want = [[t.clone() for t in ts] for ts in tensors]
    step, scale = torch.tensor(3.0, device=cuda), torch.tensor(1.7, device=cuda)
    ops.adamw_master_(*([ts[i] for ts in tensors] for i in range(5)), [step] * 2, 1e-3, 0.9, 0.95, 1e-8, 0.1, scale, torch.tensor(0.0, device=cuda))
    for (p, q, _, m, v), (wp, wq, wg, wm, wv) in zip(tensors, want):
        reference.adamw_master_(wp, wq, wg, wm, wv, step, 1e-3, 0.9, 0.95, 1e-8, 0.1, scale, None)
        torch.testing.assert_close(p, wp, rtol=1e-5, atol=1e-6)
        assert torch.equal(q, p.to(torch.bfloat16))
        torch.testing.assert_close(m.float(), wm.float(), rtol=2.0**-7, atol=1e-7)
        torch.testing.assert_close(v.float(), wv.float(), rtol=2.0**-7, atol=1e-7)
