"""``train.profile_steps`` (launch/profiling.py): kernels are classed as the step budget classes its
prediction, a profiled CPU run writes its tables and trace, and a bad window is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.config import TrainConfig
from launch.profiling import CLASSES, KernelTimes, class_of
from moe.errors import ConfigError
from tests.launch.test_train import SMALL, launch


@pytest.mark.parametrize(("kernel", "ranges", "expected"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", [], "gemm"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>", [], "gemm"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", ["moeforge.forward_backward"], "gemm"),
    ("_swiglu_fwd_kernel", [], "gemm"),
    ("aten::mm", [], "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", [], "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", [], "attention"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", [], "communication"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", ["ProfilerStep", "moeforge.optimizer"], "optimizer"),
    ("void at::native::lpnorm_cleanup<float>", ["moeforge.grad_clip"], "grad clip"),
    ("aten::mul", ["moeforge.grad_clip", "aten::clip_grad"], "grad clip"),
    ("_rope_kernel", [], "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<float>>", [], "other"),
])
def test_kernel_classes_by_name_and_range(kernel: str, ranges: list[str], expected: str) -> None:
    assert class_of(kernel, ranges) == expected


def test_kernel_times_per_class_and_table_by_hand() -> None:
    t = KernelTimes(steps=2, device="GPU")
    t.add("gemm_a", "gemm", 3000.0)
    t.add("gemm_a", "gemm", 1000.0)
    t.add("adam", "optimizer", 2000.0)
    t.add("mul", "other", 500.0)
    ms = t.per_class_ms()
    assert list(ms) == list(CLASSES)
    assert ms == {"gemm": 2.0, "attention": 0.0, "grad clip": 0.0, "optimizer": 1.0, "communication": 0.0, "other": 0.25}
    lines = t.markdown("x").splitlines()
    assert "GPU time per step over 2 profiled steps: 3.25 ms" in lines
    assert "| gemm | 2.000 | 61.5% |" in lines
    assert "| `gemm_a` | gemm | 2.000 | 1 |" in lines  # 2 calls over 2 steps


@pytest.mark.parametrize("window", [[0, 2], [3, 2], [1, 7], [2]])
def test_bad_window_is_refused_by_name(window: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"^train\.profile_steps .* must be \[\] or \[first, last\]"):
        TrainConfig(steps=6, profile_steps=window)
    assert TrainConfig(steps=6, profile_steps=[6, 6]).profile_steps == [6, 6]


@pytest.mark.slow
def test_profiled_cpu_run_writes_its_tables_and_trace(tmp_path: Path) -> None:
    out = launch(tmp_path, *SMALL, "train.steps=5", "train.log_every=5", "train.eval_every=5", "checkpoint.enabled=false",
                 "train.profile_steps=[2,3]")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "profile" / "rank0.json").read_text())
    assert summary["steps"] == [2, 3] and summary["device"] == "CPU"
    ms = summary["ms_per_step"]
    assert set(ms) == set(CLASSES)
    for cls in ("gemm", "attention", "grad clip", "optimizer", "other"):  # each ran in every step on the CPU too
        assert ms[cls] > 0, cls
    assert ms["communication"] == 0
    table = (tmp_path / "profile" / "rank0.md").read_text()
    assert table.startswith("# Steps 2-3, rank 0") and "| `aten::mm` | gemm |" in table
    names = {e.get("name") for e in json.loads((tmp_path / "profile" / "rank0.trace.json").read_text())["traceEvents"]}
    assert {"moeforge.optimizer", "moeforge.grad_clip"} <= names
