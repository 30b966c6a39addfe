"""Compile every kernel ahead of time for a CUDA architecture, without a GPU.

Usage: ``python -m kernels.compile_check [--arch 90] [--dtype bf16]``

Triton lowers a kernel to PTX and a cubin with the ``ptxas`` it ships, so a machine with no
GPU can still prove that the kernels compile (the interpreter used by the CPU tests does not
compile anything). Each kernel is built with its real constexpr combinations and the default
``BlockSizes``; the run fails on the first kernel that does not compile. Run it in a process
where ``TRITON_INTERPRET`` is unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import combine, gather_gmm, gmm_scatter, grouped_wgrad, route_meta
from kernels.layout import BlockSizes

_I32_PTRS = {"offsets_ptr", "tile_expert_ptr", "tile_row_start_ptr", "base_ptr", "totals_ptr", "sorted_ptr"}
_F32_PTRS = {"weight_ptr", "scale_ptr", "dw_ptr"}
_I64_PTRS = {"slot_ptr", "ids_ptr"}


def _signature(fn: object, constexprs: dict[str, object], dtype: str, overrides: dict[str, str]) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:  # type: ignore[attr-defined]
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in overrides:
            sig[name] = overrides[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in _I32_PTRS else "*fp32" if name in _F32_PTRS else "*i64" if name in _I64_PTRS else f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def kernel_variants(dtype: str, blocks: BlockSizes) -> list[tuple[str, object, dict[str, object], dict[str, str]]]:
    """(label, kernel, constexprs, pointer-type overrides) for every combination the launchers use."""
    gemm = dict(BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, PRECISION=blocks.precision)
    wgrad = dict(BLOCK_M=blocks.block_n, BLOCK_N=blocks.block_n, BLOCK_R=blocks.block_r, PRECISION=blocks.precision)
    i32 = {"counts_ptr": "*i32"}
    out: list[tuple[str, object, dict[str, object], dict[str, str]]] = [
        ("block_counts", route_meta._block_counts_kernel, dict(BLOCK=128, E_PAD=32), i32),
        ("block_scan", route_meta._block_scan_kernel, dict(CHUNK=128, E_PAD=32), i32),
        ("scatter_positions", route_meta._scatter_positions_kernel, dict(BLOCK=128, E_PAD=32), {}),
        ("tile_schedule", route_meta._tile_schedule_kernel, dict(BLOCK_M=blocks.block_m, BLOCK_T=64, E_PAD=128), {"counts_ptr": "*i64"}),
        ("combine", combine._combine_kernel, dict(BLOCK_D=1024), {}),
        ("swiglu_bwd", gather_gmm._swiglu_bwd_kernel, gemm, {}),
    ]
    for store_h, store_pre in ((True, False), (True, True), (False, True)):
        out.append((f"swiglu_fwd[h={store_h},pre={store_pre}]", gather_gmm._swiglu_fwd_kernel, dict(STORE_H=store_h, STORE_PRE=store_pre, **gemm), {}))
    for gather in (True, False):
        out.append((f"plain[gather={gather}]", gather_gmm._plain_kernel, dict(GATHER=gather, **gemm), {}))
    for second, scale in ((False, True), (True, False)):
        out.append((f"gmm_scatter[second={second},scale={scale}]", gmm_scatter._gmm_scatter_kernel, dict(HAS_SECOND=second, HAS_SCALE=scale, **gemm), {}))
    for a_g, b_g, scale in ((True, False, False), (False, True, True), (False, True, False)):
        label = f"grouped_wgrad[a_gather={a_g},b_gather={b_g},scale={scale}]"
        out.append((label, grouped_wgrad._grouped_wgrad_kernel, dict(A_GATHER=a_g, B_GATHER=b_g, HAS_SCALE=scale, **wgrad), {}))
    return out


def compile_all(arch: int = 90, dtype: str = "bf16", blocks: BlockSizes = BlockSizes()) -> dict[str, int]:
    """Compile every variant to a cubin for ``sm_{arch}``; returns label -> cubin size in bytes."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    target = GPUTarget("cuda", arch, 32)
    sizes = {}
    for label, fn, constexprs, overrides in kernel_variants(dtype, blocks):
        src = ASTSource(fn, signature=_signature(fn, constexprs, dtype, overrides), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages})
        sizes[label] = len(compiled.asm["cubin"])
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (90 = H100)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="element type of the data pointers")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sizes = compile_all(args.arch, args.dtype)
    for label, size in sizes.items():
        print(f"sm_{args.arch} {args.dtype} {label}: cubin {size} bytes")
    print(f"compiled {len(sizes)} kernels in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
