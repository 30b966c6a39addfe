#!/usr/bin/env bash
# Every GPU check of the project in one command (one call of a lent GPU; at most 6 minutes on a
# cold H100/H200: the timeouts below add up to 350 s). Run in the repository root. Needs torch +
# Triton (the device image has them) and, for the trainings only, hydra-core/omegaconf on
# PYTHONPATH; never wandb. Results go to $OUT (7 files); the verdict table is printed last.
#   bash tools/gpu_session.sh                               # everything
#   SHAPES="--shape 2048 768 128 8 32768" bash tools/gpu_session.sh   # bench/profile one shape
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
py=python3
log=$out/session_log.txt
t0=$(date +%s)
stamp() { echo "== $1 @ $(( $(date +%s) - t0 ))s" | tee -a "$log"; }

stamp env
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >> "$log" 2>&1

stamp tests  # every kernel and model test, compiled on the GPU (tests/parallel and tests/launch: CPU ranks and subprocesses)
timeout 70 $py -m pytest -q -p no:cacheprovider -n 8 -m "not slow" tests/kernels tests/moe tests/launch/test_throughput.py >> "$log" 2>&1
tests_rc=$?
tests_line=$(grep -E "^[0-9]+ (passed|failed)|[0-9]+ passed|[0-9]+ failed|error" "$log" | tail -1)

stamp compile_check
timeout 35 $py -m tools.compile_check --markdown > "$out/compile_check.md" 2>&1

stamp bench  # grouped_mm, the backend auto picks on Hopper (triton's rows: BACKENDS="grouped_mm triton")
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-95}" $py -m tools.bench_layer --out "$out/bench" --backends ${BACKENDS:-grouped_mm} --layers ${BACKENDS:-grouped_mm} ${SHAPES:-} > "$out/bench_log.txt" 2>&1
bench_rc=$?

stamp profile
# shellcheck disable=SC2086
timeout 40 $py -m tools.profile_layer --out "$out/profile.txt" --backends ${BACKENDS:-grouped_mm} ${SHAPES:-} >> "$log" 2>&1
profile_rc=$?

stamp train  # the OLMoE-like preset cut to 4 layers (1.9B parameters, fits one 80 GB GPU), bf16, auto then grouped_mm
train_rc=skipped
train_rows=$out/train_runs.md
echo "| experts.backend | steps | val loss | tokens/s | TFLOP/s per GPU | MFU | peak GiB |" > "$train_rows"
echo "|---|---:|---:|---:|---:|---:|---:|" >> "$train_rows"
if $py -c "import hydra, omegaconf" 2>/dev/null; then
  train_rc=0
  for backend in auto grouped_mm; do
    timeout 55 $py -m launch.train model=olmoe_1b_7b model.num_layers=4 experts.backend=$backend train.precision=bf16 \
      train.batch_size=8 train.seq_len=2048 train.steps=24 train.log_every=8 train.eval_every=24 train.eval_batches=1 \
      optim.warmup_steps=4 logging=none checkpoint.enabled=false hydra.run.dir="$out/run_$backend" >> "$log" 2>&1 || train_rc=$?
    $py - "$out/run_$backend/metrics.jsonl" "$backend" >> "$train_rows" 2>>"$log" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = [r for r in rows if "tokens_per_s" in r][-1]  # the last window: compiled and warm
val = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), float("nan"))
print(f"| {sys.argv[2]} | {last['step']} | {val:.4f} | {last['tokens_per_s']:,.0f} | {last['tflops_per_gpu']:.1f} | "
      f"{last.get('mfu', float('nan')):.1%} | {last['peak_mem_gib']:.1f} |")
PY
    rm -rf "$out/run_$backend"
  done
fi
stamp done

echo
echo "## Verdict ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
echo
echo "| check | result |"
echo "|---|---|"
echo "| tests/kernels + tests/moe on the GPU | rc $tests_rc: $tests_line |"
echo "| compile_check (sm_90, spills) | $(tail -1 "$out/compile_check.md") |"
echo "| bench_layer | rc $bench_rc |"
echo "| profile_layer | rc $profile_rc |"
echo "| OLMoE-like training, 4 layers (auto, grouped_mm) | rc $train_rc |"
echo
cat "$train_rows"
echo
sed -n '/## Targets/,$p' "$out/bench/results.md" 2>/dev/null
echo
head -12 "$out/profile.txt" 2>/dev/null
