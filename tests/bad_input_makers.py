"""Named preparation steps of the bad-input table (``tests/bad_inputs*.yaml``, step ``make:``).

A row that needs a bad input the generic steps (``json_set``, ``truncate``, ``write`` …) cannot
express names a maker here: ``make: [NAME, FILE, {keyword: value}]``. Register new ones with
``@maker`` (another method's inputs: a teacher checkpoint, a token checkpoint …).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAKERS: dict[str, Callable[..., None]] = {}


def maker(fn: Callable[..., None]) -> Callable[..., None]:
    """Register ``fn(path, **kwargs)`` under its name."""
    MAKERS[fn.__name__] = fn
    return fn


class _Payload:
    """Unpickling this would run a shell command; a safe loader must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.marker}",))


@maker
def forbidden_pickle(path: Path, layout: str = "replic") -> None:
    """A checkpoint whose pickle calls ``os.system`` (written beside it: ``<path>.executed``)."""
    import torch

    payload = _Payload(f"{path}.executed")
    data: dict[str, Any] = {"model": {}, "extra": payload}
    if layout == "official":
        data["args"] = argparse.Namespace(hidden_dim=64)
    torch.save(data, path)


def _tiny_model_config(**overrides: Any) -> dict[str, Any]:
    from replic.config import from_dict, to_dict
    from replic.models import ModelConfig

    base = dict(backbone="resnet18", pretrained_backbone="none", hidden_dim=64, nheads=4, enc_layers=2,
                dec_layers=2, dim_feedforward=128, num_queries=10, num_classes=4)
    base.update(overrides)
    return to_dict(from_dict(ModelConfig, base))


@maker
def replic_checkpoint(path: Path, drop_model: bool = False, **model: Any) -> None:
    """A replic checkpoint ``{model, model_config}`` of a tiny model built with ``model`` options."""
    import torch

    from replic.config import from_dict
    from replic.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = _tiny_model_config(**model)
    data: dict[str, Any] = {"model_config": cfg}
    if not drop_model:
        data["model"] = build_model(from_dict(ModelConfig, cfg)).state_dict()
    torch.save(data, path)


@maker
def official_checkpoint(path: Path, drop: str = "") -> None:
    """The authors' layout ``{model, args}`` of a tiny Conditional DETR, without key ``drop``."""
    import torch

    from replic.config import from_dict
    from replic.models import ModelConfig, build_model

    torch.manual_seed(0)
    options = dict(backbone="resnet18", hidden_dim=64, nheads=8, enc_layers=2, dec_layers=2,
                   dim_feedforward=128, num_queries=10, dropout=0.1, aux_loss=True)
    state = build_model(from_dict(ModelConfig, {"arch": "conditional_detr", "num_classes": 91,
                                                **options})).state_dict()
    state.pop(drop, None)
    args = argparse.Namespace(dilation=False, position_embedding="sine", pre_norm=False, masks=False,
                              dataset_file="coco", **options)
    torch.save({"model": state, "args": args, "epoch": 49}, path)


@maker
def run_dir_of_other_config(path: Path, data: str, **train: Any) -> None:
    """A run directory (``path``) holding the smoke experiment with other ``train`` values."""
    import yaml

    from replic.config import to_dict
    from replic.engine.config import load_experiment

    experiment = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cdetr_r50_50ep.yaml"
    cfg = load_experiment(experiment, "smoke", {"data": {"root": data}, "train": dict(train)})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=True))


@maker
def run_dir_of_other_inputs(path: Path, data: str) -> None:
    """A finished run directory (``path``) of the smoke experiment as the row runs it, whose
    record says it was trained from another train annotation file (other sha256, same path)."""
    import json

    run_dir_of_other_config(path, data)
    ann = Path(data) / "annotations" / "instances_train2017.json"
    record = {"data.root (train annotations)": {"path": str(ann), "sha256": "0" * 64}}
    (path / "inputs.json").write_text(json.dumps(record))
    (path / "done.json").write_text("{}")
