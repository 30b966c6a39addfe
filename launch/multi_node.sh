#!/usr/bin/env bash
# Train across machines with torchrun's c10d rendezvous. Run the same command on every node:
#   RUN_ID=exp1 NNODES=4 NPROC=8 RDZV_HOST=node0.cluster RDZV_PORT=29500 bash launch/multi_node.sh parallel=fssdp
#   RUN_ID=exp2 NNODES=2 NPROC=8 RDZV_HOST=10.0.0.1 bash launch/multi_node.sh parallel=ep parallel.ep_size=8 parallel.dense=fsdp
# RUN_ID (required) names the job: every node must get the same value; the run directory is
# runs/$RUN_ID, so rerunning the same command resumes from its newest checkpoint that verifies.
# Extra arguments are Hydra overrides for `python -m launch.train`.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES (number of machines)}"
: "${RDZV_HOST:?set RDZV_HOST (host name or IP of one node, reachable from all)}"
: "${RUN_ID:?set RUN_ID (the same on every node; names the run directory)}"
RDZV_PORT=${RDZV_PORT:-29500}
PYTHON=${PYTHON:-python}
if [[ -x .venv/bin/python && "$PYTHON" == python ]]; then PYTHON=.venv/bin/python; fi
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
export MOEFORGE_RUN_ID="$RUN_ID"
exec "$PYTHON" -m launch.torchrun \
  --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RUN_ID" \
  -m launch.train "$@"
