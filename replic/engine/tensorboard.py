"""TensorBoard event files in the run directory, so ``tensorboard --logdir runs/`` shows each run.

Optional: written only when the ``tensorboard`` package is importable (``pip install
'replic[watch]'``), through ``torch.utils.tensorboard``; otherwise one info line says how to
enable it. The values are the ``metrics.jsonl`` records (:func:`scalars` maps one record to
tags), mirrored by :class:`replic.engine.progress.MetricsLog`, so both logs always agree.

A resumed run appends a new event file to the same folder. The killed process may have logged
steps past the checkpoint it resumes from; the new file starts with a ``purge_step`` marker
(TensorBoard then drops the older events from that step on), as ``metrics.jsonl`` is truncated
to the checkpoint's step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("replic.engine")

# The files SummaryWriter writes (also what a fresh start removes: replic.engine.rundir).
EVENT_GLOB = "events.out.tfevents.*"

# metrics.jsonl keys that are positions or bookkeeping, not curves.
_NOT_SCALARS = frozenset({"type", "epoch", "step", "time", "images", "steps"})
# record type -> tag prefix (train/loss, epoch/loss, val/AP, ...).
_PREFIX = {"step": "train", "epoch": "epoch", "eval": "val"}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for one ``metrics.jsonl`` record.

    ``step`` records give ``train/<loss term>`` (the total ``train/loss`` and every logged
    term) and ``lr/<param group>``; ``epoch`` records the epoch means as ``epoch/<term>``;
    ``eval`` records (periodic val) ``val/AP``, ``val/AP50``, ... and the box-spread
    diagnostics. Non-numeric and non-finite values (an AP of a category-less split) are skipped.
    """
    prefix = _PREFIX.get(record.get("type", ""))
    if prefix is None:
        return {}
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        if key.startswith("lr_"):
            if prefix == "train":  # one lr curve, at the logged steps
                out[f"lr/{key[3:]}"] = float(value)
        else:
            out[f"{prefix}/{key}"] = float(value)
    return out


class TensorBoardLog:
    """A ``SummaryWriter`` fed with ``metrics.jsonl`` records (main process only)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, log_dir: str | Path, *, resume_step: int | None = None) -> TensorBoardLog | None:
        """A writer into ``log_dir``, or None (with one info line) when tensorboard is not installed.

        ``resume_step``: the global step of the checkpoint a resumed run starts from; events the
        stopped process logged after it are superseded by this run's.
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard missing (or too old for torch): the run goes on without
            log.info("TensorBoard event files are off: the tensorboard package is not installed "
                     "(pip install 'replic[watch]' or pip install tensorboard to write them)")
            return None
        purge = None if resume_step is None else resume_step + 1
        # flush_secs: a watched run shows its curves within ~30 s; checkpoints flush too.
        writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=30)
        log.info("TensorBoard event files: %s (tensorboard --logdir %s)", log_dir, log_dir)
        return cls(writer)

    def write(self, record: dict[str, Any]) -> None:
        """Add the record's scalars at its global ``step``."""
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Write the queued events to disk (at each checkpoint: a SIGKILL after it loses none before it)."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
