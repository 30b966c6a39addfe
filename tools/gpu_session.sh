#!/usr/bin/env bash
# The GPU checks of the project in one command (one call of a lent GPU). Run in the repository root.
# Needs torch + Triton and hydra-core/omegaconf on PYTHONPATH; never wandb. Results go to $OUT.
#
#   bash tools/gpu_session.sh              # PART=step (default): whole training steps, <= 6 minutes cold, 4 files
#   PART=layer bash tools/gpu_session.sh   # the MoE layer checks: GPU tests, compile_check, bench_layer, profile_layer
#   PART=all bash tools/gpu_session.sh     # both (about 10 minutes)
#   SHAPES="--shape 2048 768 128 8 32768" PART=layer bash tools/gpu_session.sh   # bench/profile one shape
#
# PART=step trains moe_125m and `olmoe_1b_7b model.num_layers=4` (bf16, 8 x 2048 = 16,384 tokens per
# step) four ways each: default, train.compile=true, train.cuda_graphs=true, and the fastest predicted
# (train.cuda_graphs=true optim.master_weights=true optim.moments_dtype=bf16), and prints tokens/s, MFU
# and peak memory of the last (warm) log window beside `python -m tools.bench.step_budget ... --card h200
# --json`'s prediction for the same config (computed on the CPU cores meanwhile; "n/a" without
# tools/bench/step_budget.py). Time limits: 8 x 41 s of training + 10 s of setup = 338 s. The default runs
# also profile steps 7-8 (train.profile_steps, launch/profiling.py): GPU ms per class (gemm, attention,
# grad clip, optimizer, other) beside the prediction's classes, and step_profiles.md (4 files in all).
set -uo pipefail
out=${OUT:-gpu_out}
part=${PART:-step}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
py=python3
log=$out/session_log.txt
t0=$(date +%s)
stamp() { echo "== $1 @ $(( $(date +%s) - t0 ))s" | tee -a "$log"; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

stamp env
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >> "$log" 2>&1

verdict=()

if [[ $part == layer || $part == all ]]; then
  stamp tests  # every kernel and model test, compiled on the GPU (tests/parallel and tests/launch: CPU ranks and subprocesses)
  timeout 70 $py -m pytest -q -p no:cacheprovider -n 8 -m "not slow" tests/kernels tests/moe tests/tools/bench/test_layer.py tests/tools/bench/test_compile_check.py tests/tools/bench/test_layer_budget.py tests/launch/test_throughput.py >> "$log" 2>&1
  verdict+=("| tests/kernels + tests/moe on the GPU | rc $?: $(grep -E "[0-9]+ (passed|failed)|error" "$log" | tail -1) |")
  stamp compile_check
  timeout 35 $py -m tools.bench.compile_check --markdown > "$out/compile_check.md" 2>&1
  verdict+=("| compile_check (sm_90, spills) | $(tail -1 "$out/compile_check.md") |")
  stamp bench  # grouped_mm, the backend auto picks on Hopper (triton's rows: BACKENDS="grouped_mm triton")
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-95}" $py -m tools.bench.layer --out "$out/bench" --backends ${BACKENDS:-grouped_mm} --layers ${BACKENDS:-grouped_mm} ${SHAPES:-} > "$out/bench_log.txt" 2>&1
  verdict+=("| bench_layer | rc $? |")
  stamp profile
  # shellcheck disable=SC2086
  timeout 40 $py -m tools.bench.profile_layer --out "$out/profile.txt" --backends ${BACKENDS:-grouped_mm} ${SHAPES:-} >> "$log" 2>&1
  verdict+=("| profile_layer | rc $? |")
fi

rows=$out/step_runs.md
if [[ $part == step || $part == all ]]; then
  presets=("moe_125m" "olmoe_1b_7b model.num_layers=4")
  settings=("default" "train.compile=true" "train.cuda_graphs=true" "train.cuda_graphs=true optim.master_weights=true optim.moments_dtype=bf16")
  shape="train.precision=bf16 train.batch_size=8 train.seq_len=2048"
  stamp predict  # on the CPU cores, while the GPU trains
  for i in 0 1; do
    for j in 0 1 2 3; do
      extra=${settings[$j]}; [[ $extra == default ]] && extra=""
      if [[ -f tools/bench/step_budget.py ]]; then
        # shellcheck disable=SC2086
        (timeout 300 $py -m tools.bench.step_budget model=${presets[$i]} $shape $extra --card h200 --json > "$scratch/pred_${i}_$j.json" 2>>"$scratch/pred_err.txt" &)
      fi
    done
  done
  stamp train
  train_rc=0
  for i in 0 1; do
    for j in 0 1 2 3; do
      extra=${settings[$j]}; [[ $extra == default ]] && extra="train.profile_steps=[7,8]"  # outside the last log window (11-15)
      # shellcheck disable=SC2086
      timeout 41 $py -m launch.train model=${presets[$i]} $shape $extra train.steps=15 train.log_every=5 train.eval_every=15 \
        train.eval_batches=1 optim.warmup_steps=4 logging=none checkpoint.enabled=false hydra.run.dir="$scratch/run_${i}_$j" >> "$log" 2>&1 \
        || train_rc=$?
    done
  done
  stamp summarise
  $py - "$scratch" "$rows" "${presets[@]}" -- "${settings[@]}" >> "$log" 2>&1 <<'PY'
import json, sys
from pathlib import Path

scratch, rows_path = Path(sys.argv[1]), Path(sys.argv[2])
split = sys.argv.index("--")
presets, settings = sys.argv[3:split], sys.argv[split + 1:]


def measured(run: Path) -> dict:
    try:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in lines if "tokens_per_s" in r][-1]  # the last window: compiled and warm
        return {"step": last["step"], "tokens_per_s": f"{last['tokens_per_s']:,.0f}", "mfu": f"{last.get('mfu', float('nan')):.1%}",
                "peak": f"{last['peak_mem_gib']:.1f}"}
    except (OSError, IndexError, KeyError, ValueError):
        return {"step": "-", "tokens_per_s": "failed", "mfu": "-", "peak": "-"}


def predicted(path: Path) -> dict:
    try:
        p = json.loads(path.read_text())
        return {"tokens_per_s": f"{p['tokens_per_s']:,.0f}", "mfu": f"{p['mfu']:.1%}", "peak": f"{p['memory_gb']['peak'] / 1.073741824:.1f}",
                "step_ms": f"{p['step_ms']:.0f}"}
    except (OSError, KeyError, ValueError, TypeError):
        return {"tokens_per_s": "n/a", "mfu": "n/a", "peak": "n/a", "step_ms": "n/a"}


out = ["| preset | setting | steps | tokens/s | MFU | peak GiB | predicted tokens/s | predicted MFU | predicted peak GiB | predicted step ms |",
       "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for i, preset in enumerate(presets):
    for j, setting in enumerate(settings):
        m, p = measured(scratch / f"run_{i}_{j}"), predicted(scratch / f"pred_{i}_{j}.json")
        out.append(f"| {preset} | {setting} | {m['step']} | {m['tokens_per_s']} | {m['mfu']} | {m['peak']} | {p['tokens_per_s']} | "
                   f"{p['mfu']} | {p['peak']} | {p['step_ms']} |")
rows_path.write_text("\n".join(out) + "\n")

# Where the default step's GPU time went (train.profile_steps, launch/profiling.py) beside the prediction's classes.
prof = ["", "| preset (default) | class | measured ms per step | predicted GPU ms |", "|---|---|---:|---:|"]
listing = []
for i, preset in enumerate(presets):
    try:
        measured_ms = json.loads((scratch / f"run_{i}_0" / "profile" / "rank0.json").read_text())["ms_per_step"]
        listing.append((scratch / f"run_{i}_0" / "profile" / "rank0.md").read_text().replace("# Steps", f"# {preset}: steps", 1))
    except (OSError, KeyError, ValueError):
        measured_ms = {}
    try:
        predicted_ms = json.loads((scratch / f"pred_{i}_0.json").read_text())["classes_gpu_ms"]
    except (OSError, KeyError, ValueError):
        predicted_ms = {}
    for cls in sorted(set(measured_ms) | set(predicted_ms), key=lambda c: -predicted_ms.get(c, 0.0)):
        m, p = measured_ms.get(cls), predicted_ms.get(cls)
        prof.append(f"| {preset} | {cls} | {'-' if m is None else f'{m:.2f}'} | {'-' if p is None else f'{p:.2f}'} |")
with rows_path.open("a") as f:
    f.write("\n".join(prof) + "\n")
(rows_path.parent / "step_profiles.md").write_text("\n".join(listing) or "no profile was written\n")
PY
  [[ -f $scratch/pred_err.txt ]] && tail -20 "$scratch/pred_err.txt" >> "$log"
  verdict+=("| training steps: 2 presets x (default, compile, cuda_graphs) | rc $train_rc (predicted: $([[ -f tools/bench/step_budget.py ]] && echo tools.bench.step_budget --card h200 || echo n/a)) |")
fi
stamp done

echo
echo "## Verdict ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), PART=$part)"
echo
echo "| check | result |"
echo "|---|---|"
printf '%s\n' "${verdict[@]}"
echo
[[ -f $rows ]] && cat "$rows"
if [[ $part == layer || $part == all ]]; then
  echo
  sed -n '/## Targets/,$p' "$out/bench/results.md" 2>/dev/null
  echo
  head -12 "$out/profile.txt" 2>/dev/null
fi
