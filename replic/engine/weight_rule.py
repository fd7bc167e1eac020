"""The distillation-weight rule at scales other than the paper's (docs/weight_rule.md).

A distillation term's size can depend on the problem's size by construction (an attention-map MSE
over K keys goes as 1/K²), so a weight tuned on COCO can swamp or vanish at a small scale. The
rule, fixed before any run used it: at a non-paper scale each distillation weight is

    w_S = w_paper · mean L_paper⁰ / mean L_S⁰        (kept to 3 significant figures)

where L⁰ are the unweighted terms that weight multiplies, measured on a **null run**: student and
teacher freshly initialised (student from the run's seed, teacher from seed + 1, backbones random
too, tokens drawn afresh), one training forward on the first two images of the run's first batch,
once with the experiment's paper-scale model sections and paper-sized inputs and once with the
scale's. The mean runs over the terms one option weighs (every decoder layer, both matchings), so
a scale with fewer decoder layers does not inflate the weight (with equal term counts it is the
ratio of sums the doc states). What the networks learn plays no part; at paper scale the rule is
the identity and never runs, and smoke keeps the weights as written (:data:`EXEMPT_SCALES`).

The engine computes the weights once per run (``RUN_DIR/weight_rule.json``, reused on resume so a
continued run keeps its weights bit for bit) and records them in the run's provenance.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from replic.config import ConfigError, deep_merge, to_dict

RULE_FILE = "weight_rule.json"
RULE_VERSION = 2
# The weight keeps 3 significant figures: a null run in float32 differs between CPUs and thread
# counts in the 7th digit, which must not make two machines train with different weights.
SIGNIFICANT_FIGURES = 3
# Images of the first batch the null run forwards: the terms are means over pairs, positions and
# images, so two images give their size; a paper-sized forward of two R101/R50 pairs stays cheap.
NULL_RUN_IMAGES = 2
# The paper's input size where an experiment's data section does not state it (DETR's val resize).
PAPER_DATA_KEYS = ("val_size", "val_max_size", "resize_rule")


@dataclass
class RuleSource:
    """Where the rule finds the experiment at paper size: the experiment file, the run's scale
    (a name or an overlay file) and the command line's ``--set`` overrides (the seed among them)."""

    config_path: str | Path
    scale: str | None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RuleWeight:
    """One weight option under the rule: its paper value, the null-run sizes and the result."""

    option: str
    paper_weight: float
    paper_size: float
    scale_size: float
    terms_paper: int
    terms_scale: int

    @property
    def ratio(self) -> float:
        return self.paper_size / self.scale_size

    @property
    def weight(self) -> float:
        return round_significant(self.paper_weight * self.ratio, SIGNIFICANT_FIGURES)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "weight": self.weight}


# Scales where the weights stay as written: paper (the rule is the identity there) and smoke, a
# pipeline check of models that do not learn, where a paper-sized null run (~1 CPU-minute a
# distilled run) would only slow CI; every other scale (mini, a custom overlay) takes the rule.
EXEMPT_SCALES = ("paper", "smoke")


def round_significant(value: float, figures: int) -> float:
    """``value`` rounded to ``figures`` significant figures (0 stays 0)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, figures - 1 - math.floor(math.log10(abs(value))))


def weight_rule_applies(cfg: Any, groups: dict[str, tuple[float, list[str]]]) -> bool:
    """Whether a run of ``cfg`` takes its distillation weights from the rule: a scale not in
    :data:`EXEMPT_SCALES` and a method with weight options under the rule (``groups``:
    ``method.distillation_weights()``)."""
    return bool(groups) and cfg.scale not in EXEMPT_SCALES


def compute_rule(source: RuleSource, seed: int) -> list[RuleWeight]:
    """Run both null runs of ``source`` and return the rule's weight for every option."""
    from replic.engine.config import resolve_raw

    scale_raw = deep_merge(resolve_raw(source.config_path, source.scale), source.overrides)
    paper_raw = deep_merge(resolve_raw(source.config_path, None), source.overrides)
    paper_raw = paper_sized(paper_raw, scale_raw)
    experiments = Path(source.config_path).parent
    with tempfile.TemporaryDirectory(prefix="replic-null-run-") as tmp:
        paper = null_run(paper_raw, seed, Path(tmp) / "paper", experiments, None)
        scale = null_run(scale_raw, seed, Path(tmp) / "scale", experiments, source.scale)
    if set(paper) != set(scale):
        raise ConfigError(f"{source.config_path}: the weight rule found options {sorted(scale)} at the scale but "
                          f"{sorted(paper)} at paper size (a method on at one size only?)")
    weights = []
    for option in sorted(scale):
        (w_paper, paper_terms), (_, scale_terms) = paper[option], scale[option]
        paper_size, scale_size = _mean(paper_terms), _mean(scale_terms)
        if not (math.isfinite(scale_size) and scale_size > 0 and math.isfinite(paper_size)):
            raise ValueError(f"{source.config_path}: weight rule: option {option} has null-run size {scale_size!r} at "
                             f"the scale and {paper_size!r} at paper size; the rule needs both finite and the "
                             "scale's > 0 (set the method's weight_rule: false and write the weight by hand)")
        weights.append(RuleWeight(option, float(w_paper), paper_size, scale_size, len(paper_terms), len(scale_terms)))
    return weights


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def paper_sized(paper_raw: dict[str, Any], scale_raw: dict[str, Any]) -> dict[str, Any]:
    """The paper-scale config reading the scale's data (the run's own images and classes) resized as
    the paper resizes; a null run never reads COCO, which a small scale may not have."""
    from replic.data.config import DataConfig

    raw = copy.deepcopy(paper_raw)
    paper_data = raw.get("data") or {}
    defaults = DataConfig()
    sizes = {k: paper_data.get(k, getattr(defaults, k)) for k in PAPER_DATA_KEYS}
    raw["data"] = deep_merge(copy.deepcopy(scale_raw.get("data") or {}), sizes)
    raw.setdefault("model", {})["num_classes"] = (scale_raw.get("model") or {}).get("num_classes", "auto")
    return raw


def null_run(raw: dict[str, Any], seed: int, workdir: Path, experiments: Path,
             scale: str | None) -> dict[str, tuple[float, list[float]]]:
    """One training forward of fresh models on the first images of the run's first batch.

    Returns, per weight option of the method: (its weight in ``raw``, the unweighted terms it weighs).
    """
    from replic.engine.config import build_config
    from replic.engine.runtime import build_loss, seed_everything, to_float32
    from replic.methods import MethodStep, build_method

    workdir.mkdir(parents=True)
    raw = _null_sections(raw, seed, workdir, experiments, scale)
    cfg = build_config(raw)
    seed_everything(seed)
    method = build_method(cfg, run_dir=workdir / "run")
    method.check_inputs()
    detector = method.build_model()
    criterion = build_loss(cfg)
    device = torch.device("cpu")
    method.setup(detector, criterion, device)
    groups = method.distillation_weights()
    batch = first_images(cfg, seed)
    step = MethodStep(detector, method).train()
    with torch.no_grad():
        # A first pass sets every BatchNorm's statistics from its input, layer by layer (see
        # calibrate_norms); the second, with the same random draws, is the one measured.
        remove = calibrate_norms([detector, *method.frozen_modules()])
        try:
            step(batch.images, batch.mask, batch.targets)
        finally:
            remove()
        seed_everything(seed)
        outputs = step(batch.images, batch.mask, batch.targets)
        losses = criterion(to_float32(outputs), batch.targets)
    return {option: (weight, [float(losses[k]) for k in keys if k in losses])
            for option, (weight, keys) in groups.items()}


def calibrate_norms(roots: list[torch.nn.Module]) -> Callable[[], None]:
    """Until the returned function is called, every BatchNorm under ``roots`` sets its statistics
    from its own input (per channel, over images and positions) before normalising it.

    A fresh network has no statistics of its own: with the frozen BatchNorm's initial ones (mean 0,
    variance 1) a random ResNet's activations grow with depth (a null run's FPN feature loss was
    7.6e9 with R101/R50 at 800 px against 7.8 with R18 at 128 px, measured 2026-12-07), so the rule
    would measure depth rather than the shapes it is for. Statistics from the data give every layer
    the normalised outputs a BatchNorm network trains with, at every depth and size alike.
    """
    from replic.models.backbone import FrozenBatchNorm2d

    def set_statistics(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(set_statistics)
               for root in roots for m in root.modules()
               if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


def _null_sections(raw: dict[str, Any], seed: int, workdir: Path, experiments: Path,
                   scale: str | None) -> dict[str, Any]:
    """``raw`` for a null run: random backbones, images instead of cached maps, a freshly initialised
    teacher (seed + 1) in place of each trained one, fresh tokens in place of learned ones."""
    raw = copy.deepcopy(raw)
    raw.setdefault("model", {})["pretrained_backbone"] = "none"
    raw.setdefault("train", {})["feature_cache"] = False
    raw["train"]["device"] = "cpu"
    raw["seed"] = seed
    sections = raw.get("method")
    for i, section in enumerate(sections if isinstance(sections, list) else [sections]):
        if not isinstance(section, dict):
            continue
        teacher = section.get("teacher")
        if isinstance(teacher, dict):
            path = workdir / f"teacher_{i}.pt"
            _fresh_teacher(teacher, raw, seed + 1, path, experiments, scale)
            section["teacher"] = {"checkpoint": str(path)}
        tokens = section.get("tokens")
        if isinstance(tokens, dict) and (tokens.get("experiment") or tokens.get("checkpoint")):
            section["tokens"] = {"random": True}
    return raw


def _fresh_teacher(spec: dict[str, Any], student_raw: dict[str, Any], seed: int, path: Path,
                   experiments: Path, scale: str | None) -> None:
    """Write a freshly initialised teacher of ``spec``'s architecture at this size to ``path``."""
    from replic.distill.teacher import read_teacher
    from replic.engine.checkpoint import atomic_torch_save
    from replic.engine.config import build_config, resolve_raw
    from replic.engine.runtime import seed_everything
    from replic.models.families import family_of

    if spec.get("experiment"):
        name = str(spec["experiment"])
        teacher_file = experiments / f"{name}.yaml"
        if not teacher_file.is_file():
            raise ConfigError(f"method.teacher.experiment: no experiment config {teacher_file}")
        teacher_raw = resolve_raw(teacher_file, scale)
        if scale is None:
            teacher_raw = paper_sized(teacher_raw, student_raw)
        teacher_raw["data"] = copy.deepcopy(student_raw["data"])
        teacher_raw["model"]["pretrained_backbone"] = "none"
        model_cfg = build_config(teacher_raw).model
    else:  # a checkpoint file: its architecture, fresh weights
        name = None
        model_cfg = dataclasses.replace(read_teacher(spec["checkpoint"]).model_config, pretrained_backbone="none")
    seed_everything(seed)
    model = family_of(model_cfg).build_model(model_cfg)
    atomic_torch_save({"model": model.state_dict(), "model_config": to_dict(model_cfg),
                       "config": {"name": name} if name else {}}, path)


def first_images(cfg: Any, seed: int, count: int = NULL_RUN_IMAGES) -> Any:
    """The first ``count`` images of the run's first training batch (the seed's epoch-0 order), resized
    deterministically to the config's evaluation size (no flip, no crop), as one padded batch."""
    from replic.data import build_dataset
    from replic.data.collate import collate_fn
    from replic.data.transforms import make_transforms
    from replic.engine.sampling import epoch_permutation

    dataset = build_dataset(cfg.data, "train")
    dataset.transforms = make_transforms("val", cfg.data)
    order = epoch_permutation(len(dataset), seed, 0)[: min(count, cfg.train.batch_size, len(dataset))]
    return collate_fn([dataset[int(i)] for i in order])


def load_or_compute(run_dir: Path, source: RuleSource | None, cfg: Any,
                    groups: dict[str, tuple[float, list[str]]]) -> list[dict[str, Any]]:
    """The rule's weights for the run in ``run_dir``: read from ``RUN_DIR/weight_rule.json`` when it
    was written for this config, else computed (both null runs) and written there (atomically)."""
    from replic.config import config_hash
    from replic.data.io import atomic_write_json

    path = Path(run_dir) / RULE_FILE
    identity = {"version": RULE_VERSION, "config_hash": config_hash(cfg), "options": sorted(groups)}
    if path.is_file():
        record = json.loads(path.read_text())
        if {k: record.get(k) for k in identity} == identity:
            return record["weights"]
    if source is None:
        raise ConfigError(f"{sorted(groups)}: at scale {cfg.scale} these distillation weights come from the weight "
                          "rule (docs/weight_rule.md), which needs the experiment file for its paper-size null run: "
                          "train with `replic train --config FILE`, or set the method's weight_rule: false")
    # The null runs reseed; the run's own random stream must not depend on whether they ran.
    from replic.engine.checkpoint import capture_rng_state, restore_rng_state

    rng = capture_rng_state()
    try:
        weights = [w.as_dict() for w in compute_rule(source, cfg.seed)]
    finally:
        restore_rng_state(rng)
    atomic_write_json(path, {**identity, "weights": weights})
    return weights


def apply_weights(weight_dict: dict[str, float], groups: dict[str, tuple[float, list[str]]],
                  weights: list[dict[str, Any]]) -> None:
    """Set every criterion key of each option to the rule's weight (in place)."""
    by_option = {w["option"]: float(w["weight"]) for w in weights}
    for option, (_, keys) in groups.items():
        if option not in by_option:
            raise ValueError(f"weight rule: no weight for option {option} (have {sorted(by_option)})")
        for key in keys:
            weight_dict[key] = by_option[option]
