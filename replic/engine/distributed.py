"""Process-group setup for torchrun and Slurm, and the few collectives the engine needs.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK; a plain ``srun`` launch exports
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead (then MASTER_ADDR/PORT must be
set by the job script). Without either, the run is a single process and every
helper here degrades to a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group with more than one member exists."""
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as err:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from err
    return None


def detect() -> DistInfo:
    """Read rank/world size from torchrun, else Slurm, else single process."""
    world = _env_int("WORLD_SIZE")
    if world is not None:
        return DistInfo(
            rank=_env_int("RANK") or 0,
            world_size=world,
            local_rank=_env_int("LOCAL_RANK") or 0,
        )
    world = _env_int("SLURM_NTASKS")
    if world is not None and world > 1:
        return DistInfo(
            rank=_env_int("SLURM_PROCID") or 0,
            world_size=world,
            local_rank=_env_int("SLURM_LOCALID") or 0,
        )
    return DistInfo()


def init(device_type: str) -> DistInfo:
    """Initialise the default process group when the launch has several processes.

    NCCL on CUDA, gloo on CPU. Under Slurm without torchrun, MASTER_ADDR and
    MASTER_PORT must already be exported by the job script.
    """
    info = detect()
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        return info
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(
            f"{info.world_size} processes requested but MASTER_ADDR/MASTER_PORT are not set; "
            "launch with torchrun or export them in the Slurm script"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def is_initialized() -> bool:
    """True when a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Destroy the process group if this process created one."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all processes (no-op when single)."""
    if is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar values over processes (logged losses equal the single-process ones)."""
    if not is_initialized() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def all_reduce_max(flag: bool, device: torch.device) -> bool:
    """True if the flag is true on any process (used for the stop-on-signal decision)."""
    if not is_initialized():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every process, in rank order."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
