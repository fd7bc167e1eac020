"""Gather one registry table from its runs: CSV, Markdown, provenance JSON and figures.

For every row: the paper's numbers, ours (eval fractions ×100, i.e. AP points as in
the paper) and ours − paper. A row whose evaluation is absent or unreadable is
``missing`` (empty cells, never a number); a row without an experiment (a cited
baseline) is ``cited``. Gathering therefore works on partial results:

    python -m replic.workflow.gather --table cdetr_ablations --scale smoke

Outputs depend only on the registry and the run files (no timestamps), so the
CSV, Markdown and provenance bytes are reproducible.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from replic.workflow.prepare import write_atomic
from replic.workflow.registry import Registry, Row, Table, load_registry

STATUS_OK, STATUS_MISSING, STATUS_CITED = "ok", "missing", "cited"
NAN = float("nan")


@dataclass
class RunResult:
    """What one run directory holds for the tables (everything optional)."""

    run_dir: str
    metrics: dict[str, float] | None = None  # fractions, NaN for undefined buckets
    config_sha256: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    problem: str | None = None  # why metrics is None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch, AP fraction)
    loss_curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch, training loss)
    box_std: float | None = None  # eval diagnostics: spread of each query's box across images
    gt_box_std: float | None = None  # the same statistic of the ground-truth boxes
    top_box_std: float | None = None  # spread of each image's top-scoring box across images


def _read_json(path: Path) -> Any:
    with path.open() as handle:
        return json.load(handle)


def _as_fraction(value: Any) -> float:
    """A metric value from metrics.json: numbers pass, null / −1 (pycocotools' undefined) become NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return NAN
    value = float(value)
    return NAN if (not math.isfinite(value) or value < 0) else value


def _find_ap(record: dict[str, Any]) -> float | None:
    """AP in one metrics.jsonl record, top level or under an eval/val/metrics sub-dict."""
    for holder in (record, record.get("eval"), record.get("val"), record.get("metrics")):
        if isinstance(holder, dict) and "AP" in holder:
            ap = _as_fraction(holder["AP"])
            return None if math.isnan(ap) else ap
    return None


def read_curve(metrics_jsonl: Path) -> list[tuple[float, float]]:
    """(epoch, AP) points logged during training; torn or foreign lines are skipped."""
    points: list[tuple[float, float]] = []
    if not metrics_jsonl.is_file():
        return points
    for line in metrics_jsonl.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), (int, float)):
            continue
        ap = _find_ap(record)
        if ap is not None:
            points.append((float(record["epoch"]), ap))
    return sorted(set(points))


def read_loss_curve(metrics_jsonl: Path) -> list[tuple[float, float]]:
    """(epoch, loss) of the per-epoch records (``"type": "epoch"``) of a run's metrics.jsonl."""
    points: dict[float, float] = {}
    if not metrics_jsonl.is_file():
        return []
    for line in metrics_jsonl.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("type") != "epoch":
            continue
        epoch, loss = record.get("epoch"), record.get("loss")
        if isinstance(epoch, (int, float)) and isinstance(loss, (int, float)) and math.isfinite(loss):
            points[float(epoch)] = float(loss)  # a resumed run may log an epoch twice: keep the last
    return sorted(points.items())


def read_run(run_dir: Path) -> RunResult:
    """Read the evaluation and provenance of one run directory, tolerating anything missing."""
    result = RunResult(run_dir=str(run_dir))
    sha_file = run_dir / "config.sha256"
    if sha_file.is_file():
        result.config_sha256 = sha_file.read_text().split()[0] if sha_file.read_text().split() else None
    prov_file = run_dir / "provenance.json"
    provenance: Any = None
    if prov_file.is_file():
        try:
            provenance = _read_json(prov_file)
        except (OSError, json.JSONDecodeError):
            provenance = None
    metrics_file = run_dir / "eval" / "metrics.json"
    if not metrics_file.is_file():
        result.problem = f"no evaluation: {metrics_file} does not exist"
    else:
        try:
            payload = _read_json(metrics_file)
            raw = payload["metrics"]
            if not isinstance(raw, dict):
                raise TypeError("'metrics' is not a mapping")
            result.metrics = {str(k): _as_fraction(v) for k, v in raw.items()}
            diagnostics = payload.get("diagnostics")
            if isinstance(diagnostics, dict):
                result.box_std = _optional_float(diagnostics.get("box_std_across_images"))
                result.gt_box_std = _optional_float(diagnostics.get("gt_box_std"))
                result.top_box_std = _optional_float(diagnostics.get("top_box_std"))
            if provenance is None and isinstance(payload.get("provenance"), dict):
                provenance = payload["provenance"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            result.problem = f"unreadable evaluation {metrics_file}: {err}"
    if isinstance(provenance, dict) and isinstance(provenance.get("git"), dict):
        result.git_commit = provenance["git"].get("commit")
        result.git_dirty = provenance["git"].get("dirty")
    result.curve = read_curve(run_dir / "metrics.jsonl")
    result.loss_curve = read_loss_curve(run_dir / "metrics.jsonl")
    final_epochs = _configured_epochs(run_dir / "config.yaml")
    if result.metrics is not None and final_epochs is not None and not math.isnan(result.metrics.get("AP", NAN)):
        # The final evaluation closes the curve at the end of the last epoch.
        result.curve = sorted(set(result.curve) | {(float(final_epochs), result.metrics["AP"])})
    return result


def _configured_epochs(config_yaml: Path) -> int | None:
    """train.epochs of a run's resolved config.yaml, or None if unreadable."""
    try:
        data = yaml.safe_load(config_yaml.read_text())
        epochs = data["train"]["epochs"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


@dataclass
class GatheredRow:
    row: Row
    status: str
    run: RunResult | None
    ours: dict[str, float]  # AP points (×100), NaN when not available
    gain_ours: dict[str, float] = field(default_factory=dict)  # ours − ours of row.gain_over


def gather_rows(table: Table, scale: str, runs_dir: str | Path) -> list[GatheredRow]:
    """Match every row of ``table`` with its run under ``runs_dir/scale``; shared runs are read once."""
    cache: dict[str, RunResult] = {}
    rows = []
    for row in table.rows:
        if row.experiment is None:
            rows.append(GatheredRow(row, STATUS_CITED, None, {m: NAN for m in table.metrics}))
            continue
        if row.experiment not in cache:
            cache[row.experiment] = read_run(Path(runs_dir) / scale / row.experiment)
        run = cache[row.experiment]
        if run.metrics is None:
            rows.append(GatheredRow(row, STATUS_MISSING, run, {m: NAN for m in table.metrics}))
            continue
        ours = {m: round(run.metrics.get(m, NAN) * 100.0, 2) for m in table.metrics}
        rows.append(GatheredRow(row, STATUS_OK, run, ours))
    by_id = {g.row.id: g for g in rows}
    for g in rows:
        if g.row.gain_over is not None:  # a published gain: ours is this row minus its base row
            base = by_id[g.row.gain_over].ours
            g.gain_ours = {m: round(g.ours[m] - base[m], 2) for m in table.gain_metrics()}
    return rows


def _optional_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _cell(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def _diff(ours: float, paper: float | None) -> float:
    if paper is None or math.isnan(ours):
        return NAN
    return round(ours - paper, 2)


def csv_columns(table: Table) -> list[str]:
    """Column order of the table CSV."""
    cols = ["table", "scale", "group", "row_id", "label", "epochs", "experiment", "status", "source", "inferred"]
    for metric in table.metrics:
        cols += [f"{metric}_paper", f"{metric}_ours", f"{metric}_diff"]
    cols += [f"{metric}_paper" for metric in table.paper_only]
    if table.gain_metrics():
        # Papers that publish gains only (D³ETR): the paper's gain over row gain_over vs ours.
        cols.append("gain_over")
        for metric in table.gain_metrics():
            cols += [f"{metric}_gain_paper", f"{metric}_gain_ours", f"{metric}_gain_diff"]
    # Near-zero box_std (vs gt_box_std) = one fixed box per query: the run learned only the
    # dataset's box prior (what smoke-scale runs do; configs/scales/smoke.yaml). top_box_std
    # (each image's top-scoring box) separates a detector from the prior even for reference-point
    # models, whose per-query box_std stays low (configs/scales/mini.yaml).
    cols += ["box_std", "top_box_std", "gt_box_std", "run_dir", "config_sha256", "git_commit", "git_dirty"]
    return cols


def render_csv(name: str, table: Table, scale: str, rows: list[GatheredRow]) -> str:
    """The table as CSV text (one line per registry row)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(table), lineterminator="\n")
    writer.writeheader()
    for g in rows:
        record: dict[str, Any] = {
            "table": name,
            "scale": scale,
            "group": g.row.group or "",
            "row_id": g.row.id,
            "label": g.row.label,
            "epochs": "" if g.row.epochs is None else g.row.epochs,
            "experiment": g.row.experiment or "",
            "status": g.status,
            "source": g.row.source,
            "inferred": str(g.row.inferred).lower(),
        }
        for metric in table.metrics:
            paper = g.row.paper.get(metric)
            record[f"{metric}_paper"] = _cell(paper)
            record[f"{metric}_ours"] = _cell(g.ours[metric])
            record[f"{metric}_diff"] = _cell(_diff(g.ours[metric], paper))
        for metric in table.paper_only:
            record[f"{metric}_paper"] = _cell(g.row.paper.get(metric))
        if table.gain_metrics():
            record["gain_over"] = g.row.gain_over or ""
            for metric in table.gain_metrics():
                gain = g.gain_ours.get(metric, NAN)
                record[f"{metric}_gain_paper"] = _cell(g.row.paper_gain.get(metric))
                record[f"{metric}_gain_ours"] = _cell(gain)
                record[f"{metric}_gain_diff"] = _cell(_diff(gain, g.row.paper_gain.get(metric)))
        run = g.run
        ok = run is not None and g.status == STATUS_OK
        record["box_std"] = _cell(run.box_std) if ok else ""
        record["gt_box_std"] = _cell(run.gt_box_std) if ok else ""
        record["top_box_std"] = _cell(run.top_box_std) if ok else ""
        record["run_dir"] = run.run_dir if ok else ""
        record["config_sha256"] = (run.config_sha256 or "") if ok else ""
        record["git_commit"] = (run.git_commit or "") if ok else ""
        dirty = run.git_dirty if ok else None
        record["git_dirty"] = "" if dirty is None else str(dirty).lower()
        writer.writerow(record)
    return buffer.getvalue()


def _md_number(value: float | None, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def render_markdown(name: str, table: Table, scale: str, rows: list[GatheredRow], paper: str) -> str:
    """The table as Markdown: per metric 'paper / ours (Δ)'; 'n/p' = not published, '—' = no result."""
    gains = table.gain_metrics()
    header = ["Row", "Epochs", "Status"] + table.metrics + table.paper_only + [f"{m} gain over" for m in gains]
    lines = [
        f"# {table.title}",
        "",
        f"Scale: **{scale}**. Source: {table.source} of {table.paper or paper}.",
        *([f"Note: {table.note}"] if table.note else []),
        "Cells: paper / ours (ours − paper), AP points. `n/p`: not published; `—`: no result; "
        "*: row label inferred by the reference notes.",
        "",
    ]
    if scale == "mini":
        lines += ["Ours are **mini-scale** runs (synthetic data, small models that learn on a CPU; docs/mini.md): "
                  "they can test the paper's qualitative claims (orderings, gains), not its numbers.", ""]
    elif scale != "paper":
        lines += [f"Ours are **{scale}-scale** runs: they check the pipeline, not the paper's numbers.", ""]
    current_group: object = object()
    for g in rows:
        if g.row.group != current_group:
            current_group = g.row.group
            if g.row.group:
                lines += ["", f"## {g.row.group}", ""]
            else:
                lines.append("")
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
        cells = [g.row.label + (" *" if g.row.inferred else ""), _cell(g.row.epochs) or "—", g.status]
        for metric in table.metrics:
            paper_value = g.row.paper.get(metric)
            paper_text = "n/p" if paper_value is None else f"{paper_value:.1f}"
            ours = g.ours[metric]
            if math.isnan(ours):
                cells.append(f"{paper_text} / —")
            else:
                cells.append(f"{paper_text} / {ours:.1f} ({_md_number(_diff(ours, paper_value), signed=True)})")
        for metric in table.paper_only:
            value = g.row.paper.get(metric)
            cells.append("n/p" if value is None else f"{value:g}")
        for metric in gains:  # "<base row>: paper gain / our gain (ours − paper)"
            if g.row.gain_over is None:
                cells.append("")
                continue
            paper_gain, ours_gain = g.row.paper_gain.get(metric), g.gain_ours.get(metric, NAN)
            paper_text = "n/p" if paper_gain is None else f"{paper_gain:+.1f}"
            ours_text = "—" if math.isnan(ours_gain) else (
                f"{ours_gain:+.1f} ({_md_number(_diff(ours_gain, paper_gain), signed=True)})")
            cells.append(f"{g.row.gain_over}: {paper_text} / {ours_text}")
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(g.status == s for g in rows) for s in (STATUS_OK, STATUS_MISSING, STATUS_CITED)}
    lines += ["", f"Rows: {counts[STATUS_OK]} ok, {counts[STATUS_MISSING]} missing, {counts[STATUS_CITED]} cited.", ""]
    state = code_state([(g.run.git_commit, g.run.git_dirty) for g in rows if g.status == STATUS_OK and g.run])
    if state:
        lines += [state, ""]
    return "\n".join(lines)


def code_state(commits: list[tuple[str | None, bool | None]]) -> str:
    """A warning line when rows come from more than one commit or from a dirty tree ('' when not).

    A table is only as comparable as the code behind its rows: say so where it is read.
    """
    distinct = sorted({c or "unknown" for c, _ in commits})
    dirty = sum(1 for _, d in commits if d)
    notes = []
    if len(distinct) > 1:
        notes.append(f"rows come from {len(distinct)} commits ({', '.join(c[:10] for c in distinct)})")
    if dirty:
        notes.append(f"{dirty} of {len(commits)} rows were trained from a dirty tree (uncommitted changes)")
    return ("**Code state:** " + "; ".join(notes) + " — see the .provenance.json.") if notes else ""


def render_provenance(
    name: str, table: Table, scale: str, rows: list[GatheredRow], registry_path: Path
) -> str:
    """Per-cell provenance as JSON: where each paper number and each of ours comes from."""
    out_rows = []
    for g in rows:
        run = g.run
        entry: dict[str, Any] = {
            "row_id": g.row.id,
            "experiment": g.row.experiment,
            "status": g.status,
            "paper_source": g.row.source,
            "inferred": g.row.inferred,
        }
        if run is not None:
            entry.update(
                run_dir=run.run_dir,
                eval_metrics=str(Path(run.run_dir) / "eval" / "metrics.json"),
                config_sha256=run.config_sha256,
                git_commit=run.git_commit,
                git_dirty=run.git_dirty,
            )
            if run.problem:
                entry["problem"] = run.problem
        entry["cells"] = {
            metric: {
                "paper": g.row.paper.get(metric),
                "ours": None if math.isnan(g.ours.get(metric, NAN)) else g.ours[metric],
            }
            for metric in table.metrics
        }
        if g.row.gain_over is not None:
            entry["gain_over"] = g.row.gain_over
            entry["gain_cells"] = {
                metric: {"paper": g.row.paper_gain.get(metric),
                         "ours": None if math.isnan(g.gain_ours.get(metric, NAN)) else g.gain_ours[metric]}
                for metric in table.gain_metrics()
            }
        out_rows.append(entry)
    document = {
        "table": name,
        "title": table.title,
        "scale": scale,
        "registry": str(registry_path),
        "registry_sha256": hashlib.sha256(registry_path.read_bytes()).hexdigest(),
        "rows": out_rows,
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _save_figure(fig: Any, path: Path) -> None:
    from replic.io import atomic_path

    with atomic_path(path) as tmp:  # a killed gather never leaves half a figure
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def plot_ap_bars(table: Table, rows: list[GatheredRow], scale: str, path: Path) -> None:
    """Grouped bars: paper AP vs our AP for each row (missing values draw no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [g.row.id for g in rows]
    paper = [g.row.paper.get("AP") for g in rows]
    ours = [g.ours.get("AP", NAN) for g in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2))
    ax.bar([x - 0.2 for x in xs], [NAN if p is None else p for p in paper], width=0.4, label="paper")
    ax.bar([x + 0.2 for x in xs], ours, width=0.4, label=f"ours ({scale})")
    for x, g in zip(xs, rows):
        if g.status == STATUS_MISSING:
            ax.annotate("missing", (x + 0.2, 0), rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("AP")
    ax.set_title(table.title, fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_curves(table: Table, rows: list[GatheredRow], scale: str, path: Path) -> None:
    """Per run of the table: training loss and AP (×100) against epoch, from metrics.jsonl + eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4.2))
    seen: set[str] = set()
    for g in rows:
        if g.run is None or g.row.experiment in seen:
            continue
        seen.add(g.row.experiment or "")
        if g.run.loss_curve:
            epochs, losses = zip(*g.run.loss_curve)
            ax_loss.plot(epochs, losses, marker="o", markersize=2, label=g.row.experiment)
        if g.run.curve:
            epochs, aps = zip(*g.run.curve)
            ax_ap.plot(epochs, [a * 100 for a in aps], marker="o", markersize=3, label=g.row.experiment)
    for ax, what in ((ax_loss, "training loss"), (ax_ap, "AP")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        if ax.get_lines():
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{table.title} — {scale} scale", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def gather(
    registry: Registry, registry_path: str | Path, name: str, scale: str, runs_dir: str | Path, out_dir: str | Path
) -> list[GatheredRow]:
    """Write ``table_<name>.{csv,md,provenance.json}`` and its figures under ``out_dir``."""
    table = registry.table(name)
    rows = gather_rows(table, scale, runs_dir)
    out = Path(out_dir)
    write_atomic(out / f"table_{name}.csv", render_csv(name, table, scale, rows))
    write_atomic(out / f"table_{name}.md", render_markdown(name, table, scale, rows, registry.paper))
    write_atomic(
        out / f"table_{name}.provenance.json", render_provenance(name, table, scale, rows, Path(registry_path))
    )
    plot_ap_bars(table, rows, scale, out / "figures" / f"table_{name}_ap.png")
    plot_curves(table, rows, scale, out / "figures" / f"table_{name}_curves.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replic.workflow.gather", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="configs/tables.yaml")
    parser.add_argument("--table", required=True)
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args(argv)
    registry = load_registry(args.registry)
    rows = gather(registry, args.registry, args.table, args.scale, args.runs_dir, args.out_dir)
    for g in rows:
        if g.status == STATUS_MISSING and g.run is not None:
            print(f"missing {g.row.id}: {g.run.problem}", file=sys.stderr)
    counts = {s: sum(g.status == s for g in rows) for s in (STATUS_OK, STATUS_MISSING, STATUS_CITED)}
    print(f"table {args.table} ({args.scale}): {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
