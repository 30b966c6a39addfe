"""Compile every Triton kernel of a training step (layer, its router's backward, dispatch indices and weight casts, loss, RoPE, RMSNorm, attention heads, AdamW) for real shapes; report GPU resources, without a GPU.

Usage::

    python -m tools.bench.compile_check                          # the four reference shapes, default blocks
    python -m tools.bench.compile_check --shape 2048 768 128 8 32768 --blocks 128,128,64,8,3 --markdown

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k, R routed rows.

The CPU tests run the kernels in Triton's interpreter, which compiles nothing. This module
proves they compile for a CUDA architecture and says what the compiled code costs, which is
what decides speed before any timing: registers per thread, register spills, shared memory,
whether the GEMMs lower to Hopper's ``wgmma``, and how many programs fit on one SM.

How: one forward+backward of the fused expert block (``kernels.triton.moe_experts``; plus
``route_meta`` and the per-op autograd entries, so every kernel is covered) runs on
``device="meta"`` tensors of the requested shape while ``JITFunction.run`` is replaced by a
recorder, so each launch's arguments, constexprs, options and grid are captured exactly as a
GPU run would issue them. Each captured launch is then compiled with the specialisation Triton
applies at launch time (integers equal to 1 become constants; integers and pointers divisible
by 16 get the divisibility attribute; Triton's own ``native_specialize_impl``), for
``GPUTarget("cuda", arch, 32)``, and the PTX is assembled by the ``ptxas`` Triton ships, with
``-v`` for the register and spill counts. Grid sizes of the data-dependent launches are upper
bounds (the schedule's ``max_tiles``), like the grids a real launch uses.

Occupancy uses the H100 (sm_90) limits: 65,536 registers, 228 KiB shared memory (1 KiB of it
reserved per block), 2,048 threads and 32 blocks per SM, 132 SMs.

Run it in a process where ``TRITON_INTERPRET`` is unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction

from kernels.layout import BlockSizes
from moe.errors import ConfigError
from tools.bench.shapes import REFERENCE_SHAPES, Shape

try:  # Triton's launch-time specialisation (C++); its location is not public API
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - depends on the Triton build
    native_specialize_impl = None

SM90 = dict(sms=132, regs=65536, smem=228 * 1024, smem_reserved=1024, threads=2048, blocks=32)
"""Per-SM limits of an H100 SXM (CUDA occupancy calculator, compute capability 9.0)."""


@dataclass(frozen=True)
class Launch:
    """One captured kernel launch: the kernel, its bound arguments, compile options and grid."""

    kernel: JITFunction
    args: dict[str, object]
    options: dict[str, object]
    grid: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__.strip("_").removesuffix("_kernel")

    @property
    def variant(self) -> str:
        """The non-block-size constexprs, e.g. ``STORE_H=True,STORE_PRE=False``."""
        flags = [f"{p.name}={self.args[p.name]}" for p in self.kernel.params if p.is_constexpr and not p.name.startswith(("BLOCK", "GROUP", "E_PAD", "PRECISION"))]
        return ",".join(flags)

    def key(self) -> tuple:
        """Identity of the compiled binary: kernel, specialised signature, constexprs, options."""
        spec = tuple(_specialise(v) if not p.is_constexpr else ("constexpr", self.args[p.name]) for p, v in zip(self.kernel.params, self.args.values()))
        return (self.kernel.fn.__qualname__, spec, tuple(sorted(self.options.items())))


@dataclass(frozen=True)
class KernelReport:
    """What one compiled launch costs on the target (registers and spills from ``ptxas -v``)."""

    kernel: str
    variant: str
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    mma: str
    blocks_per_sm: int
    waves: float

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


@functools.cache
def _cuda_backend_class() -> type:
    """Triton's CUDA backend class (built once; its specialisation rules do not depend on the arch)."""
    return type(make_backend(GPUTarget("cuda", 90, 32)))


def _specialise(value: object) -> tuple[str, str]:
    """(type, attribute) Triton gives an argument at launch: ("constexpr", 1) for the int 1, "D" for divisible by 16."""
    if native_specialize_impl is None:
        raise RuntimeError("this Triton build has no triton._C.libtriton.native_specialize_impl; cannot mirror launch specialisation")
    ty, attr = native_specialize_impl(_cuda_backend_class(), value, False, True, True)
    return ty, attr


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Replace ``JITFunction.run`` with a recorder for the duration; yields the list it fills.

    Launchers still allocate their (meta) outputs, so a whole forward+backward runs through.
    """
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> None:
        names = [p.name for p in self.params]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        bound = {n: bound[n] if n in bound else self.params[i].default for i, n in enumerate(names)}
        options = {k: v for k, v in kwargs.items() if k not in names}
        grid = tuple(grid if isinstance(grid, tuple) else (grid,))
        launches.append(Launch(self, bound, options, grid))

    JITFunction.run = record  # type: ignore[method-assign]
    try:
        yield launches
    finally:
        JITFunction.run = original  # type: ignore[method-assign]


STEP_VOCAB = 50304
"""Vocabulary of the loss kernel's captured launch (OLMoE's and GPT-NeoX's, padded to 64)."""
STEP_HEAD_DIM = 128
STEP_LAYERS = 16
"""Layers whose three expert weights the AdamW kernel's captured launch updates (OLMoE-1B-7B's 16)."""
"""Head width of the RoPE kernel's captured launch."""
STEP_ATTENTION = (("full", 16, 16, 128), ("none", 12, 12, 64), ("per_head", 16, 16, 128))
"""(qk_norm, H, G, d) of the fused attention-heads kernels' captured launches: olmoe_1b_7b's (16 heads of
128, qk_norm full), moe_125m's (12 of 64, none) and the per-head norm at olmoe's heads; 16,384 token rows."""
STEP_TOKENS = (8, 2048)
"""(B, S) of those launches: the budget's 16,384 tokens per step."""
STEP_NORM_WIDTHS = (2048, 768)
"""Widths of the RMSNorm kernels' captured launches: olmoe_1b_7b's and moe_125m's d_model."""
STEP_NORM_ROWS = 16384
"""Rows of the RMSNorm launches: the tokens of one 16,384-token step."""


def capture_norms() -> None:
    """RMSNorm forward and backward launches at each ``STEP_NORM_WIDTHS`` over ``STEP_NORM_ROWS``
    rows: a norm of the residual stream (fp32 or bf16 in, bf16 out; bf16 gradient in, dx in the
    stream's dtype), the same with a bf16 branch output added to the stream (h written; the stream's
    gradient added, and for an fp32 stream a bf16 da written) and the q/k norms' (a bf16 slice of the
    fused projection, one row stride of 3 widths; bf16 throughout)."""
    from kernels.ops import rms_norm_dw_programs
    from kernels.rms_norm import rms_norm_bwd_into, rms_norm_fwd_into, row_levels

    meta = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    R = STEP_NORM_ROWS
    for D in STEP_NORM_WIDTHS:
        w, rstd, part = meta(D, dtype=torch.float32), meta(R, dtype=torch.float32), meta(rms_norm_dw_programs(R), D, dtype=torch.float32)
        y, dy = meta(R, D), meta(R, D)
        for x in (meta(R, D, dtype=torch.float32), meta(R, D), meta(R, 3 * D)[:, :D]):
            rms_norm_fwd_into(x, row_levels(x), w, 1e-5, y, rstd)
            rms_norm_bwd_into(dy, row_levels(dy), x, row_levels(x), w, rstd, meta(R, D, dtype=x.dtype), part)
        for stream in (meta(R, D, dtype=torch.float32), meta(R, D)):  # train.fp32_residual=true, and the default bf16 stream
            rms_norm_fwd_into(stream, row_levels(stream), w, 1e-5, y, rstd, a=meta(R, D), h=torch.empty_like(stream))
            rms_norm_bwd_into(dy, row_levels(dy), stream, row_levels(stream), w, rstd, torch.empty_like(stream), part, dh=stream,
                              da=meta(R, D) if stream.dtype == torch.float32 else None)


def capture_layer_step(shape: Shape, blocks: BlockSizes, *, regenerate_preactivations: bool = False, per_op: bool = True) -> list[Launch]:
    """Launches of one fused forward+backward at ``shape`` (and, with ``per_op``, of route_meta and
    the per-op entries) and of the grouped_mm backend's glue kernels, deduplicated by compiled
    binary, in first-launch order; then the training step's loss and RoPE kernels (at the layer's T
    tokens and D width), its RMSNorm kernels (``capture_norms``, at fixed real shapes), the fused
    attention-heads kernels (at ``STEP_ATTENTION``'s shapes) and the AdamW kernel (over the expert weights of
    ``STEP_LAYERS`` layers, bf16 and fp32 moments)."""
    from kernels.triton import moe_experts
    from kernels.triton.swiglu_gmm import gather_gmm_swiglu
    from kernels.triton.gmm_scatter import gmm_scatter
    from kernels.layout import TileSchedule, max_tiles
    from kernels.triton.route_meta import route_meta
    from kernels.swiglu_act import swiglu_act_bwd_into, swiglu_act_fwd_into
    from kernels.cross_entropy import cross_entropy_rows_into
    from kernels.rope import rope_into
    from kernels.topk_gates import topk_gates_bwd_into
    from kernels.cast_many import cast_many_into
    from kernels.plan_indices import plan_indices_into
    from kernels.adamw import adamw_into
    from kernels.unpermute import unpermute_into

    if triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    D, Fd, E, K, T = shape
    R = T * K
    meta = lambda *s, dtype=torch.bfloat16, grad=False: torch.empty(*s, dtype=dtype, device="meta").requires_grad_(grad)  # noqa: E731
    x, wg, wu, wd = meta(T, D, grad=True), meta(E, D, Fd, grad=True), meta(E, D, Fd, grad=True), meta(E, Fd, D, grad=True)
    weight = meta(R, dtype=torch.float32, grad=True)
    slot, counts = meta(R, dtype=torch.int32), meta(E, dtype=torch.int32)
    with recording() as launches:
        y = moe_experts._FusedMoEExperts.apply(x, weight, wg, wu, wd, slot, counts, K, blocks, regenerate_preactivations)
        y.backward(torch.empty_like(y))
        if per_op:
            route_meta(meta(T, K, dtype=torch.int64), E, blocks.block_m)
            n_tiles = max_tiles(R, E, blocks.block_m)
            schedule = TileSchedule(meta(E + 1, dtype=torch.int32), meta(n_tiles, dtype=torch.int32), meta(n_tiles, dtype=torch.int32), blocks.block_m)
            h = gather_gmm_swiglu(x, slot, schedule, K, wg, wu, blocks=blocks)
            h.backward(torch.empty_like(h))
            y_SD = gmm_scatter(meta(R, Fd, grad=True), weight, slot, schedule, wd, R, blocks=blocks)
            y_SD.backward(torch.empty_like(y_SD))
        # The grouped_mm backend's glue kernels (its GEMMs are library calls, not Triton).
        g = meta(R, Fd)
        swiglu_act_fwd_into(g, g, weight, g)
        swiglu_act_bwd_into(g, g, g, weight, g, g, weight)
        unpermute_into(meta(R, D), meta(R, D), slot, K, None, meta(T, D))
        # The step's other Triton kernels on a GPU: the chunked loss over a chunk of T rows of a
        # 50,304-word vocabulary (bf16 gradient written, and loss only), and RoPE over 128-wide heads.
        z, y, loss = meta(T, STEP_VOCAB, dtype=torch.float32), meta(T, dtype=torch.int64), meta(T, dtype=torch.float32)
        cross_entropy_rows_into(z, y, 1.0, loss, meta(T, STEP_VOCAB))
        cross_entropy_rows_into(z, y, 1.0, loss, None)
        q, angles = meta(1, D // STEP_HEAD_DIM, T, STEP_HEAD_DIM), meta(T, STEP_HEAD_DIM // 2, dtype=torch.float32)
        rope_into(q, angles, angles, False, torch.empty_like(q))
        # The top-k router's backward at the layer's T, E and K, every gradient present (renormalised gates,
        # the balance loss, the z-loss and a gradient into the probabilities).
        p32, w32 = meta(T, E, dtype=torch.float32), meta(T, K, dtype=torch.float32)
        t32, e32, s32 = meta(T, dtype=torch.float32), meta(E, dtype=torch.float32), meta((), dtype=torch.float32)
        topk_gates_bwd_into(p32, w32, meta(T, K, dtype=torch.int64), w32, t32, p32, e32, s32, t32, s32, 0.5, 0.5, p32)
        # The experts' weight casts, fp32 masters to bf16 and their bf16 gradients back, three weights a launch.
        masters, halves = [meta(E, D, Fd, dtype=torch.float32)] * 3, [meta(E, D, Fd)] * 3
        cast_many_into(masters, halves)
        cast_many_into(halves, masters)
        # Dispatch's index bookkeeping over the layer's T*K slots (R = T*K rows kept, dropless).
        plan_indices_into(meta(R, dtype=torch.int64), meta(R, dtype=torch.float32), K, R, meta(R, dtype=torch.int32),
                          meta(R, dtype=torch.int64), meta(R, dtype=torch.float32))
        # The optimizer's kernel over a group of 3 L tensors up to one E x D x F expert weight (the pointer table of
        # ``kernels.adamw``), bf16 and fp32 moments, with the clipping divisor and the step guard's flag as the trainer passes them.
        table, scalar = meta(3 * STEP_LAYERS, 6, dtype=torch.int64), meta((), dtype=torch.float32)
        for moments in (torch.bfloat16, torch.float32):
            adamw_into(table, 3 * STEP_LAYERS, E * D * Fd, moments, 1e-3, 0.9, 0.95, 1e-8, 0.1, scalar, scalar)
        # Its master variant (``optim.master_weights``: fp32 masters, bf16 gradients, the bf16 parameters written; 7 columns).
        table7 = meta(3 * STEP_LAYERS, 7, dtype=torch.int64)
        for moments in (torch.bfloat16, torch.float32):
            adamw_into(table7, 3 * STEP_LAYERS, E * D * Fd, moments, 1e-3, 0.9, 0.95, 1e-8, 0.1, scalar, scalar, master=True)
        capture_norms()
        _capture_attention_heads(meta)
    unique: dict[tuple, Launch] = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def _capture_attention_heads(meta) -> None:  # type: ignore[no-untyped-def]
    """Launch the fused q/k-norm + RoPE + head-split kernels (``kernels.qkv_heads``) forward and backward
    at ``STEP_ATTENTION``'s shapes, the backward with [B, S, heads, d]-strided views of [B, heads, S, d] gradients."""
    from kernels.ops import qkv_dw_programs
    from kernels.qkv_heads import qkv_heads_bwd_into, qkv_heads_fwd_into

    B, S = STEP_TOKENS
    for qk_norm, H, G, d in STEP_ATTENTION:
        qkv, tables = meta(B, S, (H + 2 * G) * d), meta(S, d // 2, dtype=torch.float32)
        width = {"none": (0, 0, None), "full": (1, H * d, meta(H * d, dtype=torch.float32)), "per_head": (H, d, meta(d, dtype=torch.float32))}
        nr, ww, w = width[qk_norm]
        q, k, rstd = meta(B, S, H, d), meta(B, S, G, d), meta(B * S, 2 * nr, dtype=torch.float32)
        qkv_heads_fwd_into(qkv, w, w, tables, tables, qk_norm, 1e-5, q, k, rstd)
        dq, dkv = meta(B, H, S, d).transpose(1, 2), meta(B, G, S, d).transpose(1, 2)
        dw = meta(qkv_dw_programs(B * S), ww, dtype=torch.float32)
        qkv_heads_bwd_into(dq, dkv, dkv, None if qk_norm == "none" else qkv, rstd, w, w, tables, tables, qk_norm, meta(B, S, (H + 2 * G) * d), dw, dw)


def _ptxas_log(ptx: str, arch: int) -> str:
    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(src.with_suffix(".o"))], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed on the PTX Triton produced:\n{done.stderr[-2000:]}")
    return done.stderr


def occupancy(registers: int, shared_bytes: int, num_warps: int, limits: dict[str, int] = SM90) -> int:
    """Resident blocks per SM: the tightest of registers (allocated per warp in units of 256),
    shared memory, threads and the block cap."""
    threads = 32 * num_warps
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = limits["regs"] // (regs_per_warp * num_warps)
    by_smem = limits["smem"] // (shared_bytes + limits["smem_reserved"])
    return max(0, min(by_regs, by_smem, limits["threads"] // threads, limits["blocks"]))


def compile_launch(launch: Launch, arch: int = 90) -> KernelReport:
    """Compile one captured launch for ``sm_{arch}`` exactly as specialised at launch; report its resources."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(launch.kernel.params):
        value = launch.args[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", value
            continue
        ty, attr = _specialise(value)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif attr:
            attrs[(i,)] = backend.parse_attr(attr)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=launch.options)
    ptx = compiled.asm["ptx"]
    log = _ptxas_log(ptx, arch)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    registers = int(regs.group(1)) if regs else 0
    per_sm = occupancy(registers, shared, warps)
    programs = 1
    for g in launch.grid:
        programs *= g
    return KernelReport(
        kernel=launch.name, variant=launch.variant, grid=launch.grid, num_warps=warps, num_stages=compiled.metadata.num_stages,
        registers=registers, spill_stores=int(spills.group(1)) if spills else 0, spill_loads=int(spills.group(2)) if spills else 0,
        shared_bytes=shared, mma=mma, blocks_per_sm=per_sm, waves=programs / max(1, per_sm * SM90["sms"]),
    )


def profile(shape: Shape, blocks: BlockSizes, arch: int = 90, *, regenerate_preactivations: bool = False, per_op: bool = True) -> list[KernelReport]:
    """Reports for every distinct compiled launch of a layer step at ``shape``."""
    return [compile_launch(launch, arch) for launch in capture_layer_step(shape, blocks, regenerate_preactivations=regenerate_preactivations, per_op=per_op)]


def markdown(shape: Shape, blocks: BlockSizes, reports: list[KernelReport]) -> str:
    D, Fd, E, K, T = shape
    head = (
        f"D={D} F={Fd} E={E} K={K} T={T}, blocks m/n/k/r={blocks.block_m}/{blocks.block_n}/{blocks.block_k}/{blocks.block_r} "
        f"warps={blocks.num_warps} stages={blocks.num_stages}\n\n"
        "| kernel | variant | grid | regs | spill st/ld B | smem KiB | mma | blocks/SM | waves |\n|---|---|---|---:|---:|---:|---|---:|---:|\n"
    )
    rows = [
        f"| {r.kernel} | {r.variant or '-'} | {'x'.join(map(str, r.grid))} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
        f"{r.shared_bytes / 1024:.1f} | {r.mma} | {r.blocks_per_sm} | {r.waves:.1f} |"
        for r in reports
    ]
    return head + "\n".join(rows) + "\n"


def parse_blocks(text: str) -> BlockSizes:
    """``--blocks`` value: ``BlockSizes.parse`` with argparse's error type."""
    try:
        return BlockSizes.parse(text, "--blocks")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (90 = H100)")
    parser.add_argument("--shape", type=int, nargs=5, action="append", metavar=("D", "F", "E", "K", "T"), help="repeatable; default: the four reference shapes")
    parser.add_argument("--blocks", type=parse_blocks, action="append", help="bm,bn,bk,warps,stages[,br[,bwd_bn]]; repeatable; default: BlockSizes()")
    parser.add_argument("--regenerate-preactivations", action="store_true", help="profile the path whose backward computes the SwiGLU pre-activations again")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table per (shape, blocks)")
    parser.add_argument("--json", type=Path, help="also write every report to this JSON file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    worst, records = 0, []
    for shape in [tuple(s) for s in args.shape] if args.shape else REFERENCE_SHAPES:
        for blocks in args.blocks or [BlockSizes()]:
            reports = profile(shape, blocks, args.arch, regenerate_preactivations=args.regenerate_preactivations)  # type: ignore[arg-type]
            if args.markdown:
                print(markdown(shape, blocks, reports))  # type: ignore[arg-type]
            else:
                for r in reports:
                    print(f"sm_{args.arch} {shape} {r.kernel}[{r.variant}]: {asdict(r)}")
            worst = max([worst] + [r.spill_stores for r in reports])
            records += [{"shape": list(shape), "blocks": asdict(blocks), **asdict(r), "programs": r.programs} for r in reports]
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "reports": records}, indent=1))
    print(f"compiled {len(records)} launches in {time.perf_counter() - start:.1f} s; largest spill: {worst} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
