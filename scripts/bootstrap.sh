#!/usr/bin/env bash
# Create .venv with everything sparknet needs (idempotent: a second run only checks).
# On a machine without a GPU it installs the CPU build of PyTorch pinned below; on a GPU machine
# install your CUDA build of torch into .venv first (pip install torch), and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU=${SPARKNET_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sparknet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      .venv/bin/pip install -q torch            # CUDA build from PyPI
    else
      .venv/bin/pip install -q "$TORCH_CPU"     # CPU build: seconds where the wheel is cached locally
    fi
  fi
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
