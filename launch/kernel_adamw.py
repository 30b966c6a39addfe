"""AdamW through moeforge's own kernel, with its moments stored in a chosen dtype (``optim.moments_dtype=bf16``).

``torch.optim.AdamW`` keeps both moments in the parameter's dtype (fp32): per parameter and step a
fused AdamW reads 16 bytes (parameter, gradient, two moments) and writes 12. DeepSeek-V3 (DeepSeek-AI
2024, arXiv 2412.19437, sec. 3.3.3, "Low-Precision Optimizer States") tracks the first and second
moments in BF16 "without incurring observable performance degradation", keeping fp32 master weights
and gradients. ``KernelAdamW`` does that: one ``moeforge::adamw_`` launch per param group
(``kernels.adamw``: fp32 math, moments stored rounded to nearest even), 12 bytes read and 8 written
per parameter, and 8 bytes of state instead of 16.

It keeps every promise of the fused path (``launch.masked_update``): it takes ``found_inf`` (a device
flag: a non-finite step updates no weight, no moment and no step count, and the host never reads it)
and ``grad_scale`` (gradient clipping folded into the update), set as attributes around ``step()``
exactly as ``torch.amp.GradScaler`` hands them to torch's fused AdamW. Param groups carry the same
keys as ``torch.optim.AdamW``'s (``lr``, ``betas``, ``eps``, ``weight_decay``), so the schedule and
``launch.optim.apply_config`` work unchanged; state is ``step`` (a 0-dim fp32 tensor on the
parameter's device), ``exp_avg``, ``exp_avg_sq`` (shaped like the parameter: a DTensor under FSDP2,
so DCP reshards it; the kernel runs on each rank's local shard), created eagerly as
``launch.optim.init_adamw_state`` does for torch's AdamW.

``masters`` (``optim.master_weights``): parameters the model then holds in bf16, their fp32 values kept here as
masters (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.1). Their gradients arrive in bf16, and one
``moeforge::adamw_master_`` launch per group updates the masters and moments and writes the bf16 parameters in the same
pass. The masters live in ``self.masters``, not in ``state``: checkpoints store them once, as the model's own
weights (``parallel.checkpoint``), and ``params_from_masters`` re-derives the bf16 parameters after a load.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from kernels import ops
from parallel.dense import local_tensor


class KernelAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with moments in ``moments_dtype``, one kernel per param group."""

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
                 moments_dtype: torch.dtype = torch.bfloat16, masters: Iterable[Tensor] = ()) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moments_dtype = moments_dtype
        self.init_state()
        self.masters: dict[Tensor, Tensor] = {}
        """bf16 parameter -> its fp32 master (the parameter's former storage: narrowing allocates only the bf16 copy)."""
        self.narrow(masters)

    @torch.no_grad()
    def narrow(self, params: Iterable[Tensor]) -> None:
        """Keep each fp32 parameter's values as its master and make the parameter itself their bf16 rounding
        (round to nearest even); each must be one of this optimizer's plain (not DTensor) fp32 parameters."""
        mine = {p for group in self.param_groups for p in group["params"]}
        for p in params:
            if p not in mine or p.dtype != torch.float32 or type(p) is not torch.nn.Parameter:
                raise ValueError(f"KernelAdamW: a master needs one of its own plain fp32 parameters (got {type(p).__name__} {p.dtype})")
            master = p.detach()
            p.data = master.to(torch.bfloat16)
            self.masters[p] = master

    @torch.no_grad()
    def params_from_masters(self) -> None:
        """Each bf16 parameter set to its master rounded to nearest even (after the masters were loaded)."""
        for p, master in self.masters.items():
            p.copy_(master)

    @torch.no_grad()
    def init_state(self) -> None:
        """Every parameter's state now (step 0, zero moments), so a checkpoint's keys never depend on which
        parameters have had a gradient yet (``launch.optim.init_adamw_state``'s reason)."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=local_tensor(p).device),
                        "exp_avg": torch.zeros_like(p, dtype=self.moments_dtype, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, dtype=self.moments_dtype, memory_format=torch.preserve_format),
                    }

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every parameter with a gradient; skipped entirely on the device where ``self.found_inf``
        (a 0-dim tensor, when set) is nonzero; gradients divided by ``self.grad_scale`` (when set)."""
        if closure is not None:
            raise ValueError("KernelAdamW.step takes no closure")
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        # The count advances only where the step is taken (torch's fused AdamW adds 1, then takes back found_inf).
        advance: float | Tensor = 1.0 if found_inf is None else 1.0 - found_inf.float()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            steps = [self.state[p]["step"] for p in params]
            # A tensor ``advance`` goes in as a list: ``_foreach_add_(steps, tensor)`` would read it on the host.
            torch._foreach_add_(steps, [advance] * len(steps) if isinstance(advance, Tensor) else advance)
            beta1, beta2 = group["betas"]
            hyper = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), grad_scale, found_inf)
            plain = [p for p in params if p not in self.masters]
            if plain:
                states = [self.state[p] for p in plain]
                ops.adamw_([local_tensor(p.detach()) for p in plain], [local_tensor(p.grad) for p in plain],
                           [local_tensor(st["exp_avg"]) for st in states], [local_tensor(st["exp_avg_sq"]) for st in states],
                           [st["step"] for st in states], *hyper)
            narrowed = [p for p in params if p in self.masters]
            if narrowed:
                states = [self.state[p] for p in narrowed]
                ops.adamw_master_([self.masters[p] for p in narrowed], [p.detach() for p in narrowed], [p.grad for p in narrowed],
                                  [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [st["step"] for st in states], *hyper)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` casts state to the parameter's dtype; the moments go back to ``moments_dtype``,
        from the saved tensors themselves for bf16 parameters with masters (a cast through bf16 would round fp32 moments).
        The masters are not in this dict (``parallel.checkpoint`` saves them as the model's weights)."""
        super().load_state_dict(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], saved["params"]):
                st, src = self.state.get(p), state_dict["state"].get(index, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if st is not None and key in st:
                        value = src[key] if p in self.masters and key in src else st[key]
                        st[key] = value.to(device=st[key].device, dtype=self.moments_dtype)
