"""tools.bench.compile_check: every kernel a layer step launches (and the step's loss, RoPE and RMSNorm kernels) compiles for sm_90 (H100), GPU or not,
and the default block sizes keep every kernel free of register spills at the reference shapes.

Shape legend: D model dim, F expert ffn dim, E experts, K top-k, T tokens.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench.compile_check import occupancy, parse_blocks

ROOT = Path(__file__).resolve().parents[3]
GEMMS = {"swiglu_fwd", "swiglu_bwd", "plain", "gmm_scatter", "grouped_wgrad"}


def _jit_kernels() -> set[str]:
    """Names of every @triton.jit kernel (functions named _*_kernel) in kernels/."""
    names = set()
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and node.name.endswith("_kernel"):
                names.add(node.name.strip("_").removesuffix("_kernel"))
    return names


def _compile(tmp_path: Path, *extra: str) -> list[dict]:
    """Run ``python -m tools.bench.compile_check`` in a clean process (compiled mode); its JSON reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out_json = tmp_path / "reports.json"
    cmd = [sys.executable, "-m", "tools.bench.compile_check", "--arch", "90", "--json", str(out_json), *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out_json.read_text())["reports"]


NORMS = {"rms_norm_fwd", "rms_norm_bwd"}
"""Row kernels that must not spill at all: the RMSNorm pair (compiled at D = 2048 and 768, 16,384 rows)."""
SMALL_SPILL = 16
"""Bytes a memory-bound counting kernel may spill: Triton 3.6 (the GPU image's) spills 4 bytes in
route_meta's scatter_positions at E=128, one register of a kernel that moves 4-byte ids."""


def _assert_lean(reports: list[dict]) -> None:
    for r in reports:
        where = f"{r['kernel']}[{r['variant']}] at {r['shape']}"
        allowed = 0 if r["kernel"] in GEMMS | NORMS else SMALL_SPILL
        assert r["spill_stores"] <= allowed and r["spill_loads"] <= allowed, f"{where} spills {r['spill_stores']} bytes"
        assert r["blocks_per_sm"] >= 1, f"{where} does not fit on an SM"
        if r["kernel"] in GEMMS:
            assert r["mma"] == "wgmma", f"{where} lowered to {r['mma']}, not Hopper wgmma"
            assert r["blocks_per_sm"] * r["num_warps"] >= 8, f"{where}: only {r['blocks_per_sm'] * r['num_warps']} resident warps per SM"


@pytest.mark.slow
def test_default_blocks_compile_without_spills_for_sm90(tmp_path):
    reports = _compile(tmp_path)
    assert {tuple(r["shape"]) for r in reports} == {(4096, 14336, 8, 2, 8192), (2048, 1024, 64, 8, 16384), (1024, 2816, 16, 2, 16384), (2048, 768, 128, 8, 32768)}
    assert {r["kernel"] for r in reports} == _jit_kernels()  # every kernel in the package was captured and compiled
    _assert_lean(reports)


@pytest.mark.slow
def test_autotune_candidates_compile_without_spills_for_sm90(tmp_path):
    """The bench only spends GPU time on configurations that compile lean (one fine-grained shape)."""
    from tools.bench.layer import AUTOTUNE_BLOCKS

    args = [a for text in AUTOTUNE_BLOCKS for a in ("--blocks", text)]
    reports = _compile(tmp_path, "--shape", "2048", "768", "128", "8", "32768", *args)
    assert len({json.dumps(r["blocks"], sort_keys=True) for r in reports}) == len(AUTOTUNE_BLOCKS)
    _assert_lean(reports)


def test_occupancy_limits():
    # 221 regs -> 28 units of 256 per warp = 7168; 8 warps need 57,344 of 65,536: one block.
    assert occupancy(221, 144 * 1024, 8) == 1
    # 128 regs x 8 warps = 32,768 registers: two blocks by registers; 96 KiB (+1 KiB) twice fits 228 KiB.
    assert occupancy(128, 96 * 1024, 8) == 2
    assert occupancy(64, 40 * 1024, 4) == 5  # shared memory binds: 228 // 41 = 5
    assert occupancy(32, 0, 1) == 32  # the per-SM block cap
    assert occupancy(255, 240 * 1024, 8) == 0  # more shared memory than an SM has


def test_parse_blocks():
    b = parse_blocks("128,64,32,4,3")
    assert (b.block_m, b.block_n, b.block_k, b.block_r, b.num_warps, b.num_stages) == (128, 64, 32, 32, 4, 3)
    assert parse_blocks("64,64,64,4,4,16").block_r == 16
    assert parse_blocks("64,64,64,4,4,16,32").bwd_block_n == 32
    with pytest.raises(argparse.ArgumentTypeError, match=r"--blocks \('64,64'\) must be bm,bn,bk"):
        parse_blocks("64,64")
    with pytest.raises(argparse.ArgumentTypeError, match=r"--blocks \('64,64,x,4,3'\)"):
        parse_blocks("64,64,x,4,3")
    with pytest.raises(argparse.ArgumentTypeError, match=r"kernels.block_m \(48\) must be a power of two"):
        parse_blocks("48,64,64,4,3")
