"""tools/router_toys/compare.py and tools/router_toys: NMI, toy data, spec resolution, metrics, a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moe.routers import ROUTERS, RoutingDecision
from tools.router_toys import lm
from tools.router_toys.compare import main
from tools.router_toys.nmi import mutual_information, normalized_mutual_information
from tools.router_toys.specs import BASE_FRACTION, SkipRouter, build_config, parse_spec, resolve_values
from tools.router_toys.tasks import FluctuationTask, RegressionTask
from tools.router_toys.train_toy import late_flip_rate, steps_to_target, top1_experts

# ---------------------------------------------------------------- NMI


def test_nmi_perfect_relabeling_is_one() -> None:
    clusters = np.array([0, 0, 1, 1, 2, 2, 2])
    experts = np.array([5, 5, 3, 3, 7, 7, 7])  # a bijection, in another order
    assert normalized_mutual_information(experts, clusters) == pytest.approx(1.0, abs=1e-12)


def test_nmi_independent_is_zero() -> None:
    # Joint distribution uniform over the 4 pairs = product of the uniform marginals: I = 0.
    a = np.array([0, 0, 1, 1] * 3)
    b = np.array([0, 1, 0, 1] * 3)
    assert mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)


def test_nmi_hand_computed_intermediate() -> None:
    # clusters C = [0,0,1,1], experts X = [0,0,0,1]. In bits:
    #   H(C) = 1;  H(X) = -(3/4 log2 3/4 + 1/4 log2 1/4) = 2 - (3/4) log2 3 = 0.8112781;
    #   joint p = {(0,0): 1/2, (1,0): 1/4, (1,1): 1/4} -> H(C,X) = 1/2*1 + 2*(1/4*2) = 1.5;
    #   I = H(C) + H(X) - H(C,X) = 0.3112781;  NMI = 2 I / (H(C) + H(X)) = 0.6225562 / 1.8112781 = 0.3437110.
    c = np.array([0, 0, 1, 1])
    x = np.array([0, 0, 0, 1])
    assert mutual_information(c, x) == pytest.approx(0.3112781 * math.log(2), abs=1e-6)
    assert normalized_mutual_information(c, x) == pytest.approx(0.3437110, abs=1e-6)
    assert normalized_mutual_information(x, c) == pytest.approx(0.3437110, abs=1e-6)


def test_nmi_degenerate_and_bad_input() -> None:
    assert normalized_mutual_information(np.zeros(5), np.zeros(5)) == 1.0  # identical (trivial) partitions
    assert normalized_mutual_information(np.zeros(4), np.array([0, 1, 2, 3])) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        normalized_mutual_information(np.zeros(3), np.zeros(4))


# ---------------------------------------------------------------- toy data


def test_regression_data_has_cluster_structure() -> None:
    task = RegressionTask(seed=3)
    batch = task.sample(4000, torch.Generator().manual_seed(0))
    x, y, c = batch.x.double(), batch.y.double(), batch.cluster
    shares = torch.bincount(c, minlength=8).double() / c.numel()
    assert shares.min() > 0.09 and shares.max() < 0.16  # 8 clusters, ~1/8 each
    nearest = torch.cdist(x, task.mu_CX.double()).argmin(dim=1)
    assert (nearest == c).double().mean() > 0.99  # Gaussian clusters, well separated
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    fitted = []
    for k in range(8):
        xk, yk = torch.cat([x[c == k], ones[c == k]], 1), y[c == k]
        w = torch.linalg.lstsq(xk, yk).solution
        assert (xk @ w - yk).pow(2).mean() < 1e-10  # each cluster is one affine map (float32 rounding only)
        fitted.append(w)
    assert min((fitted[i] - fitted[j]).abs().max() for i in range(8) for j in range(i)) > 0.1  # and the maps differ
    xa = torch.cat([x, ones], 1)
    global_fit = xa @ torch.linalg.lstsq(xa, y).solution
    assert (global_fit - y).pow(2).mean() > 0.5  # one linear map cannot fit all clusters


def test_fluctuation_data_one_cluster_per_sequence() -> None:
    task = FluctuationTask(seed=1)
    batch = task.sample(64 * 32, torch.Generator().manual_seed(0))
    assert batch.x.shape == (64, 32, 16) and batch.y.shape == (64, 32)
    assert (batch.y == batch.y[:, :1]).all()
    # heavy per-token noise: single tokens are mostly misassigned, sequence means mostly right
    dist_token = torch.cdist(batch.x.reshape(-1, 16), task.mu_CX).argmin(1)
    dist_seq = torch.cdist(batch.x.mean(1), task.mu_CX).argmin(1)
    assert (dist_token == batch.cluster).float().mean() < 0.5
    assert (dist_seq == batch.y[:, 0]).float().mean() > 0.8


def test_fluctuation_sub_labels_follow_the_cluster_rule_and_drift_keeps_probe_tokens() -> None:
    task = FluctuationTask(seed=2, sub_labels=4, drift=0.1)
    batch = task.sample(64 * 32, torch.Generator().manual_seed(0))
    assert task.num_classes == 32 and batch.y.min() >= 0 and batch.y.max() < 32
    c_BS = batch.cluster.view(64, 32)
    assert torch.equal(batch.y // 4, c_BS)  # the cluster is the label's high part
    # Independent reference: the bucket is the number of N(0,1) quartiles below w_c . z.
    proj = (batch.z * task.w_CX[c_BS]).sum(-1).double()
    quartiles = torch.tensor([-0.6744897501960817, 0.0, 0.6744897501960817], dtype=torch.float64)
    assert torch.equal(batch.y % 4, (proj.unsqueeze(-1) > quartiles).sum(-1))
    shares = torch.bincount((batch.y % 4).flatten(), minlength=4).double() / batch.y.numel()
    assert (shares - 0.25).abs().max() < 0.03  # equal-probability slabs
    mu0 = task.mu_CX.clone()
    task.sample(32)  # a training draw: one random-walk step of std 0.1 per coordinate
    step = task.mu_CX - mu0
    assert 0.05 < float(step.std()) < 0.15
    moved = task.refresh(batch)  # same tokens, current means
    torch.testing.assert_close(moved.x - batch.x, step[c_BS[:, 0]].unsqueeze(1).expand_as(batch.x))
    assert torch.equal(moved.y, batch.y) and torch.equal(moved.cluster, batch.cluster)
    fixed = FluctuationTask(seed=2, sub_labels=4)
    fixed.sample(32)
    assert torch.equal(fixed.mu_CX, FluctuationTask(seed=2, sub_labels=4).mu_CX)  # drift 0: means never move


# ---------------------------------------------------------------- specs and metrics


def test_specs_scale_schedules_set_k_and_skip_unknown_fields() -> None:
    cfg = build_config(parse_spec("dts"), 2, 100)
    assert (cfg.k, cfg.decay_steps, cfg.hard_step) == (2, 50, 75)
    evo = build_config(parse_spec("evomoe"), 1, 100)
    base = int(100 * BASE_FRACTION)
    assert evo.evolve.enabled and evo.evolve.base_steps == base
    # the DTS schedule counts from the spawn and must fit in the steps left: hard at 3/4 of them
    assert (evo.decay_steps, evo.hard_step) == ((100 - base) // 2, (3 * (100 - base)) // 4)
    long_base = build_config(parse_spec("dts:evolve.enabled=true:evolve.base_steps=60:hard_step=7"), 1, 100)
    assert (long_base.decay_steps, long_base.hard_step) == (20, 7)  # an explicit value wins
    assert build_config(parse_spec("expert_choice"), 3, 100).capacity_factor == 3  # k -> mean experts per token
    assert build_config(parse_spec("comet+:gamma=0.5"), 2, 100).local_search.enabled
    assert build_config(parse_spec("comet+:gamma=0.5"), 2, 100).gamma == 0.5
    assert "k" not in resolve_values(parse_spec("hash"), 2, 100)
    with pytest.raises(SkipRouter, match="no field 'nosuch'"):
        build_config(parse_spec("topk:nosuch=1"), 2, 100)
    with pytest.raises(SkipRouter, match="not registered"):
        parse_spec("no_such_router")
    with pytest.raises(SkipRouter, match="invalid config"):
        build_config(parse_spec("topk"), 0 - 1, 100)


def test_top1_takes_largest_used_weight_and_falls_back_to_probs() -> None:
    decision = RoutingDecision(
        expert_ids_TK=torch.tensor([[2, 5], [1, 3], [0, 1]]),
        weights_TK=torch.tensor([[0.3, 0.7], [0.9, 0.1], [0.5, 0.5]]),
        probs_TE=torch.tensor([[0.9] + [0.02] * 5, [0.0] * 5 + [1.0], [0.0] * 4 + [1.0, 0.0]]),
        mask_TK=torch.tensor([[True, True], [False, True], [False, False]]),
    )
    assert top1_experts(decision, 6).tolist() == [5, 3, 4]  # masked 0.9 ignored; no used slot -> argmax probs


def test_steps_to_target_and_late_flip_rate() -> None:
    losses = [5.0, 4.0, 3.0, 1.0, 1.0, 0.5]
    # trailing means of 2: 4.5, 3.5, 2.0, 1.0, 0.75 -> first <= 1.0 at the window ending on step 5
    assert steps_to_target(losses, 1.0, 2) == 5
    assert steps_to_target(losses, 0.1, 2) is None
    # evaluations at 10..40 of 40 steps; flips for pairs ending 20, 30, 40; the last half is > 20
    assert late_flip_rate([10, 20, 30, 40], [0.5, 0.2, 0.1], 40) == pytest.approx(0.15)


def test_lm_dense_arm_and_metrics_parsing(tmp_path) -> None:
    arm = lm.dense_arm(2, 256)
    assert {"model.num_experts=1", "router.k=1", "model.d_ff=512", "router=topk"} <= set(arm.overrides)
    cmd = lm.train_command(lm.router_arm(parse_spec("dts"), 2, 150), 1, 150, tmp_path / "r", tmp_path / "c", ["train.batch_size=4"])
    assert cmd[1:3] == ["-m", "launch.train"] and "router=dts" in cmd and "router.decay_steps=75" in cmd
    assert "train.seed=1" in cmd and cmd[-1] == "train.batch_size=4"
    user = ["train.batch_size=8", "model.d_ff=128", "model.d_ff=64"]
    assert lm.override_value(user, "model.d_ff") == "64" and lm.override_value(user, "model.d_model") is None
    assert lm.overrides_for(arm, user) == ["train.batch_size=8"]  # the dense arm sets its own width
    assert lm.overrides_for(lm.router_arm(parse_spec("topk"), 2, 10), user) == user
    lines = [
        {"step": 1, "loss": 3.0, "routing/layer0/experts_per_token_mean": 2.0, "routing/layer1/experts_per_token_mean": 4.0,
         "routing/layer0/tokens_per_expert": [3, 1], "routing/layer1/tokens_per_expert": [1, 3]},
        {"step": 2, "loss": 2.0, "val_loss": 2.5, "routing/layer0/experts_per_token_mean": 1.0, "routing/layer1/experts_per_token_mean": 1.0,
         "routing/layer0/tokens_per_expert": [4, 0], "routing/layer1/tokens_per_expert": [4, 0]},
        {"step": 3, "loss": 1.0, "val_loss": 2.25, "routing/layer0/flips": 0.25, "routing/layer1/flips": 0.75},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = lm.read_metrics(path, "dts", 1, steps=3, target=2.0, window=1)
    assert r.losses == [3.0, 2.0, 1.0] and r.final_loss == 2.25 and r.eval_steps == [2, 3]
    assert r.steps_to_target == 2 and r.flip_rate == pytest.approx(0.5)  # mean of the two layers' flips
    assert r.experts_per_token_train == pytest.approx(2.0) and r.experts_per_token_final == pytest.approx(1.0)
    assert r.load_fractions == [[0.75, 0.25]] and math.isnan(r.nmi)  # steps 1-2 summed over layers: [12, 4]


def test_difference_from_reference_is_welch_z_and_table_gets_the_column() -> None:
    from tools.router_toys.report import difference, markdown_table, paired_difference
    from tools.router_toys.train_toy import RunResult

    def runs(label, finals):
        return [RunResult(label=label, seed=i, final_loss=v) for i, v in enumerate(finals)]

    moe, dense = runs("topk", [1.0, 1.2, 1.1]), runs("dense", [1.3, 1.3, 1.6])
    # means 1.1 and 1.4, sample variances 0.01 and 0.03: se = sqrt(0.01/3 + 0.03/3) = 0.11547, z = -2.598
    d, z = difference(moe, dense)
    assert d == pytest.approx(-0.3) and z == pytest.approx(-0.3 / math.sqrt(0.04 / 3))
    # paired by seed: d = [-0.3, -0.1, -0.5], mean -0.3, std 0.2, t = -0.3 / (0.2 / sqrt 3) = -2.598
    pm, ps, t = paired_difference(moe, dense)
    assert (pm, ps, t) == (pytest.approx(-0.3), pytest.approx(0.2), pytest.approx(-0.3 / (0.2 / math.sqrt(3))))
    table = markdown_table("t", {"topk": moe, "dense": dense}, {}, reference="dense")
    assert "Δ vs dense (z)" in table and "| -0.3000 (-2.6) | -0.3000 ± 0.2000 (-2.6) |" in table and "| — | — |" in table


# ---------------------------------------------------------------- end to end


def test_end_to_end_tiny_run_writes_table_and_pngs(tmp_path) -> None:
    assert "topk" in ROUTERS
    out = tmp_path / "cmp"
    assert main(["--task", "regression", "--routers", "topk", "--seeds", "0", "--steps", "5", "--eval-every", "2", "--out", str(out)]) == 0
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ") and not line.startswith("| router")]
    assert len(rows) == 1 and rows[0].startswith("| topk | ")
    assert "2.00 / 2.00" in rows[0]  # k = 2 slots per token, all used
    for png in ("loss_curves.png", "val_curves.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    (run,) = results["routers"]["topk"]
    assert len(run["losses"]) == 5 and run["eval_steps"] == [2, 4, 5]
    assert len(run["load_fractions"]) == 3 and all(sum(f) == pytest.approx(1.0) for f in run["load_fractions"])
    assert 0.0 <= run["nmi"] <= 1.0
    # --render-only rebuilds the same table from results.json without training
    before = (out / "table.md").read_text()
    (out / "table.md").unlink()
    assert main(["--task", "regression", "--render-only", "--out", str(out)]) == 0
    assert (out / "table.md").read_text() == before
