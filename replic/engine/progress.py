"""Training progress on the terminal and the ``metrics.jsonl`` log.

A terminal gets a one-line ``\\r`` progress bar (no tqdm dependency); a file or
pipe (Slurm logs) gets plain log lines at the logging interval instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("replic.engine")


class Progress:
    """A minimal progress display for one epoch (or one evaluation pass)."""

    def __init__(
        self, total: int, desc: str, *, start: int = 0, stream: TextIO | None = None,
        enabled: bool = True, plain_every: int = 50,
    ) -> None:
        self.total = total
        self.desc = desc
        self.count = start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.plain_every = max(1, plain_every)
        self.t0 = time.perf_counter()
        self.start = start

    def update(self, postfix: str = "") -> None:
        """Advance by one item."""
        self.count += 1
        if not self.enabled:
            return
        if self.tty:
            width = 24
            frac = self.count / self.total if self.total else 1.0
            bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
            rate = (self.count - self.start) / max(1e-9, time.perf_counter() - self.t0)
            self.stream.write(
                f"\r{self.desc} [{bar}] {self.count}/{self.total} {rate:.2f} it/s {postfix}"[:160]
            )
            self.stream.flush()
        elif self.count % self.plain_every == 0 or self.count == self.total:
            log.info("%s %d/%d %s", self.desc, self.count, self.total, postfix)

    def close(self) -> None:
        """Finish the line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only JSON lines, one per logging interval and one per epoch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk (a crash loses at most the current line)."""
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True)
        with self.path.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_after(self, global_step: int) -> None:
        """Drop records past ``global_step`` (written after the checkpoint we resume from)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
            if int(record.get("step", 0)) <= global_step:
                kept.append(line)
        from replic.io import atomic_write_text

        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
