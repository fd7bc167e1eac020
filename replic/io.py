"""Atomic file writing (readers see the old file or the whole new one, never half of it) and
the one safe ``torch.load`` every checkpoint reader goes through.

Every writer in replic goes through ``atomic_path``: a temporary file in the destination's
directory (same filesystem, so ``os.replace`` is atomic), flushed to disk, given the
permissions a plain ``open()`` would give (``mkstemp`` makes 0600 files, which other users
of a shared cluster could not read), then renamed over the destination.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class DiskFullError(OSError):
    """A write ran out of space (or quota); the message names the file. The old file is intact."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    Running out of space (ENOSPC, EDQUOT) raises :class:`DiskFullError` naming ``path``;
    ``path`` itself is untouched, so the previous version stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as err:
        # torch.save reports a full disk as a bare iostream error: look at the space left too
        # (before removing the partial file, which frees it again).
        full = _is_disk_full(err) or (isinstance(err, Exception) and _almost_no_space(path.parent))
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full:
            raise DiskFullError(
                errno.ENOSPC, f"{path}: no space left on device while writing it "
                f"({os.strerror(errno.ENOSPC)}); the previous version of the file is kept"
            ) from err
        raise


def _almost_no_space(folder: Path) -> bool:
    """Less than 1 MiB left for unprivileged writes on ``folder``'s filesystem."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < (1 << 20)


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library (torch.save) wraps the OSError in a RuntimeError."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return False  # already reported
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, RuntimeError) and ("No space left" in str(current)
                                                  or "Disk quota exceeded" in str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (checkpoints and COCO annotations are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def dump_json_bytes(obj: Any) -> bytes:
    """Stable JSON encoding: sorted keys, compact separators, so equal data gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as stable, compact JSON, atomically."""
    atomic_write_bytes(path, dump_json_bytes(obj))


class CheckpointReadError(ValueError):
    """A checkpoint cannot be read safely; the message names the file and why."""


def load_torch_weights_only(path: str | os.PathLike, *, map_location: Any = "cpu",
                            extra_globals: Iterable[type] = ()) -> Any:
    """``torch.load(weights_only=True)`` with one set of errors for every checkpoint reader.

    A pickled object outside the allow-list (tensors, plain containers, ``extra_globals``) is
    refused, never executed; a truncated or foreign file is "not a readable torch checkpoint".
    Both name ``path``.
    """
    import torch

    extra = list(extra_globals)
    allowed = ", ".join(["tensors", "plain containers", *(f"{t.__module__}.{t.__qualname__}" for t in extra)])
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln), "")
        if detail:  # a class or function outside the allow-list; anything else is a damaged file
            raise CheckpointReadError(
                f"{path}: refused to load: it pickles an object outside the allow-list "
                f"({allowed}): {detail}"
            ) from err
        # Not torch's advice about weights_only=False: the unpickler's own reason, if it gives one.
        reason = next((ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in lines
                       if "WeightsUnpickler error:" in ln), "")
        raise CheckpointReadError(
            f"{path}: not a readable torch checkpoint (truncated, or not written by torch.save)"
            + (f": {reason}" if reason else "")
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointReadError(
            f"{path}: not a readable torch checkpoint (truncated, or not written by torch.save): {first}"
        ) from err
