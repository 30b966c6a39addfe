"""tools.bench.step_budget / tools.bench.op_counter / tools.bench.meta_cuda: a whole step counted on meta tensors.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, H heads, G kv heads, d head dim,
E experts, F expert width, K top-k, V vocabulary, L layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from launch.profiling import CLASSES
from tools.bench.card_rates import CARDS
from tools.bench.op_counter import MemoryTracker, OpCounter, multi_tensor_launches
from tools.bench.step_budget import COMPONENTS, STEADY_STEPS, count_step, issue_queue, main, op_ms, predict

PRESETS = ("tiny", "moe_125m", "olmoe_1b_7b", "mixtral_8x7b")


@pytest.mark.parametrize("preset", PRESETS)
def test_counted_flops_equal_the_mfu_formula(preset: str) -> None:
    """Without recomputation the GEMMs and attention the step runs are the formula's
    6 N_active + 12 L H Q S per token (attention over the full square), within 1%."""
    count = count_step([f"model={preset}", "train.batch_size=1", "train.seq_len=256"])
    assert count.budget.model_flops == pytest.approx(count.formula_flops, rel=0.01)
    assert count.settings["activation_checkpointing"] == "none"


def test_components_hold_their_hand_counted_gemms() -> None:
    """OLMoE shape cut to 2 layers, T = 2 x 256: each component's FLOPs counted by hand."""
    L, D, H, d, E, F, K, V, T, S = 2, 2048, 16, 128, 64, 1024, 8, 50304, 512, 256
    count = count_step(["model=olmoe_1b_7b", f"model.num_layers={L}", "train.batch_size=2", f"train.seq_len={S}"])
    flops = {c: 0 for c in COMPONENTS}
    for r, c in zip(count.budget.ops, count.components):
        flops[c] += r.model_flops
    assert flops["attention projections"] == L * 6 * T * D * (3 * H * d + D)  # qkv (H + 2G heads, G = H) and out
    assert flops["attention (SDPA)"] == L * 12 * 2 * H * S * S * d  # 12 B H S^2 d per layer
    assert flops["MoE layers"] == L * (18 * T * K * D * F + 6 * T * D * E)  # 9 expert GEMMs + 3 router GEMMs
    assert flops["head and loss"] == 6 * T * D * V
    assert flops["embedding"] == flops["optimizer"] == flops["grad clip"] == flops["other"] == 0
    assert count.budget.atomics == ["aten.embedding_dense_backward.default"]  # the one scatter-accumulate: dL/d(embedding)


def test_loss_memory_of_a_plain_cross_entropy_is_counted_by_hand() -> None:
    """The memory machinery on today's loss (bf16 logits upcast, fp32 cross-entropy): at its peak,
    besides the bf16 logits themselves, the fp32 log-probs, their gradient and the logits' fp32
    gradient are live: (4 + 4 + 4) bytes x T x V."""
    T, V = 16384, 50304
    with torch.device("meta"):
        logits = torch.empty(T, V, dtype=torch.bfloat16, requires_grad=True)
        y = torch.empty(T, dtype=torch.long)
    memory = MemoryTracker()
    memory.track(logits, "input")
    memory.peak = 0
    with OpCounter(memory=memory):
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
    assert memory.peak - T * V * 2 == pytest.approx(12 * T * V, rel=0.01)


def test_loss_peak_is_a_quarter_of_the_full_logits_loss() -> None:
    """At V = 50,304 and T = 16,384 the head and loss may hold at most 1/4 of what the full-logits
    loss held: (2 + 12) x T x V bytes (the bf16 logits the head makes, plus the 12 x T x V of the
    test above) = 11.5 GB; the tool counted 11.68 GB for it at main 0630dc1."""
    T, V = 16384, 50304
    count = count_step(["model.vocab_size=50304", "model.num_layers=1", "model.d_model=256", "model.max_seq_len=2048",
                        "train.batch_size=8", "train.seq_len=2048"])
    assert count.tokens == T
    assert count.component_peak["head and loss"] <= 14 * T * V / 4


def test_json_report_has_the_keys_gpu_session_reads(capsys: pytest.CaptureFixture[str]) -> None:
    main(["model=tiny", "train.batch_size=2", "train.seq_len=64", "--card", "h100", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["card"] == "h100" and rep["experts_backend"] == "grouped_mm"
    assert rep["tokens_per_s"] > 0 and 0 < rep["mfu"] < 1 and rep["step_ms"] > 0 and rep["memory_gb"]["peak"] > 0
    assert set(rep["components"]) == set(COMPONENTS)
    assert set(rep["classes_gpu_ms"]) == set(CLASSES) and sum(rep["classes_gpu_ms"].values()) == pytest.approx(rep["gpu_ms"])


def test_prediction_queues_the_op_times_at_the_card_rates() -> None:
    """The GPU part is each op at its card rate (GEMM FLOPs / rate, glue bytes / bandwidth); the
    step lies between the larger of the GPU's and the host's time and their sum; the idle time
    put on the components adds up to the step beyond the GPU's time."""
    count = count_step(["model=tiny", "train.batch_size=2", "train.seq_len=64"])
    card = CARDS["h200"]
    pred = predict(count, card)
    gemm_ms = sum(r.flops / (card.grouped_gemm_tflops if r.name == "_grouped_mm" else card.dense_gemm_tflops) / 1e9
                  for r in count.budget.ops if r.kind == "gemm")
    glue_ms = count.budget.glue_bytes / card.glue_tbps / 1e9
    sdpa_ms = sum(r.flops for r in count.budget.ops if r.kind == "sdpa") / card.attention_tflops / 1e9
    host_ms = count.budget.launches * card.launch_us / 1e3
    assert pred.gpu_ms == pytest.approx(gemm_ms + glue_ms + sdpa_ms)
    assert pred.host_issue_ms == pytest.approx(host_ms)
    assert max(pred.gpu_ms, host_ms) * (1 - 1e-9) <= pred.step_ms <= (pred.gpu_ms + host_ms) * (1 + 1e-9)
    assert sum(row["host_ms"] for row in pred.per_component.values()) == pytest.approx(pred.step_ms - pred.gpu_ms)
    assert pred.mfu == pytest.approx(count.formula_flops / (pred.step_ms / 1e3) / 989.4e12)
    count.settings["cuda_graphs"] = True  # a replayed graph: no host time per launch
    assert predict(count, card).step_ms == pytest.approx(gemm_ms + glue_ms + sdpa_ms)
    # the classes a profiled run (train.profile_steps) reports: GEMMs, attention, clip and optimizer, the rest
    optimizer_ms = sum(r.bytes for r, c in zip(count.budget.ops, count.components) if c == "optimizer") / card.glue_tbps / 1e9
    clip_ms = sum(r.bytes for r, c in zip(count.budget.ops, count.components) if c == "grad clip") / card.glue_tbps / 1e9
    assert optimizer_ms > 0 and clip_ms > 0
    assert pred.per_class == pytest.approx({"gemm": gemm_ms, "attention": sdpa_ms, "grad clip": clip_ms, "optimizer": optimizer_ms,
                                            "communication": 0.0, "other": glue_ms - optimizer_ms - clip_ms})


def test_issue_queue_by_hand() -> None:
    """launch 0.1 ms. One step from idle: A (1 ms GPU) waits 0.1 for its launch; B and C (0.05 each)
    queue behind it; D syncs: the host waits until 1.2; E's two launches then start at 1.3 (0.1
    idle) and 1.4. The next step's A is issued at 1.5 as E ends, so back to back a step takes 1.4.
    Without D's sync the host stays ahead: 1.4 from idle (A's wait), 1.3 (the GPU's time) back to
    back. Five tiny ops: the GPU follows the host (0.51 from idle, 0.5 back to back)."""
    def queue(ops: list[tuple[float, int, bool]], steps: int = 1) -> list[float]:
        end, idle = issue_queue(ops, 0.1, steps)
        return [end, *idle]

    ops = [(1.0, 1, False), (0.05, 1, False), (0.05, 1, False), (0.0, 1, True), (0.2, 2, False)]
    assert queue(ops) == pytest.approx([1.5, 0.1, 0, 0, 0, 0.1])
    assert queue(ops, steps=3) == pytest.approx([1.4, 0, 0, 0, 0, 0.1])
    ops[3] = (0.0, 1, False)
    assert queue(ops) == pytest.approx([1.4, 0.1, 0, 0, 0, 0])
    assert queue(ops, steps=3) == pytest.approx([1.3, 0, 0, 0, 0, 0])
    assert queue([(0.01, 1, False)] * 5) == pytest.approx([0.51, 0.1, 0.09, 0.09, 0.09, 0.09])
    assert queue([(0.01, 1, False)] * 5, steps=3) == pytest.approx([0.5, 0.09, 0.09, 0.09, 0.09, 0.09])


def test_queue_model_reproduces_the_measured_host_bound_layer() -> None:
    """docs/bench_layer/2026-11-27-h200: the (1024, 2816, 16, 2, 16384) layer step took 4.360 ms
    (results.md, layer:grouped_mm), back to back, no host sync. The count of today's layer, its
    ops at the H200's rates, queued at launch_us for a few steps back to back: within 5% of the
    measurement; adding every
    launch's host time to the GPU's instead (the model before) overshoots by more than 30%.

    The measured code launched 86 kernels per layer step (main 0630dc1); today's layer launches
    fewer (router and dispatch bookkeeping merged, each removed op a T*K-sized one, well under a
    microsecond of GPU time at this shape), so the count is topped up to the measured 86 with
    empty ops, each a launch and no bytes."""
    from tools.bench.layer_budget import OpRecord, count_layer_step

    card = CARDS["h200"]
    budget = count_layer_step((1024, 2816, 16, 2, 16384))
    measured_launches = 86
    assert budget.launches <= measured_launches
    budget.ops += [OpRecord("removed since the measurement", "glue") for _ in range(measured_launches - budget.launches)]
    times = [op_ms(r, card) for r in budget.ops]
    end, _ = issue_queue([(ms, r.launches, r.host_sync) for ms, r in zip(times, budget.ops)], card.launch_us / 1e3, STEADY_STEPS)
    assert end == pytest.approx(4.360, rel=0.05)
    assert sum(times) + budget.launches * card.launch_us / 1e3 > 1.3 * 4.360


def test_counter_sees_each_kind_of_host_sync_on_meta() -> None:
    """``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()`` and ``nonzero`` on a device tensor
    are host syncs; on meta they answer zeros, and host-side (CPU) scalars are not syncs."""
    t = torch.empty(4, device="meta")
    with OpCounter() as counter:
        assert t.sum().item() == 0.0
        assert not bool(t[0])
        assert t.tolist() == [0.0] * 4
        assert t.cpu().shape == (4,)
        assert torch.nonzero(t).shape == (0, 1)
        torch.ones(2).sum().item()  # a CPU scalar: no device involved
    syncs = counter.budget.host_syncs
    assert len(syncs) == 5, syncs


def test_multi_tensor_launches_follow_torch_multi_tensor_apply() -> None:
    """110 tensors per launch at depth 1, 320 chunks of 65,536 elements per launch."""
    small = [torch.empty(10, device="meta") for _ in range(221)]
    assert multi_tensor_launches(torch.ops.aten._foreach_mul_.Scalar, (small, 2.0)) == 3
    big = [torch.empty(65536 * 641, device="meta")]
    assert multi_tensor_launches(torch.ops.aten._foreach_mul_.Scalar, (big, 2.0)) == 3


def test_meta_autocast_casts_as_cpu_autocast_does_for_gemms() -> None:
    """CudaAutocast's lower-precision rule matches real autocast on the ops both lists share, and a
    weight is cast once per block however often it is used."""
    from tools.bench.meta_cuda import CudaAutocast

    w = torch.nn.Parameter(torch.randn(8, 4))
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = (torch.nn.functional.linear(x, w).dtype, (x @ w.t()).dtype)
    wm = torch.nn.Parameter(torch.empty(8, 4, device="meta"))
    xm = torch.empty(3, 4, device="meta")
    with OpCounter() as counter, CudaAutocast(torch.bfloat16) as amp, amp.region():
        got = (torch.nn.functional.linear(xm, wm).dtype, (xm @ wm.t()).dtype)
        soft = torch.softmax(torch.nn.functional.linear(xm, wm), -1).dtype
    assert got == ref == (torch.bfloat16, torch.bfloat16)
    assert soft == torch.float32  # softmax is on CUDA autocast's fp32 list
    casts = [r for r in counter.budget.ops if r.name.startswith("aten._to_copy") and r.bytes == 8 * 4 * (4 + 2)]
    # the weight once for its two linears (autocast's cache of leaf weights), and w.t() once: a
    # view is not a leaf, so autocast does not cache its cast either
    assert len(casts) == 2


def test_full_recomputation_adds_one_forward_of_the_blocks() -> None:
    """activation_checkpointing=full runs every block's forward twice: the executed GEMMs and
    attention grow by exactly one forward of the blocks (hand count), the formula's do not."""
    L, D, H, d, E, F, K, B, S = 2, 2048, 16, 128, 64, 1024, 8, 2, 256
    T = B * S
    args = ["model=olmoe_1b_7b", f"model.num_layers={L}", f"train.batch_size={B}", f"train.seq_len={S}"]
    plain = count_step(args)
    full = count_step([*args, "train.activation_checkpointing=full"])
    block_forward = L * (2 * T * D * (3 * H * d + D) + 4 * B * H * S * S * d + 6 * T * K * D * F + 2 * T * D * E)
    assert full.budget.model_flops - plain.budget.model_flops == block_forward
    assert full.formula_flops == plain.formula_flops


def test_parallel_layout_adds_the_hand_counted_communication() -> None:
    """tiny on 2 GPUs, parallel=ep (ep 2), 2 x 64 tokens per GPU, balanced routing: per MoE layer each
    GPU sends 2 (T k / 2 + T k / 2) = 512 rows of 128 bf16 (131,072 bytes), 4 layers; the dense
    gradients (332,928 fp32 parameters) ring-all-reduce 2 (G - 1) / G of their bytes; all over
    NVLink at 300 GB/s."""
    from tools.bench.step_parallel import predict_layout

    out = predict_layout(["model=tiny", "train.batch_size=4", "train.seq_len=64"], 2, "ep", "h100")
    tokens = 4 * 131_072 / 300e9
    dense = 2 * (2 - 1) / 2 * 332_928 * 4 / 300e9
    assert out["layout"] == "parallel=ep parallel.ep_size=2" and out["tokens_per_gpu"] == 128
    assert out["comm_ms"] == pytest.approx((tokens + dense) * 1e3)
    assert out["held_fraction"] == pytest.approx((332_928 + 3_145_728 / 2) / 3_478_656)


@pytest.mark.parametrize(("fp32_residual", "s"), [(False, 2), (True, 4)])
def test_norms_cost_their_hand_counted_bytes_with_no_cast(fp32_residual: bool, s: int) -> None:
    """tiny (L = 4, D = 128), T = 2 x 16, bf16 autocast: every norm is one fused kernel each way, bf16
    out, no cast, and every residual add is inside the norm after it. The stream is bf16 under
    autocast (s = 2 bytes per element), fp32 with train.fp32_residual=true (s = 4); branch outputs a
    (attention's, the FFN's) are bf16. The first block's attention norm reads the stream alone (x in;
    y, 1/rms out; backward dy, x, 1/rms in, dx out). Every other norm (each FFN norm after its
    attention, each later attention norm after the previous FFN, the final norm) also adds a branch
    output to the stream (``add_rms_norm``: x, a in; h, y out) and in the backward adds the stream's
    gradient dh to its own, writing it for x and, for an fp32 stream, apart in bf16 for a (a bf16
    stream's gradient is a's as is); every backward writes dw as per-program partials that one small
    sum reduces; the final norm's h goes nowhere, so it reads no dh. One add is
    left: the embedding's output feeds both the first attention norm and the first FFN norm, so
    autograd sums the two gradients (a + b -> c). No residual add is left outside the norms."""
    L, D, B, S = 4, 128, 2, 16
    T = B * S
    count = count_step(["model=tiny", f"train.batch_size={B}", f"train.seq_len={S}", f"train.fp32_residual={str(fp32_residual).lower()}"])
    seen: dict[str, list[int]] = {}
    for r, c in zip(count.budget.ops, count.components):
        if r.kind == "glue" and r.where.split(".")[-1].endswith("norm"):
            assert c == "norms and RoPE"
            seen.setdefault(r.name, []).append(r.bytes)
    w, rows = 4 * D, 4 * T  # the weight (and dw), 1/rms
    x, b16 = s * T * D, 2 * T * D  # a stream tensor, a bf16 one
    parts = 4 * min(T, 264) * D  # the backward's dw partials, one fp32 row per program (P = min(rows, 264))
    fused_bwd = x + b16 + x + w + rows + x + (b16 if s == 4 else 0) + parts  # dh, dy, h, w, 1/rms -> dx, da, dw partials
    assert seen == {
        "moeforge.rms_norm.default": [x + w + b16 + rows],
        "moeforge.rms_norm_backward.default": [b16 + x + w + rows + x + parts],
        "aten.sum.dim_IntList": [parts + w] * (2 * L + 1),  # dw = the partials' sum, a second small launch per norm
        "moeforge.add_rms_norm.default": [x + b16 + w + x + b16 + rows] * (2 * L),
        "moeforge.add_rms_norm_backward.default": [fused_bwd - x] + [fused_bwd] * (2 * L - 1),  # the final norm first
        "aten.add.Tensor": [3 * x],
    }
    stream_adds = [r.name for r, c in zip(count.budget.ops, count.components) if c == "other" and r.name.startswith("aten.add") and r.bytes >= T * D]
    assert not stream_adds  # no residual add outside the norms (the bf16 stream's one cast of the embedding stays in "other")
