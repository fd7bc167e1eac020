"""Workflow steps that prepare a scale: check a COCO directory layout, write the scale overlay.

Run by the Snakefile as ``python -m replic.workflow.prepare {check-coco,overlay} ...``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from replic.config import deep_merge, load_yaml

SPLITS: tuple[str, ...] = ("train2017", "val2017")


def coco_layout_problems(root: str | Path) -> list[str]:
    """What is missing from a COCO 2017 layout at ``root`` (empty list: the layout is complete)."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root} is not a directory"]
    problems = []
    for split in SPLITS:
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            problems.append(f"missing annotation file {ann}")
        if not (root / split).is_dir():
            problems.append(f"missing image folder {root / split}/")
    return problems


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``replic.io``: temp file, fsync, readable mode, rename)."""
    from replic.io import atomic_write_text

    atomic_write_text(path, text)


def check_coco(root: str | Path, out: str | Path) -> int:
    """Check the layout at ``root``; on success write a stamp JSON naming the annotation files."""
    problems = coco_layout_problems(root)
    if problems:
        print(
            f"COCO layout check failed for coco_root={root}:\n  - " + "\n  - ".join(problems)
            + "\nExpected: annotations/instances_{train,val}2017.json, train2017/, val2017/ "
            "(set it with --config coco_root=/path/to/coco)",
            file=sys.stderr,
        )
        return 1
    root = Path(root).resolve()
    stamp = {
        "root": str(root),
        "annotations": {
            split: {
                "path": str(root / "annotations" / f"instances_{split}.json"),
                "bytes": (root / "annotations" / f"instances_{split}.json").stat().st_size,
            }
            for split in SPLITS
        },
    }
    write_atomic(out, json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return 0


def dotted_settings(items: list[str]) -> dict[str, Any]:
    """``["a.b=x"]`` -> ``{"a": {"b": "x"}}`` (values parsed as YAML scalars); ValueError naming a bad item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(text)
    return out


def scale_overlay(scale: str, data_root: str, scales_dir: str | Path,
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The overlay the workflow passes as ``--scale``: the named scale's file + the data root.

    Training is told not to evaluate at the end: the workflow evaluates in its own job
    (own resources, and DC5 models at 1 image per GPU) so it is not done twice.
    """
    base_path = Path(scales_dir) / f"{scale}.yaml"
    base = load_yaml(base_path) if base_path.is_file() else {}
    overlay = deep_merge(base, {"scale": scale, "data": {"root": data_root}, "train": {"eval_at_end": False}})
    # Paths that follow the workflow's layout (mini: the pretrained backbone, the feature cache).
    return deep_merge(overlay, settings or {})


def backbone_mismatches(weights: str | Path, expected: dict[str, Any]) -> list[str]:
    """How a pretrained backbone file differs from what the workflow config asks for (empty: it fits).

    Compares ``expected`` (pretraining options, e.g. ``{"steps": 1200, "roi_cls_weight": 1.0}``)
    with the options in ``<weights>.provenance.json`` and the file's sha256 with the recorded one.
    Snakemake reruns the pretraining when its params change only if it made the file itself; a
    file made by hand, or before a config change, would otherwise be used stale by every run.
    """
    from replic.engine.pretrain import PretrainOptions, provenance_path
    from replic.io import file_sha256

    weights = Path(weights)
    prov_file = provenance_path(weights)
    if not weights.is_file():
        return [f"{weights}: no such file"]
    if not prov_file.is_file():
        return [f"{prov_file}: missing (no record of how {weights.name} was pretrained)"]
    try:
        record = json.loads(prov_file.read_text())
        options = record["options"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return [f"{prov_file}: unreadable provenance ({type(err).__name__}: {err})"]
    defaults = PretrainOptions(data_root="")
    problems = []
    for key, want in sorted(expected.items()):
        # Options added after a file was written take their default (what that run used).
        have = options.get(key, getattr(defaults, key, None))
        if have != want:
            problems.append(f"{prov_file}: options.{key} = {have!r}, the config asks for {want!r}")
    recorded = record.get("sha256")
    if recorded and recorded != file_sha256(weights):
        problems.append(f"{weights}: sha256 differs from {prov_file.name} (the file was replaced)")
    return problems


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def overlay_fingerprint(scale: str, data_root: str, scales_dir: str | Path,
                        settings: dict[str, Any] | None = None) -> str:
    """sha256 (16 hex digits) of the overlay :func:`scale_overlay` writes, by content."""
    return _digest(scale_overlay(scale, data_root, scales_dir, settings))


def run_fingerprint(experiment: str | Path, scale: str, data_root: str, scales_dir: str | Path,
                    settings: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> str:
    """sha256 (16 hex digits) of the raw config a workflow run resolves to.

    The experiment with its ``extends`` chain and per-scale sizes, merged with the overlay
    :func:`scale_overlay` writes: what ``replic train`` reads, by content. The workflow reruns a
    run when this changes (a Snakemake param), not when a config file's time does — so an edited
    base file reruns its experiments, and a comment-only edit reruns nothing. (The overlay file
    itself is rebuilt by :func:`overlay_fingerprint` in the same way.) ``overrides``: what the run
    sets after the overlay (a seed replicate's ``seed`` and ``name``).
    """
    from replic.engine.config import resolve_raw

    overlay = scale_overlay(scale, data_root, scales_dir, settings)
    raw = resolve_raw(experiment, scale, overlay=overlay)
    if overrides:
        raw = deep_merge(raw, overrides)
    return _digest(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replic.workflow.prepare", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    check = sub.add_parser("check-coco", help="check a COCO 2017 directory layout")
    check.add_argument("--root", required=True)
    check.add_argument("--out", required=True, help="stamp JSON written on success")
    overlay = sub.add_parser("overlay", help="write the scale overlay YAML")
    overlay.add_argument("--scale", required=True)
    overlay.add_argument("--data-root", required=True)
    overlay.add_argument("--scales-dir", required=True)
    overlay.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="one more overlay key, e.g. model.pretrained_backbone=runs/mini/backbone/x.pt")
    overlay.add_argument("--backbone", help="pretrained backbone whose provenance must match --backbone-expect")
    overlay.add_argument("--backbone-expect", action="append", default=[], metavar="OPTION=VALUE",
                         help="a pretraining option the backbone must have been made with (repeatable)")
    overlay.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.step == "check-coco":
        return check_coco(args.root, args.out)
    if args.backbone:
        problems = backbone_mismatches(args.backbone, dotted_settings(args.backbone_expect))
        if problems:
            print(f"stale pretrained backbone {args.backbone}:\n  - " + "\n  - ".join(problems)
                  + "\nRebuild it with the workflow config's mini_pretrain options: snakemake --forcerun"
                  " pretrain_backbone <target> --config scale=mini (or delete the file)",
                  file=sys.stderr)
            return 1
    data = scale_overlay(args.scale, args.data_root, args.scales_dir, dotted_settings(args.set))
    write_atomic(args.out, yaml.safe_dump(data, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
