"""Which experiments train with which method — read from their YAML, without importing torch.

The Snakefile imports this while it builds the DAG (e.g. KS-DETR's attention figures exist only for
runs with ``method.name: ks_detr``); ``replic.engine.config`` would pull in torch for every
snakemake call, so the ``extends:`` chain is followed here with the plain YAML loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from replic.config import load_yaml

EXTENDS_KEYS = ("extends", "base")  # as replic.engine.config.EXTENDS_KEYS


def _chain_value(config_path: str | Path, section: str, key: str, default: str) -> str:
    """``section.key`` of an experiment YAML after its ``extends:`` chain (``default`` if unset)."""
    path = Path(config_path)
    seen: set[Path] = set()
    while path not in seen:
        seen.add(path)
        raw: dict[str, Any] = load_yaml(path)
        block = raw.get(section)
        if isinstance(block, dict) and key in block:
            return str(block[key])
        parent = next((raw[k] for k in EXTENDS_KEYS if k in raw), None)
        if parent is None:
            return default
        path = (path.parent / parent).resolve()
    raise ValueError(f"{config_path}: circular extends chain")


def method_name(config_path: str | Path) -> str:
    """``method.name`` of an experiment YAML after its ``extends:`` chain ("none" if unset)."""
    return _chain_value(config_path, "method", "name", "none")


def experiments_with_method(experiments: list[str], experiments_dir: str | Path, name: str) -> list[str]:
    """The experiments among ``experiments`` whose config selects method ``name`` (missing files skipped)."""
    folder = Path(experiments_dir)
    return [e for e in experiments if (folder / f"{e}.yaml").is_file() and method_name(folder / f"{e}.yaml") == name]


def model_family(config_path: str | Path) -> str:
    """``model.family`` of an experiment YAML after its ``extends:`` chain ("detr" if unset)."""
    return _chain_value(config_path, "model", "family", "detr")


def experiments_of_family(experiments: list[str], experiments_dir: str | Path, family: str) -> list[str]:
    """The experiments among ``experiments`` whose model is of ``family`` (missing files skipped).

    The attention figures read DETR decoder attention: CNN-family runs (``model.family: cnn``)
    have none, so the figure rules only take the ``detr`` runs of a table.
    """
    folder = Path(experiments_dir)
    return [e for e in experiments if (folder / f"{e}.yaml").is_file() and model_family(folder / f"{e}.yaml") == family]


def token_runs(experiments: list[str], experiments_dir: str | Path) -> list[str]:
    """The MasKD token runs (``method.tokens.experiment``) the experiments among ``experiments`` name,
    sorted, each once (missing files skipped)."""
    from replic.workflow.registry import experiment_teachers

    folder = Path(experiments_dir)
    found = set()
    for name in experiments:
        path = folder / f"{name}.yaml"
        if path.is_file():
            found |= {value for kind, value in experiment_teachers(path, key="tokens") if kind == "experiment"}
    return sorted(found)
