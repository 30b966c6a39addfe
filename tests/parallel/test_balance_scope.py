"""``router.balance_scope``: with ``global`` and the balance loss on, N ranks train like one process.

The Switch loss ``E * sum_e f_e P_e`` has ``f`` (a count, not differentiated) summed over the
data-parallel ranks (Qiu et al. 2025, arXiv 2501.11873), so the ranks' mean loss is the loss of one
process on the concatenated batch. Under gradient accumulation ``f`` covers one micro-batch on every
rank: the reference is one process whose micro-batch j is every rank's micro-batch j, concatenated.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed
from test_parallel_ep import TOL
from test_parallel_fssdp import lm_loss
from test_parallel_modes import expected, full

from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers.losses import switch_balance_loss
from moe.routers.topk import TopKConfig
from parallel import ParallelConfig, apply_parallel, setup_runtime

ROWS, MICRO = 4, 2
MODES = (("ddp", "ddp"), ("fsdp", "ddp"), ("ep", "fsdp"), ("fssdp", "ddp"))
LOSS_TOL = 1e-6


def balanced_model(scope: str = "global", seed: int = 0) -> MoETransformer:
    """The parallel tests' tiny model with the Switch balance loss on (0.05, so it moves gradients)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_experts=4, d_ff=24, dense_d_ff=32, max_seq_len=16)
    return MoETransformer(cfg, TopKConfig(k=2, aux_loss_coef=0.05, balance_scope=scope), ExpertsConfig())


def global_tokens(world: int) -> torch.Tensor:
    return torch.randint(0, 32, (world * ROWS, 9), generator=torch.Generator().manual_seed(17))


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def check_grads(model: torch.nn.Module, ref: torch.nn.Module, what: str) -> None:
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(full(p.grad), expected(model, name, ref_grads[name]), **TOL, msg=lambda m: f"{what} {name}: {m}")


def global_against_one_process(cfg: ParallelConfig, steps: int = 2) -> None:
    """Each rank's loss on its rows, averaged over ranks, equals one process's loss on all rows
    (within LOSS_TOL) at every step, and so do the gradients after the runtime's reduction."""
    rt = setup_runtime(cfg)
    W, r = rt.world_size, rt.rank
    tokens = global_tokens(W)
    ref = balanced_model()
    model = apply_parallel(copy.deepcopy(ref), cfg, rt)
    ref_opt, opt = torch.optim.AdamW(ref.parameters(), lr=1e-2), torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, steps + 1):
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = lm_loss(ref, tokens)
        ref_loss.backward()
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens[r * ROWS : (r + 1) * ROWS])
        loss.backward()
        rt.before_optimizer_step(model)
        diff = float((mean_over_ranks(loss) - ref_loss.detach()).abs())
        assert diff <= LOSS_TOL, f"{cfg.mode} on {W} ranks, step {step}: mean rank loss differs from one process by {diff:.3g}"
        check_grads(model, ref, f"{cfg.mode} W={W} step {step}")
        ref_opt.step()
        opt.step()
        rt.after_optimizer_step(model, opt, step)
    assert rt.comm_metrics().get("comm/balance_counts_bytes_sent", 0.0) > 0, "the count sum should have run"


def _global_worker() -> None:
    for mode, dense in MODES:
        global_against_one_process(ParallelConfig(mode=mode, dense=dense, timeout_s=60))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_global_balance_loss_matches_one_process_in_every_mode(world: int) -> None:
    run_distributed(_global_worker, world, timeout_s=300)


def _micro_batch_worker() -> None:
    """micro_batch scope: each rank's loss is one process's loss on that rank's rows alone (the
    per-rank statistic), which differs from the global batch's."""
    rt = setup_runtime(ParallelConfig(mode="ddp", timeout_s=60))
    W, r = rt.world_size, rt.rank
    tokens = global_tokens(W)
    ref = balanced_model("micro_batch")
    model = apply_parallel(copy.deepcopy(ref), ParallelConfig(mode="ddp", timeout_s=60), rt)
    mine = tokens[r * ROWS : (r + 1) * ROWS]
    loss = lm_loss(model, mine)
    torch.testing.assert_close(loss, lm_loss(ref, mine), rtol=0, atol=LOSS_TOL)
    assert float((mean_over_ranks(loss) - lm_loss(ref, tokens)).abs()) > 10 * LOSS_TOL  # the gap global closes


def test_micro_batch_scope_counts_each_rank_alone() -> None:
    run_distributed(_micro_batch_worker, 2)


def accumulate_against_one_process(cfg: ParallelConfig) -> None:
    """grad_accum = MICRO with global scope: f of micro-batch j counts micro-batch j of every rank.
    Reference: one process whose micro-batch j is the concatenation of the ranks' micro-batches j."""
    rt = setup_runtime(cfg)
    W, r = rt.world_size, rt.rank
    tokens = global_tokens(W)
    per = ROWS // MICRO
    ref = balanced_model()
    model = apply_parallel(copy.deepcopy(ref), cfg, rt)
    ref_opt, opt = torch.optim.AdamW(ref.parameters(), lr=1e-2), torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        ref_opt.zero_grad(set_to_none=True)
        for j in range(MICRO):
            rows = torch.cat([tokens[s * ROWS + j * per : s * ROWS + (j + 1) * per] for s in range(W)])
            (lm_loss(ref, rows) / MICRO).backward()
        opt.zero_grad(set_to_none=True)
        for j, micro in enumerate(tokens[r * ROWS : (r + 1) * ROWS].split(per)):
            with rt.grad_sync(model, enabled=j == MICRO - 1):
                (lm_loss(model, micro) / MICRO).backward()
        rt.before_optimizer_step(model)
        check_grads(model, ref, f"{cfg.mode} accumulated step {step}")
        ref_opt.step()
        opt.step()
        rt.after_optimizer_step(model, opt, step)


def _accum_worker() -> None:
    for mode, dense in MODES:
        accumulate_against_one_process(ParallelConfig(mode=mode, dense=dense, timeout_s=60))


@pytest.mark.slow
def test_global_scope_under_grad_accumulation_counts_each_micro_batch_over_ranks() -> None:
    run_distributed(_accum_worker, 2, timeout_s=300)


def test_switch_loss_with_summed_counts_matches_hand_formula() -> None:
    """f from counts summed with another rank's (a stand-in for the all-reduce), P from this rank:
    E * sum_e f_e P_e written out by hand from the two ranks' expert ids."""
    g = torch.Generator().manual_seed(2)
    E, T, K = 4, 6, 2
    probs_TE = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    ids_TK = torch.randint(0, E, (T, K), generator=g)
    other_ids_TK = torch.randint(0, E, (T, K), generator=g)
    other_counts = [sum(int(v == e) for v in other_ids_TK.flatten().tolist()) for e in range(E)]
    mine = [sum(int(v == e) for v in ids_TK.flatten().tolist()) for e in range(E)]
    total = [a + b for a, b in zip(mine, other_counts)]
    P = probs_TE.mean(dim=0).tolist()
    want = E * sum(total[e] / (2 * T * K) * P[e] for e in range(E))
    got = switch_balance_loss(probs_TE, ids_TK, sum_counts=lambda c: c + torch.tensor(other_counts, dtype=c.dtype))
    assert abs(float(got) - want) < 1e-6
    alone = E * sum(mine[e] / (T * K) * P[e] for e in range(E))
    assert abs(float(switch_balance_loss(probs_TE, ids_TK)) - alone) < 1e-6 and abs(alone - want) > 1e-3
