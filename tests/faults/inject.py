"""``python -m tests.faults.inject <hydra overrides>``: ``python -m launch.train`` with one injected fault.

The fault comes from the environment variable ``MOEFORGE_FAULT`` (JSON), one of:

- ``{"kill_save": n, "op": k}``: SIGKILL at the k-th filesystem operation of the n-th checkpoint
  save of this process (``fs_ops.FsOps``; a write is torn in half first);
  ``{"kill_save": n, "fraction": f}``: at operation ``round(f * ops of the first save)`` instead;
  ``{"kill_save": n, "at": text, "nth": k}``: at the k-th operation of that save whose name
  contains ``text`` (``"-> step_"``: the publishing rename; ``".del-"``: the pruning);
- ``{"nan_step": k}``: the logits of training step k (1-based) are NaN;
- ``{"signal_step": k, "signal": "SIGTERM"}``: the process sends itself that signal in the middle of
  step k's forward pass;
- ``{"kill_step": k, "rank": r}``: rank r SIGKILLs itself in step k's forward pass, on torchrun's
  first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), so a restarted worker group goes through;
  ``{"stop_step": k, "rank": r}``: the same with SIGSTOP (a frozen rank);
- ``{"collapse_router": true}``: every top-k router's logits favour experts 0, 1, ... by a wide
  margin (a collapsed router: every token on the same k experts);
- ``{"spike_step": k, "factor": f}``: the loss the spike guard sees for step k (1-based) is f times
  the real one (default 10), the first time step k is trained only (a rollback then trains on).

The trainer itself has no fault hooks: this module patches ``CheckpointWriter`` and
``MoETransformer.forward`` from outside, then runs ``launch.train`` as ``__main__``.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
from typing import Any

import torch

from launch.checkpoint import CheckpointWriter
from launch.spike_guard import SpikeGuard
from moe.model import MoETransformer
from tests.faults.fs_ops import FsOps


def _patch_saves(spec: dict[str, Any]) -> None:
    ops = FsOps()
    ops.install()
    target_save = int(spec["kill_save"])
    state = {"saves": 0, "first_ops": None}
    save, finish = CheckpointWriter.save, CheckpointWriter.finish

    def armed_save(self: CheckpointWriter, step: int, st: dict[str, Any]) -> Any:
        state["saves"] += 1
        if state["saves"] == target_save and "at" in spec:
            ops.kill_match = (str(spec["at"]), int(spec.get("nth", 1)))
        elif state["saves"] == target_save:
            k = spec.get("op") or max(1, round(float(spec["fraction"]) * (state["first_ops"] or 1)))
            ops.kill_at = ops.count + int(k)
        before = ops.count
        with ops.armed():
            out = save(self, step, st)
        if state["first_ops"] is None:
            state["first_ops"] = ops.count - before
        return out

    def armed_finish(self: CheckpointWriter) -> Any:
        with ops.armed():
            return finish(self)

    CheckpointWriter.save, CheckpointWriter.finish = armed_save, armed_finish  # type: ignore[method-assign]


def _patch_forward(spec: dict[str, Any]) -> None:
    forward = MoETransformer.forward
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def faulty(self: MoETransformer, tokens_BS: torch.Tensor, step: int = 0, doc_ids_BS: torch.Tensor | None = None, **kw: Any) -> Any:
        out, aux = forward(self, tokens_BS, step=step, doc_ids_BS=doc_ids_BS, **kw)  # logits, or the loss with targets_BS
        if self.training:
            if spec.get("nan_step") == step + 1:
                out = out * float("nan")
            if spec.get("signal_step") == step + 1:
                os.kill(os.getpid(), getattr(signal, spec.get("signal", "SIGTERM")))
            this_rank = first_attempt and int(os.environ.get("RANK", "0")) == spec.get("rank", 0)
            if spec.get("kill_step") == step + 1 and this_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            if spec.get("stop_step") == step + 1 and this_rank:
                os.kill(os.getpid(), signal.SIGSTOP)
        return out, aux

    MoETransformer.forward = faulty  # type: ignore[method-assign]


def _patch_router() -> None:
    from moe.routers.topk import TopKRouter

    logits = TopKRouter.logits

    def collapsed(self: TopKRouter, x_TD: torch.Tensor) -> torch.Tensor:
        h_TE = logits(self, x_TD)
        return h_TE + torch.linspace(50.0, 0.0, h_TE.shape[-1], device=h_TE.device)

    TopKRouter.logits = collapsed  # type: ignore[method-assign]


def _patch_spike(spec: dict[str, Any]) -> None:
    record = SpikeGuard.record
    fired = []

    def spiky(self: SpikeGuard, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if step == spec["spike_step"] and not fired:
            fired.append(step)
            loss = loss * float(spec.get("factor", 10.0))
        record(self, step, loss, grad_norm)

    SpikeGuard.record = spiky  # type: ignore[method-assign]


def main() -> None:
    spec = json.loads(os.environ.get("MOEFORGE_FAULT", "{}"))
    if "kill_save" in spec:
        _patch_saves(spec)
    if {"nan_step", "signal_step", "kill_step", "stop_step"} & spec.keys():
        _patch_forward(spec)
    if spec.get("collapse_router"):
        _patch_router()
    if "spike_step" in spec:
        _patch_spike(spec)
    runpy.run_module("launch.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
