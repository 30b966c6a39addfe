"""tools/bench/layer.py on CPU: --help, the no-GPU exit, and the pieces every backend is fed.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import reference
from tools.bench import layer as bench_layer

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.usefixtures("kernels_runnable")  # the triton backend runs only where the kernels can


def test_help_runs_on_cpu():
    out = subprocess.run([sys.executable, "-m", "tools.bench.layer", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--autotune" in out.stdout and "--quick" in out.stdout and "--out" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_with_one_line_without_gpu(tmp_path, capsys):
    assert bench_layer.main(["--quick", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err
    assert not (tmp_path / "o").exists()


def test_useful_flops_is_three_gemms_times_three():
    # forward: gate, up, down = 3 * 2*T*K*D*F; backward doubles it.
    assert bench_layer.useful_flops(T=8, K=2, D=4, F_=5) == 3 * (3 * 2 * 8 * 2 * 4 * 5)


def test_routings(gen):
    T, E, K = 96, 8, 2
    bal = bench_layer.routing_ids(T, E, K, "balanced", 1.2, gen)
    assert torch.bincount(bal.reshape(-1), minlength=E).tolist() == [T * K // E] * E
    assert bool((bal[:, 0] != bal[:, 1]).all())
    zipf = bench_layer.routing_ids(4096, E, K, "zipf", 1.2, gen)
    counts = torch.bincount(zipf.reshape(-1), minlength=E)
    assert bool((zipf[:, 0] != zipf[:, 1]).all())
    assert counts.max() > 2 * counts.float().mean()  # rank 1 of Zipf(1.2) over 8 holds ~39% of first picks


@pytest.mark.parametrize("routing", ["balanced", "zipf"])
def test_every_backend_equals_reference_on_its_plan(kc, gen, routing):
    """The bench's router follows the drawn routing, and each backend's wiring (CPU: torch,
    capacity_bmm, grouped_mm, interpreted triton) equals the reference on the plan it gets."""
    T, D, F, E, K = 32, 16, 32, 4, 2
    ids = bench_layer.routing_ids(T, E, K, routing, 1.5, gen)
    bias = torch.zeros(T, E).scatter_(1, ids, bench_layer.ROUTING_BIAS)
    x = torch.randn(T, D, generator=gen)
    w_router = torch.randn(D, E, generator=gen) * 0.01
    weights = tuple(w.detach().cpu() for w in kc.make_weights(E, D, F, gen))
    plan = bench_layer.route(x, w_router, bias, K, None)
    expert_S = torch.empty(T * K, dtype=torch.long)
    expert_S[plan.slot_idx_R] = torch.repeat_interleave(torch.arange(E), plan.counts_E)
    assert torch.equal(expert_S.reshape(T, K).sort(-1).values, ids.sort(-1).values)
    backends = bench_layer.expert_runs(None)
    assert {"torch", "capacity_bmm", "grouped_mm", "triton"} <= set(backends)
    for name, (run, cf) in backends.items():
        plan = bench_layer.route(x, w_router, bias, K, cf)
        if cf is not None:
            assert int(plan.counts_E.max()) <= bench_layer.capacity(T, K, E, cf)
        y = run(x, plan, weights, K)
        want = reference.moe_experts(x, plan.slot_idx_R, plan.weight_R, plan.counts_E, K, *weights)
        kc.assert_close(y, want, what=name)
    # The plain baseline layer routes the same way and computes the same function.
    y_plain, aux = bench_layer.plain_grouped_mm_layer(x, w_router, bias, weights, K)
    plan = bench_layer.route(x, w_router, bias, K, None)
    kc.assert_close(y_plain, reference.moe_experts(x, plan.slot_idx_R, plan.weight_R, plan.counts_E, K, *weights), what="plain_grouped_mm")
    assert aux.item() >= 1.0 - 1e-5  # the Switch balance loss is >= 1 (1 only for uniform routing)


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_whole_layer_row_routes_like_the_problem_and_matches_reference(kc, backend):
    """``build_layer``: the MoELayer row holds the problem's weights and its forced routing."""
    from moe.routers import RouterContext

    p = bench_layer.Problem.make((16, 32, 4, 2, 24), "zipf", 1.5, 3, kc.DEVICE, torch.float32)
    layer = bench_layer.build_layer(p, backend)
    y, aux = layer(p.x, RouterContext())
    plan = bench_layer.route(p.x, p.w_router, p.bias, p.K, None)
    kc.assert_close(y, reference.moe_experts(p.x, plan.slot_idx_R, plan.weight_R, plan.counts_E, p.K, *p.weights), what=backend)
    assert set(aux) == {"aux_loss", "z_loss"}


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_backend_and_the_autotune_sweep(tmp_path):
    """The whole bench (autotune included) on a tiny fp32 shape, Triton interpreted: the run a GPU
    lease would make, minus the GPU, so a bench bug never costs device time."""
    import json
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "tools.bench.layer", "--device", "cpu", "--dtype", "fp32", "--shape", "32", "64", "4", "2", "64",
           "--warmup", "0", "--iters", "1", "--autotune", "--backends", "torch", "capacity_bmm", "grouped_mm", "triton", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "smoke run" in done.stderr
    result = json.loads((out / "results.json").read_text())
    records = result["records"]
    want = {"bmm_ceiling", "dense_gemm", "torch", "capacity_bmm", "grouped_mm", "triton", "plain_grouped_mm", "layer:grouped_mm", "layer:triton"}
    for routing in ("balanced", "zipf"):
        rows = {r["backend"]: r for r in records if r["routing"] == routing}
        assert want <= set(rows), (routing, sorted(rows))
        for name in want - {"bmm_ceiling", "dense_gemm"}:
            assert "error" not in rows[name], rows[name]
            assert rows[name]["max_rel_err"] < 1e-5, (routing, name, rows[name]["max_rel_err"])
            assert rows[name]["fwd_bwd_ms"] > 0
        assert rows["dense_gemm"]["vs_dense"] == 1.0
    assert [r for r in records if r["backend"] == "capacity_bmm" and r["routing"] == "zipf"][0]["dropped_frac"] > 0
    (sweep,) = result["autotune"]  # one shape, tuned on the first routing only
    assert sweep["routing"] == "balanced" and len(sweep["results"]) == len(bench_layer.AUTOTUNE_BLOCKS)
    assert all("error" not in r for r in sweep["results"])
    md = (out / "results.md").read_text()
    assert "## Targets" in md and md.count("| triton |") == 4  # two rows and two targets, per routing
    targets = md.split("## Targets")[1]
    assert targets.count("| grouped_mm |") == 2 and "| predicted ms |" in targets
