#!/usr/bin/env bash
# Copy this checkout as a plain clone would hold it (tracked files plus untracked ones git does not ignore; no
# lab/ state, no .venv, nothing beside it, so no ../shared) to DEST/repo, link this checkout's .venv into it, and
# run pytest there with the remaining arguments.
#
#   bash .ci/plain_clone.sh /tmp/plain -q tests/test_compare.py
#
# Why: a test that needs ../shared skips where it is absent, so a suite run next to ../shared cannot tell how much
# of it a plain clone really runs. DEST must not exist yet, or hold only an earlier copy made by this script.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:?usage: bash .ci/plain_clone.sh DEST [pytest args...]}
shift
if [ -e "$dest" ] && [ ! -f "$dest/.plain-clone" ]; then
  echo "error: $dest exists and was not made by .ci/plain_clone.sh (fix: pass a new folder)" >&2
  exit 2
fi
rm -rf "$dest"
mkdir -p "$dest/repo"
touch "$dest/.plain-clone"
# --ignore-failed-read: a tracked file deleted in this checkout is absent from a clone of it too.
git ls-files -z --cached --others --exclude-standard \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$dest/repo"
ln -s "$(pwd)/.venv" "$dest/repo/.venv"
[ ! -e "$dest/shared" ] || { echo "error: $dest/shared exists: the copy would see it" >&2; exit 2; }
cd "$dest/repo"
# The copy's sparknet, not the editable install's (which points at this checkout).
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest --rootdir="$(pwd)" "$@"
