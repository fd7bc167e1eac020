"""Training progress on the terminal, the step log line and the ``metrics.jsonl`` log.

A terminal gets a one-line ``\\r`` progress bar (no tqdm dependency); a file or
pipe (Slurm logs) gets plain log lines at the logging interval instead. Training
also logs one line per logging interval (:func:`format_step_line`, as detectron2 and
MMEngine print them: ETA, smoothed loss, lr, seconds per step, peak GPU memory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("replic.engine")


class Progress:
    """A minimal progress display for one epoch (or one evaluation pass)."""

    def __init__(
        self, total: int, desc: str, *, start: int = 0, stream: TextIO | None = None,
        enabled: bool = True, plain_every: int = 50, plain: bool = True,
    ) -> None:
        self.total = total
        self.desc = desc
        self.count = start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.plain_every = max(1, plain_every)
        # False: no plain lines off a terminal (the caller logs its own, e.g. the training step line).
        self.plain = plain
        self.drawn = False  # the bar is on the terminal's current line
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
            self.drawn = True
        elif self.plain and (self.count % self.plain_every == 0 or self.count == self.total):
            log.info("%s %d/%d %s", self.desc, self.count, self.total, postfix)

    def clear(self) -> None:
        """Blank the bar's line so a log line printed now starts at column 0 (redrawn on the next update)."""
        if self.tty and self.drawn:
            self.stream.write("\r" + " " * 160 + "\r")
            self.stream.flush()
            self.drawn = False

    def close(self) -> None:
        """Finish the line."""
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only JSON lines, one per logging interval and one per epoch.

    ``mirrors`` get every record after it is on disk (the TensorBoard event files), so each
    logged value has one source and no writer can log a value the others lack.
    """

    def __init__(self, path: str | Path, *,
                 mirrors: Sequence[Callable[[dict[str, Any]], None]] = ()) -> None:
        self.path = Path(path)
        self.mirrors = list(mirrors)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk (a crash loses at most the current line)."""
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True)
        with self.path.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for mirror in self.mirrors:
            mirror(record)

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


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS`` (``D day(s), H:MM:SS`` past a day, as ``datetime.timedelta``); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} day{'s' if days > 1 else ''}, {text}" if days else text


def format_step_line(*, epoch: int, epoch_step: int, epoch_steps: int, step: int, total: int,
                     eta_s: float | None, loss: float, smoothed: float, lr: float | None,
                     sec_per_step: float | None, mem_bytes: int | None = None) -> str:
    """One training log line, e.g.
    ``epoch 3 [120/500]  step 1200/10000  eta 0:09:41  loss 3.214 (3.402)  lr 1.0e-04  1.3 s/it  mem 5.1G``.

    The loss in parentheses is the smoothed one (:class:`StepMeter`); ``mem`` (peak GPU memory
    allocated, GiB) only when ``mem_bytes`` is given, i.e. on CUDA.
    """
    parts = [f"epoch {epoch} [{epoch_step}/{epoch_steps}]", f"step {step}/{total}",
             f"eta {format_eta(eta_s)}", f"loss {loss:.4g} ({smoothed:.4g})"]
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if sec_per_step is not None:
        parts.append(f"{sec_per_step:.3g} s/it")
    if mem_bytes is not None:
        parts.append(f"mem {mem_bytes / 2**30:.1f}G")
    return "  ".join(parts)


class StepMeter:
    """Smoothed loss, seconds per step and ETA over the last ``window`` logged steps.

    The loss is smoothed by the median of the last ``window`` logged values (detectron2's
    ``(median)``); seconds per step is the wall time over the steps of the last ``window``
    logging intervals, so the ETA follows a run whose speed changes (a periodic eval, a
    slower resumed machine) without jumping at every line. Timing starts at construction:
    a resumed run's ETA counts only its own steps.
    """

    def __init__(self, total_steps: int, start_step: int, *, window: int = 20,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total_steps = total_steps
        self.clock = clock
        self.losses: deque[float] = deque(maxlen=window)
        self.intervals: deque[tuple[int, float]] = deque(maxlen=window)  # (steps, seconds)
        self.last_step = start_step
        self.last_time = clock()

    def update(self, step: int, loss: float) -> dict[str, float | None]:
        """Record the logged ``loss`` at global ``step``; returns ``smoothed``, ``sec_per_step`` and ``eta_s``."""
        now = self.clock()
        if step > self.last_step:
            self.intervals.append((step - self.last_step, now - self.last_time))
        self.last_step, self.last_time = step, now
        if math.isfinite(loss):
            self.losses.append(loss)
        smoothed = statistics.median(self.losses) if self.losses else loss
        steps = sum(n for n, _ in self.intervals)
        sec_per_step = sum(t for _, t in self.intervals) / steps if steps else None
        eta = None if sec_per_step is None else sec_per_step * max(0, self.total_steps - step)
        return {"smoothed": smoothed, "sec_per_step": sec_per_step, "eta_s": eta}
