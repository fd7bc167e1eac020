"""Val AP against training steps for several runs (the analogue of Conditional DETR's Figure 1).

Reads the ``{"type": "eval"}`` lines that periodic evaluation (``train.eval_every``) writes to
each run's ``metrics.jsonl`` and draws AP and AP50 (×100) against the optimizer step, one line
per run; the same points go to a CSV beside the figure.

    python -m replic.viz.convergence --run "DETR=runs/mini/detr_r50_50ep" \\
        --run "Conditional DETR=runs/mini/cdetr_r50_50ep" --out results/figures/mini/convergence.png
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("run", "step", "AP", "AP50", "AP75", "top_box_std", "gt_box_std", "images")


def eval_points(run_dir: str | Path) -> list[dict[str, Any]]:
    """The periodic-evaluation records of one run, by step (ValueError naming the file if none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log (is {run_dir} a run directory?)")
    points = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON: {err}") from err
        if record.get("type") == "eval":
            points.append(record)
    if not points:
        raise ValueError(f"{path}: no periodic evaluation lines (train.eval_every was 0 for this run)")
    return sorted(points, key=lambda r: r["step"])


def render_csv(runs: dict[str, list[dict[str, Any]]]) -> str:
    """One CSV row per (run, evaluated step); AP values ×100."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for label, points in runs.items():
        for p in points:
            writer.writerow({
                "run": label, "step": p["step"],
                **{k: f"{100 * p[k]:.2f}" if p.get(k) is not None else "" for k in ("AP", "AP50", "AP75")},
                **{k: f"{p[k]:.4f}" if p.get(k) is not None else "" for k in ("top_box_std", "gt_box_std")},
                "images": p.get("images", ""),
            })
    return buffer.getvalue()


def plot(runs: dict[str, list[dict[str, Any]]], title: str = "") -> Any:
    """A figure with AP and AP50 panels against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric in zip(axes, ("AP", "AP50")):
        for label, points in runs.items():
            steps = [p["step"] for p in points]
            values = [100 * p[metric] if p.get(metric) is not None else float("nan") for p in points]
            ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"val {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replic.viz.convergence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR",
                        help="a run directory with periodic evaluation, and its legend label")
    parser.add_argument("--out", required=True, help="figure (.png); the CSV goes beside it (.csv)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    try:
        runs = {}
        for item in args.run:
            label, sep, run_dir = item.partition("=")
            if not sep:
                raise ValueError(f"--run {item!r}: expected LABEL=RUN_DIR")
            runs[label] = eval_points(run_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"convergence: error: {err}", file=sys.stderr)
        return 2
    from replic.io import atomic_path, atomic_write_text

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".csv"), render_csv(runs))
    fig = plot(runs, args.title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
