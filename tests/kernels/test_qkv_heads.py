"""The fused q/k-norm + RoPE + head-split op against attention's eager chain, forward and gradients.

Shape legend: B batch, S positions, T = B*S tokens, H query heads, G key/value heads, d head dim,
N = (H + 2G) d. On CPU the Triton kernels run in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from moe.model import Attention, _FusedQKVHeads, apply_rope_reference, rms_norm_reference, rope_tables
from tests.kernel_harness import assert_kernels_run

MODES = ("none", "full", "per_head")
EPS = 1e-5


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "qkv_heads", "_qkv_heads_fwd_kernel", "_qkv_heads_bwd_kernel")


def eager_heads(qkv_BSN, w_q, w_k, cos, sin, H, G, mode):
    """Today's ``Attention`` chain, op by op: split, RMSNorm (``rms_norm_reference``), cat, head view, RoPE."""
    B, S, N = qkv_BSN.shape
    d = N // (H + 2 * G)
    if mode == "full":
        q, k, v = qkv_BSN.split([H * d, G * d, G * d], dim=-1)
        qkv_BSN = torch.cat([rms_norm_reference(q, w_q, EPS), rms_norm_reference(k, w_k, EPS), v], dim=-1)
    q, k, v = qkv_BSN.view(B, S, H + 2 * G, d).transpose(1, 2).split([H, G, G], dim=1)
    if mode == "per_head":
        q, k = rms_norm_reference(q, w_q, EPS), rms_norm_reference(k, w_k, EPS)
    return apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin), v


def make_inputs(gen, device, B, S, H, G, d, mode, dtype):
    """Fresh random qkv (dtype) and fp32 norm weights (as under autocast: fp32 master weights), and the
    cos/sin rows of positions 3.. (as a KV-cached forward slices them)."""
    qkv = (torch.randn(B, S, (H + 2 * G) * d, generator=gen) * 3).to(device, dtype)
    width = {"full": (H * d, G * d), "per_head": (d, d)}.get(mode)
    ws = [None, None] if width is None else [(1 + 0.5 * torch.randn(n, generator=gen)).to(device) for n in width]
    cos, sin = (t[3:].to(device) for t in rope_tables(S + 3, d, 10000.0, torch.device("cpu")))
    return qkv, ws, cos, sin


def leaves(qkv, ws, dtype):
    return qkv.to(dtype).detach().requires_grad_(), [None if w is None else w.detach().clone().requires_grad_() for w in ws]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("H,G,d", [(4, 2, 6), (3, 3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_heads_equal_the_eager_chain_forward_and_grads(kc, gen, mode, H, G, d, dtype):
    """GQA (G < H) with d = 6 (a masked half of 3 in 4 columns) and 3 heads (a masked head row);
    gradients of qkv and both norm weights, for head gradients given in [B, heads, S, d] order
    (strided in the kernel's [B, S, heads, d] view)."""
    B, S = 2, 5
    qkv, ws, cos, sin = make_inputs(gen, kc.DEVICE, B, S, H, G, d, mode, dtype)
    x16, w16 = leaves(qkv, ws, dtype)
    x32, w32 = leaves(qkv, ws, torch.float32)
    got = [t.transpose(1, 2) for t in _FusedQKVHeads.apply(x16, *w16, cos, sin, H, G, mode, EPS)]
    want = eager_heads(x32, *w32, cos, sin, H, G, mode)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: both round the same fp32 value (may differ by one step)
    assert got[0].transpose(1, 2).is_contiguous() and got[1].transpose(1, 2).is_contiguous()  # [B, S, heads, d] memory: flash's layout
    assert got[2]._base is x16  # the values are a view of the projection, never copied
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.to(dtype).float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    dys = [torch.randn(w.shape, generator=gen).to(kc.DEVICE) for w in want]
    inputs16 = [x16] + [w for w in w16 if w is not None]
    inputs32 = [x32] + [w for w in w32 if w is not None]
    got_g = torch.autograd.grad(got, inputs16, [dy.to(dtype) for dy in dys])
    want_g = torch.autograd.grad(want, inputs32, dys)
    for name, g, w in zip(("dqkv", "dw_q", "dw_k"), got_g, want_g):
        assert g.dtype == (dtype if name == "dqkv" else torch.float32)
        if dtype == torch.float32:
            kc.assert_close(g, w, tol=1e-4, what=name)
        else:
            kc.assert_close_scaled(g, w, tol=2e-2, what=name)


@pytest.mark.parametrize("mode", MODES)
def test_reference_backward_equals_autograd_and_its_partials_sum_rows_by_program(kc, gen, mode):
    """The op's pure-torch backward (the CPU fallback) against autograd through the eager chain in
    fp32, and the dw partials grouped as the kernel's programs walk rows (p, p + P, ...)."""
    B, S, H, G, d = 3, 4, 4, 2, 8
    qkv, ws, cos, sin = make_inputs(gen, "cpu", B, S, H, G, d, mode, torch.float32)
    x, w = leaves(qkv, ws, torch.float32)
    want = eager_heads(x, *w, cos, sin, H, G, mode)
    dys = [torch.randn(t.shape, generator=gen) for t in want]
    inputs = [x] + [t for t in w if t is not None]
    want_g = torch.autograd.grad(want, inputs, dys)
    q, k, rstd = reference.qkv_heads(qkv, *ws, cos, sin, H, G, mode, EPS)
    P = 5  # 12 rows: programs 0, 1 walk three rows, 2..4 walk two
    dqkv, dwq, dwk = reference.qkv_heads_bwd(*(dy.transpose(1, 2) for dy in dys), None if mode == "none" else qkv, rstd, *ws, cos, sin, mode, P)
    kc.assert_close(dqkv, want_g[0], tol=1e-5, what="dqkv")
    if mode != "none":
        assert dwq.shape[0] == P and dwk.shape[0] == P
        kc.assert_close(dwq.sum(0), want_g[1], tol=1e-5, what="dw_q")
        kc.assert_close(dwk.sum(0), want_g[2], tol=1e-5, what="dw_k")
        # Partial row 1 is the sum over token rows 1, 6, 11 alone: equal to a backward of those rows only.
        keep = torch.zeros(B * S, 1, 1)
        keep[[1, 6, 11]] = 1
        only = [(dy.transpose(1, 2).reshape(B * S, -1, d) * keep).reshape(dy.transpose(1, 2).shape) for dy in dys]
        _, dwq_only, _ = reference.qkv_heads_bwd(*only, qkv, rstd, *ws, cos, sin, mode, 1)
        kc.assert_close(dwq[1], dwq_only[0], tol=1e-5, what="partial row 1")
    else:
        assert dwq.shape == (P, 0) and dwk.shape == (P, 0)


@pytest.mark.parametrize("mode", MODES)
def test_attention_module_fused_equals_eager(kc, gen, mode, monkeypatch):
    """The whole Attention (projection, heads, SDPA, out projection) with the fused heads against its
    eager chain: output and the gradients of the input and every parameter."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    attn = Attention(32, 4, 2, mode).to(kc.DEVICE)
    if mode != "none":
        for p in (attn.q_norm.weight, attn.k_norm.weight):
            p.data.normal_(1.0, 0.5)
    x = torch.randn(2, 5, 32, generator=gen).to(kc.DEVICE)
    cos, sin = rope_tables(5, 8, 10000.0, kc.DEVICE)
    dy = torch.randn(2, 5, 32, generator=gen).to(kc.DEVICE)
    results = []
    for fused in (False, True):
        if fused:  # the fused path wherever this test runs (CPU: the interpreted kernel)
            monkeypatch.setattr(attn, "_eager_heads", attn._fused_heads)
        xi = x.clone().requires_grad_()
        y, _ = attn(xi, cos, sin)
        params = list(attn.parameters())
        results.append((y, torch.autograd.grad(y, [xi] + params, dy)))
    (y0, g0), (y1, g1) = results
    kc.assert_close(y1, y0, tol=1e-5, what="y")
    names = ["dx"] + [n for n, _ in attn.named_parameters()]
    assert len(names) == (5 if mode != "none" else 3)
    for name, a, b in zip(names, g1, g0):
        kc.assert_close(a, b, tol=1e-4, what=name)


def test_kv_cached_decoding_on_the_fused_path_equals_the_uncached_forward(kc, gen, monkeypatch):
    """A prefill of 3 positions then two single-token steps through one cache, with the fused heads
    (RoPE at the cached offsets 3 and 4, through the sliced cos/sin rows), against one uncached forward."""
    from moe.model import LayerKVCache

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    attn = Attention(32, 4, 2, "per_head").to(kc.DEVICE).eval()
    attn.q_norm.weight.data.normal_(1.0, 0.5)
    monkeypatch.setattr(attn, "_eager_heads", attn._fused_heads)  # the fused path wherever this test runs
    x = torch.randn(2, 5, 32, generator=gen).to(kc.DEVICE)
    cos, sin = rope_tables(5, 8, 10000.0, kc.DEVICE)
    cache = LayerKVCache()
    with torch.no_grad():
        full, _ = attn(x, cos, sin)
        steps = [attn(x[:, a:b], cos[a:b], sin[a:b], cache=cache)[0] for a, b in ((0, 3), (3, 4), (4, 5))]
    assert cache.length == 5
    kc.assert_close(torch.cat(steps, dim=1), full, tol=1e-5, what="cached")


@pytest.mark.parametrize("mode", MODES)
def test_attention_on_meta_launches_one_op_each_way_with_hand_counted_bytes(mode):
    """On ``meta`` (the step budget's GPU) the heads cost one fused op forward and one backward, plus
    a sum of each weight's partials: no cat, no clone, no casts. Bytes counted from the shapes."""
    from tools.bench.meta_cuda import on_card
    from tools.bench.op_counter import OpCounter

    B, S, D, H = 2, 8, 64, 4  # G = H: no GQA head repeat on the SDPA side
    d, T, N = D // H, B * S, 3 * D
    attn = Attention(D, H, None, mode).to(device="meta", dtype=torch.bfloat16)
    cos, sin = (t.to("meta") for t in rope_tables(S, d, 10000.0, torch.device("cpu")))
    x = torch.empty(B, S, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with on_card("h200", (9, 0)), OpCounter() as counter:
        y, _ = attn(x, cos, sin)
        y.backward(torch.empty_like(y))
    ops_ = counter.budget.ops
    assert [r.kind for r in ops_].count("gemm") == 6 and [r.kind for r in ops_].count("sdpa") == 2
    glue = [(r.name, r.bytes) for r in ops_ if r.kind == "glue"]
    wq = {"none": 0, "full": D, "per_head": d}[mode]  # norm weight width (bf16 here)
    nr = {"none": 0, "full": 2, "per_head": 2 * H}[mode]  # fp32 1/rms per token
    tables = 2 * S * (d // 2) * 4  # cos and sin, fp32
    fwd = T * N * 2 + 2 * wq * 2 + tables + 2 * T * D * 2 + T * nr * 4  # qkv, weights, tables -> q, k, rstd (v: a view of qkv)
    P = T  # fewer token rows than ops.QKV_DW_PROGRAMS: one program per row
    qkv_read = T * N * 2 if mode != "none" else 0  # only the norms' backward reads the saved projection
    bwd = 3 * T * D * 2 + qkv_read + T * nr * 4 + 2 * wq * 2 + tables + T * N * 2 + 2 * P * wq * 4  # dq, dk, dv, qkv, rstd, w, tables -> dqkv, partials
    want = [("moeforge.qkv_heads.default", fwd), ("moeforge.qkv_heads_bwd.default", bwd)]
    if mode != "none":
        want += [("aten.sum.dim_IntList", P * wq * 4 + wq * 2)] * 2  # partials [P, width] fp32 -> dw (bf16 weight)
    assert glue == want


def test_cpu_keeps_its_eager_chain(gen, monkeypatch):
    """On the CPU (the default run, bit-identical to before) Attention never calls the fused op."""
    calls = []
    monkeypatch.setattr(ops, "qkv_heads", lambda *a: calls.append(a))
    attn = Attention(32, 4, 2, "full")
    cos, sin = rope_tables(5, 8, 10000.0, torch.device("cpu"))
    attn(torch.randn(2, 5, 32, generator=gen), cos, sin)
    assert not calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("mode,H,G,d", [("full", 16, 16, 128), ("none", 12, 12, 64), ("per_head", 16, 4, 128)])
def test_gpu_real_shape_bf16_against_the_fp32_chain(kc, gen, mode, H, G, d):
    """olmoe's (16 heads of 128, full), moe_125m's (12 of 64, none) and a GQA per-head shape at 4,096 tokens."""
    B, S = 2, 2048
    qkv, ws, cos, sin = make_inputs(gen, "cuda", B, S, H, G, d, mode, torch.bfloat16)
    x16, w16 = leaves(qkv, ws, torch.bfloat16)
    x32, w32 = leaves(qkv, ws, torch.float32)
    got = [t.transpose(1, 2) for t in _FusedQKVHeads.apply(x16, *w16, cos, sin, H, G, mode, EPS)]
    want = eager_heads(x32, *w32, cos, sin, H, G, mode)
    for name, g, w in zip("qkv", got, want):
        kc.assert_close_scaled(g, w, tol=1e-2, what=name)
    dys = [torch.randn(w.shape, generator=gen).cuda() for w in want]
    inputs16 = [x16] + [w for w in w16 if w is not None]
    inputs32 = [x32] + [w for w in w32 if w is not None]
    for name, g, w in zip(("dqkv", "dw_q", "dw_k"), torch.autograd.grad(got, inputs16, [dy.bfloat16() for dy in dys]),
                          torch.autograd.grad(want, inputs32, dys)):
        kc.assert_close_scaled(g, w, tol=2e-2, what=name)
