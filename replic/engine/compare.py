"""``replic compare RUN_A RUN_B``: what differs between two run directories of ``replic train``.

Three questions, in the order one asks them when two numbers disagree:

* **config**: the resolved configs (``config.yaml``, everything the run computed from), as dotted
  keys ``key: A -> B``; only keys that differ are listed.
* **metrics**: every metric both ``eval/metrics.json`` hold, in AP points (x100, as the papers'
  tables print them; the files keep pycocotools' fractions), with the difference B - A.
* **code and environment** (``provenance.json``): the git commit and dirty flag of the replic
  source, the package versions that differ, Python and hardware, and the sha256 of the input
  files the runs read beside their configs (``inputs.json``) where they differ.

Only the run directories' files are read: no model is built and no data is touched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from replic.config import load_yaml
from replic.engine.rundir import flatten
from replic.eval.coco_eval import METRIC_NAMES, ap_points

# Environment facts of provenance.json compared beside the packages: (label, path in the record).
ENVIRONMENT_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python", ("python",)),
    ("cpu", ("hardware", "cpu")),
    ("gpus", ("hardware", "gpus")),
    ("cuda", ("hardware", "cuda")),
    ("world_size", ("world_size",)),
)
ABSENT = "<absent>"


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, ``None`` if the file is absent; a malformed file is an input error."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return data


def load_run(path: str | Path) -> dict[str, Any]:
    """The parts of a run directory that ``compare`` reads: resolved config, metrics, provenance.

    Raises ``ValueError`` naming the path when it is no run directory (missing, a file, or
    without the resolved ``config.yaml`` that ``replic train`` writes first).
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: no such run directory")
    if not root.is_dir():
        raise ValueError(f"{root}: not a run directory (it is a file)")
    config_file = root / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{root}: not a run directory of replic train: no resolved config "
                         f"{config_file}")
    eval_record = _read_json(root / "eval" / "metrics.json")
    metrics = None
    if eval_record is not None:
        metrics = eval_record.get("metrics")
        if not isinstance(metrics, dict):
            raise ValueError(f"{root / 'eval' / 'metrics.json'}: no 'metrics' object")
    provenance = _read_json(root / "provenance.json")
    if provenance is None and eval_record is not None:
        # An evaluation records the provenance of the process that scored the run.
        provenance = eval_record.get("provenance")
    return {
        "path": str(root),
        "config": load_yaml(config_file),
        "metrics": metrics,
        "provenance": provenance or {},
        "inputs": _read_json(root / "inputs.json") or {},
    }


def _dig(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _pair(a: Any, b: Any) -> dict[str, Any]:
    return {"a": a, "b": b}


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{dotted key: {"a": value, "b": value}}`` for every key whose value differs.

    A key that one config lacks has no entry on that side.
    """
    flat_a, flat_b = flatten(a), flatten(b)
    diffs: dict[str, dict[str, Any]] = {}
    for key in sorted(set(flat_a) | set(flat_b)):
        if flat_a.get(key, ABSENT) != flat_b.get(key, ABSENT):
            diffs[key] = {side: flat[key] for side, flat in (("a", flat_a), ("b", flat_b)) if key in flat}
    return diffs


def _points(value: Any) -> float | None:
    points = ap_points(value) if isinstance(value, (int, float)) else None
    return None if points is None else round(points, 4)


def metric_diff(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every metric both runs hold, in AP points (x100), with the difference B - A.

    COCO's twelve come first in their usual order; a null value (no object in a bucket) stays
    null and so does its difference.
    """
    if a is None or b is None:
        return {}
    names = [n for n in METRIC_NAMES if n in a and n in b]
    names += sorted(n for n in a if n in b and n not in METRIC_NAMES)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        pa, pb = _points(a[name]), _points(b[name])
        diff = None if pa is None or pb is None else round(pb - pa, 4)
        out[name] = {"a": pa, "b": pb, "diff": diff}
    return out


def code_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Commit and dirty flag of both runs; package versions, environment and inputs that differ."""
    git_a, git_b = a["provenance"].get("git") or {}, b["provenance"].get("git") or {}
    packages_a = a["provenance"].get("packages") or {}
    packages_b = b["provenance"].get("packages") or {}
    packages = {name: _pair(packages_a.get(name), packages_b.get(name))
                for name in sorted(set(packages_a) | set(packages_b))
                if packages_a.get(name) != packages_b.get(name)}
    environment = {}
    for label, keys in ENVIRONMENT_KEYS:
        va, vb = _dig(a["provenance"], keys), _dig(b["provenance"], keys)
        if va != vb:
            environment[label] = _pair(va, vb)
    inputs = {}
    for key in sorted(set(a["inputs"]) | set(b["inputs"])):
        sha_a = (a["inputs"].get(key) or {}).get("sha256")
        sha_b = (b["inputs"].get(key) or {}).get("sha256")
        if sha_a != sha_b:
            inputs[key] = _pair(sha_a, sha_b)
    return {
        "commit": _pair(git_a.get("commit"), git_b.get("commit")),
        "dirty": _pair(git_a.get("dirty"), git_b.get("dirty")),
        "dirty_files": _pair(git_a.get("dirty_files"), git_b.get("dirty_files")),
        "packages": packages,
        "environment": environment,
        "inputs": inputs,
        "provenance": _pair(bool(a["provenance"]), bool(b["provenance"])),
    }


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    """The whole comparison as one JSON-ready object (what ``--json`` prints)."""
    a, b = load_run(run_a), load_run(run_b)
    config = config_diff(a["config"], b["config"])
    return {
        "a": a["path"],
        "b": b["path"],
        "config": {"same": not config, "differences": config},
        "metrics": {
            "units": "AP points (x100); diff = B - A",
            "available": _pair(a["metrics"] is not None, b["metrics"] is not None),
            "values": metric_diff(a["metrics"], b["metrics"]),
        },
        "code": code_diff(a, b),
    }


def _show(value: Any) -> str:
    return "unknown" if value is None else str(value)


def _show_points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def format_comparison(result: dict[str, Any]) -> str:
    """The human-readable report of :func:`compare_runs`."""
    lines = [f"A: {result['a']}", f"B: {result['b']}", ""]
    config = result["config"]
    if config["same"]:
        lines.append("config: same resolved config")
    else:
        lines.append(f"config: {len(config['differences'])} resolved key(s) differ")
        for key, pair in config["differences"].items():
            lines.append(f"  {key}: {pair.get('a', ABSENT)!r} -> {pair.get('b', ABSENT)!r}")

    lines.append("")
    metrics = result["metrics"]
    missing = [side.upper() for side, there in metrics["available"].items() if not there]
    if missing:
        lines.append(f"metrics: not compared, no eval/metrics.json in {' and '.join(missing)}")
    else:
        lines.append("metrics (eval/metrics.json, AP points x100; diff = B - A):")
        for name, row in metrics["values"].items():
            diff = "n/a" if row["diff"] is None else f"{row['diff']:+.1f}"
            lines.append(f"  {name:<6} {_show_points(row['a']):>6} -> {_show_points(row['b']):>6}  ({diff})")

    lines.append("")
    code = result["code"]
    lines.append("code and environment (provenance.json):")
    if not all(code["provenance"].values()):
        absent = [side.upper() for side, there in code["provenance"].items() if not there]
        lines.append(f"  no provenance record in {' and '.join(absent)}")
    commit_a, commit_b = code["commit"]["a"], code["commit"]["b"]
    same_commit = " (same)" if commit_a == commit_b and commit_a is not None else ""
    lines.append(f"  commit: {_show(commit_a)} -> {_show(commit_b)}{same_commit}")
    lines.append(f"  dirty: {_show(code['dirty']['a'])} -> {_show(code['dirty']['b'])}")
    if code["packages"]:
        for name, pair in code["packages"].items():
            lines.append(f"  package {name}: {_show(pair['a'])} -> {_show(pair['b'])}")
    else:
        lines.append("  packages: same versions")
    for label, pair in code["environment"].items():
        lines.append(f"  {label}: {_show(pair['a'])} -> {_show(pair['b'])}")
    for key, pair in code["inputs"].items():
        lines.append(f"  input {key}: sha256 {_show(pair['a'])[:12]} -> {_show(pair['b'])[:12]}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    result = compare_runs(args.run_a, args.run_b)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=False))
    else:
        print(format_comparison(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compare`` to the ``replic`` command."""
    p = subparsers.add_parser(
        "compare", help="what differs between two run directories (config, metrics, code)",
        description="Compare two run directories written by replic train: the resolved configs "
        "(config.yaml; only differing dotted keys), every metric both eval/metrics.json hold in "
        "AP points (x100) with the difference B - A, and the code and environment "
        "(provenance.json: commit, dirty flag, package versions that differ).",
    )
    p.add_argument("run_a", metavar="RUN_A", help="first run directory")
    p.add_argument("run_b", metavar="RUN_B", help="second run directory")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.set_defaults(func=_run)
