#!/usr/bin/env bash
# The test command: set up .venv from the lockfile, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A run that collects fewer tests than this is a broken collection, not a pass (see tests/conftest.py).
export REPLIC_MIN_TESTS=${REPLIC_MIN_TESTS:-40}
# Two pytest-xdist workers, a test file each at a time (module fixtures such as a shared pretraining
# or Slurm working directory are built once): the 2-core CI machine spends much of the workflow
# tests waiting on Snakemake and Slurm. REPLIC_TEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest -n "${REPLIC_TEST_WORKERS:-2}" --dist loadfile "$@"
