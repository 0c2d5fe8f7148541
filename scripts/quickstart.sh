#!/usr/bin/env bash
# The quickstart on a fresh machine: install, then run the main job on the offline, CPU-sized default.
# Today that is the data half of the lab: mixtures/quickstart.yaml -> exact token streams, with the
# per-source report and an audit of every training batch against the plan.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
.venv/bin/python -m sparknet.prepare mixtures/quickstart.yaml --audit "$@"
