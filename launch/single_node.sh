#!/usr/bin/env bash
# Train on every GPU of this machine (or N CPU processes with gloo) with torchrun.
#   bash launch/single_node.sh                                   # all local GPUs, parallel=ep
#   NPROC=2 bash launch/single_node.sh parallel=fssdp train.steps=100
#   RUN_ID=exp1 NPROC=4 bash launch/single_node.sh parallel=ep parallel.ep_size=2 parallel.dense=fsdp
# Extra arguments are Hydra overrides for `python -m launch.train`. NCCL is used on GPUs, gloo on CPUs.
# The run directory is runs/$RUN_ID (default runs/local): rerunning the same command resumes it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ -x .venv/bin/python && "$PYTHON" == python ]]; then PYTHON=.venv/bin/python; fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
export MOEFORGE_RUN_ID="${RUN_ID:-${MOEFORGE_RUN_ID:-local}}"
has_parallel=0
for arg in "$@"; do [[ "$arg" == parallel=* ]] && has_parallel=1; done
extra=()
if [[ $has_parallel == 0 ]]; then extra+=("parallel=ep"); fi
# launch.torchrun: torchrun's arguments; on a failure, one line and the worker's exit status.
exec "$PYTHON" -m launch.torchrun --standalone --nproc-per-node "$NPROC" -m launch.train "${extra[@]}" "$@"
