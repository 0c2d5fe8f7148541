#!/usr/bin/env bash
# Start a shared MLflow tracking server for the lab (several machines, or a sweep's workers).
#
#   bash lab/mlflow_server.sh                    # 127.0.0.1:5000, store lab/mlflow.db, artifacts lab/mlartifacts
#   HOST=0.0.0.0 PORT=5000 bash lab/mlflow_server.sh   # reachable from other machines (trusted network only:
#                                                      # MLflow has no authentication by default)
#   BACKEND=postgresql://user:pw@db:5432/mlflow bash lab/mlflow_server.sh
#
# Then on every machine: export MLFLOW_TRACKING_URI=http://<host>:<port>  (or tracking.uri=... per run).
# Lean settings: one worker and no job runner. MLflow's defaults spawn several gunicorn/uvicorn workers
# plus a job-execution process (~3 GB of RAM); one worker serves a lab's training runs comfortably.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
BACKEND=${BACKEND:-sqlite:///$(pwd)/lab/mlflow.db}
ARTIFACTS=${ARTIFACTS:-$(pwd)/lab/mlartifacts}
WORKERS=${WORKERS:-1}
MLFLOW=${MLFLOW:-.venv/bin/mlflow}
[ -x "$MLFLOW" ] || MLFLOW=mlflow
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
mkdir -p "$ARTIFACTS"
echo "MLflow server on http://$HOST:$PORT  (store $BACKEND, artifacts $ARTIFACTS)" >&2
exec "$MLFLOW" server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" "$@"
