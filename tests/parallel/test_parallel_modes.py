"""Every parallel mode on a tiny transformer equals the single-process model; checkpoints relabel.

Each rank trains on its rows of a global batch with the per-rank mean loss (the trainer's rule);
the reference is the single-process model with the mean of those per-rank losses. Router aux
(balance) loss is off here; with it on, test_balance_scope.py compares the global-batch scope
with one process on the concatenated batch.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from dist_harness import run_distributed
from test_parallel_ep import TOL
from test_parallel_fssdp import lm_loss, tiny_model

from launch.dcp_io import split_state
from moe.experts import Experts
from parallel import ParallelConfig, apply_parallel, checkpoint_state, load_checkpoint_state, setup_runtime

ROWS = 2


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def expected(model: torch.nn.Module, name: str, ref_value: torch.Tensor) -> torch.Tensor:
    """The rows of the single-process tensor this rank holds for parameter ``name``."""
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    ids = getattr(module, "expert_ids", None) if isinstance(module, Experts) else None
    return ref_value if ids is None else ref_value[ids]


def batch(world: int) -> torch.Tensor:
    return torch.randint(0, 32, (world * ROWS, 9), generator=torch.Generator().manual_seed(11))


def _modes_worker() -> None:
    for mode, dense in (("ddp", "ddp"), ("fsdp", "ddp"), ("ep", "fsdp"), ("fssdp", "fsdp")):
        train_against_reference(ParallelConfig(mode=mode, dense=dense, timeout_s=60), steps=2)


def train_against_reference(cfg: ParallelConfig, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """``steps`` AdamW steps under ``cfg`` next to the single-process twin: loss, clip norm and every
    clipped gradient must match at each step. Returns the parallel model, optimizer and runtime."""
    mode = cfg.mode
    rt = setup_runtime(cfg)
    W, r = rt.world_size, rt.rank
    tokens = batch(W)
    ref = tiny_model()
    model = apply_parallel(copy.deepcopy(ref), cfg, rt)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, steps + 1):
        ref_opt.zero_grad(set_to_none=True)
        ref_losses = [lm_loss(ref, tokens[s * ROWS : (s + 1) * ROWS]) for s in range(W)]
        (sum(ref_losses) / W).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens[r * ROWS : (r + 1) * ROWS])
        loss.backward()
        rt.before_optimizer_step(model)
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        norm = rt.clip_grad_norm_(model, 1.0)
        torch.testing.assert_close(loss, ref_losses[r], **TOL, msg=lambda m: f"{mode} step {step} loss: {m}")
        torch.testing.assert_close(norm, ref_norm, **TOL, msg=lambda m: f"{mode} step {step} norm: {m}")
        for name, p in model.named_parameters():  # grads after clipping (both clipped at 1.0)
            torch.testing.assert_close(full(p.grad), expected(model, name, ref_grads[name]), **TOL, msg=lambda m: f"{mode} {name}: {m}")
        ref_opt.step()
        opt.step()
        rt.after_optimizer_step(model, opt, step)
    return model, opt, rt


def test_ddp_fsdp_ep_fssdp_match_single_process_transformer() -> None:
    """Loss, clip norm and every (clipped) gradient for two steps, in four layouts on 2 ranks."""
    run_distributed(_modes_worker, 2)


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, rt=None) -> None:
    opt.zero_grad(set_to_none=True)
    lm_loss(model, tokens).backward()
    if rt is not None:
        rt.before_optimizer_step(model)
    opt.step()


def _save_ep_load_fssdp_worker(directory: str) -> None:
    cfg = ParallelConfig(mode="ep", timeout_s=60)
    rt = setup_runtime(cfg)
    W, r = rt.world_size, rt.rank
    tokens = batch(W)
    ref = tiny_model()
    model = apply_parallel(copy.deepcopy(ref), cfg, rt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _one_step(model, opt, tokens[r * ROWS : (r + 1) * ROWS], rt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(checkpoint_state(model, opt, rt), checkpoint_id=directory)
    if r == 0:  # the single-process twin of that step, for the loaders to compare with
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        _one_step(ref, ref_opt, tokens)
        torch.save({"model": ref.state_dict(), "exp_avg": {n: ref_opt.state[p]["exp_avg"] for n, p in ref.named_parameters()}}, Path(directory) / "ref.pt")
    rt.barrier()
    # Load the EP checkpoint into FSSDP on the same ranks (a relabelling of the expert rows).
    model, opt = load_into_fresh_model(ParallelConfig(mode="fssdp", timeout_s=60), directory)
    check_against_reference(model, opt, Path(directory) / "ref.pt")


def load_into_fresh_model(cfg: ParallelConfig, directory: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A differently seeded tiny model and AdamW under ``cfg``, loaded from the DCP checkpoint at ``directory``."""
    rt = setup_runtime(cfg)
    model = apply_parallel(tiny_model(seed=5), cfg, rt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state, _ = split_state(checkpoint_state(model, opt, rt))  # tensors only, as the trainer loads them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=directory)
    load_checkpoint_state(model, opt, state, rt)
    return model, opt


def check_against_reference(model: torch.nn.Module, opt: torch.optim.Optimizer, ref_file: Path) -> None:
    saved = torch.load(ref_file, weights_only=False)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected(model, name, saved["model"][name]), **TOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(opt.state[p]["exp_avg"], expected(model, name, saved["exp_avg"][name]), **TOL, msg=lambda m: f"{name} exp_avg: {m}")


def test_checkpoint_from_two_rank_ep_loads_into_fssdp_and_one_process(tmp_path: Path) -> None:
    directory = str(tmp_path / "ckpt")
    run_distributed(_save_ep_load_fssdp_worker, 2, directory)
    model = tiny_model(seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = checkpoint_state(model, opt)
    assert "blocks.0.ffn.experts.w_gate_EDF.3" in state["model"] and "blocks.0.ffn.experts.w_gate_EDF" not in state["model"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=directory)
    load_checkpoint_state(model, opt, state)
    check_against_reference(model, opt, tmp_path / "ckpt" / "ref.pt")


def _spawn_worker() -> None:
    from moe.dtensor_io import copy_full_
    from moe.routers.evolve import EvolveConfig, spawn_experts

    evolve = EvolveConfig(enabled=True, mask_ratio=0.5, seed=3)
    for mode in ("fsdp", "ep", "fssdp"):
        cfg = ParallelConfig(mode=mode, timeout_s=60)
        rt = setup_runtime(cfg)
        ref = tiny_model(num_experts=4)
        model = apply_parallel(copy.deepcopy(ref), cfg, rt)
        for twin in (ref, model):
            for m in twin.modules():
                if isinstance(m, Experts):
                    spawn_experts(m, evolve)
        for name, p in model.named_parameters():
            want = expected(model, name, dict(ref.named_parameters())[name].detach())
            assert torch.equal(full(p.detach()), want), f"{mode} {name}: spawned rows differ from one process"
        base = [m for m in ref.modules() if isinstance(m, Experts)][0].w_gate_EDF[0]
        assert not torch.equal(base, [m for m in ref.modules() if isinstance(m, Experts)][0].w_gate_EDF[1])  # masks differ
        # A gate rewritten whole (DTS's reset at the spawn) lands in FSDP2 shards too.
        gate = model.blocks[0].ffn.router.gate.weight
        value = torch.randn(gate.shape, generator=torch.Generator().manual_seed(4))
        copy_full_(gate, value)
        assert torch.equal(full(gate.detach()), value), mode


def test_evomoe_spawn_matches_single_process_in_sharded_modes() -> None:
    """EvoMoE's spawn reads expert 0 from its owner and writes each rank's rows: fsdp (DTensor
    shards), ep (E/2 experts per rank) and fssdp (owner-only rows) equal the one-process spawn bit for bit."""
    run_distributed(_spawn_worker, 2)


def _hybrid_fssdp_worker(directory: str) -> None:
    # 4 ranks, FSSDP inside groups of 2 (ranks 0-1 and 2-3), the groups replicas of each other;
    # re-ownership every 2 steps and hot experts materialised on both ranks of a group.
    fssdp = dict(shard_size=2, overlap_degree=1, memory_cap=1, reshard_every=2, window=2, debug_plan_hash=True)
    cfg = ParallelConfig(mode="fssdp", fssdp=fssdp, timeout_s=60)
    model, opt, rt = train_against_reference(cfg, steps=3)
    assert rt.fssdp.world == 2 and rt.expert_replicas == 2
    twin = {0: 2, 1: 3, 2: 0, 3: 1}[rt.rank]
    ids: list[object] = [None] * rt.world_size
    torch.distributed.all_gather_object(ids, [lay.experts.expert_ids for lay in rt.fssdp.layers])
    assert ids[rt.rank] == ids[twin], "replicas must own the same experts"
    assert sorted(sum((ids[0][0], ids[1][0]), [])) == [0, 1, 2, 3], "each group owns every expert once"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(checkpoint_state(model, opt, rt), checkpoint_id=directory)
    # The replicated owners' checkpoint loads into plain FSSDP over all 4 ranks (a relabelling).
    plain, _ = load_into_fresh_model(ParallelConfig(mode="fssdp", timeout_s=60), directory)
    tokens = batch(4)[:ROWS]
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens[:, :-1])[0], model(tokens[:, :-1])[0], **TOL)


def test_hybrid_fssdp_groups_match_single_process_and_checkpoint(tmp_path: Path) -> None:
    """parallel.fssdp.shard_size=2 on 4 ranks: loss, norm and every gradient equal the single
    process for 3 steps (with a re-ownership); replicas own the same experts; the checkpoint loads
    into 4-rank FSSDP without groups and gives the same logits."""
    run_distributed(_hybrid_fssdp_worker, 4, str(tmp_path / "ckpt"))
