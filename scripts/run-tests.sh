#!/usr/bin/env bash
# The test command: set up .venv from the lockfile, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A run that collects fewer tests than this is a broken collection, not a pass (see tests/conftest.py).
export REPLIC_MIN_TESTS=${REPLIC_MIN_TESTS:-40}
exec .venv/bin/python -m pytest "$@"
