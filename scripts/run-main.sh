#!/usr/bin/env bash
# The main job: set up .venv, then let Snakemake test one of the papers' claims at mini scale —
# Conditional DETR ahead of DETR on a 12-epoch schedule (configs/claims.yaml,
# cdetr_ahead_at_12_epochs): synthetic mini data -> the shipped mini backbone -> two trainings ->
# two COCO evaluations -> the claim's effect, 95 % interval and verdict, and the two runs'
# convergence curves. About 10 minutes on 2 cores once .venv exists.
# Other targets: `bash scripts/run-main.sh TARGET... [--config scale=mini]` (arguments go to snakemake),
# e.g. `bash scripts/run-main.sh results/table_cdetr_ablations.csv` (the smoke-scale pipeline check).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
claim=cdetr_ahead_at_12_epochs
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=("results/claims/mini/$claim.md" results/figures/mini/convergence_detr_vs_cdetr_12ep.png
        --config scale=mini)
fi
start=$(date +%s)
snakemake --cores all "${args[@]}"
# The HTML report of what was built (a report of the default target would ask for every table).
mkdir -p results/logs
snakemake --report results/report.html "${args[@]}" > results/logs/report.log 2>&1 \
  || { echo "report failed: results/logs/report.log" >&2; exit 1; }
echo
echo "main job finished in $(( $(date +%s) - start )) s."
if [ $# -eq 0 ]; then
  # The claim's row: effect in AP points, 95 % interval (val images + seed noise), verdict.
  sed -n '/^| claim /,/^$/p' "results/claims/mini/$claim.md"
  sed -n "s/^- \*\*$claim\*\* (\([^)]*\)): \([^—]*\) —.*/Claim (\1): \2/p" "results/claims/mini/$claim.md"
  echo "Results:"
  ls -1 results/claims/mini/$claim.* results/figures/mini/convergence_detr_vs_cdetr_12ep.* | sed 's/^/  /'
  echo "  results/report.html (the claim and the figure in one page)"
  echo "Runs (configs, provenance, checkpoints, metric logs, TensorBoard): runs/mini/"
  echo "Every claim: snakemake --cores all results/claims_mini.md --config scale=mini (hours)"
else
  echo "  results/report.html (what was built, in one page)"
fi
