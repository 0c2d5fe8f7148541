#!/usr/bin/env bash
# Create .venv with everything sparknet needs (idempotent: a second run only checks).
#
#   bash scripts/bootstrap.sh          install, or check what is there
#   bash scripts/bootstrap.sh --plan   print what it would do about torch, and change nothing
#
# torch, by what the machine has (nvidia-smi, else a /dev/nvidia<N> node):
# - no NVIDIA GPU: the CPU build pinned below (SPARKNET_TORCH overrides the requirement).
# - an NVIDIA GPU on x86_64: PyPI's torch of the same version, a CUDA build.
# - an NVIDIA GPU on aarch64 (a DGX Spark's GB10, a GH200): PyPI has no CUDA build for aarch64, so PyTorch's own
#   wheel index: cu130 when the driver supports CUDA 13 (the GB10, compute capability 12.1, needs a CUDA 13 build:
#   older builds do not know sm_121), else cu128. SPARKNET_TORCH_INDEX overrides the index.
# An installed CUDA torch is kept when it is recent enough for the GPU (on aarch64 with compute capability 12.x: built
# for CUDA 13 or later); a CPU-only torch on a GPU machine is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TORCH_REQ=${SPARKNET_TORCH:-torch==$TORCH_VERSION}
PLAN=0
case "${1:-}" in
  --plan) PLAN=1 ;;
  "") ;;
  *) echo "bootstrap: unknown argument $1 (use --plan or nothing)" >&2; exit 2 ;;
esac

# --- what the machine has
gpu="" cap="" driver_cuda=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true)
  driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n1 || true)
fi
if [ -z "$gpu" ] && compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
  gpu="an NVIDIA GPU (/dev/nvidia*; nvidia-smi failed or is missing)"
fi
arch=$(uname -m)
cap_major=${cap%%.*}
case "$cap_major" in ''|*[!0-9]*) cap_major=0 ;; esac
case "$driver_cuda" in ''|*[!0-9]*) driver_cuda=0 ;; esac

# --- what torch is there: "missing", or "<version> <cuda or none> <cuda usable: 0/1>"
probe_torch() {
  if [ "$PLAN" = 1 ] && [ -n "${SPARKNET_TORCH_PROBE:-}" ]; then  # tests: a pretend installation
    echo "$SPARKNET_TORCH_PROBE"
  elif [ -x .venv/bin/python ]; then
    .venv/bin/python -c "import torch; print(torch.__version__, torch.version.cuda or 'none', int(torch.cuda.is_available()))" \
      2>/dev/null || echo missing
  else
    echo missing
  fi
}
read -r torch_version torch_cuda torch_usable _ <<<"$(probe_torch) x x"

# --- what torch should be
need_cuda=0          # the least CUDA major a kept build must have (0: any CUDA build)
index=""             # empty: PyPI
if [ -n "$gpu" ]; then
  if [ "$arch" = aarch64 ]; then
    [ "$cap_major" -ge 12 ] && need_cuda=13
    if [ "$driver_cuda" -ge 13 ] || [ "$driver_cuda" = 0 ]; then
      index=https://download.pytorch.org/whl/cu130
    else
      index=https://download.pytorch.org/whl/cu128
    fi
    index=${SPARKNET_TORCH_INDEX:-$index}
  else
    index=${SPARKNET_TORCH_INDEX:-}
  fi
fi
from=${index:-PyPI}
action=keep why=""
if [ "$torch_version" = missing ]; then
  action=install why="no torch in .venv"
elif [ -n "$gpu" ] && [ "$torch_cuda" = none ]; then
  action=replace why="torch $torch_version is a CPU-only build and this machine has $gpu"
elif [ -n "$gpu" ] && [ "${torch_cuda%%.*}" -lt "$need_cuda" ]; then
  action=replace why="torch $torch_version is built for CUDA $torch_cuda; $gpu (compute capability $cap) needs CUDA $need_cuda"
fi
if [ "$action" = keep ]; then
  if [ -n "$gpu" ] && [ "$torch_usable" != 1 ]; then
    msg="keep torch $torch_version (CUDA $torch_cuda) although it cannot use $gpu now (driver $driver_cuda.x: check nvidia-smi)"
  else
    msg="keep torch $torch_version (${gpu:-no NVIDIA GPU}; CUDA ${torch_cuda})"
  fi
elif [ -z "$gpu" ]; then
  msg="$action torch: $TORCH_REQ from PyPI, the CPU build ($why; no NVIDIA GPU)"
else
  msg="$action torch: $TORCH_REQ from $from, a CUDA build for $gpu ($why)"
fi
if [ "$PLAN" = 1 ]; then
  echo "bootstrap plan: $msg"
  exit 0
fi

# --- do it
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$action" != keep ]; then
  echo "bootstrap: $msg"
  .venv/bin/python -m pip install -q --upgrade pip
  [ "$action" = replace ] && .venv/bin/pip uninstall -y -q torch  # same version number, other build: pip would keep it
  if [ -n "$index" ]; then
    .venv/bin/pip install -q "$TORCH_REQ" --index-url "$index"
  else
    .venv/bin/pip install -q "$TORCH_REQ"   # CPU build: seconds where the wheel is cached locally
  fi
  if [ -n "$gpu" ] && ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bootstrap: warning: the installed torch does not see $gpu (check the driver: nvidia-smi)" >&2
  fi
fi
stamp=.venv/.sparknet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
