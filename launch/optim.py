"""AdamW with linear warmup then a cosine, WSD or constant schedule, and the config's values winning over a checkpoint's.

A checkpoint restores the optimizer's moments and the schedule's position exactly. Its
hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``) are restored too, but the run's
config then takes precedence (``apply_config``): after a divergence, rerunning with a lower
``optim.lr`` must train with that lr, not with the one that diverged. When nothing changed, nothing
is touched, so a plain resume stays bit-exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from launch.config import JobConfig, OptimConfig
from launch.kernel_adamw import KernelAdamW

log = logging.getLogger("moeforge")

MOMENTS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``optim.moments_dtype`` (``launch.config.MOMENTS_DTYPES``) -> the dtype AdamW's moments are stored in."""


def build_optimizer(model: torch.nn.Module, job: JobConfig,
                    regroup: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
                    masters: list[torch.nn.Parameter] | None = None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on matrices only) with the learning-rate schedule of ``lr_factor``.

    ``optim.moments_dtype``: fp32 is ``torch.optim.AdamW`` (fused on CUDA); bf16 is
    ``launch.kernel_adamw.KernelAdamW`` (moments stored in bf16, DeepSeek-V3 sec. 3.3.3).

    ``regroup``: rewrites the two param groups (named ``decay`` and ``no_decay``, each with a
    ``decay`` flag that ``apply_config`` reads) before AdamW is built; groups it makes must keep
    their source group's keys (``engine=deepspeed parallel=ep`` moves the experts into DeepSpeed's
    MoE groups).

    ``masters`` (``optim.master_weights``): parameters ``KernelAdamW`` keeps fp32 masters of while the model
    holds them in bf16 (either moments dtype).
    """
    o, steps = job.optim, job.train.steps
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if regroup is not None:
        groups = regroup([{**groups[0], "name": "decay", "decay": True}, {**groups[1], "name": "no_decay", "decay": False}])
    moments = MOMENTS_DTYPE[o.moments_dtype]
    if masters or moments is not torch.float32:
        opt: torch.optim.Optimizer = KernelAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, moments_dtype=moments,
                                                 masters=masters or ())
    else:
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused_for({p.device for p in params}))
        init_adamw_state(opt)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, o))


def fused_for(devices: set[torch.device]) -> bool:
    """Fused AdamW (one multi-tensor kernel reading each parameter, gradient and both moments once) when
    every parameter is on CUDA; CPU keeps torch's default implementation (and its numbers). ``meta``
    parameters stand for CUDA ones (``tools.bench.step_budget`` counts the step the card would run)."""
    return bool(devices) and all(d.type in ("cuda", "meta") for d in devices)


def lr_factor(step: int, steps: int, o: OptimConfig) -> float:
    """The learning rate at optimizer step ``step`` (0-based) of ``steps``, as a fraction of ``o.lr``.

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then
    - cosine: ``m + (1 - m) (1 + cos(pi p)) / 2``, ``p`` the fraction of the post-warmup steps done
      (Loshchilov & Hutter 2017, SGDR, without restarts), ``m = min_lr_ratio``;
    - wsd: 1 until the last ``decay_fraction`` of ``steps``, then linear to ``m`` at ``steps``
      (warmup-stable-decay, Hu et al. 2024, "MiniCPM", sec. 4);
    - constant: 1.
    """
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    m = o.min_lr_ratio
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "wsd":
        decay_steps = max(1, round(o.decay_fraction * steps))
        start = max(o.warmup_steps, steps - decay_steps)
        if step < start:
            return 1.0
        return 1.0 - (1.0 - m) * min(1.0, (step - start) / max(1, steps - start))
    progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def init_adamw_state(opt: torch.optim.AdamW) -> None:
    """Create every parameter's AdamW state now (step 0, zero moments) instead of at its first grad.

    AdamW creates state lazily, so a parameter that has had no gradient yet (a gate during
    EvoMoE's base phase, an expert no token reached) would be missing from a checkpoint, and the
    checkpoint's keys would depend on routing history. State created here is exactly what AdamW
    creates on a first step (``torch.optim.AdamW._init_group``: step 0, zero ``exp_avg`` and
    ``exp_avg_sq``), and AdamW skips parameters without gradients, so training is unchanged. Fused
    AdamW keeps ``step`` on the parameter's device, as its ``_init_group`` does.
    """
    for group in opt.param_groups:
        fused = bool(group.get("fused")) or bool(group.get("capturable"))
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32, device=p.device if fused else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def apply_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, job: JobConfig) -> list[str]:
    """After loading a checkpoint, put back the config's lr, betas, eps and weight decay where they differ.

    Returns one ``optim.<key>: checkpoint -> config`` entry per changed value (empty for a plain
    resume, which is then left untouched).
    """
    o = job.optim
    changed: list[str] = []
    for i, group in enumerate(optimizer.param_groups):
        decays = group.get("decay", i == 0)  # build_optimizer: group 0 decays, or each regrouped group says
        want = {"initial_lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay if decays else 0.0}
        for key, value in want.items():
            if group.get(key) != value:
                note = f"optim.{'lr' if key == 'initial_lr' else key}: {group.get(key)} -> {value}"
                if note not in changed:
                    changed.append(note)
                group[key] = value
    if changed:
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
    return changed
