"""The run directory: resolved config + hash, and the refusal to mix two configs in one directory."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from replic.config import config_hash, to_dict
from replic.data.io import atomic_write_bytes
from replic.engine.config import ExperimentConfig


log = logging.getLogger("replic.engine")


class RunDirError(ValueError):
    """The run directory holds a different experiment (or is otherwise unusable)."""


class RunPaths:
    """Every file the engine writes into a run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.config_hash = self.root / "config.sha256"
        self.provenance = self.root / "provenance.json"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.final = self.root / "checkpoint_final.pt"
        self.done = self.root / "done.json"
        self.eval_dir = self.root / "eval"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 10) -> list[str]:
    """Human-readable ``key: old -> new`` lines for two resolved configs."""
    a, b = _flatten(old), _flatten(new)
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
    a = {k: v for k, v in _flatten(old).items() if k not in LAYOUT_ONLY_KEYS}
    b = {k: v for k, v in _flatten(new).items() if k not in LAYOUT_ONLY_KEYS}
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


def prepare(paths: RunPaths, cfg: ExperimentConfig, *, force: bool, write: bool) -> bool:
    """Check (and, on the main process, write) the run directory's config.

    Returns True when the directory already held this config (a continuation); configs that
    differ only in :data:`LAYOUT_ONLY_KEYS` count as the same (the directory's config is kept).
    A different config is refused unless ``force``, which starts the run afresh
    (old checkpoints, metrics and results are removed).
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
    if write and not same:
        for stale in (paths.checkpoints, paths.eval_dir):
            if stale.exists():
                shutil.rmtree(stale)
        for stale in (paths.metrics, paths.done, paths.final):
            if stale.exists():
                stale.unlink()
    if write:
        remove_stale_temporaries(paths)
    if write and not layout_only:
        paths.root.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(resolved, sort_keys=True)
        atomic_write_bytes(paths.config, text.encode())
        atomic_write_bytes(paths.config_hash, (digest + "\n").encode())
    return same
