"""Where a training step's device time goes, measured: ``train.profile_steps=[first, last]``.

The training loop runs ``torch.profiler`` over optimizer steps ``first`` to ``last`` (inclusive,
numbered as the logs number them, from 1) and writes, per rank, into ``<run dir>/profile/``:

- ``rank<r>.md``: device time per step by class, and the largest kernels (name, class, ms and
  calls per step). On a machine without a GPU the classes hold the operators' own CPU time.
- ``rank<r>.json``: the per-class milliseconds per step (what ``tools/gpu_session.sh`` compares with
  the prediction).
- ``rank<r>.trace.json``: the Chrome trace (open it in Perfetto or ``chrome://tracing``).

Classes (``CLASSES``): ``gemm`` (library and moeforge Triton GEMM kernels), ``attention`` (the
SDPA kernels), ``grad clip`` and ``optimizer`` (whatever runs inside the trainer's
``moeforge.grad_clip`` / ``moeforge.optimizer`` ranges), ``communication`` (NCCL/gloo collectives),
``other`` (elementwise, norms, copies, the loss, routing). ``tools.bench.step_budget`` splits its
prediction into the same classes, so a profiled run checks each rate of ``tools.bench.card_rates``
on its own (GEMM TFLOP/s, glue TB/s, the optimizer's bandwidth).

Profiling adds host work to the profiled steps: the log window that holds them reports lower
tokens/s; pick steps outside the window you read.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CLASSES = ("gemm", "attention", "grad clip", "optimizer", "communication", "other")
RANGES = {"moeforge.grad_clip": "grad clip", "moeforge.optimizer": "optimizer"}
"""``torch.profiler.record_function`` names the trainer opens, and the class of all they run."""
GEMM_KERNEL = re.compile(r"gemm|cutlass|xmma|nvjet|wgmma|_gmm|_grouped_wgrad|_swiglu_fwd_kernel|_swiglu_bwd_kernel|_plain_kernel"
                         r"|Kernel2|^aten::(mm|addmm|bmm|_grouped_mm|baddbmm)$")
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|^aten::_scaled_dot_product", re.IGNORECASE)
COMMUNICATION_KERNEL = re.compile(r"nccl|gloo|^c10d::|all_to_all|allreduce|all_reduce|reduce_scatter|all_gather|broadcast", re.IGNORECASE)


def class_of(kernel: str, ranges: list[str]) -> str:
    """The class of a kernel (or, without a GPU, a leaf operator) named ``kernel`` that ran inside the
    ``record_function`` ranges ``ranges`` (innermost last)."""
    for name in reversed(ranges):
        if name in RANGES:
            return RANGES[name]
    if COMMUNICATION_KERNEL.search(kernel):
        return "communication"
    if ATTENTION_KERNEL.search(kernel):
        return "attention"
    if GEMM_KERNEL.search(kernel):
        return "gemm"
    return "other"


@dataclass
class KernelTimes:
    """Summed time (us) and calls per kernel name, each with its class, over ``steps`` steps."""

    steps: int
    device: str
    us: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kernel: str, cls: str, us: float) -> None:
        self.us[(kernel, cls)] += us
        self.calls[(kernel, cls)] += 1

    def per_class_ms(self) -> dict[str, float]:
        """Milliseconds per step of each class (every class listed, 0 where nothing ran)."""
        out = dict.fromkeys(CLASSES, 0.0)
        for (_, cls), us in self.us.items():
            out[cls] += us / 1e3 / self.steps
        return out

    def markdown(self, title: str, top: int = 25) -> str:
        classes = self.per_class_ms()
        total = sum(classes.values())
        lines = [f"# {title}", "", f"{self.device} time per step over {self.steps} profiled steps: {total:.2f} ms", "",
                 "| class | ms per step | share |", "|---|---:|---:|"]
        lines += [f"| {c} | {ms:.3f} | {ms / total if total else 0.0:.1%} |" for c, ms in classes.items()]
        lines += ["", "| kernel | class | ms per step | calls per step |", "|---|---|---:|---:|"]
        for (name, cls), us in sorted(self.us.items(), key=lambda kv: -kv[1])[:top]:
            short = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| `{short}` | {cls} | {us / 1e3 / self.steps:.3f} | {self.calls[(name, cls)] / self.steps:g} |")
        return "\n".join(lines) + "\n"


def _ranges_of(event: Any) -> list[str]:
    names = []
    parent = event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names[::-1]


def kernel_times(events: Any, steps: int, on_gpu: bool) -> KernelTimes:
    """``KernelTimes`` of a profiler's ``events()``: each device kernel once, under the operator that
    launched it; without a GPU, each CPU operator's own time (without its children's; record_function ranges excluded)."""
    times = KernelTimes(steps, "GPU" if on_gpu else "CPU")
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or e.is_async:
            continue
        if on_gpu:
            for k in e.kernels:
                times.add(k.name, class_of(k.name, _ranges_of(e) + [e.name]), k.duration)
        elif not e.is_user_annotation and not e.name.startswith("moeforge.") and e.self_cpu_time_total > 0:
            times.add(e.name, class_of(e.name, _ranges_of(e)), e.self_cpu_time_total)
    return times


class StepProfiler:
    """Profiles optimizer steps ``first..last`` (1-based, inclusive) and writes ``out_dir/rank<r>.md``
    and ``rank<r>.trace.json`` after ``last``; does nothing for an empty window."""

    def __init__(self, window: list[int], out_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = (window[0], window[1]) if window else (0, -1)
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self._prof: Any = None

    def before(self, step: int) -> None:
        """Call before optimizer step ``step`` (1-based) runs."""
        if step == self.first and self._prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities)
            self._prof.start()

    def after(self, step: int) -> Path | None:
        """Call after optimizer step ``step`` finished; at ``last`` writes the files and returns the table's path."""
        if self._prof is None or step != self.last:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.stop()
        prof, self._prof = self._prof, None
        times = kernel_times(prof.events(), self.last - self.first + 1, self.device.type == "cuda")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        table = self.out_dir / f"rank{self.rank}.md"
        table.write_text(times.markdown(f"Steps {self.first}-{self.last}, rank {self.rank}"))
        (self.out_dir / f"rank{self.rank}.json").write_text(json.dumps(
            {"steps": [self.first, self.last], "device": times.device, "ms_per_step": times.per_class_ms()}, indent=1))
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}.trace.json"))
        return table
