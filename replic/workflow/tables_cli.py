"""``replic tables``: every table target the workflow can build, with its paper, rows, and the runs
it needs and what they cost at each scale.

The run set of a table is the distinct experiments of its rows plus what they need trained first
(a distillation teacher, MasKD's token run), as the workflow's DAG has them.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from replic.workflow.registry import SCALES, Registry, experiment_teachers, load_registry

DEFAULT_REGISTRY = "configs/tables.yaml"
DEFAULT_EXPERIMENTS = "configs/experiments"


def run_set(registry: Registry, table: str, experiments_dir: str | Path, scale: str | None = None) -> list[str]:
    """The experiments a table trains at ``scale`` (default: any): its rows' runs, their teachers and
    token runs (sorted)."""
    todo = list(registry.experiments([table], scale))
    runs: set[str] = set()
    while todo:
        name = todo.pop()
        if name in runs:
            continue
        runs.add(name)
        path = Path(experiments_dir) / f"{name}.yaml"
        for key in ("teacher", "tokens"):
            for kind, value in experiment_teachers(path, key=key) if path.is_file() else []:
                if kind == "experiment":
                    todo.append(value)
    return sorted(runs)


def table_costs(registry: Registry, table: str, experiments_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per scale: trainings and an estimate — CPU minutes (smoke, mini) or GPU hours (paper)."""
    costs: dict[str, dict[str, Any]] = {}
    for scale in SCALES:
        runs = run_set(registry, table, experiments_dir, scale)
        evaluated = registry.experiments([table], scale)
        if scale not in registry.compute:
            costs[scale] = {"trainings": len(runs), "available": False}
            continue
        compute = registry.compute[scale]
        if compute.train.gpu:
            hours = sum(registry.resources(r, scale, "train", capped=False)["runtime"] * compute.train.gpu
                        for r in runs) / 60
            hours += sum(registry.resources(r, scale, "eval")["runtime"] * compute.eval.gpu for r in evaluated) / 60
            costs[scale] = {"trainings": len(runs), "gpu_hours": round(hours, 1)}
        else:
            typical = (compute.train.typical_minutes or 0) * len(runs) + (compute.eval.typical_minutes or 0) * len(evaluated)
            costs[scale] = {"trainings": len(runs), "cpu_minutes": round(typical, 1)}
    return costs


def describe_tables(registry: Registry, experiments_dir: str | Path, include_test: bool = False) -> list[dict[str, Any]]:
    """One record per table target, in registry order."""
    records = []
    for name, table in registry.tables.items():
        if table.test_only and not include_test:
            continue
        records.append({
            "target": f"results/table_{name}.csv", "table": name, "paper": table.paper or registry.paper,
            "title": table.title, "rows": len(table.rows),
            "rows_run": sum(1 for r in table.rows if r.experiment), "test_only": table.test_only,
            "cost": table_costs(registry, name, experiments_dir),
        })
    return records


def _cost_text(cost: dict[str, Any]) -> str:
    if cost.get("available") is False:
        return "n/a"
    if "gpu_hours" in cost:
        return f"{cost['trainings']} runs, ~{cost['gpu_hours']:,.0f} GPU-h"
    minutes = cost["cpu_minutes"]
    when = f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"
    return f"{cost['trainings']} runs, ~{when} on 1 core"


def format_tables(records: list[dict[str, Any]]) -> str:
    """A plain-text listing: target, paper, rows, and cost per scale."""
    lines = []
    for rec in records:
        lines.append(f"{rec['target']}  ({rec['rows']} rows, {rec['rows_run']} run{'; CI only' if rec['test_only'] else ''})")
        lines.append(f"    {rec['title']}")
        lines.append(f"    {rec['paper']}")
        lines.append("    " + "  |  ".join(f"{scale}: {_cost_text(rec['cost'][scale])}" for scale in SCALES))
    lines.append("")
    lines.append("Build one: snakemake --cores all <target> --config scale=<smoke|mini|paper> "
                 "(paper also coco_root=/path/to/coco); the claims ledger: results/claims_<scale>.md")
    return "\n".join(lines)


def known_result(target: str, registry: Registry) -> bool:
    """Whether the table or claims rule makes ``target`` (a results/ file directly under results/)."""
    stems = [f"results/table_{name}" for name in registry.tables] + [f"results/claims_{scale}" for scale in SCALES]
    return any(target == f"{stem}.{ext}" for stem in stems for ext in ("csv", "md", "provenance.json"))


def suggest_target(target: str, registry: Registry) -> str:
    """The message for a results/ target no rule makes: the closest valid targets, then all of them."""
    valid = [f"results/table_{name}.csv" for name in registry.tables]
    valid += [f"results/table_{name}.md" for name in registry.tables]
    valid += [f"results/claims_{scale}.{ext}" for scale in SCALES for ext in ("csv", "md")]
    close = difflib.get_close_matches(target, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    listing = ", ".join(f"results/table_{name}.csv" for name in registry.tables)
    return (f"no rule makes {target}.{hint} Tables: {listing}; claims: results/claims_<scale>.md "
            "(replic tables lists them with their cost)")


def _run(args: argparse.Namespace) -> int:
    registry = load_registry(args.registry)
    records = describe_tables(registry, args.experiments_dir, include_test=args.all)
    print(json.dumps(records, indent=2) if args.json else format_tables(records))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tables`` to the ``replic`` command."""
    p = subparsers.add_parser("tables", help="list the table targets with their papers, rows and cost per scale",
                              description=__doc__)
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"table registry (default {DEFAULT_REGISTRY})")
    p.add_argument("--experiments-dir", default=DEFAULT_EXPERIMENTS)
    p.add_argument("--all", action="store_true", help="also the CI-only tables")
    p.add_argument("--json", action="store_true", help="one JSON list instead of text")
    p.set_defaults(func=_run)
