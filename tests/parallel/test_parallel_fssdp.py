"""FSSDP on gloo ranks: layer equivalence with replicated hot experts, byte counts, re-ownership.

Reference and conventions as in test_parallel_ep.py: the single-process layer on the global batch
with loss ``sum(y * g) / W``; each rank runs its rows with loss ``sum(y * g)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed
from test_parallel_ep import TOL, T, D, F, check_layer_grads, global_batch, make_layer, reference

from launch.kernel_adamw import KernelAdamW
from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers import RouterContext
from moe.routers.topk import TopKConfig
from parallel import ParallelConfig, apply_parallel, setup_runtime

CHUNK_BYTES = (2 * D * F + F * D) * 4  # one expert's three fp32 matrices


def _fssdp_layer_worker() -> None:
    for remat in (False, True):
        cfg = ParallelConfig(mode="fssdp", fssdp=dict(overlap_degree=2, memory_cap=2, reshard_every=0, rematerialize=remat, debug_plan_hash=True), timeout_s=60)
        rt = setup_runtime(cfg)
        W, r = rt.world_size, rt.rank
        layer = make_layer(num_experts=4, k=1, skew=30.0)  # rank 0 -> expert 0, rank 1 -> expert 1
        x, g = global_batch(W)
        y_ref, ref_grads = reference(layer, x, g, W)
        layer = apply_parallel(layer, cfg, rt)
        opt = torch.optim.SGD(layer.parameters(), lr=0.0)
        rows = slice(r * T, (r + 1) * T)
        state = rt.fssdp.layers[0]
        assert state.owner_E == [0, 0, 1, 1] and layer.experts.expert_ids == ([0, 1] if r == 0 else [2, 3])
        # The plan takes routing counts one step late: steps 1 and 2 run every expert only at its
        # owner; the plan made after step 2 (from step 1's counts) holds hot experts 0, 1 everywhere.
        for step in (1, 2, 3):
            opt.zero_grad(set_to_none=True)
            y, _ = layer(x[rows], RouterContext())
            (y * g[rows]).sum().backward()
            rt.before_optimizer_step(layer)
            torch.testing.assert_close(y, y_ref[rows], **TOL)
            check_layer_grads(layer, ref_grads, layer.experts.expert_ids)
            ref_norm = torch.linalg.vector_norm(torch.stack([gr.norm() for gr in ref_grads.values()]))
            torch.testing.assert_close(rt.clip_grad_norm_(layer, 0.0), ref_norm, **TOL)
            metrics = rt.comm_metrics()
            spag_sent = metrics.get("comm/fssdp_spag_bytes_sent", 0.0)
            spag_recv = metrics.get("comm/fssdp_spag_bytes_recv", 0.0)
            sprs_sent = metrics.get("comm/fssdp_sprs_bytes_sent", 0.0)
            if step < 3:
                assert spag_sent == 0 and spag_recv == 0 and sprs_sent == 0
            else:
                # spAG moves sum_e |W_e| (holders_e - 1): experts 0 and 1 (owned by rank 0) to rank 1;
                # with re-materialisation it runs twice (forward and backward).
                gathers = 2 if remat else 1
                assert spag_sent == (2 * CHUNK_BYTES * gathers if r == 0 else 0)
                assert spag_recv == (0 if r == 0 else 2 * CHUNK_BYTES * gathers)
                assert sprs_sent == (0 if r == 0 else 2 * CHUNK_BYTES)
            opt.step()
            rt.after_optimizer_step(layer, opt, step)
            assert state.holders_E == ([[0], [0], [1], [1]] if step == 1 else [[0, 1], [0, 1], [1], [1]])
        assert len(rt.fssdp.digests) == 2


def test_fssdp_layer_matches_single_process_with_replicas_and_remat() -> None:
    run_distributed(_fssdp_layer_worker, 2)


def tiny_model(seed: int = 0, num_experts: int = 4) -> MoETransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_experts=num_experts, d_ff=24, dense_d_ff=32, max_seq_len=16)
    return MoETransformer(cfg, TopKConfig(k=2, aux_loss_coef=0.0), ExpertsConfig())


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits, aux = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return loss + sum(aux.values())


def snapshot(rt, opt: torch.optim.Optimizer) -> dict[tuple[int, int, str], torch.Tensor]:
    """Every expert's params and optimizer state, keyed by (layer, global expert, name), all ranks."""
    mine = {}
    for li, lay in enumerate(rt.fssdp.layers):
        for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            p = getattr(lay.experts, name)
            for i, e in enumerate(lay.experts.expert_ids):
                mine[(li, e, name)] = p.detach()[i].clone()
                for k, v in opt.state[p].items():
                    mine[(li, e, f"{name}/{k}")] = (v[i] if v.shape == p.shape else v).clone()
    everyone: list[dict | None] = [None] * rt.world_size
    dist.all_gather_object(everyone, mine)
    merged = {}
    for d in everyone:
        merged.update(d)
    return merged


def _reshard_worker(moments: str) -> None:
    cfg = ParallelConfig(mode="fssdp", fssdp=dict(overlap_degree=1, memory_cap=1, reshard_every=2, window=2, debug_plan_hash=True), timeout_s=60)
    rt = setup_runtime(cfg)
    W, r = rt.world_size, rt.rank
    model = apply_parallel(tiny_model(), cfg, rt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if moments == "fp32" else KernelAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 32, (W * 2, 9), generator=g)
    mine = tokens[r * 2 : (r + 1) * 2]
    for step in (1, 2):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, mine).backward()
        rt.before_optimizer_step(model)
        opt.step()
        if step == 2:
            before = snapshot(rt, opt)
            owners_before = [list(lay.owner_E) for lay in rt.fssdp.layers]
            with torch.no_grad():
                logits_before = model(mine[:, :-1])[0]
        rt.after_optimizer_step(model, opt, step)
    owners_after = [list(lay.owner_E) for lay in rt.fssdp.layers]
    assert owners_after != owners_before, "Algorithm 2 should have moved some expert"
    after = snapshot(rt, opt)
    assert before.keys() == after.keys() and len(before) == 2 * 4 * 3 * 4  # layers*experts*params*(param,step,m,v)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    # Every optimizer entry is a live expert or dense parameter, and each expert is owned once.
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live for grp in opt.param_groups for p in grp["params"])
    assert len({id(p) for grp in opt.param_groups for p in grp["params"]}) == len(list(model.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(model(mine[:, :-1])[0], logits_before, **TOL)
    # Training goes on after the move.
    opt.zero_grad(set_to_none=True)
    lm_loss(model, mine).backward()
    rt.before_optimizer_step(model)
    opt.step()


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_fssdp_reownership_moves_params_with_optimizer_state_exactly(moments: str) -> None:
    """bf16: ``optim.moments_dtype=bf16``'s moments travel through the fp32 exchange buffer and stay bf16, exactly."""
    run_distributed(_reshard_worker, 4, moments)
