"""A frozen teacher detector: where its checkpoint is, reading it, checking it fits the student.

A teacher is named in a method's config as either another experiment of the DAG
(``{experiment: cdetr_r101_50ep}``: its run ``<runs>/<scale>/<experiment>/checkpoint_final.pt``,
the sibling of the student's run directory) or a checkpoint file (``{checkpoint: path}``:
a replic training checkpoint or a converted official release, ``replic convert``). Its
architecture comes from the checkpoint's ``model_config``, so a teacher may differ from the
student (deeper backbone, more queries). Every problem — missing file, no model config,
another class count or hidden size — is a ``TeacherError`` naming the file and the key,
raised by :func:`read_teacher` / :func:`check_teacher_fits` before any training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from replic.config import ConfigError, from_dict
from replic.io import file_sha256
from replic.models.config import ModelConfig


class TeacherError(ValueError):
    """The teacher cannot be used; the message names the checkpoint and the mismatch."""


@dataclass
class TeacherSpec:
    """Which teacher: exactly one of ``experiment`` (a DAG run) or ``checkpoint`` (a file)."""

    experiment: str | None = None
    checkpoint: str | None = None

    def validate(self) -> None:
        if (self.experiment is None) == (self.checkpoint is None):
            raise ConfigError("give exactly one of 'experiment' (a run of the DAG) and 'checkpoint' (a file)")


@dataclass
class TeacherCheckpoint:
    """A read teacher checkpoint: architecture, weights and where they came from."""

    path: Path
    model_config: Any  # ModelConfig (DETR) or CnnModelConfig
    state: dict[str, torch.Tensor]
    sha256: str
    experiment: str | None = None  # the config name recorded in a replic training checkpoint


def teacher_path(spec: TeacherSpec, run_dir: str | Path | None) -> Path:
    """The checkpoint file a spec names; an experiment resolves next to the student's run."""
    if spec.checkpoint is not None:
        return Path(spec.checkpoint)
    if run_dir is None:
        raise TeacherError(
            f"method.teacher.experiment: '{spec.experiment}' is read from the sibling run directory "
            f"<runs>/<scale>/{spec.experiment}/checkpoint_final.pt, but no run directory is known "
            "(train with `replic train --out RUN_DIR`, or name a file with method.teacher.checkpoint)")
    return Path(run_dir).resolve().parent / str(spec.experiment) / "checkpoint_final.pt"


def read_teacher(path: str | Path, expect_experiment: str | None = None) -> TeacherCheckpoint:
    """Read a teacher checkpoint (weights_only); errors name the file.

    ``expect_experiment``: when the spec named a DAG run, the checkpoint must have been written
    by that experiment (its recorded config name), so a stale or misplaced run is refused.
    """
    from replic.engine.checkpoint import load_checkpoint, model_state_from_checkpoint

    path = Path(path)
    if not path.is_file():
        hint = (f" (train the teacher first: it is the run of experiment '{expect_experiment}')"
                if expect_experiment else "")
        raise TeacherError(f"method.teacher: teacher checkpoint not found: {path}{hint}")
    data = load_checkpoint(path, map_location="cpu")
    raw_cfg = data.get("model_config")
    if not isinstance(raw_cfg, dict):
        raise TeacherError(f"{path}: teacher checkpoint has no 'model_config' (write it with replic train or "
                           "replic convert)")
    try:
        # The schema of the teacher's family (a CNN teacher: model_config.family == "cnn").
        model_config = from_dict(_model_schema(raw_cfg), raw_cfg, prefix="model_config")
    except ConfigError as err:
        raise TeacherError(f"{path}: teacher model_config is invalid: {err}") from err
    recorded = data.get("config", {}).get("name") if isinstance(data.get("config"), dict) else None
    if expect_experiment is not None and recorded is not None and recorded != expect_experiment:
        raise TeacherError(f"{path}: written by experiment '{recorded}', but method.teacher.experiment is "
                           f"'{expect_experiment}'")
    return TeacherCheckpoint(path=path, model_config=model_config,
                             state=model_state_from_checkpoint(data, path), sha256=file_sha256(path),
                             experiment=recorded)


def _model_schema(raw_cfg: dict[str, Any]) -> type:
    """The model-config dataclass of a checkpoint's ``model_config`` (DETR unless ``family`` says)."""
    if raw_cfg.get("family", "detr") == "cnn":
        from replic.models.cnn.config import CnnModelConfig

        return CnnModelConfig
    return ModelConfig


def check_teacher_fits(teacher: ModelConfig, student: ModelConfig, path: str | Path, *,
                       same_hidden: bool, same_layers: bool, same_heads: bool) -> None:
    """Refuse a teacher whose outputs cannot be compared with the student's.

    Always: the same class count (the class distillation compares logits class by class).
    ``same_hidden``: the student decodes the teacher's object queries (fixed matching).
    ``same_layers``: layer-to-layer distillation of every decoder layer.
    ``same_heads``: per-head attention maps.
    """
    t, s = teacher.resolved(), student.resolved()
    checks = [("num_classes", True), ("hidden_dim", same_hidden), ("dec_layers", same_layers),
              ("aux_loss", same_layers), ("nheads", same_heads), ("focal_loss", True)]
    problems = [f"{key}: teacher {getattr(t, key)} vs student {getattr(s, key)}"
                for key, needed in checks if needed and getattr(t, key) != getattr(s, key)]
    if problems:
        raise TeacherError(f"{path}: the teacher does not fit the student: " + "; ".join(problems))


def build_teacher(checkpoint: TeacherCheckpoint, device: torch.device) -> nn.Module:
    """The teacher detector with its weights, on ``device``, in eval mode (never downloads)."""
    from replic.models.families import family_of

    # The weights come from the checkpoint: never fetch ImageNet weights for the backbone.
    cfg = dataclasses.replace(checkpoint.model_config, pretrained_backbone="none")
    model = family_of(cfg).build_model(cfg)
    try:
        model.load_state_dict(checkpoint.state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise TeacherError(f"{checkpoint.path}: teacher weights do not fit its model_config: {first}") from err
    return model.to(device).eval()


def teacher_facts(checkpoint: TeacherCheckpoint) -> dict[str, Any]:
    """What the run's provenance records about its teacher."""
    if getattr(checkpoint.model_config, "family", "detr") == "cnn":
        cnn = checkpoint.model_config
        return {"path": str(checkpoint.path), "sha256": checkpoint.sha256, "experiment": checkpoint.experiment,
                "family": "cnn", "arch": cnn.arch, "backbone": cnn.backbone, "fpn_channels": cnn.fpn_channels,
                "num_classes": cnn.num_classes}
    cfg = checkpoint.model_config.resolved()
    return {"path": str(checkpoint.path), "sha256": checkpoint.sha256, "experiment": checkpoint.experiment,
            "backbone": cfg.backbone, "hidden_dim": cfg.hidden_dim, "dec_layers": cfg.dec_layers,
            "num_queries": cfg.num_queries, "num_classes": cfg.num_classes}


def shares_backbone(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether a DETR teacher's backbone is the student's, weight for weight (at mini scale both use
    the one frozen pretrained ResNet): then the student's cached backbone maps
    (``train.feature_cache``) are the teacher's too."""
    own, theirs = student.backbone.state_dict(), teacher.backbone.state_dict()
    return own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k].to(own[k].device)) for k in own)
