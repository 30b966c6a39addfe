#!/usr/bin/env bash
# Every GPU check of the project in one command (one call of a lent GPU; ~5 minutes on a cold
# H100/H200). Run in the repository root. Needs torch + Triton (the device image has them) and,
# for the short training only, hydra-core/omegaconf on PYTHONPATH; never wandb. Results go to
# $OUT (6 files); the verdict table is printed last.
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
timeout 90 $py -m pytest -q -p no:cacheprovider -n 8 -m "not slow" tests/kernels tests/moe >> "$log" 2>&1
tests_rc=$?
tests_line=$(grep -E "^[0-9]+ (passed|failed)|[0-9]+ passed|[0-9]+ failed|error" "$log" | tail -1)

stamp compile_check
timeout 40 $py -m tools.compile_check --markdown > "$out/compile_check.md" 2>&1

stamp bench
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-150}" $py -m tools.bench_layer --out "$out/bench" ${SHAPES:-} > "$out/bench_log.txt" 2>&1
bench_rc=$?

stamp profile
# shellcheck disable=SC2086
timeout 80 $py -m tools.profile_layer --out "$out/profile.txt" ${SHAPES:-} >> "$log" 2>&1
profile_rc=$?

stamp train  # the default model on the GPU: experts.backend=auto, bf16 autocast
train_rc=skipped
if $py -c "import hydra, omegaconf" 2>/dev/null; then
  timeout 45 $py -m launch.train train.steps=60 logging=none hydra.run.dir="$out/run" checkpoint.every=0 >> "$log" 2>&1
  train_rc=$?
  rm -rf "$out/run"
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
echo "| short training (60 steps) | rc $train_rc: $(grep -E 'val_loss' "$log" | tail -1) |"
echo
sed -n '/## Targets/,$p' "$out/bench/results.md" 2>/dev/null
echo
head -12 "$out/profile.txt" 2>/dev/null
