"""Model + optimizer state in a layout-independent DCP form.

Dense parameters appear under their fully-qualified names (``blocks.0.attn.qkv.weight``; a
DTensor under FSDP2, a plain tensor when replicated). Expert weights never appear stacked: each
expert's rows are saved under their *global* index, ``<experts fqn>.<param>.<e>`` (for example
``blocks.0.ffn.experts.w_gate_EDF.5``), by a rank that holds them (EP: the EP rank that owns the
block, DCP de-duplicates expert-data-parallel copies; FSSDP: the owner; FSDP2: the rank whose
shard holds row e; one process: itself). Optimizer state follows the same naming
(``state.<name>.<key>``), so changing EP size, FSSDP ownership, world size or parallel mode is a
relabelling DCP resolves by key. Research note: research/distributed.md §a ("Save each expert
under its global index") and pain point 2 (checkpoints not reshardable across EP sizes).

The dict holds *views* of the live tensors, so ``torch.distributed.checkpoint.load`` writes into
the model and optimizer in place; ``load_checkpoint_state`` then copies anything that was loaded
into a different tensor and restores the param groups' hyperparameters.

Under ``optim.master_weights`` the model holds its expert weights in bf16 and the optimizer their fp32 masters
(``launch.kernel_adamw.KernelAdamW.masters``): the expert keys are views of the masters, so a checkpoint holds the
same fp32 values, in the same keys, as one without master weights (nothing is stored twice), and a load writes
into the masters; the engine then re-derives the bf16 weights from them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from moe.experts import EXPERT_WEIGHT_NAMES, Experts


def _expert_rows(experts: Experts, t: Tensor) -> tuple[list[int], Tensor]:
    """(global expert ids of the local rows, the local rows) of a stacked expert tensor."""
    return experts.rows_of(t)


def _expert_params(model: nn.Module) -> Iterator[tuple[str, Experts, str, nn.Parameter]]:
    """(fqn of the Experts module, module, param name, param) for every stacked expert weight."""
    for fqn, mod in model.named_modules():
        if isinstance(mod, Experts):
            for name in EXPERT_WEIGHT_NAMES:
                yield fqn, mod, name, getattr(mod, name)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (a zero-lr step on zero grads) so DCP can load into them."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, runtime: object = None) -> dict[str, object]:
    """``{"model": {name: tensor}, "optim": {"state": {name: {key: tensor}}, "param_groups": [...]}}``."""
    expert_ids = {id(p) for *_, p in _expert_params(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    model_sd: dict[str, object] = {}
    expert_keys = {f"{fqn}.{name}" if fqn else name for fqn, _, name, _ in _expert_params(model)}
    for key, value in model.state_dict().items():
        if key not in expert_keys:
            model_sd[key] = value
    masters: dict[Tensor, Tensor] = getattr(optimizer, "masters", {})  # optim.master_weights: the fp32 values of bf16 weights
    for fqn, mod, name, p in _expert_params(model):
        ids, local = _expert_rows(mod, masters.get(p, p.detach()))
        base = f"{fqn}.{name}" if fqn else name
        for i, e in enumerate(ids):
            model_sd[f"{base}.{e}"] = local[i]
    _init_optimizer_state(optimizer)
    state: dict[str, object] = {}
    experts_of = {id(p): (mod, p) for _, mod, _, p in _expert_params(model)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in optimizer.state or id(p) not in names:
                continue
            st = optimizer.state[p]
            if id(p) in expert_ids:
                mod, _ = experts_of[id(p)]
                per = {k: _expert_rows(mod, v)[1] for k, v in st.items() if isinstance(v, Tensor) and v.shape == p.shape}
                ids, _ = _expert_rows(mod, p.detach())
                for i, e in enumerate(ids):
                    state[f"{names[id(p)]}.{e}"] = {k: (per[k][i] if k in per else v) for k, v in st.items()}
            else:
                state[names[id(p)]] = dict(st)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    out: dict[str, object] = {"model": model_sd, "optim": {"state": state, "param_groups": groups}}
    fssdp = getattr(runtime, "fssdp", None)
    if fssdp is not None:  # the routing-count window and owners: an FSSDP resume plans as the uninterrupted run
        out["fssdp"] = fssdp.state_dict()
    return out


def _copy_tree(dst: object, src: object) -> None:
    if isinstance(dst, dict) and isinstance(src, dict):
        for k, v in dst.items():
            if k in src:
                _copy_tree(v, src[k])
    elif isinstance(dst, Tensor) and isinstance(src, Tensor):
        if dst is not src:
            with torch.no_grad():
                dst.copy_(src)


@torch.no_grad()
def load_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, object], runtime: object = None) -> None:
    """Copy a loaded ``checkpoint_state`` dict into the model and optimizer (views are no-ops)."""
    live = checkpoint_state(model, optimizer, runtime)
    _copy_tree(live["model"], state["model"])
    optim = state["optim"]
    assert isinstance(optim, dict)
    _copy_tree(live["optim"]["state"], optim.get("state", {}))  # type: ignore[index]
    for group, saved in zip(optimizer.param_groups, optim.get("param_groups", [])):
        for k, v in saved.items():
            if k != "params":
                group[k] = v
    fssdp = getattr(runtime, "fssdp", None)
    if fssdp is not None and isinstance(state.get("fssdp"), dict):
        fssdp.load_state_dict(state["fssdp"], optimizer)
