"""Gradient accumulation under every parallel mode equals the single-process model on the whole batch.

Each rank runs its rows as two micro-batches, the earlier backward inside
``Runtime.grad_sync(enabled=False)`` (no bucket starts, FSDP2 keeps unsharded gradients), each
micro-batch loss divided by 2. The reference is one process on the whole global batch with the
mean of the same per-micro-batch losses.
"""

from __future__ import annotations

import copy

import torch
from dist_harness import run_distributed
from test_parallel_ep import TOL
from test_parallel_fssdp import lm_loss, tiny_model
from test_parallel_modes import expected, full

from parallel import ParallelConfig, apply_parallel, setup_runtime

ROWS, MICRO = 4, 2


def accumulate_against_reference(cfg: ParallelConfig) -> None:
    rt = setup_runtime(cfg)
    W, r = rt.world_size, rt.rank
    tokens = torch.randint(0, 32, (W * ROWS, 9), generator=torch.Generator().manual_seed(5))
    ref = tiny_model()
    model = apply_parallel(copy.deepcopy(ref), cfg, rt)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    per = ROWS // MICRO
    for step in range(2):
        ref_opt.zero_grad(set_to_none=True)
        chunks = tokens.split(per)
        (sum(lm_loss(ref, c) for c in chunks) / len(chunks)).backward()
        opt.zero_grad(set_to_none=True)
        mine = tokens[r * ROWS : (r + 1) * ROWS].split(per)
        for j, micro in enumerate(mine):
            with rt.grad_sync(model, enabled=j == MICRO - 1):
                (lm_loss(model, micro) / MICRO).backward()
        rt.before_optimizer_step(model)
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        for name, p in model.named_parameters():
            torch.testing.assert_close(full(p.grad), expected(model, name, ref_grads[name]), **TOL,
                                       msg=lambda m: f"{cfg.mode} step {step} {name}: {m}")
        ref_opt.step()
        opt.step()
        rt.after_optimizer_step(model, opt, step)


def _accum_worker() -> None:
    for mode, dense in (("ddp", "ddp"), ("fsdp", "ddp"), ("ep", "fsdp"), ("fssdp", "ddp")):
        accumulate_against_reference(ParallelConfig(mode=mode, dense=dense, timeout_s=60))


def test_grad_accumulation_matches_single_process_in_every_mode() -> None:
    run_distributed(_accum_worker, 2)
