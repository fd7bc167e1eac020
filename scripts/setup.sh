#!/usr/bin/env bash
# Create (or refresh) the project virtual environment .venv from the lockfile.
# Idempotent: it re-installs only when requirements.lock or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${REPLIC_VENV:-.venv}

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"replic needs Python >= 3.11, found {sys.version.split()[0]}")
PY

stamp="$VENV/.replic-lock.sha256"
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date with requirements.lock"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# The lock pins every package (torch/torchvision as a pair); replic itself goes in editable, without deps.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.lock
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
# Register the venv's kernel so notebooks execute with this environment.
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$want" > "$stamp"
echo "setup: installed $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
