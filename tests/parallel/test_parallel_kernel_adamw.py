"""``optim.moments_dtype=bf16`` (``KernelAdamW``) in every parallel mode equals one process, skips a non-finite step
everywhere, and survives FSSDP's re-ownership with its moments still bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_harness import run_distributed
from test_parallel_modes import ROWS, batch, expected, full
from test_parallel_fssdp import lm_loss, tiny_model

from launch.kernel_adamw import KernelAdamW
from launch.masked_update import clip_scale, masked_step
from parallel import ParallelConfig, apply_parallel, setup_runtime
from parallel.dense import local_tensor


def _opt(model: torch.nn.Module) -> KernelAdamW:
    return KernelAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _modes_worker() -> None:
    for mode, dense in (("ddp", "ddp"), ("fsdp", "ddp"), ("ep", "fsdp"), ("fssdp", "fsdp")):
        _against_reference(ParallelConfig(mode=mode, dense=dense, timeout_s=60))


def _against_reference(cfg: ParallelConfig) -> None:
    """Three steps as the native engine takes them (norm, clipping folded into the kernel, ``masked_step``),
    the second one non-finite on one rank only: every rank skips it, as the single process does."""
    rt = setup_runtime(cfg)
    W, r = rt.world_size, rt.rank
    tokens = batch(W)
    ref = tiny_model()
    model = apply_parallel(copy.deepcopy(ref), cfg, rt)
    ref_opt, opt = _opt(ref), _opt(model)
    for step in range(1, 4):
        ref_opt.zero_grad(set_to_none=True)
        (sum(lm_loss(ref, tokens[s * ROWS : (s + 1) * ROWS]) for s in range(W)) / W).backward()
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        opt.zero_grad(set_to_none=True)
        lm_loss(model, tokens[r * ROWS : (r + 1) * ROWS]).backward()
        rt.before_optimizer_step(model)
        norm = rt.total_grad_norm(model)
        bad = torch.tensor([float(step == 2 and r == W - 1)])
        rt.all_reduce_max_([bad])  # the step guard's verdict, agreed over ranks
        ok = bad[0] == 0
        if step == 2:
            before = [full(p.detach()).clone() for p in model.parameters()]
            moments = [local_tensor(v).clone() for st in opt.state.values() for v in st.values()]
            if r == W - 1:
                next(model.parameters()).grad.fill_(float("nan"))
        masked_step(ref_opt, torch.tensor(step != 2), clip_scale(ref_norm, 1.0))
        masked_step(opt, ok, clip_scale(norm, 1.0))
        rt.after_optimizer_step(model, opt, step)
        if step == 2:
            assert all(torch.equal(full(p.detach()), b) for p, b in zip(model.parameters(), before)), cfg.mode
            assert all(torch.equal(local_tensor(v), b) for v, b in zip((v for st in opt.state.values() for v in st.values()), moments)), cfg.mode
    # A moment whose fp32 value differs in its last bits (another reduction order) may round to the neighbouring
    # bf16 value: that step's update moves by up to 2^-8 of lr (1e-2), 4e-5 per step.
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        st, ref_st = opt.state[p], ref_opt.state[ref_params[name]]
        assert st["exp_avg"].dtype == torch.bfloat16 and float(st["step"]) == 2.0, (cfg.mode, name)
        torch.testing.assert_close(full(p.detach()), expected(model, name, ref_params[name].detach()), rtol=0, atol=1e-4,
                                   msg=lambda m: f"{cfg.mode} {name}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):  # one bf16 rounding may flip on fp32 last-bit differences
            torch.testing.assert_close(full(st[key]).float(), expected(model, name, ref_st[key]).float(), rtol=2.0**-7, atol=1e-7,
                                       msg=lambda m: f"{cfg.mode} {name} {key}: {m}")


@pytest.mark.slow
def test_bf16_moments_match_single_process_and_skip_nonfinite_in_every_mode() -> None:
    run_distributed(_modes_worker, 2)
