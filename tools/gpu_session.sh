#!/usr/bin/env bash
# Everything the kernel issue needs from a lent GPU, in one call of the device tool (run in the
# repository root; results land in $OUT, at most 8 files). The device image has torch and Triton
# but not hydra/wandb, so nothing is installed: the kernels, tests and bench need neither.
#   bash tools/gpu_session.sh                       # GPU tests, static profile, bench with autotune
#   BENCH_ARGS="--shape 2048 768 128 8 32768" bash tools/gpu_session.sh   # one shape (fits 10 minutes)
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD TRITON_DEFAULT_FP_FUSION=1
py=python3
{ nvidia-smi; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$out/env.txt" 2>&1
$py -m pytest -q -p no:cacheprovider tests/kernels/test_gpu.py tests/kernels/test_layer_backend.py > "$out/gpu_tests.txt" 2>&1
echo "gpu tests exit $?" >> "$out/gpu_tests.txt"
$py -m kernels.compile_check --markdown > "$out/compile_check.md" 2>&1
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-420}" $py -m tools.bench_layer --autotune --out "$out/bench" ${BENCH_ARGS:-} > "$out/bench_log.txt" 2>&1
echo "bench exit $?" >> "$out/bench_log.txt"
tail -3 "$out/gpu_tests.txt" "$out/bench_log.txt"
