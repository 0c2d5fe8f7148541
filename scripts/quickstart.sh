#!/usr/bin/env bash
# The quickstart on a fresh machine: install, then the whole mission on a CPU-sized mixture:
# mixtures/quickstart.yaml -> exact token streams (with the per-source report) -> a small GPT-2 trained to
# exactly 1M tokens -> per-source validation loss, samples, and WikiText-2 scored at the end, recorded in
# lab/mlflow.db -> the comparison table: this run, GPT-2 and CodeLion (scored once, cached in lab/baselines) and
# the published figures, bits per byte first (the number that compares across tokenizers).
#
# Online, WikiText-2 and the baselines come from the Hugging Face hub (cached). Offline (one probe, at most 5 s,
# then HF_HUB_OFFLINE=1 for everything after it, so nothing waits on retries) it still trains and records the run,
# and says in one line how to score it later. On a CPU the baselines are left to one later command (GPT-2 alone
# takes tens of minutes of 2 CPU cores; the table says which).
#
#   bash scripts/quickstart.sh [key=value ...] [--fresh]     # overrides go to sparknet.run
#   SPARKNET_WIKITEXT=DIR bash scripts/quickstart.sh          # score on a local WikiText-2 copy, online or not
#
# Rerunning it resumes (or, once finished, shows the table again); add --fresh to train again.
# SPARKNET_LAB=DIR puts the lab elsewhere (default lab/); SPARKNET_NO_INSTALL=1 uses .venv as it is (the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SPARKNET_NO_INSTALL:-}" ] || bash scripts/bootstrap.sh
LAB=${SPARKNET_LAB:-lab}
PY=.venv/bin/python

offline=0
case "${HF_HUB_OFFLINE:-}" in
  1|ON|on|YES|yes|TRUE|true) offline=1 ;;
  *)
    # timeout: the probe bounds itself (4 s, name lookup included); this bounds the interpreter's start too.
    if ! why=$(timeout 5 "$PY" -m sparknet.compare --check-hub 2>/dev/null); then
      offline=1
      echo "${why:-the Hugging Face hub did not answer within 5 s}: working offline (HF_HUB_OFFLINE=1)"
    fi ;;
esac
if [ "$offline" = 1 ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi

"$PY" -m sparknet.run mixtures/quickstart.yaml "lab_dir=$LAB" "$@"

if [ "$offline" = 1 ] && [ -z "${SPARKNET_DOWNSTREAM:-}" ]; then
  echo "Downstream tasks not scored (offline): once online, .venv/bin/python -m sparknet.evaluate downstream" \
       "$LAB/runs/<run> --tasks arc_easy,hellaswag,piqa,winogrande --items 200 scores them; or now, from a local copy:" \
       "SPARKNET_DOWNSTREAM=DIR bash scripts/quickstart.sh --fresh"
fi
if [ "$offline" = 1 ] && [ -z "${SPARKNET_WIKITEXT:-}" ]; then
  echo "WikiText-2 not scored (offline): once online, .venv/bin/python -m sparknet.compare --evaluate --experiment" \
       "quickstart scores the run, GPT-2 and CodeLion; or now, from a local copy: SPARKNET_WIKITEXT=DIR bash" \
       "scripts/quickstart.sh"
else
  # --evaluate fills what is missing and caches it, so a rerun scores nothing. GPT-2 and CodeLion are scored here on
  # a GPU only (seconds): on 2 CPU cores GPT-2 alone takes tens of minutes, so there the table shows them as gaps and
  # says how to score them once (SPARKNET_SCORE_BASELINES=1 scores them here anyway).
  what=runs
  if [ -n "${SPARKNET_SCORE_BASELINES:-}" ] || \
     "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    what=all
  fi
  echo
  "$PY" -m sparknet.compare --evaluate "$what" --experiment quickstart --lab "$LAB" --no-log
fi
echo "open the run: .venv/bin/mlflow ui --backend-store-uri sqlite:///$LAB/mlflow.db  (then http://127.0.0.1:5000)"
