#!/usr/bin/env bash
# The quickstart on a fresh machine: install, then the main job on the offline, CPU-sized default:
# mixtures/quickstart.yaml -> exact token streams (with the per-source report) -> a small GPT-2 trained
# to exactly 1M tokens -> per-source validation loss and samples, recorded in lab/mlflow.db.
# Rerunning it resumes (or, once finished, prints the result); add --fresh to train again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
.venv/bin/python -m sparknet.run mixtures/quickstart.yaml "$@"
echo "open the run: .venv/bin/mlflow ui --backend-store-uri sqlite:///lab/mlflow.db  (then http://127.0.0.1:5000)"
