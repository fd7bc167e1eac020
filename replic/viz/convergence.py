"""Val AP against training steps for several runs (the analogue of Conditional DETR's Figure 1).

Reads the ``{"type": "eval"}`` lines that periodic evaluation (``train.eval_every``) writes to
each run's ``metrics.jsonl`` (a subset of the val images) and, once the run is done and
evaluated, its final evaluation on every val image at the last step, and draws AP and AP50 (×100)
against the optimizer step, one line per run; the same points go to a CSV beside the figure
(column ``images``: how many val images each point scored).

A label given several times (``--run "DETR=…seed1" --run "DETR=…seed2"``) is one model trained
with several seeds: each replicate is drawn thin, their mean bold, and the CSV gets a
``mean`` row per step with the standard deviation across replicates — one seed cannot tell a
small gap between two models from seed noise.

    python -m replic.viz.convergence --run "DETR=runs/mini/detr_r50_50ep" \\
        --run "Conditional DETR=runs/mini/cdetr_r50_50ep" --out results/figures/mini/convergence.png
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("run", "replicate", "step", "AP", "AP50", "AP75", "top_box_std", "gt_box_std", "images",
           "AP_sd", "AP50_sd")
METRICS = ("AP", "AP50", "AP75")


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
    final = final_point(run_dir)
    if final is not None and all(p["step"] != final["step"] for p in points):
        points.append(final)
    return sorted(points, key=lambda r: r["step"])


def final_point(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's final evaluation (``eval/metrics.json``, every val image) at its last optimizer
    step (``done.json``), as a curve point; None before both exist. It is the value a claim or a
    table compares, so the curve ends on it."""
    done, metrics = Path(run_dir) / "done.json", Path(run_dir) / "eval" / "metrics.json"
    if not (done.is_file() and metrics.is_file()):
        return None
    try:
        step = int(json.loads(done.read_text())["global_steps"])
        evaluated = json.loads(metrics.read_text())
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{run_dir}: unreadable done.json or eval/metrics.json ({err})") from err
    diagnostics = evaluated.get("diagnostics", {})
    return {**{k: evaluated["metrics"].get(k) for k in METRICS}, "step": step, "final": True,
            "images": evaluated.get("eval", {}).get("images"),
            "top_box_std": diagnostics.get("top_box_std"), "gt_box_std": diagnostics.get("gt_box_std")}


def mean_points(replicates: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per step evaluated by every replicate: the mean of each metric and its standard deviation."""
    common = set.intersection(*({p["step"] for p in points} for points in replicates))
    by_step = [{p["step"]: p for p in points} for points in replicates]
    means = []
    for step in sorted(common):
        record: dict[str, Any] = {"step": step, "n": len(replicates)}
        for key in (*METRICS, "top_box_std", "gt_box_std"):
            values = [r[step][key] for r in by_step if r[step].get(key) is not None]
            record[key] = statistics.fmean(values) if len(values) == len(by_step) else None
            if key in ("AP", "AP50") and record[key] is not None:
                record[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        means.append(record)
    return means


def render_csv(runs: dict[str, list[list[dict[str, Any]]]]) -> str:
    """One CSV row per (run, replicate, evaluated step), then, for a label with several
    replicates, one ``mean`` row per step (with the standard deviations); AP values ×100."""

    def row(label: str, replicate: Any, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "run": label, "replicate": replicate, "step": p["step"],
            **{k: f"{100 * p[k]:.2f}" if p.get(k) is not None else "" for k in METRICS},
            **{k: f"{p[k]:.4f}" if p.get(k) is not None else "" for k in ("top_box_std", "gt_box_std")},
            "images": p.get("images", ""),
            **{k: f"{100 * p[k]:.2f}" if p.get(k) is not None else "" for k in ("AP_sd", "AP50_sd")},
        }

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for label, replicates in runs.items():
        for index, points in enumerate(replicates):
            for p in points:
                writer.writerow(row(label, index, p))
        if len(replicates) > 1:
            for p in mean_points(replicates):
                writer.writerow(row(label, "mean", p))
    return buffer.getvalue()


def gap_lines(runs: dict[str, list[list[dict[str, Any]]]], metric: str = "AP") -> list[str]:
    """For exactly two labels (A, B): per common step, B's mean minus A's (×100) and in how many
    of the A×B replicate pairs B is ahead; empty otherwise."""
    if len(runs) != 2:
        return []
    (label_a, reps_a), (label_b, reps_b) = runs.items()
    mean_a = {p["step"]: p for p in mean_points(reps_a)}
    mean_b = {p["step"]: p for p in mean_points(reps_b)}
    steps_a = [{p["step"]: p for p in points} for points in reps_a]
    steps_b = [{p["step"]: p for p in points} for points in reps_b]
    lines = []
    for step in sorted(set(mean_a) & set(mean_b)):
        if mean_a[step].get(metric) is None or mean_b[step].get(metric) is None:
            continue
        a = [by_step[step][metric] for by_step in steps_a]
        b = [by_step[step][metric] for by_step in steps_b]
        ahead = sum(y > x for x in a for y in b)
        lines.append(f"step {step}: {label_b} - {label_a} = {100 * (mean_b[step][metric] - mean_a[step][metric]):+.2f} "
                     f"{metric} (means of {len(b)} / {len(a)} runs; {label_b} ahead in {ahead} of {len(a) * len(b)} pairs)")
    return lines


def _percent(points: list[dict[str, Any]], metric: str) -> list[float]:
    """A metric ×100 per point (NaN where a point lacks it: a gap in the line)."""
    return [100 * p[metric] if p.get(metric) is not None else float("nan") for p in points]


def plot(runs: dict[str, list[list[dict[str, Any]]]], title: str = "") -> Any:
    """A figure with AP and AP50 panels against the optimizer step (replicates thin, mean bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, ("AP", "AP50")):
        for colour, (label, replicates) in zip(itertools.cycle(colours), runs.items()):
            many = len(replicates) > 1
            for points in replicates:
                ax.plot([p["step"] for p in points], _percent(points, metric), color=colour, alpha=0.35 if many else 1.0, linewidth=1.0,
                        marker=None if many else "o", markersize=3, label=None if many else label)
            if many:
                mean = mean_points(replicates)
                ax.plot([p["step"] for p in mean], _percent(mean, metric), color=colour, linewidth=2.2, marker="o", markersize=3,
                        label=f"{label} (mean of {len(replicates)} seeds)")
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
                        help="a run directory with periodic evaluation, and its legend label (a label given "
                             "several times: replicates of one model, e.g. seeds)")
    parser.add_argument("--out", required=True, help="figure (.png); the CSV goes beside it (.csv)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    try:
        runs = {}
        for item in args.run:
            label, sep, run_dir = item.partition("=")
            if not sep:
                raise ValueError(f"--run {item!r}: expected LABEL=RUN_DIR")
            runs.setdefault(label, []).append(eval_points(run_dir))
    except (ValueError, FileNotFoundError) as err:
        print(f"convergence: error: {err}", file=sys.stderr)
        return 2
    from replic.io import atomic_path, atomic_write_text

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".csv"), render_csv(runs))
    for line in gap_lines(runs):
        print(line)
    fig = plot(runs, args.title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
