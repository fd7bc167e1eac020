"""The run directory: resolved config + hash, the sha256 of the files the run reads beside its
config, and the refusal to mix two configs (or two sets of inputs) in one directory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from replic.config import config_hash, to_dict
from replic.data.io import atomic_write_bytes
from replic.io import atomic_write_json, file_sha256
from replic.engine.config import ExperimentConfig
from replic.engine.tensorboard import EVENT_GLOB


log = logging.getLogger("replic.engine")


class RunDirError(ValueError):
    """The run directory holds a different experiment (or is otherwise unusable)."""


class RunPaths:
    """Every file the engine writes into a run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.config_hash = self.root / "config.sha256"
        self.inputs = self.root / "inputs.json"
        self.provenance = self.root / "provenance.json"
        self.metrics = self.root / "metrics.jsonl"
        # The run's log records (appended by each process that trains into the directory); the
        # workflow's logs/train.log is the job's stdout/stderr, another file.
        self.train_log = self.root / "train.log"
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.final = self.root / "checkpoint_final.pt"
        self.done = self.root / "done.json"
        self.eval_dir = self.root / "eval"

    def event_files(self) -> list[Path]:
        """The TensorBoard event files in the directory (one per process that trained into it)."""
        return sorted(self.root.glob(EVENT_GLOB)) if self.root.is_dir() else []


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": value}`` (lists and scalars are leaves)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 10) -> list[str]:
    """Human-readable ``key: old -> new`` lines for two resolved configs."""
    a, b = flatten(old), flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


# Keys that change how the model is executed, not what it computes (beyond float rounding).
# A run directory whose config differs only in these (e.g. written before the key existed)
# continues under the current setting instead of being refused.
LAYOUT_ONLY_KEYS = frozenset({"model.channels_last"})


def _same_function(old: dict[str, Any], new: dict[str, Any]) -> bool:
    a = {k: v for k, v in flatten(old).items() if k not in LAYOUT_ONLY_KEYS}
    b = {k: v for k, v in flatten(new).items() if k not in LAYOUT_ONLY_KEYS}
    return a == b


def remove_stale_temporaries(paths: RunPaths) -> int:
    """Delete the temporary files of writes a killed process never finished (``.<name>.*.tmp``).

    Atomic writes leave them only when the writer is SIGKILLed; a checkpoint's is as large as the
    checkpoint. Called by the main process before it writes again, so none is in use.
    """
    removed = 0
    for folder in (paths.root, paths.checkpoints, paths.eval_dir):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("%s: removed %d temporary file(s) of interrupted writes", paths.root, removed)
    return removed


def run_inputs(cfg: ExperimentConfig, method_files: dict[str, Path] | None = None) -> dict[str, dict[str, str]]:
    """The files a run reads beside its config, whose content shapes it, with their sha256.

    The config names them by path only, so a file rewritten in place (a re-pretrained backbone,
    regenerated data, a retrained teacher) leaves the config equal: without this record a
    continued run would resume checkpoints made from the old file. Keys are the config keys
    that name the files; missing files are left out (their readers fail with a clear error).
    """
    from replic.data import annotation_file

    files: dict[str, Path] = {}
    backbone = str(getattr(cfg.model, "pretrained_backbone", "none"))
    if backbone not in ("none", "torchvision"):
        files["model.pretrained_backbone"] = Path(backbone)
    files["data.root (train annotations)"] = annotation_file(cfg.data, "train")
    files.update(method_files or {})
    return {key: {"path": str(path), "sha256": file_sha256(path)}
            for key, path in sorted(files.items()) if path.is_file()}


def input_differences(old: dict[str, Any] | None, new: dict[str, dict[str, str]]) -> list[str]:
    """``key: sha256 old -> new`` lines (by content: a moved but equal file is no difference)."""
    old = old or {}
    lines = []
    for key in sorted(set(old) | set(new)):
        a = (old.get(key) or {}).get("sha256", "<absent>")
        b = (new.get(key) or {}).get("sha256", "<absent>")
        if a != b:
            where = (new.get(key) or old.get(key) or {}).get("path", "?")
            lines.append(f"{key} ({where}): sha256 {a[:12]} -> {b[:12]}")
    return lines


def _stale_inputs(paths: RunPaths, inputs: dict[str, dict[str, str]]) -> list[str]:
    """Why the directory's run did not read these inputs (empty: it did, or there is nothing to continue)."""
    if not (paths.last.is_file() or paths.done.is_file()):
        return []
    if not paths.inputs.is_file():
        return [f"no record of the files it read ({paths.inputs}; written before replic recorded "
                f"them), so a change of {', '.join(inputs)} cannot be ruled out"] if inputs else []
    try:
        stored = json.loads(paths.inputs.read_text())
    except json.JSONDecodeError as err:
        return [f"{paths.inputs}: unreadable ({err})"]
    return input_differences(stored, inputs)


def prepare(paths: RunPaths, cfg: ExperimentConfig, *, force: bool, write: bool,
            inputs: dict[str, dict[str, str]] | None = None) -> bool:
    """Check (and, on the main process, write) the run directory's config and input record.

    Returns True when the directory already held this config (a continuation); configs that
    differ only in :data:`LAYOUT_ONLY_KEYS` count as the same (the directory's config is kept).
    A different config is refused unless ``force``, which starts the run afresh
    (old checkpoints, metrics and results are removed). So is the same config whose input files
    (``inputs``, from :func:`run_inputs`) changed content since the run's checkpoints were made.
    """
    resolved = to_dict(cfg)
    digest = config_hash(cfg)
    same = layout_only = False
    if paths.config.is_file():
        old = yaml.safe_load(paths.config.read_text()) or {}
        if old == resolved:
            same = True
        elif _same_function(old, resolved):
            # Keep the directory's config: it records how the run started. The provenance of
            # this process records the current config hash.
            same = layout_only = True
            log.warning("%s: continuing a run whose config differs only in execution layout: %s",
                        paths.root, "; ".join(config_differences(old, resolved)))
        elif not force:
            diffs = config_differences(old, resolved)
            raise RunDirError(
                f"{paths.root} already holds a run with a different config "
                f"({paths.config}); differences: " + "; ".join(diffs)
                + ". Use another --out directory, or --force to start this one afresh."
            )
    if same and inputs is not None:
        changed = _stale_inputs(paths, inputs)
        if changed and not force:
            raise RunDirError(
                f"{paths.root} holds a run of this config made from other input files: "
                + "; ".join(changed)
                + ". Use another --out directory, or --force to start this one afresh "
                "(in the workflow: --config force_retrain=true)."
            )
        if changed:
            log.warning("%s: input files changed (%s): starting afresh (--force)", paths.root, "; ".join(changed))
            same = layout_only = False
    if write and not same:
        for stale in (paths.checkpoints, paths.eval_dir):
            if stale.exists():
                shutil.rmtree(stale)
        # The logs too: a run started afresh must not draw the old run's curves or lines.
        for stale in (paths.metrics, paths.done, paths.final, paths.train_log, *paths.event_files()):
            if stale.exists():
                stale.unlink()
    if write:
        remove_stale_temporaries(paths)
    if write and not layout_only:
        paths.root.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(resolved, sort_keys=True)
        atomic_write_bytes(paths.config, text.encode())
        atomic_write_bytes(paths.config_hash, (digest + "\n").encode())
    if write and inputs is not None:
        atomic_write_json(paths.inputs, inputs)
    return same
