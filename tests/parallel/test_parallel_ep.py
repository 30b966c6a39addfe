"""Expert parallelism on 2 and 4 gloo ranks equals the single-process MoE layer.

Every rank builds the same layer (same seed) and the same global batch; it runs its rows
``[rank*T, (rank+1)*T)`` through the EP layer with loss ``sum(y * g)`` and compares with the
single-process layer run on the whole batch with loss ``sum(y * g) / W`` (the mean over ranks of
the per-rank losses). Outputs and every gradient (router, local experts) must match in fp32.
"""

from __future__ import annotations

import copy

import torch
from dist_harness import run_distributed

from moe.dispatch import dispatch
from moe.experts import Experts, ExpertsConfig
from moe.layer import MoELayer, local_runner
from moe.routers import RouterContext, RoutingDecision
from moe.routers.topk import TopKConfig
from parallel import ParallelConfig, apply_parallel, setup_runtime
from parallel.expert_parallel import ExpertParallelRunner, shard_experts

D, F, T = 16, 24, 12
TOL = dict(rtol=1e-5, atol=1e-5)


def make_layer(num_experts: int, k: int, skew: float, seed: int = 0) -> MoELayer:
    """Skewed gate on input feature 0 (+1 on rank 0's rows, -1 elsewhere, see ``global_batch``):
    rank 0's tokens always pick expert 0 and never expert 1, the other ranks' the reverse."""
    torch.manual_seed(seed)
    layer = MoELayer(D, F, num_experts, TopKConfig(k=k, aux_loss_coef=0.0, z_loss_coef=0.0), ExpertsConfig())
    with torch.no_grad():
        layer.router.gate.weight[:, 0] = 0.0
        layer.router.gate.weight[0, 0] = skew
        layer.router.gate.weight[1, 0] = -skew
    return layer


def global_batch(world: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * T, D, generator=g)
    x[:, 0] = -1.0
    x[:T, 0] = 1.0
    return x, torch.randn(world * T, D, generator=g)


def reference(layer: MoELayer, x: torch.Tensor, grad_out: torch.Tensor, world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ref = copy.deepcopy(layer)
    y, _ = ref(x, RouterContext())
    ((y * grad_out).sum() / world).backward()
    return y.detach(), {n: p.grad.clone() for n, p in ref.named_parameters()}


def check_layer_grads(layer: MoELayer, ref_grads: dict[str, torch.Tensor], expert_ids: list[int]) -> None:
    for name, p in layer.named_parameters():
        want = ref_grads[name]
        if name.startswith("experts."):
            want = want[expert_ids]
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"{name}: {m}")


def rows_leaving_rank(x: torch.Tensor, gate_ED: torch.Tensor, k: int, ep_size: int, num_experts: int, rank: int) -> tuple[int, int]:
    """Rows ``rank`` sends to the other ranks of its EP group in one forward, from the routing alone:
    (its own rows going out, results of the rows that came in going back).

    Top-k of the gate logits ``x W_g^T`` gives each slot's expert; expert e lives on EP rank
    ``e // (E / ep_size)`` and EP groups are blocks of ``ep_size`` consecutive ranks holding rows
    ``[q*T, (q+1)*T)`` of ``x`` each. The rank sends its slots whose expert lives elsewhere, then
    the results of the other group members' slots whose expert it holds.
    """
    owner_TK = (x @ gate_ED.t()).topk(k, dim=-1).indices // (num_experts // ep_size)
    first = rank - rank % ep_size
    out_rows = int((owner_TK[rank * T : (rank + 1) * T] != rank % ep_size).sum())
    back_rows = sum(int((owner_TK[q * T : (q + 1) * T] == rank % ep_size).sum()) for q in range(first, first + ep_size) if q != rank)
    return out_rows, back_rows


def _ep_layer_worker(ep_size: int, num_experts: int, skew: float) -> None:
    cfg = ParallelConfig(mode="ep", ep_size=ep_size, timeout_s=60)
    rt = setup_runtime(cfg)
    W, r = rt.world_size, rt.rank
    layer = make_layer(num_experts=num_experts, k=2, skew=skew)
    x, g = global_batch(W)
    y_ref, ref_grads = reference(layer, x, g, W)
    layer = apply_parallel(layer, cfg, rt)
    rows = slice(r * T, (r + 1) * T)
    y, _ = layer(x[rows], RouterContext())
    (y * g[rows]).sum().backward()
    rt.before_optimizer_step(layer)
    torch.testing.assert_close(y, y_ref[rows], **TOL)
    assert len(layer.experts.expert_ids) == num_experts // ep_size
    check_layer_grads(layer, ref_grads, layer.experts.expert_ids)
    if skew > 0:  # the skew really leaves expert 1 (rank 0) / expert 0 (others) without tokens
        counts = layer.stats.raw()[0]["counts_E"]
        assert counts[1 if r == 0 else 0] == 0 and counts[0 if r == 0 else 1] == T
    # The clipping norm equals the single-process norm (experts counted once, not averaged).
    ref_norm = torch.linalg.vector_norm(torch.stack([gr.norm() for gr in ref_grads.values()]))
    norm = rt.clip_grad_norm_(layer, max_norm=ref_norm.item() / 2)
    torch.testing.assert_close(norm, ref_norm, **TOL)
    clipped = {n: gr * (ref_norm.item() / 2) / (ref_norm.item() + 1e-6) for n, gr in ref_grads.items()}
    check_layer_grads(layer, clipped, layer.experts.expert_ids)
    metrics = rt.comm_metrics()
    out_rows, back_rows = rows_leaving_rank(x, layer.router.gate.weight, k=2, ep_size=ep_size, num_experts=num_experts, rank=r)
    row_bytes = D * 4  # fp32
    assert out_rows > 0 and back_rows > 0  # the skewed and the random routing both cross EP ranks
    assert metrics["comm/ep_a2a_tokens_bytes_sent"] == (out_rows + back_rows) * row_bytes
    # The backward retraces the return exchange only: the input rows (data) want no gradient.
    assert metrics["comm/ep_a2a_tokens_bwd_bytes_sent"] == out_rows * row_bytes
    if W // ep_size > 1:
        assert metrics["comm/expert_allreduce_bytes_sent"] > 0


def test_ep_layer_matches_single_process_two_ranks_skewed() -> None:
    run_distributed(_ep_layer_worker, 2, 2, 8, 30.0)


def test_ep_layer_with_expert_data_parallel_four_ranks() -> None:
    """ep_size=2 on 4 ranks: experts replicated over 2 EDP groups, grads summed over EDP / W."""
    run_distributed(_ep_layer_worker, 4, 2, 4, 0.0)


def masked_decision(rank: int, world: int, num_experts: int, k: int, kind: str) -> RoutingDecision:
    """Hand-made per-rank decisions (variable experts per token through a mask).

    kind="self": every rank routes only to experts its own EP rank owns (nothing crosses);
    rank 1 additionally masks out every slot, so it sends and receives no rows at all.
    kind="mixed": random experts, random mask (some tokens use 0 experts, some k).
    """
    g = torch.Generator().manual_seed(100 + rank)
    local = num_experts // world
    if kind == "self":
        ids = rank * local + torch.randint(0, local, (T, k), generator=g)
        mask = torch.ones(T, k, dtype=torch.bool) if rank != 1 else torch.zeros(T, k, dtype=torch.bool)
    else:
        ids = torch.randint(0, num_experts, (T, k), generator=g)
        mask = torch.rand(T, k, generator=g) < 0.6
    w = torch.rand(T, k, generator=g)
    return RoutingDecision(expert_ids_TK=ids, weights_TK=w * mask, probs_TE=torch.full((T, num_experts), 1.0 / num_experts), mask_TK=mask)


def _runner_worker(kinds: list[str]) -> None:
    cfg = ParallelConfig(mode="ep", timeout_s=60)
    rt = setup_runtime(cfg)
    for kind in kinds:
        _check_runner(rt, kind)


def _check_runner(rt, kind: str) -> None:
    W, r, E, k = rt.world_size, rt.rank, 4, 3
    torch.manual_seed(0)
    full = Experts(E, D, F)
    x, g = global_batch(W, seed=7)
    # Reference: every rank's decision through the local runner with all experts, loss mean over ranks.
    ref = copy.deepcopy(full)
    x_ref = x.clone().requires_grad_(True)
    loss = 0.0
    ys = []
    for src in range(W):
        plan = dispatch(masked_decision(src, W, E, k, kind), E)
        rows = slice(src * T, (src + 1) * T)
        y_src = local_runner(ref, x_ref[rows], plan)
        ys.append(y_src.detach())
        loss = loss + (y_src * g[rows]).sum() / W
    loss.backward()
    # This rank through the EP runner.
    ids = shard_experts(full, r, W)
    runner = ExpertParallelRunner(E, rt.mesh.group("ep"), r, W, rt.meter)
    rows = slice(r * T, (r + 1) * T)
    x_mine = x[rows].clone().requires_grad_(True)
    y = runner(full, x_mine, dispatch(masked_decision(r, W, E, k, kind), E))
    (y * g[rows]).sum().backward()
    torch.testing.assert_close(y, ys[r], **TOL)
    torch.testing.assert_close(x_mine.grad, x_ref.grad[rows] * W, **TOL)
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        torch.testing.assert_close(getattr(full, name).grad / W, getattr(ref, name).grad[ids], **TOL)
    sent, recv = rt.meter.sent["ep_a2a_tokens"], rt.meter.recv["ep_a2a_tokens"]
    rt.meter.pop()
    if kind == "self":  # nothing crossed ranks, and rank 1 had no rows at all
        assert sent == 0 and recv == 0
        if r == 1:
            assert y.abs().sum() == 0
    else:
        assert sent > 0 and recv > 0


def test_ep_runner_no_hang_with_empty_rank_and_variable_experts_per_token() -> None:
    """Rank 1 sends and receives nothing (all slots masked); then a random variable-k mask."""
    run_distributed(_runner_worker, 2, ["self", "mixed"])
