#!/usr/bin/env bash
# One-shot GPU check for a lent GPU (benchmarks/README.md, "gpu.sh"): runs benchmarks/bench_gpu.py
# under a hard time limit so it cannot eat a short device loan, from the repository root, with the
# project's virtual environment when there is one.
#
#   bash benchmarks/gpu.sh --out benchmarks/results_gpu.json       # paper size, on the GPU
#   REPLIC_OFFICIAL_CONDDETR=/path/to/ConditionalDETR bash benchmarks/gpu.sh --out ...   # + the authors' model
#   bash benchmarks/gpu.sh --reduced --device cpu --out /tmp/r.json  # the CPU test's reduced mode
#
# Every argument goes to bench_gpu.py (--help lists them). Environment:
#   REPLIC_GPU_TIMEOUT  seconds before the run is stopped (default 480 = 8 min); the JSON is
#                       rewritten after each section, so a stopped run keeps what it measured.
#   REPLIC_PYTHON       the interpreter (default: .venv/bin/python if present, else python3).
#   REPLIC_GIT_COMMIT   recorded as the commit when the copy on the GPU machine has no .git.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${REPLIC_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
# replic importable without an install (a bare GPU machine with torch but no `pip install -e .`).
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
quoted=""
if [[ $# -gt 0 ]]; then printf -v quoted ' %q' "$@"; fi
export REPLIC_BENCH_WRAPPER="bash benchmarks/gpu.sh$quoted"   # recorded in the JSON
# Fail in seconds, not after the model builds, when the environment lacks the project's dependencies.
"$python" -c 'import torchvision, replic.engine.train, replic.methods' || {
    echo "gpu.sh: $python cannot import replic's training engine (error above): install the project" \
         "(pip install -e . or requirements.lock)" >&2
    exit 2
}
exec timeout --signal=TERM --kill-after=15 "${REPLIC_GPU_TIMEOUT:-480}" "$python" benchmarks/bench_gpu.py "$@"
