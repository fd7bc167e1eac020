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

from replic.io import atomic_path, load_torch_weights_only  # noqa: I001

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
    # The same refusal (foreign pickle) and truncation messages as `replic convert`.
    data = load_torch_weights_only(path, map_location=map_location)
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


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: str | Path, *,
                       target: str = "the model", config_differences: list[str] | None = None) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is one ``ValueError`` naming the file.

    The message lists the checkpoint's ``model_config`` keys that differ from the model's
    (``config_differences``, when known) before a few missing / unexpected / wrong-shape keys,
    instead of torch's many-line ``size mismatch`` error.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        parts = []
        if config_differences:
            parts.append("the checkpoint's model_config differs in " + "; ".join(config_differences))
        if reshaped:
            parts.append(f"{len(reshaped)} weights of another shape (e.g. {reshaped[:2]})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise ValueError(f"{path}: weights do not fit {target}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
