#!/usr/bin/env bash
# Install (if needed) and run the test suite: CPU-only, offline, a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
# Two workers, each taking the next test when it is free (the suite's long tests are spread across its files); one
# worker per core is what the multi-process tests' timeouts are sized for. SPARKNET_TEST_WORKERS=0 runs serially.
.venv/bin/python -m pytest -q -n "${SPARKNET_TEST_WORKERS:-2}" --dist worksteal "$@"
