"""Experiment configuration: the typed schema and the YAML loader with ``extends:`` and scales.

An experiment YAML is a small overlay: ``extends: base.yaml`` (a path relative to
the file) names the file it builds on, and its own keys deep-merge on top. A
*scale* (``smoke``, ``paper`` or a path to an overlay YAML) is then merged onto the
experiment, so one definition serves both a laptop smoke run and the paper run.
An experiment may size itself per scale with ``scale_overrides: {smoke: {...}}``, merged
after the overlay (a distillation teacher stays larger than its student at smoke scale).

Validation happens in :func:`load_experiment` before any data is read: unknown or
misspelt keys, wrong types and impossible combinations raise ``ConfigError``
naming the dotted key. ``num_classes: auto`` is resolved afterwards from the
training annotation file (max category id + 1, the official convention).
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from replic.config import ADDED_KEY, ConfigError, deep_merge, from_dict, load_yaml
from replic.data.config import DataConfig
from replic.methods import DEFAULT_METHOD, parse_method_options
from replic.models.cnn.config import CnnModelConfig
from replic.models.config import ModelConfig

SCALE_NAMES: tuple[str, ...] = ("smoke", "mini", "paper")
# Keys an experiment YAML may use to name the file it builds on.
EXTENDS_KEYS: tuple[str, ...] = ("extends", "base")
# Placeholder value for the class count that comes from the data.
AUTO = "auto"
# Model family (``model.family``; absent = detr) -> the schema of the model section.
MODEL_FAMILIES: dict[str, type] = {"detr": ModelConfig, "cnn": CnnModelConfig}


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults are the official Conditional DETR ``main.py`` ones."""

    epochs: int = 50
    # Per-process (per-GPU) batch size: 2 for R50/R101, 1 for DC5 [official scripts].
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    # None: the official code decays every parameter; detrex uses 0.0 for norm layers.
    weight_decay_norm: float | None = None
    # StepLR, stepped once per epoch.
    lr_drop: int = 40
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    # Optional cap on the total number of optimizer steps (smoke runs); None = full epochs.
    max_steps: int | None = None
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Write a metrics.jsonl line every this many steps (and always at epoch end).
    log_every: int = 50
    # Extra mid-epoch checkpoints every this many steps (0 = only at epoch end / on signal).
    checkpoint_every: int = 0
    # Evaluate on the val split after the last epoch (writes eval/ in the run dir).
    eval_at_end: bool = True
    # DDP: allow parameters that get no gradient in a step (some ablation variants).
    find_unused_parameters: bool = False
    # torch.use_deterministic_algorithms (warn_only on CUDA where some kernels lack one).
    deterministic: bool = True
    # Frozen-backbone feature cache (replic/engine/feature_cache.py): compute the backbone maps
    # of every (train image, flip) once, keyed by backbone weights + data + transform, and train
    # the transformer from them. Needs model.train_backbone false, one data.train_scales size
    # and data.resize_only_prob 1.0 (the only random choice left is the flip).
    # (ADDED_KEY: left out of the resolved config while at the default, so existing run
    # directories keep their config hash.)
    feature_cache: bool = field(default=False, metadata=ADDED_KEY)
    # Where cache files (<sha256 key>.pt) live; runs with the same backbone and data share them.
    feature_cache_dir: str = field(default="feature_cache", metadata=ADDED_KEY)
    # Periodic evaluation: every this many optimizer steps (0 = never), score the first
    # eval_every_images val images (null = all) and write a {"type": "eval"} line to metrics.jsonl.
    eval_every: int = field(default=0, metadata=ADDED_KEY)
    eval_every_images: int | None = field(default=None, metadata=ADDED_KEY)
    # --- keys added for the CNN family (mmdet recipe); left out of the resolved config while at
    # their default, so the DETR configs keep their hash. See replic/engine/optim.py.
    # adamw (DETR: lr / lr_backbone groups) | sgd (mmdet: momentum, same groups).
    # adam: torch Adam with L2 weight decay (mmcv's Adam; MasKD's token learning).
    optimizer: Literal["adamw", "sgd", "adam"] = field(default="adamw", metadata=ADDED_KEY)
    momentum: float = field(default=0.9, metadata=ADDED_KEY)
    # step: StepLR(lr_drop, lr_gamma) per epoch (DETR) | multistep: x lr_gamma at each epoch in lr_steps (mmdet).
    # cosine: per optimizer step from lr to min_lr over max_steps (mmcv CosineAnnealing by iteration;
    # MasKD's token learning); needs max_steps.
    lr_schedule: Literal["step", "multistep", "cosine"] = field(default="step", metadata=ADDED_KEY)
    min_lr: float = field(default=0.0, metadata=ADDED_KEY)
    lr_steps: list[int] = field(default_factory=list, metadata=ADDED_KEY)
    # mmdet warm-up over the first warmup_iters optimizer steps (multistep only; 0 = none):
    # 'linear' rises from warmup_ratio x lr to lr; 'constant' holds warmup_ratio x lr (mmdet's FCOS).
    warmup: Literal["linear", "constant"] = field(default="linear", metadata=ADDED_KEY)
    warmup_iters: int = field(default=0, metadata=ADDED_KEY)
    warmup_ratio: float = field(default=0.001, metadata=ADDED_KEY)
    # mmdet paramwise_cfg: lr and weight-decay multipliers of bias parameters outside norm layers.
    bias_lr_mult: float = field(default=1.0, metadata=ADDED_KEY)
    bias_decay_mult: float = field(default=1.0, metadata=ADDED_KEY)

    def validate(self) -> None:
        """Reject impossible recipes."""
        if self.lr_schedule == "multistep":
            if not self.lr_steps or any(b <= a for a, b in zip(self.lr_steps, self.lr_steps[1:])):
                raise ConfigError(f"lr_steps: multistep needs increasing epochs, got {self.lr_steps}")
            if self.lr_steps[0] <= 0:
                raise ConfigError(f"lr_steps: epochs must be positive, got {self.lr_steps}")
        elif self.lr_steps or self.warmup_iters:
            # (cosine included: its only parameters are max_steps and min_lr)
            raise ConfigError("lr_steps / warmup_iters: only used with lr_schedule: multistep")
        if self.warmup_iters < 0 or not 0.0 < self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup: need warmup_iters >= 0 and 0 < warmup_ratio <= 1, got "
                              f"{self.warmup_iters}, {self.warmup_ratio}")
        for name in ("momentum", "bias_lr_mult", "bias_decay_mult"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "lr_drop", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "lr_gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.weight_decay_norm is not None and self.weight_decay_norm < 0:
            raise ConfigError(f"weight_decay_norm: must be >= 0, got {self.weight_decay_norm}")
        if self.lr_schedule == "cosine" and self.max_steps is None:
            raise ConfigError("max_steps: lr_schedule cosine anneals over max_steps; set it")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr: must be in [0, lr], got {self.min_lr}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps: must be positive, got {self.max_steps}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: must be >= 0, got {self.eval_every}")
        if self.eval_every_images is not None and self.eval_every_images <= 0:
            raise ConfigError(f"eval_every_images: must be positive, got {self.eval_every_images}")
        if self.feature_cache and not self.feature_cache_dir:
            raise ConfigError("feature_cache_dir: must name a directory when feature_cache is true")
        if self.device == "cpu" and self.amp == "fp16":
            raise ConfigError("amp: fp16 needs a CUDA device (train.device is cpu)")


@dataclass
class EvalConfig:
    """COCO evaluation settings. Padding makes AP depend on the batch size: DC5 uses 1."""

    batch_size: int = 2
    backend: Literal["pycocotools", "faster-coco-eval"] = "pycocotools"
    # Evaluate only the first N val images (None = all); recorded with the metrics.
    max_images: int | None = None

    def validate(self) -> None:
        """Reject impossible evaluation settings."""
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size: must be positive, got {self.batch_size}")
        if self.max_images is not None and self.max_images <= 0:
            raise ConfigError(f"max_images: must be positive, got {self.max_images}")


@dataclass
class ExperimentConfig:
    """One experiment: data + model (with its ``model.criterion``) + recipe + evaluation + seed."""

    name: str = "experiment"
    description: str = ""
    # Which scale overlay produced this resolved config (recorded, not an input switch).
    scale: str = "paper"
    # Base seed; process r uses seed + r (the official convention).
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    # The detector: a DETR (ModelConfig) or, with ``family: cnn``, a torchvision CNN detector
    # (replic.models.cnn.config.CnnModelConfig). :func:`build_config` picks the schema.
    model: ModelConfig | CnnModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The training method (replic.methods): ``name`` plus that method's own options, checked
    # by the method's ``Options`` dataclass. ``none`` = plain detector training.
    # ADDED_KEY: omitted while plain training, so configs written before methods existed keep their hash.
    # A list of such sections composes methods on one student (replic/methods/compose.py).
    method: dict[str, Any] | list[dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_METHOD),
                                                          metadata=ADDED_KEY)

    def validate(self) -> None:
        """Cross-section checks."""
        method_cls, method_options = parse_method_options(self.method)
        method_cls.check_config(self, method_options)
        if self.train.feature_cache:
            from replic.engine.feature_cache import check_cacheable

            check_cacheable(self)
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if (self.train.lr_schedule == "step" and self.train.max_steps is None
                and self.train.lr_drop > self.train.epochs):
            # Allowed by StepLR, but then the drop never happens: almost always a typo, or a
            # shortened schedule (--set train.epochs=1) whose lr_drop still comes from the file.
            raise ConfigError(
                f"train.lr_drop: {self.train.lr_drop} is after the last epoch "
                f"(train.epochs = {self.train.epochs}); the lr would never drop: add "
                f"--set train.lr_drop=<N> (N <= {self.train.epochs})"
            )
        if (self.train.lr_schedule == "multistep" and self.train.max_steps is None
                and self.train.lr_steps[-1] >= self.train.epochs):
            raise ConfigError(f"train.lr_steps: {self.train.lr_steps} reaches the last epoch "
                              f"(train.epochs = {self.train.epochs}); a step would never happen")


def load_with_extends(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, following its ``extends:`` / ``base:`` chain (paths relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"{path}: 'extends' cycle: {chain}")
    data = load_yaml(path)
    parents = [k for k in EXTENDS_KEYS if k in data]
    if len(parents) > 1:
        raise ConfigError(f"{path}: use only one of {list(EXTENDS_KEYS)}")
    if not parents:
        return data
    key = parents[0]
    parent = data.pop(key)
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: '{key}' must be a file path, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise ConfigError(f"{path}: '{key}' names a missing file: {parent_path}")
    return deep_merge(load_with_extends(parent_path, (*_seen, path)), data)


def find_scale_file(scale: str, config_path: str | Path | None = None) -> Path:
    """Resolve a scale name (``smoke``/``mini``/``paper``) or overlay path to a YAML file.

    A bare word that is no scale name gets the closest name suggested (``minii`` -> ``mini``).
    """
    candidate = Path(scale)
    if scale not in SCALE_NAMES or candidate.suffix in (".yaml", ".yml"):
        if candidate.is_file():
            return candidate
        hint = ""
        if not candidate.suffix and len(candidate.parts) == 1:
            # A bare word is a scale name, most likely misspelt (``minii``), not a path.
            close = difflib.get_close_matches(scale, SCALE_NAMES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FileNotFoundError(
            f"scale overlay not found: {scale} (use one of {list(SCALE_NAMES)} or a YAML path){hint}"
        )
    search: list[Path] = []
    if config_path is not None:
        # configs/experiments/x.yaml -> configs/scales/<scale>.yaml
        search.append(Path(config_path).resolve().parent.parent / "scales" / f"{scale}.yaml")
    search.append(Path.cwd() / "configs" / "scales" / f"{scale}.yaml")
    search.append(Path(__file__).resolve().parents[2] / "configs" / "scales" / f"{scale}.yaml")
    for path in search:
        if path.is_file():
            return path
    raise FileNotFoundError(f"scale '{scale}' not found; looked in {[str(p) for p in search]}")


def _auto_paths(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(section, key) pairs whose value is the ``auto`` placeholder."""
    found = []
    sub = raw.get("model")
    if isinstance(sub, dict) and sub.get("num_classes") == AUTO:
        found.append(("model", "num_classes"))
    return found


def num_classes_from_annotations(annotation_file: str | Path) -> int:
    """max category id + 1 of a COCO annotation file (raw ids, as the official code)."""
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"num_classes: auto needs the training annotation file, not found: {path}"
        )
    from replic.data.coco import read_annotation_json

    data = read_annotation_json(path)  # a truncated or non-JSON file is an error naming it
    if not isinstance(data, dict):
        raise ConfigError(f"num_classes: auto, but {path} is not a COCO annotation object")
    try:
        ids = [int(c["id"]) for c in data.get("categories", [])]
        ids += [int(a["category_id"]) for a in data.get("annotations", [])]
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"num_classes: auto, but {path} has a category without an integer id "
                          f"({type(err).__name__}: {err})") from err
    if not ids:
        raise ConfigError(f"num_classes: auto, but {path} has no categories")
    return max(ids) + 1


def train_annotation_file(data: DataConfig) -> Path:
    """The COCO annotation file of the training split."""
    return Path(data.root) / "annotations" / f"instances_{data.train_split}.json"


def resolve_raw(config_path: str | Path, scale: str | None = None,
                overlay: dict[str, Any] | None = None) -> dict[str, Any]:
    """Experiment YAML (+ extends chain) with the scale overlay merged in, as plain data.

    The recorded ``scale`` is the overlay's own ``scale:`` key when it has one (so a copied
    overlay such as the workflow's ``runs/smoke/scale.yaml`` still says ``smoke``), else
    the scale name or the overlay file's stem; ``paper`` without an overlay. ``overlay``: the
    overlay's contents, given instead of reading the file ``scale`` names.
    """
    raw = load_with_extends(config_path)
    per_scale = _pop_scale_overrides(raw, config_path)
    raw.setdefault("scale", "paper")
    if scale is not None or overlay is not None:
        if overlay is None:
            overlay = load_with_extends(find_scale_file(scale, config_path))
        scale = scale or "overlay"
        raw = deep_merge(raw, family_overlay(overlay, model_family_name(raw)))
        if "scale" not in overlay:
            raw["scale"] = scale if scale in SCALE_NAMES else Path(scale).stem
    # The experiment's own per-scale sizes win over the generic overlay (e.g. a distillation
    # teacher that must stay larger than its student at smoke scale).
    if raw["scale"] in per_scale:
        raw = deep_merge(raw, per_scale[raw["scale"]])
    raw.setdefault("name", Path(config_path).stem)
    if isinstance(raw.get("method"), list):
        raw["method"] = [_referenced_method(item, i, config_path, raw["scale"]) for i, item in enumerate(raw["method"])]
    return raw


def _referenced_method(item: Any, index: int, config_path: str | Path, scale: str) -> Any:
    """A composed method's item ``{from: EXPERIMENT, <key>: ...}``: that experiment's (single) method
    section at this scale, its ``scale_overrides`` applied, with the item's other keys on top; so a
    composition names each method's recipe once, where the method's own experiment defines it."""
    if not isinstance(item, dict) or "from" not in item:
        return item
    path = Path(config_path).parent / f"{item['from']}.yaml"
    if not path.is_file():
        raise ConfigError(f"{config_path}: method[{index}].from: no experiment config {path}")
    ref = load_with_extends(path)
    per_scale = _pop_scale_overrides(ref, path)
    section = deep_merge(ref, per_scale.get(scale, {})).get("method")
    if not isinstance(section, dict) or section.get("name", "none") == "none":
        raise ConfigError(f"{config_path}: method[{index}].from: {item['from']} has no method section to compose")
    return deep_merge(section, {k: v for k, v in item.items() if k != "from"})


def _pop_scale_overrides(raw: dict[str, Any], config_path: str | Path) -> dict[str, dict[str, Any]]:
    """Remove and check the experiment's ``scale_overrides: {<scale>: {...}}`` section.

    Each entry is merged after the scale overlay when the run's scale has that name, so an
    experiment can size itself per scale (data, not code). Unknown scale names are errors.
    """
    per_scale = raw.pop("scale_overrides", None) or {}
    if not isinstance(per_scale, dict):
        raise ConfigError(f"{config_path}: scale_overrides must map a scale name to config keys")
    for name, section in per_scale.items():
        if name not in SCALE_NAMES:
            raise ConfigError(f"{config_path}: scale_overrides.{name}: unknown scale; known: {list(SCALE_NAMES)}")
        if not isinstance(section, dict):
            raise ConfigError(f"{config_path}: scale_overrides.{name} must be a mapping of config keys")
    return per_scale


def model_family_name(raw: dict[str, Any]) -> str:
    """The model family of plain config data: ``model.family`` (only ``cnn``), else ``detr``."""
    model = raw.get("model")
    family = model.get("family", "detr") if isinstance(model, dict) else "detr"
    if family not in MODEL_FAMILIES:
        raise ConfigError(f"model.family: {family!r} is not one of ['cnn'] "
                          "(leave it out for DETR / Conditional DETR)")
    return family


def family_overlay(overlay: dict[str, Any], family: str) -> dict[str, Any]:
    """A scale overlay as it applies to one model family.

    An overlay's ``model`` section is DETR-shaped; its ``families: {<family>: {...}}`` entries
    hold the other families' sizes. For a non-DETR family the overlay's ``model`` is dropped and
    that family's entry is merged on top of the rest (``data``, ``train``, ``eval``).
    """
    overlay = dict(overlay)
    families = overlay.pop("families", None) or {}
    if not isinstance(families, dict) or set(families) - set(MODEL_FAMILIES):
        raise ConfigError(f"scale overlay: families must map family names {list(MODEL_FAMILIES)} "
                          f"to config keys, got {families!r}")
    if family == "detr":
        return overlay
    overlay.pop("model", None)
    return deep_merge(overlay, families.get(family) or {})


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate plain data into an ``ExperimentConfig``; then resolve ``num_classes: auto``.

    The schema check runs with a placeholder class count first, so a misspelt key is
    reported before the annotation file is ever opened.
    """
    autos = _auto_paths(raw)
    checked = copy.deepcopy(raw)
    for section, key in autos:
        checked[section][key] = 1
    # The model section against its family's schema first: errors name its keys, not a union.
    schema = MODEL_FAMILIES[model_family_name(checked)]
    from_dict(schema, checked.get("model") or {}, prefix="model")
    cfg = from_dict(ExperimentConfig, checked)
    if autos:
        n = num_classes_from_annotations(train_annotation_file(cfg.data))
        for section, key in autos:
            checked[section][key] = n
        cfg = from_dict(ExperimentConfig, checked)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    import yaml

    result: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from err
        if isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string; on the command line it means a number.
            try:
                value = float(value)
            except ValueError:
                pass
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is set both as a value and a section")
        node[parts[-1]] = value
    return result


def load_experiment(
    config_path: str | Path, scale: str | None = None, overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Load, merge and validate an experiment (the one entry point the CLI uses)."""
    raw = resolve_raw(config_path, scale)
    if overrides:
        raw = deep_merge(raw, overrides)
    return build_config(raw)
