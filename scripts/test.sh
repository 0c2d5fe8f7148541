#!/usr/bin/env bash
# Install (if needed), then ruff and the tests: CPU-only, offline.
#
#   bash scripts/test.sh            the fast suite (tests not marked `slow`): about 3 minutes on 2 cores
#   bash scripts/test.sh --all      everything, as .ci/run does: also PostgreSQL, torchrun, MLflow servers,
#                                   kill-and-resume and the quickstart (about 10 minutes on 2 cores)
#   bash scripts/test.sh [--all] PYTEST_ARGS...   e.g. -k sweep, tests/test_config.py, --randomly-seed=123
#
# The order of the tests is shuffled on every run (pytest-randomly; the seed is printed first: `--randomly-seed=N`
# repeats an order, `-p no:randomly` turns it off). The 15 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not slow")
if [ "${1:-}" = --all ]; then
  select=()
  shift
fi
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
# Two workers, each taking the next test when it is free; one worker per core is what the multi-process tests'
# timeouts are sized for. SPARKNET_TEST_WORKERS=0 runs serially.
.venv/bin/python -m pytest -q -n "${SPARKNET_TEST_WORKERS:-2}" --dist worksteal --durations=15 ${select[@]+"${select[@]}"} "$@"
