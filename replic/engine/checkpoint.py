"""Atomic checkpoints that load with ``torch.load(weights_only=True)``, and RNG state capture.

A training checkpoint holds everything an exact resume needs: model, optimizer,
LR scheduler and grad-scaler states, the RNG states of every process (Python,
NumPy, torch CPU, CUDA) and the data-order position (epoch, step within epoch).
NumPy's and Python's RNG states are stored as plain ints / int64 tensors so no
pickled class is needed to read them back.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replic.io import atomic_path  # noqa: I001

CHECKPOINT_FORMAT = 1


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as weights-only-safe data."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through ``replic.io.atomic_path`` (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (or a converted ``.safetensors``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        # A converted official checkpoint (replic convert): weights + model_config in metadata.
        from replic.models.convert import load_replic_checkpoint

        model_config, state, source = load_replic_checkpoint(path)
        return {"model": state, "model_config": model_config, "source": source}
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types; re-raise with the file
        raise ValueError(f"{path}: cannot load checkpoint with weights_only=True: {err}") from err
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path}: not a replic checkpoint (no 'model' entry)")
    return data


def model_state_from_checkpoint(data: dict[str, Any], path: str | Path = "") -> dict[str, Any]:
    """The model state dict of a training checkpoint or of a converted official one."""
    state = data["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'model' entry is not a state dict")
    # Checkpoints saved from a DDP-wrapped model would carry 'module.' prefixes.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
