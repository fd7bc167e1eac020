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
STATUS_OTHER_SCALE = "other scale"  # a row run at other scales only (Row.scales)
STATUSES = (STATUS_OK, STATUS_MISSING, STATUS_CITED, STATUS_OTHER_SCALE)
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
    gain_sum: dict[str, float] = field(default_factory=dict)  # Σ gain_ours of the rows in row.sum_of


def gather_rows(table: Table, scale: str, runs_dir: str | Path) -> list[GatheredRow]:
    """Match every row of ``table`` with its run under ``runs_dir/scale``; shared runs are read once."""
    cache: dict[str, RunResult] = {}
    rows = []
    for row in table.rows:
        if row.experiment is None:
            rows.append(GatheredRow(row, STATUS_CITED, None, {m: NAN for m in table.metrics}))
            continue
        if not row.at(scale):
            rows.append(GatheredRow(row, STATUS_OTHER_SCALE, None, {m: NAN for m in table.metrics}))
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
    for g in rows:
        if g.row.sum_of:
            g.gain_sum = {m: round(sum(by_id[r].gain_ours[m] for r in g.row.sum_of), 2) for m in table.gain_metrics()}
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
        if any(row.sum_of for row in table.rows):
            # A combination's gain beside the sum of its single methods' gains (same base row).
            cols.append("sum_of")
            cols += [f"{metric}_gain_sum_of_singles" for metric in table.gain_metrics()]
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
            if any(row.sum_of for row in table.rows):
                record["sum_of"] = " + ".join(g.row.sum_of)
                for metric in table.gain_metrics():
                    record[f"{metric}_gain_sum_of_singles"] = _cell(g.gain_sum.get(metric, NAN)) if g.row.sum_of else ""
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
        "*: row label reconstructed from the paper's text, not read from a table.",
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
            summed = g.gain_sum.get(metric)
            singles = "" if summed is None or math.isnan(summed) else f"; sum of single gains {summed:+.1f}"
            cells.append(f"{g.row.gain_over}: {paper_text} / {ours_text}{singles}")
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(g.status == s for g in rows) for s in STATUSES}
    other = f", {counts[STATUS_OTHER_SCALE]} run at other scales only" if counts[STATUS_OTHER_SCALE] else ""
    lines += ["", f"Rows: {counts[STATUS_OK]} ok, {counts[STATUS_MISSING]} missing, {counts[STATUS_CITED]} cited{other}.",
              ""]
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


# ------------------------------------------------------------------------------------ figures
# Built on a bare matplotlib Figure (no pyplot): no global state or backend switch, and the
# returned Figure can be inspected (tests check its artists, not its pixels).
from typing import TYPE_CHECKING  # noqa: E402  (the figures' types only)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_AP_UNIT = "AP points"  # our eval fractions ×100, the papers' unit
_TICK_WRAP = 30  # characters per line of a row's tick label: two lines for most labels
_TICK_ROTATION = 45.0  # degrees: two or three slanted lines fit a bar pair's width without touching
_TICK_FONT = 7.0
_PAPER_COLOR, _OURS_COLOR, _MARK_COLOR = "#8c8c8c", "#1f77b4", "0.35"


def _wrap(text: str, width: int) -> str:
    """``text`` on lines of at most ``width`` characters, broken at spaces only (its own line
    breaks kept).

    Never inside 'DETR-DC5-R101', so joining the lines with one space gives the text back.
    """
    import textwrap

    def fill(line: str) -> str:
        for w in range(width, width + 9):  # a little wider rather than a lone short word below
            lines = textwrap.wrap(line, w, break_long_words=False, break_on_hyphens=False)
            if len(lines) < 2 or len(lines[-1]) >= 8:
                break
        return "\n".join(lines) or line

    return "\n".join(fill(line) for line in text.split("\n"))


def figure_labels(rows: list[GatheredRow], *, with_group: bool = False) -> dict[str, str]:
    """What the figures call each row (by row id): its registry label, told apart from its twins.

    Rows may share a label (DETR-R50 at 50 and 500 epochs; '+ MasKD (R101 teacher)' under three
    detectors): they get ', N ep' (with a no-break space) where the epochs differ, and with
    ``with_group`` (figures that do not show the groups) ' · <group>' where the epochs do not
    tell them apart.
    """
    by_label: dict[str, list[Row]] = {}
    for g in rows:
        by_label.setdefault(g.row.label, []).append(g.row)
    names: dict[str, str] = {}
    for g in rows:
        row, text = g.row, g.row.label
        twins = by_label[row.label]
        if len({r.epochs for r in twins}) > 1 and row.epochs is not None:
            text += f", {row.epochs}\u00a0ep"  # no-break space: the wrap keeps '12 ep' whole
            twins = [r for r in twins if r.epochs == row.epochs]
        if with_group and len(twins) > 1 and row.group:
            text += f" · {row.group}"
        names[row.id] = text
    return names


def _new_figure(width: float, height: float) -> Figure:
    """A Figure with an Agg canvas of its own (draws and measures text without pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _bar_metric(table: Table) -> str:
    """The metric the bar figure compares: AP, or the table's first metric if it has no AP."""
    return "AP" if "AP" in table.metrics else table.metrics[0]


def _no_result_mark(g: GatheredRow) -> str:
    """Why a row has no number of ours: shown where its bar would be (never a zero bar)."""
    if g.status == STATUS_CITED:
        return "not re-run"
    if g.status == STATUS_MISSING:
        return "missing"
    if g.status == STATUS_OTHER_SCALE:
        return "not at this scale"
    return "n/a"


def _gain_mark(g: GatheredRow, base: GatheredRow | None) -> str:
    """Why a row has no gain of ours: our gain needs this row's run and its base row's."""
    if g.status != STATUS_OK:
        return _no_result_mark(g)
    if base is not None and base.status != STATUS_OK:
        return "base " + _no_result_mark(base)
    return "n/a"


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _bar_series(ax: Axes, values: list[float | None], marks: list[str], *, offset: float, width: float,
                label: str, color: str) -> None:
    """One series of bars at ``range(len(values)) + offset``: a bar where there is a value, the
    row's mark (rotated text from 0 up) where there is none."""
    from matplotlib.transforms import blended_transform_factory

    drawn = [(x + offset, v) for x, v in enumerate(values) if _finite(v)]
    if drawn:
        xs, heights = zip(*drawn)
        ax.bar(xs, heights, width=width, label=label, color=color, zorder=2)
    # Axes y: the mark stands at the bottom whatever the scale (gain panels go below 0).
    where = blended_transform_factory(ax.transData, ax.transAxes)
    for x, (value, mark) in enumerate(zip(values, marks)):
        if not _finite(value) and mark:
            ax.text(x + offset, 0.02, mark, transform=where, rotation=90, ha="center", va="bottom",
                    fontsize=6, color=_MARK_COLOR, gid="no_result")


def _paper_and_ours(ax: Axes, paper: list[float | None], ours: list[float | None], ours_marks: list[str],
                    scale: str, slot: float = 0.8) -> None:
    """Paper bars (only if the paper gives some number here) beside ours, both within ``slot`` of
    each row's unit width."""
    if any(_finite(p) for p in paper):
        half = slot / 2
        _bar_series(ax, paper, ["n/p" for _ in paper], offset=-half / 2, width=half, label="paper",
                    color=_PAPER_COLOR)
        _bar_series(ax, ours, ours_marks, offset=half / 2, width=half, label=f"ours ({scale} scale)",
                    color=_OURS_COLOR)
    else:  # e.g. D³ETR publishes no absolute APs: a lone series of ours, and no 'paper' legend
        _bar_series(ax, ours, ours_marks, offset=0.0, width=0.75 * slot, label=f"ours ({scale} scale)",
                    color=_OURS_COLOR)


def _legend(ax: Axes) -> None:
    """The panel's legend, above its right end: only the series drawn in this panel (none if none)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles),
                  fontsize=7.5, frameon=False, borderaxespad=0.2)


def _row_in(fig_width_in: float, n: int) -> float:
    """Inches along the x axis per row (the figure less the y axis' labels)."""
    return max(0.1, fig_width_in - 1.3) / max(1, n)


def _slot(fig_width_in: float, n: int) -> float:
    """Width (data units) of a row's bars: 0.8 of the row, at most ~1.1 in (3 gain rows across a
    wide figure would otherwise be slabs)."""
    return min(0.8, 1.1 / _row_in(fig_width_in, n))


_CHAR_IN, _LINE_IN = _TICK_FONT * 0.55 / 72, _TICK_FONT * 1.3 / 72  # a tick label's character, line


def _ticks_flat(labels: list[str], row_in: float) -> bool:
    """Whether the wrapped labels fit side by side unrotated (a few rows on a wide figure)."""
    longest = max((len(line) for t in labels for line in _wrap(t, _TICK_WRAP).split("\n")), default=0)
    return longest * _CHAR_IN <= 0.9 * row_in


def _row_ticks(ax: Axes, labels: list[str], row_in: float) -> None:
    """Rows' labels under their bars: wrapped and, unless they fit flat, slanted and anchored at
    the tick so that neighbours do not collide."""
    wrapped = [_wrap(t, _TICK_WRAP) for t in labels]
    if _ticks_flat(labels, row_in):
        ax.set_xticks(range(len(labels)), wrapped, fontsize=_TICK_FONT)
    else:
        ax.set_xticks(range(len(labels)), wrapped, rotation=_TICK_ROTATION, ha="right", rotation_mode="anchor",
                      fontsize=_TICK_FONT)
    ax.set_xlim(-0.6, len(labels) - 0.4)


def _tick_depth_in(labels: list[str], row_in: float) -> float:
    """Rough height (inches) that the wrapped (maybe slanted) tick labels take below an axes."""
    if not labels:
        return 0.3
    wrapped = [_wrap(t, _TICK_WRAP).split("\n") for t in labels]
    longest = max(len(line) for lines in wrapped for line in lines)
    lines = max(len(lines) for lines in wrapped)
    if _ticks_flat(labels, row_in):
        return lines * _LINE_IN + 0.35
    return 0.71 * (longest * _CHAR_IN + lines * _LINE_IN) + 0.35  # sin = cos 45°, + room for the axis


def _group_headers(ax: Axes, rows: list[GatheredRow], row_width_in: float, top: float) -> None:
    """Each group's name above its rows and a dotted line between groups; ylim leaves them room."""
    from matplotlib.transforms import blended_transform_factory

    spans: list[tuple[str, int, int]] = []  # (group, first x, last x) of consecutive rows
    for x, g in enumerate(rows):
        name = g.row.group or ""
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], x)
        else:
            spans.append((name, x, x))
    if not any(name for name, _, _ in spans):
        ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
        return
    where = blended_transform_factory(ax.transData, ax.transAxes)
    max_lines = 1
    for name, first, last in spans:
        if first > 0:
            ax.axvline(first - 0.5, color="0.75", linestyle=":", linewidth=0.8, zorder=1)
        if name:
            chars = max(6, int((last - first + 1) * row_width_in * 72 / (6.5 * 0.55)) - 1)
            text = _wrap(name, chars)
            max_lines = max(max_lines, text.count("\n") + 1)
            ax.text((first + last) / 2, 0.985, text, transform=where, ha="center", va="top", fontsize=6.5,
                    color="0.25", gid="group")
    # Bars stay below the headers: the headers take ~max_lines lines of a ~3 in axes.
    free = max(0.5, 1.0 - 0.035 - max_lines * 6.5 * 1.25 / 72 / 3.0)
    ax.set_ylim(0, (top if top > 0 else 1.0) * 1.03 / free)


def build_ap_bars(table: Table, rows: list[GatheredRow], scale: str) -> Figure:
    """The AP figure of one table, unsaved: paper vs our AP per row and, where rows state a gain
    over another row (papers that publish gains only, like D³ETR), the paper's gain vs ours."""
    metric = _bar_metric(table)
    names = figure_labels(rows)
    labels = [names[g.row.id] for g in rows]
    gains = table.gain_metrics()
    gain_rows = [g for g in rows if g.row.gain_over is not None] if gains else []
    gain_metric = metric if metric in gains else (gains[0] if gains else metric)
    by_id = {g.row.id: g for g in rows}
    bases = sorted({g.row.gain_over for g in gain_rows if g.row.gain_over in by_id})
    # Several base rows: each gain's tick names its base on lines of their own.
    gain_labels = [names[g.row.id] if len(bases) <= 1 else
                   _wrap(names[g.row.id], _TICK_WRAP) + "\n" + _wrap("vs " + names[g.row.gain_over or ""], _TICK_WRAP)
                   for g in gain_rows]

    width = min(22.0, max(7.5, 0.6 * len(rows) + 2.0))  # ~0.6 in per row: a slanted 2-line label
    ap_height = 3.0 + _tick_depth_in(labels, _row_in(width, len(rows)))
    gain_height = 2.6 + _tick_depth_in(gain_labels, _row_in(width, len(gain_rows))) if gain_rows else 0.0
    title = f"{table.title} — ours at {scale} scale"
    title_chars = int(width * 72 / (10 * 0.58))
    title_in = (_wrap(title, title_chars).count("\n") + 1) * 10 * 1.4 / 72 + 0.35
    fig = _new_figure(width, ap_height + gain_height + title_in)
    if gain_rows:
        ax, ax_gain = fig.subplots(2, 1, height_ratios=[ap_height, gain_height])
    else:
        ax, ax_gain = fig.subplots(1, 1), None
    fig.suptitle(_wrap(title, title_chars), fontsize=10)

    ax.set_label("ap")
    paper = [g.row.paper.get(metric) for g in rows]
    ours: list[float | None] = [g.ours.get(metric, NAN) for g in rows]
    _paper_and_ours(ax, paper, ours, [_no_result_mark(g) for g in rows], scale, _slot(width, len(rows)))
    _legend(ax)
    _row_ticks(ax, labels, _row_in(width, len(rows)))
    top = max([v for v in paper + ours if v is not None and _finite(v)], default=0.0)
    _group_headers(ax, rows, _row_in(width, len(rows)), top)
    ax.set_ylabel(f"{metric} ({_AP_UNIT})")
    ax.grid(axis="y", color="0.9", zorder=0)

    if ax_gain is not None:
        ax_gain.set_label("gain")
        paper_gain = [g.row.paper_gain.get(gain_metric) for g in gain_rows]
        ours_gain: list[float | None] = [g.gain_ours.get(gain_metric, NAN) for g in gain_rows]
        marks = [_gain_mark(g, by_id.get(g.row.gain_over or "")) for g in gain_rows]
        _paper_and_ours(ax_gain, paper_gain, ours_gain, marks, scale, _slot(width, len(gain_rows)))
        _legend(ax_gain)
        _row_ticks(ax_gain, gain_labels, _row_in(width, len(gain_rows)))
        ax_gain.axhline(0.0, color="0.3", linewidth=0.8, zorder=1)
        ax_gain.set_ylabel(f"{gain_metric} gain ({_AP_UNIT})")
        ax_gain.grid(axis="y", color="0.9", zorder=0)
        if not ax_gain.patches:  # no gain at all: an axis around 0 for the marks, not matplotlib's 0..1
            ax_gain.set_ylim(-1.0, 1.0)
        # Left, so that the legend has the right end of the line.
        over = f"over {names[bases[0]]}" if len(bases) == 1 else "over each row's base row (after 'vs')"
        ax_gain.set_title(_wrap(f"{gain_metric} gain {over}", int((width - 3.0) * 72 / (8.5 * 0.58))),
                          fontsize=8.5, loc="left")
    return fig


def build_curves(table: Table, rows: list[GatheredRow], scale: str) -> Figure:
    """The curves figure of one table, unsaved: per run, training loss and AP against epochs."""
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    names = figure_labels(rows, with_group=True)
    runs: dict[str, tuple[list[str], RunResult]] = {}  # one entry per run (rows may share one)
    for g in rows:
        if g.run is not None and g.row.experiment is not None:
            runs.setdefault(g.row.experiment, ([], g.run))[0].append(names[g.row.id])
    run_names = {exp: _wrap(" / ".join(labels), 45) for exp, (labels, _) in runs.items()}
    logged = [exp for exp, (_, run) in runs.items() if run.curve or run.loss_curve]
    title = f"{table.title} — ours at {scale} scale"
    if len(logged) < len(runs):  # a run that logged nothing has no line: say so rather than hide it
        title += f"; {len(runs) - len(logged)} of {len(runs)} runs logged no curve yet"
    width, legend_font = 12.0, 6.5
    title_chars = int(width * 72 / (10 * 0.58))
    longest = max((len(line) for exp in logged for line in run_names[exp].split("\n")), default=10)
    ncol = max(1, int(width * 0.95 / (longest * legend_font * 0.55 / 72 + 0.55)))
    legend_lines = sum(max(run_names[e].count("\n") + 1 for e in logged[i:i + ncol])
                       for i in range(0, len(logged), ncol))
    height = 4.0 + (_wrap(title, title_chars).count("\n") + 1) * 0.2 + legend_lines * legend_font * 1.5 / 72
    fig = _new_figure(width, height)
    ax_loss, ax_ap = fig.subplots(1, 2)
    ax_loss.set_label("loss")
    ax_ap.set_label("ap")
    fig.suptitle(_wrap(title, title_chars), fontsize=10)

    colors = matplotlib.colormaps["tab20" if len(logged) > 10 else "tab10"].colors
    handles = []
    for i, exp in enumerate(logged):
        run = runs[exp][1]
        style = {"color": colors[i % len(colors)], "linestyle": ("-", "--", ":")[i // len(colors) % 3]}
        if run.loss_curve:
            # A loss record's "epoch" is the epoch index (0-based) and its loss the mean over that
            # epoch; evaluations log epochs completed: plot the mean at its epoch's end.
            ax_loss.plot([e + 1 for e, _ in run.loss_curve], [v for _, v in run.loss_curve],
                         marker="o" if len(run.loss_curve) <= 40 else "", markersize=2, label=run_names[exp],
                         **style)
        if run.curve:
            ax_ap.plot([e for e, _ in run.curve], [a * 100 for _, a in run.curve],
                       marker="o" if len(run.curve) <= 40 else "", markersize=3, label=run_names[exp], **style)
        handles.append(Line2D([], [], marker="o", markersize=3, label=run_names[exp], **style))
    for ax, what in ((ax_loss, "training loss (mean over the epoch)"), (ax_ap, f"AP ({_AP_UNIT})")):
        ax.set_xlabel("epochs completed")
        ax.set_ylabel(what)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(color="0.92")
        if not ax.get_lines():
            ax.text(0.5, 0.5, f"no {what.split(' (')[0]} logged", ha="center", va="center",
                    transform=ax.transAxes)
    # One legend for both panels (a run has the same colour in each), under them, in columns.
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=legend_font, frameon=False)
    return fig


def _save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as PNG; 'tight' keeps every label and the title inside the image."""
    from replic.io import atomic_path

    with atomic_path(path) as tmp:  # a killed gather never leaves half a figure
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1,
                    metadata={"Software": None})


def plot_ap_bars(table: Table, rows: list[GatheredRow], scale: str, path: Path) -> Figure:
    """Save the AP figure of ``build_ap_bars`` to ``path``; the Figure is returned for inspection."""
    fig = build_ap_bars(table, rows, scale)
    _save_figure(fig, path)
    return fig


def plot_curves(table: Table, rows: list[GatheredRow], scale: str, path: Path) -> Figure:
    """Save the curves figure of ``build_curves`` to ``path``; the Figure is returned for inspection."""
    fig = build_curves(table, rows, scale)
    _save_figure(fig, path)
    return fig


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
    counts = {s: sum(g.status == s for g in rows) for s in STATUSES}
    print(f"table {args.table} ({args.scale}): {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
