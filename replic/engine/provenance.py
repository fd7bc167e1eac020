"""Where a result came from: code version, software, hardware, seeds and command line."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES: tuple[str, ...] = (
    "replic",
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "pycocotools",
    "faster-coco-eval",
    "pyyaml",
    "pillow",
)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip("\n")  # keep porcelain's leading status columns


def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """Commit of the replic source tree and whether tracked files differ from it."""
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    commit = _git(["rev-parse", "HEAD"], root)
    commit = commit.strip() if commit else None
    if commit is None:
        return {"commit": None, "dirty": None, "dirty_files": []}
    status = _git(["status", "--porcelain", "--untracked-files=no"], root) or ""
    dirty_files = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(dirty_files), "dirty_files": dirty_files[:50]}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that shape results."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict[str, Any]:
    """CPU model and count, GPU names and count, host name."""
    import torch

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def collect(
    *, seeds: dict[str, Any] | None = None, world_size: int = 1, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything recorded with a run or an evaluation."""
    record: dict[str, Any] = {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "python": sys.version.split()[0],
        "git": git_info(),
        "packages": package_versions(),
        "hardware": hardware_info(),
        "world_size": world_size,
        "launcher": {
            k: os.environ[k]
            for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "TORCHELASTIC_RUN_ID")
            if k in os.environ
        },
    }
    if seeds is not None:
        record["seeds"] = seeds
    if extra:
        record.update(extra)
    return record
