#!/usr/bin/env bash
# Create ./.venv with moeforge, its dev tools and DeepSpeed (engine=deepspeed). CPU machines get the CPU build of torch.
#   bash launch/setup_env.sh                 # torch==2.13.0 (override: TORCH_SPEC="torch==2.9.1")
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# Ask for torch by exact version first, so a range elsewhere never pulls another (multi-GB) build.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# engine=deepspeed: the [deepspeed] extra, pure Python (DS_BUILD_OPS=0: no CUDA/C++ ops built); torch pinned so pip keeps it.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[deepspeed]" "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -c "import torch, hydra, wandb; print(f'moeforge env ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
