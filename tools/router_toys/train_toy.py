"""Train one router on one toy task with one seed, and measure its routing.

Shape legend: T tokens, E experts, K slots.

Per run: the task loss of every training step; at every evaluation (on a fixed held-out probe
batch, eval mode) the probe loss and each probe token's top-1 expert; per evaluation window the
routed slots per expert (the load heatmap). Summaries (definitions used by the table):

- final loss: probe loss at the last evaluation;
- steps to target: first step at which the mean training loss of the last ``window`` steps is
  <= the target (None if never);
- NMI: ``normalized_mutual_information(top-1 expert, true cluster)`` on the probe at the end;
- flip rate: share of probe tokens whose top-1 expert changed between two consecutive
  evaluations, averaged over the evaluation pairs in the last half of training;
- experts per token: used slots per token (``RoutingDecision.valid_mask()``), averaged over all
  training forwards (what the run paid for) and at the last evaluation (where routing ended).

"Top-1 expert" is the used slot with the largest combine weight (the expert that contributes
most to the token; for DeepSeek-V3's bias routing that follows the biased selection, unlike
``argmax probs_TE``). A token with no used slot (expert choice can leave one out) takes
``argmax probs_TE``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moe.routers import RouterConfig, RoutingDecision
from tools.router_toys.nmi import normalized_mutual_information
from tools.router_toys.tasks import TASKS, Batch, accuracy


@dataclass(frozen=True)
class ToySettings:
    task: str
    steps: int
    target: float
    batch_tokens: int = 256
    probe_tokens: int = 1024
    eval_every: int = 10
    lr: float = 3e-3
    num_experts: int = 8
    d_ff: int = 16
    window: int = 10
    grad_clip: float = 1.0
    task_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the task's constructor (fluctuation: noise, sub_labels, drift)."""
    task_seed: int | None = None
    """Seed of the task instance (cluster means, maps) and of the probe; None = the run's seed.
    With a fixed task seed every seed sees the same task and the same held-out probe, and the
    run's seed draws only the initialisation and the training batches, so the spread over seeds
    is the router's own, not the spread of task difficulty or of probe sampling."""


@dataclass
class RunResult:
    label: str
    seed: int
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    flips: list[float] = field(default_factory=list)
    """Flip fraction between evaluation i-1 and i, for i >= 1 (aligned with ``eval_steps[1:]``)."""
    load_fractions: list[list[float]] = field(default_factory=list)
    """Per evaluation window, the share of routed slots each expert got in training."""
    final_loss: float = math.nan
    final_accuracy: float | None = None
    steps_to_target: int | None = None
    nmi: float = math.nan
    flip_rate: float = math.nan
    experts_per_token_train: float = math.nan
    experts_per_token_final: float = math.nan
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        keys = ("final_loss", "final_accuracy", "steps_to_target", "nmi", "flip_rate",
                "experts_per_token_train", "experts_per_token_final", "wall_s")
        return {k: getattr(self, k) for k in keys}


class DecisionRecorder:
    """Keeps the last ``RoutingDecision`` of a router (a forward hook; the router is not changed)."""

    def __init__(self, router: nn.Module) -> None:
        self.last: RoutingDecision | None = None
        self.handle = router.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: RoutingDecision) -> None:
        self.last = output

    def take(self) -> RoutingDecision:
        assert self.last is not None, "router did not run"
        decision, self.last = self.last, None
        return decision


def dense_weights(decision: RoutingDecision, num_experts: int) -> Tensor:
    """``[T, E]`` combine weight of each expert (0 where unused)."""
    ids_TK, valid_TK = decision.expert_ids_TK, decision.valid_mask()
    w_TK = decision.weights_TK.detach().float() * valid_TK
    w_TE = torch.zeros(ids_TK.shape[0], num_experts, device=ids_TK.device)
    return w_TE.scatter_add_(1, ids_TK.clamp(0, num_experts - 1), w_TK)


def top1_experts(decision: RoutingDecision, num_experts: int) -> Tensor:
    """Top-1 expert per token (module docstring): largest used weight, else ``argmax probs_TE``."""
    valid_TK = decision.valid_mask()
    w_TE = dense_weights(decision, num_experts)
    # Rank used experts above unused ones even where a used weight is 0; scatter_add so a masked
    # slot that repeats a used slot's id (ids are arbitrary where masked) cannot unmark it.
    ids_TK = decision.expert_ids_TK.clamp(0, num_experts - 1)
    used_TE = torch.zeros_like(w_TE).scatter_add_(1, ids_TK, valid_TK.float()) > 0
    score_TE = torch.where(used_TE, w_TE, torch.full_like(w_TE, -1.0))
    top_T = score_TE.argmax(dim=-1)
    return torch.where(valid_TK.any(dim=1), top_T, decision.probs_TE.argmax(dim=-1))


def expert_loads(decision: RoutingDecision, num_experts: int) -> Tensor:
    """Routed slots per expert ``[E]`` (valid slots only)."""
    ids = decision.expert_ids_TK[decision.valid_mask()]
    return torch.bincount(ids.reshape(-1), minlength=num_experts)[:num_experts].double()


def steps_to_target(losses: list[float], target: float, window: int) -> int | None:
    """First step count n with ``mean(losses[n-window:n]) <= target`` (n >= window); None if never."""
    arr = np.asarray(losses, dtype=np.float64)
    if arr.size < window:
        return None
    means = np.convolve(arr, np.ones(window) / window, mode="valid")
    hit = np.nonzero(means <= target)[0]
    return int(hit[0] + window) if hit.size else None


def late_flip_rate(eval_steps: list[int], flips: list[float], steps: int) -> float:
    """Mean flip fraction over evaluation pairs whose later evaluation is past ``steps / 2``."""
    late = [f for s, f in zip(eval_steps[1:], flips) if s > steps / 2]
    return float(np.mean(late)) if late else math.nan


@torch.no_grad()
def evaluate(
    model: nn.Module, recorder: DecisionRecorder, probe: Batch, step: int, num_experts: int
) -> tuple[float, Tensor, float, float | None]:
    """(probe loss, top-1 experts ``[T]``, experts per token, accuracy) in eval mode."""
    model.eval()
    out, loss, _ = model(probe, step)
    decision = recorder.take()
    model.train()
    per_token = float(decision.valid_mask().sum(dim=1).double().mean())
    return float(loss), top1_experts(decision, num_experts), per_token, accuracy(out, probe)


def train_one(label: str, router_cfg: RouterConfig, seed: int, settings: ToySettings) -> RunResult:
    """Train ``router_cfg`` on ``settings.task`` with ``seed`` (data and init); see module docstring."""
    t0 = time.perf_counter()
    task = TASKS[settings.task](seed if settings.task_seed is None else settings.task_seed, **settings.task_options)
    if settings.task_seed is not None:
        task.generator = torch.Generator().manual_seed(20_000 + seed)  # training batches from the run's seed
    probe_seed = 10_000 + (seed if settings.task_seed is None else settings.task_seed)
    probe = task.sample(settings.probe_tokens, torch.Generator().manual_seed(probe_seed))
    torch.manual_seed(seed)
    model = task.build_model(router_cfg, settings.num_experts, settings.d_ff)
    recorder = DecisionRecorder(model.moe.router)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    E = settings.num_experts
    result = RunResult(label=label, seed=seed)
    loads_E = torch.zeros(E, dtype=torch.float64)
    slots, tokens = 0.0, 0
    previous_top1: Tensor | None = None
    for step in range(settings.steps):
        batch = task.sample(settings.batch_tokens)
        _, loss, aux = model(batch, step)
        decision = recorder.take()
        total = loss + sum(aux.values(), torch.zeros(()))
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss {float(total)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        model.moe.after_step(step)
        result.losses.append(float(loss.detach()))
        valid_TK = decision.valid_mask()
        slots, tokens = slots + float(valid_TK.sum()), tokens + valid_TK.shape[0]
        loads_E += expert_loads(decision, E)
        done = step + 1
        if done % settings.eval_every == 0 or done == settings.steps:
            probe = task.refresh(probe)  # the same tokens at the current cluster means (drift)
            eval_loss, top1_T, per_token, acc = evaluate(model, recorder, probe, step, E)
            result.eval_steps.append(done)
            result.eval_losses.append(eval_loss)
            if previous_top1 is not None:
                result.flips.append(float((top1_T != previous_top1).double().mean()))
            previous_top1 = top1_T
            result.load_fractions.append((loads_E / loads_E.sum().clamp_min(1.0)).tolist())
            loads_E.zero_()
            result.final_loss, result.final_accuracy, result.experts_per_token_final = eval_loss, acc, per_token
    recorder.handle.remove()
    assert previous_top1 is not None
    result.nmi = normalized_mutual_information(previous_top1.numpy(), probe.cluster.numpy())
    result.flip_rate = late_flip_rate(result.eval_steps, result.flips, settings.steps)
    result.steps_to_target = steps_to_target(result.losses, settings.target, min(settings.window, settings.steps))
    result.experts_per_token_train = slots / max(tokens, 1)
    result.wall_s = time.perf_counter() - t0
    return result
