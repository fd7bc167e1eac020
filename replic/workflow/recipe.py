"""``replic recipe``: the resolved training recipe of every paper-scale experiment, each value with
the authors' file and argument it corresponds to, and replic's deliberate differences from it.

Three tables of data, defined once here and used by the command, by ``docs/recipes.md`` (generated
by ``replic recipe --markdown docs/recipes.md``) and by ``tests/test_recipe_table.py`` (which reads
the authors' own files and compares):

* :data:`CODEBASES`: per authors' code base, replic key -> :class:`Source` (file, argument or key).
  A ``ref`` that is an argparse flag (``--lr``) or a dotted config path (``optimizer.lr``) is what
  the test looks up in the authors' file; a ``note`` says how a value is derived when it is not a
  plain lookup (``× lr_factor_func``, ``max_iter / 7500``).
* :data:`FAMILIES`: experiments grouped by paper and recipe family (one table per family in the doc).
* :data:`DELIBERATE`: every deliberate difference from the authors' recipe (experiment globs, key,
  authors' value, replic's value, reason, and the doc that explains it). ``impl.*`` keys are
  implementation choices that no config holds; the others are recipe keys of :func:`recipe_values`.

:func:`compare` takes the authors' values as a plain dict, so it is testable without a checkout.
Values come from replic's own loader (:func:`replic.engine.config.load_experiment` at paper scale),
never from the YAML text.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENTS = "configs/experiments"
DEFAULT_REGISTRY = "configs/tables.yaml"
DEFAULT_DOC = "docs/recipes.md"
REGENERATE = "replic recipe --markdown docs/recipes.md"
#: The value of a key one side does not have (e.g. ``train.momentum`` under Adam).
ABSENT = "—"


# --------------------------------------------------------------------------- keys
#: Every recipe key in table order: key -> (label, group). Keys starting ``method.`` that are not
#: listed (a method's own options) are appended in the order of the method's ``Options`` fields.
KEYS: dict[str, tuple[str, str]] = {
    "train.optimizer": ("optimizer", "optimizer"),
    "train.lr": ("lr", "optimizer"),
    "train.lr_backbone": ("lr of the backbone", "optimizer"),
    "train.momentum": ("momentum", "optimizer"),
    "train.betas": ("betas", "optimizer"),
    "train.weight_decay": ("weight decay", "optimizer"),
    "train.weight_decay_norm": ("weight decay of norm layers", "optimizer"),
    "train.bias_lr_mult": ("bias lr ×", "optimizer"),
    "train.bias_decay_mult": ("bias decay ×", "optimizer"),
    "train.batch_size": ("batch per GPU", "batch"),
    "train.gpus": ("GPUs (registry, paper scale)", "batch"),
    "train.total_batch_size": ("total batch", "batch"),
    "train.epochs": ("epochs", "schedule"),
    "train.max_steps": ("optimizer steps (cap)", "schedule"),
    "train.lr_schedule": ("lr schedule", "schedule"),
    "train.lr_drop": ("lr drop after epoch", "schedule"),
    "train.lr_steps": ("lr steps after epochs", "schedule"),
    "train.lr_gamma": ("lr factor at a drop", "schedule"),
    "train.min_lr": ("final lr (cosine)", "schedule"),
    "train.warmup": ("warm-up", "schedule"),
    "train.warmup_iters": ("warm-up iterations", "schedule"),
    "train.warmup_ratio": ("warm-up start (× lr)", "schedule"),
    "train.clip_max_norm": ("gradient clip (max L2 norm; 0 = off)", "schedule"),
    "train.amp": ("mixed precision", "precision and seed"),
    "seed": ("seed (+ rank)", "precision and seed"),
    "model.arch": ("detector", "model"),
    "model.backbone": ("backbone", "model"),
    "model.dilation": ("DC5 (dilated C5)", "model"),
    "model.backbone_style": ("ResNet style", "model"),
    "model.backbone_norm": ("backbone BatchNorm", "model"),
    "model.trainable_layers": ("trainable ResNet stages", "model"),
    "model.fpn_channels": ("FPN channels", "model"),
    "model.head_norm": ("RetinaNet head norm", "model"),
    "model.hidden_dim": ("hidden dim", "model"),
    "model.nheads": ("heads", "model"),
    "model.enc_layers": ("encoder layers", "model"),
    "model.dec_layers": ("decoder layers", "model"),
    "model.dim_feedforward": ("FFN dim", "model"),
    "model.dropout": ("dropout", "model"),
    "model.num_queries": ("queries", "model"),
    "model.aux_loss": ("aux loss (every decoder layer)", "model"),
    "model.spatial_query": ("spatial query", "model"),
    "model.lambda_form": ("λ form", "model"),
    "model.reference_point": ("reference point", "model"),
    "model.offset_regression": ("offset regression", "model"),
    "model.num_classes": ("classes (logits)", "model"),
    "model.rpn_pre_nms_top_n_train": ("RPN pre-NMS (train)", "model"),
    "model.rpn_post_nms_top_n_train": ("RPN proposals (train)", "model"),
    "model.rpn_pre_nms_top_n_test": ("RPN pre-NMS (test)", "model"),
    "model.rpn_post_nms_top_n_test": ("RPN proposals (test)", "model"),
    "model.roi_head_dim": ("RoI head FC width", "model"),
    "model.size_divisible": ("pad to a multiple of", "model"),
    "model.focal_loss": ("sigmoid focal loss", "loss and matcher"),
    "model.criterion.cls_loss_coef": ("class loss weight", "loss and matcher"),
    "model.criterion.bbox_loss_coef": ("L1 box loss weight", "loss and matcher"),
    "model.criterion.giou_loss_coef": ("GIoU loss weight", "loss and matcher"),
    "model.criterion.focal_alpha": ("focal α", "loss and matcher"),
    "model.criterion.focal_gamma": ("focal γ", "loss and matcher"),
    "model.criterion.eos_coef": ("no-object weight", "loss and matcher"),
    "model.criterion.cost_class": ("matcher class cost", "loss and matcher"),
    "model.criterion.cost_bbox": ("matcher L1 cost", "loss and matcher"),
    "model.criterion.cost_giou": ("matcher GIoU cost", "loss and matcher"),
    "data.resize_rule": ("resize arithmetic", "data"),
    "data.train_scales": ("train short sides", "data"),
    "data.max_size": ("train long-side cap", "data"),
    "data.resize_only_prob": ("p(plain resize branch)", "data"),
    "data.crop_scales": ("crop branch: first resize", "data"),
    "data.crop_size": ("crop branch: crop side range", "data"),
    "data.hflip_prob": ("horizontal flip p", "data"),
    "data.remove_crowd": ("crowd boxes dropped", "data"),
    "data.filter_empty_gt": ("images without boxes dropped", "data"),
    "data.val_size": ("test short side", "data"),
    "data.val_max_size": ("test long-side cap", "data"),
    "eval.batch_size": ("eval images per GPU", "evaluation"),
    "model.postprocess_topk": ("detections kept (top-k)", "evaluation"),
    "model.score_thresh": ("score threshold", "evaluation"),
    "model.nms_thresh": ("NMS IoU", "evaluation"),
    "model.topk_candidates": ("candidates per level before NMS", "evaluation"),
    "model.detections_per_img": ("detections per image", "evaluation"),
    "method.name": ("method", "method"),
    "method.teacher": ("teacher", "method"),
    "method.teacher.backbone": ("teacher backbone", "method"),
    "method.tokens": ("receptive tokens from", "method"),
    "method.head_kd": ("extra head distillation terms", "method"),
    "method.init_from_teacher": ("student parts initialised from the teacher", "method"),
}
GROUPS: tuple[str, ...] = ("optimizer", "batch", "schedule", "precision and seed", "model", "loss and matcher",
                           "data", "evaluation", "method")


def key_label(key: str) -> str:
    """Human label of a recipe key (a method option's own name when it has none)."""
    return KEYS[key][0] if key in KEYS else key.split(".", 1)[-1].replace("_", " ")


def key_group(key: str) -> str:
    """The table group of a recipe key."""
    if key in KEYS:
        return KEYS[key][1]
    return "method" if key.startswith("method.") else "other"


def _torch_default_betas(optimizer: str) -> tuple[float, float]:
    """The betas torch's Adam/AdamW use when none are passed (replic passes none, as main.py)."""
    import inspect

    import torch

    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    return tuple(inspect.signature(cls).parameters["betas"].default)  # type: ignore[return-value]


def _spec_text(spec: Any) -> str:
    """A teacher / token spec dataclass as one phrase (``experiment X``, ``checkpoint F``, ``random``)."""
    values = dataclasses.asdict(spec)
    parts = [f"{k} {v}" if not isinstance(v, bool) else k for k, v in values.items() if v not in (None, False)]
    return ", ".join(parts) or "none"


def recipe_values(cfg: Any, gpus: int | None = None,
                  teachers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe of one resolved ``ExperimentConfig`` as an ordered ``{key: value}`` dict.

    Only keys that apply are present (``train.momentum`` only for SGD, ``train.lr_drop`` only for a
    step schedule, ...). ``gpus``: the GPUs the experiment trains on (the registry's paper-scale
    compute), giving ``train.total_batch_size``. ``teachers``: resolved configs by experiment name,
    to show a distillation teacher's backbone.
    """
    from replic.methods import parse_method_options

    t, v = cfg.train, {}
    cnn = getattr(cfg.model, "family", "detr") == "cnn"
    v["train.optimizer"] = t.optimizer
    v["train.lr"] = t.lr
    v["train.lr_backbone"] = t.lr_backbone
    if t.optimizer == "sgd":
        v["train.momentum"] = t.momentum
    else:
        v["train.betas"] = _torch_default_betas(t.optimizer)
    v["train.weight_decay"] = t.weight_decay
    v["train.weight_decay_norm"] = t.weight_decay_norm
    if cnn or t.bias_lr_mult != 1.0 or t.bias_decay_mult != 1.0:
        v["train.bias_lr_mult"] = t.bias_lr_mult
        v["train.bias_decay_mult"] = t.bias_decay_mult
    v["train.batch_size"] = t.batch_size
    if gpus:
        v["train.gpus"] = gpus
        v["train.total_batch_size"] = t.batch_size * gpus
    v["train.epochs"] = t.epochs
    if t.max_steps is not None:
        v["train.max_steps"] = t.max_steps
    v["train.lr_schedule"] = t.lr_schedule
    if t.lr_schedule == "step":
        v["train.lr_drop"] = t.lr_drop
    elif t.lr_schedule == "multistep":
        v["train.lr_steps"] = list(t.lr_steps)
    if t.lr_schedule in ("step", "multistep"):
        v["train.lr_gamma"] = t.lr_gamma
    else:
        v["train.min_lr"] = t.min_lr
    # Only the multistep schedule warms up (TrainConfig.validate): mmdet 'linear' or 'constant'.
    warm = t.lr_schedule == "multistep" and t.warmup_iters > 0
    v["train.warmup"] = t.warmup if warm else "none"
    if warm:
        v["train.warmup_iters"] = t.warmup_iters
        v["train.warmup_ratio"] = t.warmup_ratio
    v["train.clip_max_norm"] = t.clip_max_norm
    v["train.amp"] = t.amp
    v["seed"] = cfg.seed
    v.update(_cnn_model_values(cfg.model) if cnn else _detr_model_values(cfg.model))
    v.update(_data_values(cfg.data, cnn))
    v["eval.batch_size"] = cfg.eval.batch_size
    sections = cfg.method if isinstance(cfg.method, list) else [cfg.method]
    names = [section.get("name", "none") for section in sections]
    name = "+".join(names)
    v["method.name"] = name
    for section in sections if name != "none" else []:
        _, options = parse_method_options(section)
        # A composed method's keys carry the method's name: method.<name>.<key>.
        prefix = f"method.{section['name']}." if len(sections) > 1 else "method."
        for f in dataclasses.fields(options):
            if section["name"] == "maskd" and f.name in _MASKD_EXTRAS:
                continue  # written below as the official configs name them
            value = getattr(options, f.name)
            v[f"{prefix}{f.name}"] = _spec_text(value) if dataclasses.is_dataclass(value) else value
            if f.name == "teacher" and teachers and value.experiment in teachers:
                v[f"{prefix}teacher.backbone"] = teachers[value.experiment].model.backbone
        if section["name"] == "ks_detr":
            v[f"{prefix}masking_loc"] = options.location  # null = the variant's official pairing
        if section["name"] == "maskd":
            v.update({prefix + k: value for k, value in _maskd_extras(cfg, options).items()})
    return v


# MasKD options written as the official configs' extra distiller components and init_cfg prefixes.
_MASKD_EXTRAS = ("head_distill", "head_weight", "init_from_teacher")
_MASKD_HEAD_TERMS = {
    "retinanet": "mmdet.L1Loss on bbox_head.retina_reg",
    "faster_rcnn": "mmdet.SmoothL1Loss on roi_head.bbox_head.fc_reg",
}
_MASKD_HEAD_INPUTS = {"faster_rcnn": " (student inputs to roi_head.bbox_roi_extractor)"}
_MASKD_INIT_PARTS = {"retinanet": "neck, bbox_head", "fcos": "neck, bbox_head",
                     "faster_rcnn": "neck, rpn_head, roi_head"}


def _maskd_extras(cfg: Any, options: Any) -> dict[str, Any]:
    """``head_kd`` and ``init_from_teacher`` of a MasKD student, resolved (unset options follow the
    official config of the student's detector) and worded as the official configs."""
    from replic.methods.maskd import MasKD, student_arch

    method = MasKD(cfg, options)
    arch = student_arch(cfg)
    head = "none"
    if method.head_distill:
        weight = options.head_weight
        weight_text = int(weight) if float(weight).is_integer() else weight
        head = f"{_MASKD_HEAD_TERMS[arch]} ×{weight_text}{_MASKD_HEAD_INPUTS.get(arch, '')}"
    init = _MASKD_INIT_PARTS.get(arch, "none") if method.init_from_teacher else "none"
    return {"head_kd": head, "init_from_teacher": init}


def _detr_model_values(model: Any) -> dict[str, Any]:
    m = model.resolved()
    c = m.criterion
    v: dict[str, Any] = {}
    for name in ("arch", "backbone", "dilation", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                 "dim_feedforward", "dropout", "num_queries", "aux_loss", "spatial_query", "lambda_form",
                 "reference_point", "offset_regression", "num_classes", "postprocess_topk", "focal_loss"):
        v[f"model.{name}"] = getattr(m, name)
    for name in ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef"):
        v[f"model.criterion.{name}"] = getattr(c, name)
    if m.focal_loss:
        v["model.criterion.focal_alpha"] = c.focal_alpha
        v["model.criterion.focal_gamma"] = c.focal_gamma
    else:
        v["model.criterion.eos_coef"] = c.eos_coef
    for name in ("cost_class", "cost_bbox", "cost_giou"):
        v[f"model.criterion.{name}"] = getattr(c, name)
    return v


def _cnn_model_values(m: Any) -> dict[str, Any]:
    v: dict[str, Any] = {"model.arch": m.arch, "model.backbone": m.backbone,
                         # replic's CNN backbones: torchvision (pytorch-style) ResNets with
                         # FrozenBatchNorm2d everywhere (docs/cnn_detectors.md).
                         "model.backbone_style": "pytorch", "model.backbone_norm": "frozen",
                         "model.trainable_layers": m.trainable_layers, "model.fpn_channels": m.fpn_channels}
    if m.arch == "retinanet":
        v["model.head_norm"] = m.head_norm
    v["model.num_classes"] = m.num_classes
    if m.arch == "faster_rcnn":
        for name in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                     "rpn_post_nms_top_n_test", "roi_head_dim"):
            v[f"model.{name}"] = getattr(m, name)
    v["model.size_divisible"] = m.size_divisible
    v["model.score_thresh"] = m.score_thresh
    v["model.nms_thresh"] = m.nms
    if m.arch != "faster_rcnn":
        v["model.topk_candidates"] = m.topk_candidates
    v["model.detections_per_img"] = m.detections_per_img
    return v


def _data_values(d: Any, cnn: bool) -> dict[str, Any]:
    v: dict[str, Any] = {"data.resize_rule": d.resize_rule, "data.train_scales": list(d.train_scales),
                         "data.max_size": d.max_size, "data.resize_only_prob": d.resize_only_prob}
    if d.resize_only_prob < 1.0:
        v["data.crop_scales"] = list(d.crop_scales)
        v["data.crop_size"] = list(d.crop_size)
    v["data.hflip_prob"] = d.hflip_prob
    v["data.remove_crowd"] = d.remove_crowd
    if cnn:
        v["data.filter_empty_gt"] = False  # replic's dataset keeps images without boxes
    v["data.val_size"] = d.val_size
    v["data.val_max_size"] = d.val_max_size
    return v


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """Where the authors set a value: a file of their repository and the argument or key in it.

    ``ref`` is an argparse flag (``--lr``), a dotted config path (``optimizer.lr``) or, with a
    ``note``, a phrase naming the code. ``{config}`` in ``file`` is the experiment's own config
    (:data:`AUTHORS_FILES`).
    """

    file: str
    ref: str
    note: str = ""

    def text(self) -> str:
        """The source as Markdown."""
        where = f"`{self.file}` " if self.file else ""
        return f"{where}`{self.ref}`" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Codebase:
    """One authors' code base: the repository (with the commit read) and its key mapping."""

    name: str
    title: str
    repo: str
    env: str | None
    sources: dict[str, Source]
    base: str | None = None  # another code base whose sources this one extends

    def source(self, key: str) -> Source | None:
        """The authors' source of ``key``, looking in the base code base too."""
        if key in self.sources:
            return self.sources[key]
        return CODEBASES[self.base].source(key) if self.base else None


def _s(file: str, ref: str, note: str = "") -> Source:
    return Source(file, ref, note)


_CDETR_MAIN = "main.py"
_CDETR_SCRIPT = "scripts/conddetr_<model>_epoch50.sh"
_CDETR_COCO = "datasets/coco.py"
_CDETR_T = "datasets/transforms.py"
_CDETR_MODEL = "models/conditional_detr.py"

_DETR_LIKE: dict[str, Source] = {
    "train.optimizer": _s(_CDETR_MAIN, "torch.optim.AdamW(param_dicts, ...)"),
    "train.lr": _s(_CDETR_MAIN, "--lr"),
    "train.lr_backbone": _s(_CDETR_MAIN, "--lr_backbone"),
    "train.betas": _s(_CDETR_MAIN, "torch.optim.AdamW(...)", "betas not passed: torch's default"),
    "train.weight_decay": _s(_CDETR_MAIN, "--weight_decay"),
    "train.weight_decay_norm": _s(_CDETR_MAIN, "param_dicts", "no norm group: every parameter decays"),
    "train.epochs": _s(_CDETR_MAIN, "--epochs"),
    "train.lr_schedule": _s(_CDETR_MAIN, "torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)",
                            "stepped once per epoch"),
    "train.lr_drop": _s(_CDETR_MAIN, "--lr_drop"),
    "train.lr_gamma": _s(_CDETR_MAIN, "StepLR(...)", "gamma not passed: torch's default"),
    "train.warmup": _s(_CDETR_MAIN, "StepLR(...)", "no warm-up"),
    "train.clip_max_norm": _s(_CDETR_MAIN, "--clip_max_norm"),
    "train.amp": _s("main.py, engine.py", "train_one_epoch", "no autocast / GradScaler: fp32"),
    "seed": _s(_CDETR_MAIN, "--seed"),
    "model.backbone": _s(_CDETR_MAIN, "--backbone"),
    "model.dilation": _s(_CDETR_MAIN, "--dilation"),
    "model.hidden_dim": _s(_CDETR_MAIN, "--hidden_dim"),
    "model.nheads": _s(_CDETR_MAIN, "--nheads"),
    "model.enc_layers": _s(_CDETR_MAIN, "--enc_layers"),
    "model.dec_layers": _s(_CDETR_MAIN, "--dec_layers"),
    "model.dim_feedforward": _s(_CDETR_MAIN, "--dim_feedforward"),
    "model.dropout": _s(_CDETR_MAIN, "--dropout"),
    "model.num_queries": _s(_CDETR_MAIN, "--num_queries"),
    "model.aux_loss": _s(_CDETR_MAIN, "--no_aux_loss"),
    "model.criterion.bbox_loss_coef": _s(_CDETR_MAIN, "--bbox_loss_coef"),
    "model.criterion.giou_loss_coef": _s(_CDETR_MAIN, "--giou_loss_coef"),
    "model.criterion.cost_class": _s(_CDETR_MAIN, "--set_cost_class"),
    "model.criterion.cost_bbox": _s(_CDETR_MAIN, "--set_cost_bbox"),
    "model.criterion.cost_giou": _s(_CDETR_MAIN, "--set_cost_giou"),
    "data.resize_rule": _s(_CDETR_T, "resize / get_size_with_aspect_ratio", "short side = scale, long side capped"),
    "data.train_scales": _s(_CDETR_COCO, "make_coco_transforms: scales"),
    "data.max_size": _s(_CDETR_COCO, "T.RandomResize(scales, max_size=...)"),
    "data.resize_only_prob": _s(_CDETR_T, "RandomSelect(..., p)", "default of p; make_coco_transforms passes none"),
    "data.crop_scales": _s(_CDETR_COCO, "T.RandomResize([400, 500, 600])"),
    "data.crop_size": _s(_CDETR_COCO, "T.RandomSizeCrop(min_size, max_size)"),
    "data.hflip_prob": _s(_CDETR_T, "RandomHorizontalFlip(p)", "default of p"),
    "data.remove_crowd": _s(_CDETR_COCO, "ConvertCocoPolysToMask", "keeps iscrowd == 0"),
    "data.val_size": _s(_CDETR_COCO, "val: T.RandomResize([800], max_size=...)"),
    "data.val_max_size": _s(_CDETR_COCO, "val: T.RandomResize([...], max_size=1333)"),
    "eval.batch_size": _s(_CDETR_MAIN, "data_loader_val = DataLoader(dataset_val, args.batch_size, ...)",
                          "evaluates at the training batch per GPU"),
}

CODEBASES: dict[str, Codebase] = {}


def _register(cb: Codebase) -> None:
    CODEBASES[cb.name] = cb


_register(Codebase(
    "conditional_detr", "Conditional DETR", "Atten4Vis/ConditionalDETR @ 8ea7c3f", "REPLIC_OFFICIAL_CONDDETR",
    {**_DETR_LIKE,
     "train.batch_size": _s(_CDETR_SCRIPT, "--batch_size", "else main.py's default"),
     "train.gpus": _s(_CDETR_SCRIPT, "--nproc_per_node"),
     "train.total_batch_size": _s(_CDETR_SCRIPT, "--nproc_per_node × --batch_size"),
     "model.arch": _s(_CDETR_MODEL, "ConditionalDETR"),
     "model.spatial_query": _s("", "paper Table 3", "main.py has no switch: conditional spatial query only"),
     "model.lambda_form": _s("", "paper Figure 5", "main.py: the diagonal query_scale MLP only"),
     "model.reference_point": _s("", "paper §4.3", "main.py: predicted from the query only"),
     "model.offset_regression": _s("", "paper Table 4", "main.py: always on"),
     "model.num_classes": _s(_CDETR_MODEL, "build(): num_classes"),
     "model.postprocess_topk": _s(_CDETR_MODEL, "PostProcess: torch.topk(prob.view(...), k)"),
     "model.focal_loss": _s(_CDETR_MODEL, "SetCriterion.loss_labels: sigmoid_focal_loss"),
     "model.criterion.cls_loss_coef": _s(_CDETR_MAIN, "--cls_loss_coef"),
     "model.criterion.focal_alpha": _s(_CDETR_MAIN, "--focal_alpha"),
     "model.criterion.focal_gamma": _s(_CDETR_MODEL, "sigmoid_focal_loss(..., gamma=...)")},
))
_register(Codebase(
    "detr", "DETR", "facebookresearch/detr @ 29901c5", "REPLIC_OFFICIAL_DETR",
    {**_DETR_LIKE,
     "train.batch_size": _s(_CDETR_MAIN, "--batch_size", "README's training command passes none"),
     "train.gpus": _s("README.md", "Training: torch.distributed.launch --nproc_per_node"),
     "train.total_batch_size": _s("README.md", "--nproc_per_node × main.py --batch_size"),
     "model.arch": _s("models/detr.py", "DETR"),
     "model.num_classes": _s("models/detr.py", "build(): num_classes"),
     "model.postprocess_topk": _s("models/detr.py", "PostProcess", "one box per query: all queries"),
     "model.focal_loss": _s("models/detr.py", "SetCriterion.loss_labels: F.cross_entropy", "softmax CE"),
     "model.criterion.cls_loss_coef": _s("models/detr.py", "build(): weight_dict['loss_ce']"),
     "model.criterion.eos_coef": _s(_CDETR_MAIN, "--eos_coef"),
     "model.spatial_query": _s("", "Conditional DETR paper Table 4", "DETR has no conditional spatial query"),
     "model.offset_regression": _s("", "Conditional DETR paper Table 4", "DETR has no reference point"),
     "model.lambda_form": _s("", "—", "DETR has no λ"),
     "model.reference_point": _s("", "—", "DETR has no reference point")},
))

_KS_CFG = "{config}"
_KS_OPTIM = "configs/common/optim.py"
_KS_SCHED = "configs/common/coco_schedule.py"
_KS_DATA = "projects/ks_detr/configs/ks_coco_detr.py"
_KS_MODEL = "projects/ks_detr/configs/ks_conditional_detr/models/ks_conditional_detr_r50.py"
_KS_GT = "projects/ks_detr/configs/ksgt_configs/triple_attn_smlp_share_qkv_outproj_ffn.py"
_register(Codebase(
    "ks_detr", "KS-DETR (detrex LazyConfig)", "edocanonymous/KS-DETR @ df0f2f6", "REPLIC_OFFICIAL_KSDETR",
    {
        "train.optimizer": _s(_KS_CFG, "optimizer", "get_config('common/optim.py').AdamW"),
        "train.lr": _s(_KS_CFG, "optimizer.lr"),
        "train.lr_backbone": _s(_KS_CFG, "optimizer.params.lr_factor_func",
                                "lr × the factor for module names containing 'backbone'"),
        "train.betas": _s(_KS_CFG, "optimizer.betas"),
        "train.weight_decay": _s(_KS_CFG, "optimizer.weight_decay"),
        "train.weight_decay_norm": _s(_KS_OPTIM, "AdamW.params.weight_decay_norm"),
        "train.total_batch_size": _s(_KS_CFG, "dataloader.train.total_batch_size"),
        "train.gpus": _s("README.md", "8 GPUs", "not a config value"),
        "train.epochs": _s(_KS_CFG, "train.max_iter", "iterations ÷ 7500 per epoch at batch 16 (coco_schedule.py)"),
        "train.lr_schedule": _s(_KS_CFG, "lr_multiplier", "lr_multiplier_<N>ep = default_coco_scheduler(...)"),
        "train.lr_drop": _s(_KS_SCHED, "default_coco_scheduler(epochs, decay_epochs, warmup_epochs)",
                            "decay_epochs"),
        "train.lr_gamma": _s(_KS_SCHED, "MultiStepParamScheduler(values=[1.0, γ])"),
        "train.warmup": _s(_KS_SCHED, "default_coco_scheduler(...)", "warmup_epochs"),
        "train.clip_max_norm": _s(_KS_CFG, "train.clip_grad.params.max_norm"),
        "train.amp": _s("configs/common/train.py", "train.amp.enabled"),
        "seed": _s("configs/common/train.py", "train.seed", "not set: detectron2's default −1 (random)"),
        "model.arch": _s(_KS_MODEL, "KSConditionalDETR"),
        "model.backbone": _s(_KS_CFG, "model.backbone.stages.depth"),
        "model.hidden_dim": _s(_KS_CFG, "model.embed_dim"),
        "model.nheads": _s(_KS_CFG, "model.transformer.encoder.num_heads"),
        "model.enc_layers": _s(_KS_CFG, "model.transformer.encoder.encoder_layer_config", "'regular_5-…_1': 6"),
        "model.dec_layers": _s(_KS_CFG, "model.transformer.decoder.decoder_layer_config", "'regular_6': 6"),
        "model.dim_feedforward": _s(_KS_CFG, "model.transformer.encoder.feedforward_dim"),
        "model.dropout": _s(_KS_CFG, "model.transformer.encoder.attn_dropout", "and ffn_dropout"),
        "model.num_queries": _s(_KS_CFG, "model.num_queries"),
        "model.aux_loss": _s(_KS_CFG, "model.aux_loss"),
        "model.num_classes": _s(_KS_CFG, "model.num_classes"),
        "model.postprocess_topk": _s(_KS_CFG, "model.select_box_nums_for_evaluation"),
        "model.focal_loss": _s(_KS_CFG, "model.criterion.loss_class_type"),
        "model.criterion.cls_loss_coef": _s(_KS_CFG, "model.criterion.weight_dict.loss_class"),
        "model.criterion.bbox_loss_coef": _s(_KS_CFG, "model.criterion.weight_dict.loss_bbox"),
        "model.criterion.giou_loss_coef": _s(_KS_CFG, "model.criterion.weight_dict.loss_giou"),
        "model.criterion.focal_alpha": _s(_KS_CFG, "model.criterion.alpha"),
        "model.criterion.focal_gamma": _s(_KS_CFG, "model.criterion.gamma"),
        "model.criterion.cost_class": _s(_KS_CFG, "model.criterion.matcher.cost_class"),
        "model.criterion.cost_bbox": _s(_KS_CFG, "model.criterion.matcher.cost_bbox"),
        "model.criterion.cost_giou": _s(_KS_CFG, "model.criterion.matcher.cost_giou"),
        "data.train_scales": _s(_KS_DATA, "dataloader.train.mapper.augmentation[1].short_edge_length"),
        "data.max_size": _s(_KS_DATA, "dataloader.train.mapper.augmentation[1].max_size"),
        "data.resize_only_prob": _s("projects/ks_detr/data", "KSDetrDatasetMapper",
                                    "augmentation vs augmentation_with_crop"),
        "data.crop_scales": _s(_KS_DATA, "dataloader.train.mapper.augmentation_with_crop[1].short_edge_length"),
        "data.crop_size": _s(_KS_DATA, "dataloader.train.mapper.augmentation_with_crop[2].crop_size"),
        "data.hflip_prob": _s(_KS_DATA, "T.RandomFlip()", "detectron2's default p"),
        "data.val_size": _s(_KS_DATA, "dataloader.test.mapper.augmentation[0].short_edge_length"),
        "data.val_max_size": _s(_KS_DATA, "dataloader.test.mapper.augmentation[0].max_size"),
        "eval.batch_size": _s(_KS_DATA, "build_detection_test_loader", "detectron2's default per GPU"),
        "method.variant": _s(_KS_CFG, "model.transformer.encoder.encoder_layer_config",
                             "TripleAttnQKVShareAV / DualAttnShareA / DualAttnShareV"),
        "method.token_masking": _s(_KS_GT, "ksgt_module.encoder_token_masking"),
        "method.masking_loc": _s(_KS_GT, "ksgt_module.encoder_token_masking_loc"),
        "method.pad_fg_pixel": _s(_KS_GT, "ksgt_module.pad_fg_pixel"),
        "method.mask_criterion": _s(_KS_GT, "ksgt_module.gt_fg_bg_mask_criterion"),
        "method.encoder_layer": _s(_KS_CFG, "model.transformer.encoder.encoder_layer_config",
                                   "position of the KS layer"),
    },
))

_D3 = "docs/d3etr.md"
_register(Codebase(
    "d3etr", "D³ETR (no official code)", "none: D³ETR's code is not released", None,
    {
        "method.teacher": _s(_D3, "choice 1", "[inferred] the official 50-ep Conditional DETR-R101"),
        "method.teacher.backbone": _s(_D3, "choice 1", "[inferred]"),
        "method.matching": _s(_D3, "matching ablation", "[paper] MixMatcher = adaptive + fixed"),
        "method.signals": _s(_D3, "signal ablation", "[paper] figure caption"),
        "method.layers": _s(_D3, "choice 4-5", "[paper] per decoder layer"),
        "method.cost_class": _s(_D3, "choice 4", "[unofficial] TPRD DistillHungarianMatcher"),
        "method.cost_bbox": _s(_D3, "choice 4", "[unofficial] TPRD"),
        "method.cost_giou": _s(_D3, "choice 4", "[unofficial] TPRD"),
        "method.class_weight": _s(_D3, "choice 6", "[inferred] KL form, TPRD's weight"),
        "method.bbox_weight": _s(_D3, "choice 6", "[unofficial] TPRD"),
        "method.giou_weight": _s(_D3, "choice 6", "[unofficial] TPRD"),
        "method.self_attn_weight": _s(_D3, "choice 7", "[unofficial] TPRD"),
        "method.cross_attn_weight": _s(_D3, "choice 7", "[unofficial] TPRD"),
        "method.attn_loss": _s(_D3, "choice 7", "[unofficial] TPRD"),
        "method.attn_per_head": _s(_D3, "choice 7", "[inferred]"),
        "method.fixed_reference_points": _s(_D3, "choice 2", "[inferred]"),
        "method.fixed_group_gt_loss": _s(_D3, "choice 3", "[inferred]"),
        "method.unmatched": _s(_D3, "choice 8", "[inferred]"),
        "train.lr_drop": _s(_D3, "choice 11", "12 ep: detrex lr_multiplier_12ep [third-party]; 50 ep: main.py"),
    },
    base="conditional_detr",
))

_RAZOR = "{config}"
_register(Codebase(
    "mmdet", "MMDetection 2.x (vendored in hunto/MasKD)", "hunto/MasKD @ b5af34f (mmdetection/, mmrazor/)",
    "REPLIC_OFFICIAL_MASKD",
    {
        "train.optimizer": _s(_RAZOR, "optimizer.type"),
        "train.lr": _s(_RAZOR, "optimizer.lr"),
        "train.lr_backbone": _s(_RAZOR, "optimizer.lr", "one lr for the whole detector"),
        "train.momentum": _s(_RAZOR, "optimizer.momentum"),
        "train.betas": _s(_RAZOR, "optimizer", "betas not set: torch's default"),
        "train.weight_decay": _s(_RAZOR, "optimizer.weight_decay"),
        "train.weight_decay_norm": _s(_RAZOR, "optimizer.paramwise_cfg.norm_decay_mult", "absent: norms decay"),
        "train.bias_lr_mult": _s(_RAZOR, "optimizer.paramwise_cfg.bias_lr_mult", "absent: 1"),
        "train.bias_decay_mult": _s(_RAZOR, "optimizer.paramwise_cfg.bias_decay_mult", "absent: 1"),
        "train.batch_size": _s(_RAZOR, "data.samples_per_gpu"),
        "train.gpus": _s("README.md", "dist_train(_mmdet).sh ${CONFIG} 8"),
        "train.total_batch_size": _s(_RAZOR, "data.samples_per_gpu × GPUs"),
        "train.epochs": _s(_RAZOR, "runner.max_epochs"),
        "train.max_steps": _s(_RAZOR, "runner.max_iters"),
        "train.lr_schedule": _s(_RAZOR, "lr_config.policy"),
        "train.lr_steps": _s(_RAZOR, "lr_config.step"),
        "train.lr_gamma": _s(_RAZOR, "lr_config.gamma", "absent: mmcv's 0.1"),
        "train.min_lr": _s(_RAZOR, "lr_config.min_lr"),
        "train.warmup": _s(_RAZOR, "lr_config.warmup"),
        "train.warmup_iters": _s(_RAZOR, "lr_config.warmup_iters"),
        "train.warmup_ratio": _s(_RAZOR, "lr_config.warmup_ratio"),
        "train.clip_max_norm": _s(_RAZOR, "optimizer_config.grad_clip.max_norm", "None: no clipping"),
        "train.amp": _s(_RAZOR, "fp16", "absent: fp32"),
        "seed": _s("tools/train.py", "--seed", "not set in the README's commands"),
        "model.arch": _s(_RAZOR, "<model>.type"),
        "model.backbone": _s(_RAZOR, "<model>.backbone.depth"),
        "model.backbone_style": _s(_RAZOR, "<model>.backbone.style"),
        "model.backbone_norm": _s(_RAZOR, "<model>.backbone.norm_cfg.requires_grad, norm_eval"),
        "model.trainable_layers": _s(_RAZOR, "<model>.backbone.frozen_stages", "4 − frozen_stages"),
        "model.fpn_channels": _s(_RAZOR, "<model>.neck.out_channels"),
        "model.head_norm": _s(_RAZOR, "<model>.bbox_head", "RetinaHead: no norm_cfg"),
        "model.num_classes": _s(_RAZOR, "<model>.(roi_head.)bbox_head.num_classes"),
        "model.rpn_pre_nms_top_n_train": _s(_RAZOR, "<model>.train_cfg.rpn_proposal.nms_pre"),
        "model.rpn_post_nms_top_n_train": _s(_RAZOR, "<model>.train_cfg.rpn_proposal.max_per_img"),
        "model.rpn_pre_nms_top_n_test": _s(_RAZOR, "<model>.test_cfg.rpn.nms_pre"),
        "model.rpn_post_nms_top_n_test": _s(_RAZOR, "<model>.test_cfg.rpn.max_per_img"),
        "model.roi_head_dim": _s(_RAZOR, "<model>.roi_head.bbox_head.fc_out_channels"),
        "model.size_divisible": _s(_RAZOR, "train_pipeline: Pad(size_divisor)"),
        "model.score_thresh": _s(_RAZOR, "<model>.test_cfg(.rcnn).score_thr"),
        "model.nms_thresh": _s(_RAZOR, "<model>.test_cfg(.rcnn).nms.iou_threshold"),
        "model.topk_candidates": _s(_RAZOR, "<model>.test_cfg.nms_pre"),
        "model.detections_per_img": _s(_RAZOR, "<model>.test_cfg(.rcnn).max_per_img"),
        "data.resize_rule": _s(_RAZOR, "train_pipeline: Resize(keep_ratio=True)", "mmcv imrescale"),
        "data.train_scales": _s(_RAZOR, "train_pipeline: Resize(img_scale)", "short sides"),
        "data.max_size": _s(_RAZOR, "train_pipeline: Resize(img_scale)", "long side"),
        "data.hflip_prob": _s(_RAZOR, "train_pipeline: RandomFlip(flip_ratio)"),
        "data.resize_only_prob": _s(_RAZOR, "train_pipeline", "no crop step"),
        "data.remove_crowd": _s(_RAZOR, "LoadAnnotations", "crowd boxes become gt_bboxes_ignore, never assigned"),
        "data.filter_empty_gt": _s("mmdet/datasets/custom.py", "CustomDataset(filter_empty_gt=True)",
                                   "mmdet's default"),
        "data.val_size": _s(_RAZOR, "test_pipeline: MultiScaleFlipAug(img_scale)", "short side"),
        "data.val_max_size": _s(_RAZOR, "test_pipeline: MultiScaleFlipAug(img_scale)", "long side"),
        "eval.batch_size": _s("tools/test.py", "samples_per_gpu", "1 image per GPU"),
        "method.teacher": _s(_RAZOR, "algorithm.distiller.teacher"),
        "method.teacher.backbone": _s(_RAZOR, "algorithm.distiller.teacher.backbone.depth"),
        "method.tokens": _s(_RAZOR, "MasKDLoss(pretrained=...)", "the released stage-1 tokens"),
        "method.num_tokens": _s(_RAZOR, "algorithm.distiller.components[0].losses[0].num_tokens"),
        "method.weighting": _s(_RAZOR, "algorithm.distiller.components[0].losses[0].weight_mask"),
        "method.loss_weight": _s(_RAZOR, "algorithm.distiller.components[0].losses[0].loss_weight"),
        "method.custom_mask": _s(_RAZOR, "algorithm.distiller.components[0].losses[0].custom_mask"),
        "method.custom_mask_warmup": _s(_RAZOR, "algorithm.distiller.components[0].losses[0].custom_mask_warmup"),
        "method.position": _s(_RAZOR, "algorithm.distiller.components[0].student_module", "'neck' = fpn"),
        "method.head_kd": _s(_RAZOR, "algorithm.distiller.components[1:]"),
        "method.init_from_teacher": _s(_RAZOR, "student.{neck,bbox_head}.init_cfg.prefix"),
        "method.dice": _s("mmdetection/maskd_hook.py", "MasKDHook", "the Dice loss is always on"),
        "method.dice_weight": _s("mmdetection/maskd_hook.py", "MasKDHook", "[paper] Eq. 10, λ = 1"),
    },
))
_register(Codebase(
    "maskd_tokens", "MasKD stage 1 (mmdetection/configs/maskd)", "hunto/MasKD @ b5af34f", "REPLIC_OFFICIAL_MASKD",
    {
        "train.gpus": _s("mmdetection/README.md", "dist_train.sh <config> 8"),
        "method.num_tokens": _s(_RAZOR, "custom_hooks[MasKDHook].num_tokens"),
        "method.weighting": _s(_RAZOR, "custom_hooks[MasKDHook].weight_mask"),
        "method.position": _s(_RAZOR, "custom_hooks[MasKDHook].module_name", "'neck' = fpn"),
        "method.teacher": _s(_RAZOR, "model.init_cfg.checkpoint", "the mmdet zoo teacher"),
    },
    base="mmdet",
))
_register(Codebase(
    "maskd_detr", "MasKD on a DETR (beyond the paper)", "none: MasKD has no DETR config", None,
    {"method.name": _s("", "beyond the paper", "recipe of the official CNN configs carried over [inferred]")},
    base="conditional_detr",
))

_register(Codebase(
    "composition", "Methods composed on one student (beyond the papers)", "none: no paper composes them", None,
    {"method.name": _s("", "beyond the papers", "each method's own recipe, from its experiment (`from:`)")},
    base="conditional_detr",
))

_KS_CDETR = "projects/ks_detr/configs/ks_conditional_detr"
#: The authors' files that define one experiment's run, relative to the code base's checkout. An
#: experiment not listed has no single authors' file (an ablation, a longer schedule of the paper).
AUTHORS_FILES: dict[str, tuple[str, ...]] = {
    "cdetr_r50_50ep": ("main.py", "scripts/conddetr_r50_epoch50.sh"),
    "cdetr_r101_50ep": ("main.py", "scripts/conddetr_r101_epoch50.sh"),
    "cdetr_dc5_r50_50ep": ("main.py", "scripts/conddetr_r50dc5_epoch50.sh"),
    "cdetr_dc5_r101_50ep": ("main.py", "scripts/conddetr_r101dc5_epoch50.sh"),
    "detr_r50_50ep": ("main.py", "README.md"),
    "ks_cdetr_r50_50ep": (f"{_KS_CDETR}/ks_conditional_detr_r50_50ep_smlp_qkv_triple_attn.py",),
    "ks_cdetr_r50_50ep_base": (f"{_KS_CDETR}/ks_conditional_detr_r50_50ep.py",),
    "ks_cdetr_r101_50ep": (f"{_KS_CDETR}/ks_conditional_detr_r101_50ep_smlp_qkv_triple_attn.py",),
    "ks_cdetr_r101_50ep_base": (f"{_KS_CDETR}/ks_conditional_detr_r101_50ep.py",),
    "maskd_retinanet_r50_24ep": ("mmrazor/configs/distill/maskd/retinanet_r101-retinanet_r50_coco.py",),
    "maskd_frcnn_r50_24ep": ("mmrazor/configs/distill/maskd/fpn_r101-fpn_r50_coco.py",),
    "maskd_fcos_r50_24ep": ("mmrazor/configs/distill/maskd/fcos_r101-fcos_r50_coco.py",),
    # The students alone: the KD configs' student recipe (replic trains the baseline as MasKD
    # trains the student; the published baseline APs are mmdet zoo numbers).
    "retinanet_r50_24ep": ("mmrazor/configs/distill/maskd/retinanet_r101-retinanet_r50_coco.py",),
    "frcnn_r50_24ep": ("mmrazor/configs/distill/maskd/fpn_r101-fpn_r50_coco.py",),
    "fcos_r50_24ep": ("mmrazor/configs/distill/maskd/fcos_r101-fcos_r50_coco.py",),
    # The teachers: the mmdet zoo configs of the checkpoints the MasKD configs load.
    "retinanet_r101_24ep": ("mmdetection/configs/retinanet/retinanet_r101_fpn_2x_coco.py",),
    "frcnn_r101_24ep": ("mmdetection/configs/faster_rcnn/faster_rcnn_r101_fpn_2x_coco.py",),
    "fcos_r101_24ep": ("mmdetection/configs/fcos/fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco.py",),
    "maskd_tokens_retinanet_r101_24ep_t6": ("mmdetection/configs/maskd/retinanet_r101_fpn_2x_coco.py",),
    "maskd_tokens_frcnn_r101_24ep_t6": ("mmdetection/configs/maskd/faster_rcnn_r101_fpn_2x_coco.py",),
    "maskd_tokens_fcos_r101_24ep_t6": (
        "mmdetection/configs/maskd/fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco.py",),
}


# --------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """Experiments that share one recipe except the keys they vary (one table in the doc)."""

    paper: str
    title: str
    experiments: tuple[str, ...]  # globs, first family that matches wins
    codebase: str
    note: str = ""


PAPERS: dict[str, str] = {
    "conditional_detr": "Conditional DETR (Meng et al., ICCV 2021, arXiv 2108.06152)",
    "ks_detr": "KS-DETR (Zhao & Ukita, arXiv 2302.11208)",
    "d3etr": "D³ETR (Chen et al., IJCAI 2024, arXiv 2211.09768)",
    "maskd": "MasKD (Huang et al., ICLR 2023, arXiv 2205.14589)",
    "composition": "Beyond the papers: KS-DETR, D³ETR and MasKD on one student (docs/composition.md)",
}

FAMILIES: tuple[Family, ...] = (
    # First: its KS-DETR row (cdetr_r50_12ep_ks) would otherwise match the Conditional DETR globs.
    Family("composition", "Composed methods and KS-DETR on the official recipe",
           ("compose_*", "cdetr_r50_12ep_ks"), "composition",
           "Every row trains the official Conditional DETR-R50 recipe; a composition takes each method's "
           "section from that method's own experiment."),
    Family("conditional_detr", "Conditional DETR: the official recipe", ("cdetr_*",), "conditional_detr",
           "The 75 / 108-epoch schedules (lr drop at 60 / 80) are the paper's (§4.1); the official scripts "
           "train 50 epochs. The 12-epoch run is D³ETR's short-schedule baseline. Table 3, Figure 5 and §4.3 "
           "ablations are model switches with no flag in the official code."),
    Family("conditional_detr", "DETR baselines (Table 1)", ("detr_r50_50ep", "detr_r101_50ep", "detr_dc5_*",
                                                             "detr_*_500ep", "detr_r50_12ep"), "detr",
           "The 50-epoch DETR rows are the Conditional DETR paper's re-runs; the 500-epoch rows are the "
           "original DETR schedule (its released checkpoints); the 12-epoch row is replic's short-schedule "
           "pair of `cdetr_r50_12ep` (the main job's claim)."),
    Family("conditional_detr", "DETR with focal loss / offset regression (Table 4)", ("detr_r50_50ep_t4_*",), "detr",
           "Table 4 switches focal loss (with Conditional DETR's 300 queries and loss weights) and offset "
           "regression on the 50-epoch DETR-R50; the row without either is `detr_r50_50ep` above."),
    Family("ks_detr", "KS-Conditional-DETR: the README rows (50 epochs) and their baselines",
           ("ks_cdetr_r50_50ep*", "ks_cdetr_r101_50ep*"), "ks_detr",
           "Baselines (`*_base`) and KS models share the detrex protocol (configs/experiments/base/"
           "ks_protocol.yaml) and are compared as pairs."),
    Family("ks_detr", "KS-DETR on DETR-R50 (no official config)", ("ks_detr_r50_50ep*",), "ks_detr",
           "KS-DETR publishes no DETR row; these runs use the KS-Conditional-DETR protocol on the DETR model."),
    Family("ks_detr", "KS-DETR: ablations (Conditional DETR-R50, 12 epochs)", ("ks_cdetr_r50_12ep*",), "ks_detr",
           "12 epochs with the lr drop after 11: detrex's `lr_multiplier_12ep` (configs/common/coco_schedule.py)."),
    Family("d3etr", "D³ETR: Conditional DETR-R50 students of a Conditional DETR-R101 teacher", ("d3etr_*",), "d3etr",
           "The student's recipe is the official Conditional DETR one; every method key is a choice "
           "(no official code), with its source in docs/d3etr.md."),
    Family("maskd", "CNN detectors alone: MasKD's teachers and students (mmdet 2×)",
           ("retinanet_*", "frcnn_*", "fcos_*"), "mmdet",
           "R50 runs follow the MasKD KD configs' student recipe; R101 runs are the teachers (the mmdet zoo "
           "checkpoints the MasKD configs load)."),
    Family("maskd", "MasKD stage 1: receptive tokens on the frozen teachers (main runs)",
           ("maskd_tokens_retinanet_r101_24ep_t6", "maskd_tokens_frcnn_r101_24ep_t6", "maskd_tokens_fcos_r101_24ep_t6"),
           "maskd_tokens"),
    Family("maskd", "MasKD stage 1: token ablations (RetinaNet-R101 teacher)", ("maskd_tokens_retinanet_*",),
           "maskd_tokens"),
    Family("maskd", "MasKD stage 2: distilled students (R50 ← R101)",
           ("maskd_retinanet_r50_24ep", "maskd_frcnn_r50_24ep", "maskd_fcos_r50_24ep", "maskd_*_r50_24ep_paperw"),
           "mmdet"),
    Family("maskd", "MasKD stage 2: RetinaNet ablations", ("maskd_retinanet_r50_24ep_*",), "mmdet"),
    Family("maskd", "MasKD on Conditional DETR (beyond the paper)", ("maskd_cdetr_*", "maskd_tokens_cdetr_*"),
           "maskd_detr"),
)


def family_of(experiment: str) -> Family:
    """The first family whose globs match ``experiment``; ValueError if none does."""
    for fam in FAMILIES:
        if any(fnmatch.fnmatchcase(experiment, g) for g in fam.experiments):
            return fam
    raise ValueError(f"experiment '{experiment}' belongs to no recipe family; add it to FAMILIES in "
                     "replic/workflow/recipe.py")


# --------------------------------------------------------------------------- deliberate differences
@dataclass(frozen=True)
class Deviation:
    """A deliberate difference from the authors' recipe: where, which key, both values and why.

    ``experiments``: globs; ``exclude``: globs of matching experiments it does not cover. ``key`` is
    a recipe key of :func:`recipe_values` or, for a choice no config holds, an ``impl.*`` name.
    ``doc``: the replic document (or config) that explains it.
    """

    experiments: tuple[str, ...]
    key: str
    authors: Any
    replic: Any
    reason: str
    doc: str
    exclude: tuple[str, ...] = ()

    def applies(self, experiment: str) -> bool:
        """Whether this difference is declared for ``experiment``."""
        return (any(fnmatch.fnmatchcase(experiment, g) for g in self.experiments)
                and not any(fnmatch.fnmatchcase(experiment, g) for g in self.exclude))


_KS = "docs/ks_detr.md"
_KS_MODELS = ("ks_cdetr_*", "ks_detr_*")
_MK = "docs/maskd.md"
_CNN = "docs/cnn_detectors.md"
_CNN_ALL = ("retinanet_*", "frcnn_*", "fcos_*", "maskd_retinanet_*", "maskd_frcnn_*", "maskd_fcos_*",
            "maskd_tokens_retinanet_*", "maskd_tokens_frcnn_*", "maskd_tokens_fcos_*")
_RETINA = ("retinanet_*", "maskd_retinanet_*", "maskd_tokens_retinanet_*")
_FRCNN = ("frcnn_*", "maskd_frcnn_*", "maskd_tokens_frcnn_*")
_FCOS = ("fcos_*", "maskd_fcos_*", "maskd_tokens_fcos_*")

DELIBERATE: tuple[Deviation, ...] = (
    # --- KS-DETR (docs/ks_detr.md, "Design choices")
    Deviation(("ks_*",), "model.num_classes", 80, 91,
              "raw COCO ids end to end (91 logits = max id + 1); detrex maps to 80 contiguous classes. The 11 "
              "extra logits never see a positive; baseline and KS model alike, compared as a pair.", _KS),
    Deviation(("ks_*",), "impl.detector_core", "detrex's Conditional DETR re-implementation",
              "the official Conditional DETR layers (Atten4Vis/ConditionalDETR)",
              "one detector core for every paper; baseline and KS model share it.", _KS),
    Deviation(_KS_MODELS, "impl.ks_attention_output_dropout", 0.0, 0.1,
              "detrex encoder layers add the attention output without dropout (proj_drop 0); replic's layers "
              "are the official Conditional DETR's (dropout1 0.1), kept in the KS layer so that it differs "
              "from the plain layer it replaces only by the triple attention.", _KS, exclude=("*_base",)),
    Deviation(_KS_MODELS, "impl.decoder_passes", "one decoder pass per teacher memory",
              "student and teacher memories decoded in one pass",
              "the same function per image; only the random dropout masks are drawn differently.", _KS,
              exclude=("*_base",)),
    Deviation(_KS_MODELS, "impl.teacher_at_inference", "GT masks built and teacher branches run (ignored)",
              "no teacher and no GT at inference", "the same detections; a KS checkpoint evaluates like any "
              "detector.", _KS, exclude=("*_base",)),
    Deviation(("ks_cdetr_r50_12ep*",), "model.arch",
              "dab_detr (R101, 50 ep: sharing variants), dn_detr (12 ep: mask padding)", "conditional_detr",
              "[inferred] the cheapest official schedule (12 ep) on the detector replic has.", _KS),
    Deviation(("ks_detr_r50_50ep*",), "model.arch", "no KS-DETR config for DETR", "detr",
              "[inferred] KS-DETR publishes no DETR row; replic runs one with the KS-Conditional-DETR settings.",
              _KS),
    # --- D³ETR / the 12-epoch Conditional DETR baseline (docs/d3etr.md, choice 11)
    Deviation(("cdetr_r50_12ep", "d3etr_cdetr_r50_12ep*"), "train.lr_drop", "not published for 12 epochs", 11,
              "detrex's 12-epoch schedule (lr_multiplier_12ep = default_coco_scheduler(12, 11, 0)) [third-party]; "
              "neither paper states a 12-epoch drop.", _D3),
    # --- DETR baselines (configs/experiments/base/detr.yaml, detr_*_500ep.yaml)
    Deviation(("detr_r50_50ep*", "detr_r101_50ep", "detr_dc5_r50_50ep", "detr_dc5_r101_50ep"), "train.epochs",
              300, 50, "the Conditional DETR paper's 50-epoch DETR baselines (Table 1, Table 4), not DETR's own "
              "schedule.", "configs/experiments/base/detr.yaml"),
    Deviation(("detr_r50_50ep*", "detr_r101_50ep", "detr_dc5_r50_50ep", "detr_dc5_r101_50ep"), "train.lr_drop",
              200, 40, "[inferred] the Conditional DETR 50-epoch schedule; the paper does not state the drop of "
              "its 50-epoch DETR runs.", "configs/experiments/base/detr.yaml"),
    Deviation(("detr_r50_12ep",), "train.epochs", 300, 12,
              "[inferred] no paper trains DETR for 12 epochs: the DETR side of the short-schedule pair with "
              "cdetr_r50_12ep (claim cdetr_ahead_at_12_epochs, Conditional DETR Figure 1).",
              "configs/experiments/detr_r50_12ep.yaml"),
    Deviation(("detr_r50_12ep",), "train.lr_drop", 200, 11, "as cdetr_r50_12ep (detrex's 12-epoch schedule).",
              "configs/experiments/detr_r50_12ep.yaml"),
    Deviation(("detr_*500ep",), "train.epochs", 300, 500,
              "the DETR paper's 500-epoch schedule (its released checkpoints).",
              "configs/experiments/detr_r50_500ep.yaml"),
    Deviation(("detr_*500ep",), "train.lr_drop", 200, 400,
              "the DETR paper's 500-epoch schedule drops the lr after 400 epochs.",
              "configs/experiments/detr_r50_500ep.yaml"),
    Deviation(("detr_r50_500ep", "detr_r101_500ep"), "train.batch_size", 2, 4,
              "[inferred] the DETR paper's 4 images per GPU (16 GPUs).", "configs/experiments/detr_r50_500ep.yaml"),
    Deviation(("detr_*", "ks_detr_*"), "impl.detr_postprocess", "one label per query (argmax over the real classes)",
              "top-k (query, class) pairs of the softmax, as the sigmoid models",
              "[inferred] one evaluation protocol for DETR and Conditional DETR; with k >= queries it only adds "
              "lower-scored extra classes per query.", "replic/models/postprocess.py"),
    # --- MasKD (docs/maskd.md, "Design choices" and "Not reproduced")
    Deviation(("maskd_tokens_frcnn_*",), "train.optimizer", "sgd", "adam",
              "the paper's stage-1 optimizer (Adam 0.01, wd 1e-3, cosine to 1e-6) for every teacher; the "
              "official Faster R-CNN mask config keeps the detector's SGD at lr 0.1.", _MK),
    Deviation(("maskd_tokens_frcnn_*",), "train.lr", 0.1, 0.01, "as train.optimizer: the paper's Adam lr.", _MK),
    Deviation(("maskd_tokens_frcnn_*",), "train.lr_backbone", 0.1, 0.01,
              "as train.optimizer (mmdet: one lr for every trainable parameter).", _MK),
    Deviation(("maskd_tokens_frcnn_*",), "train.weight_decay", 1e-4, 1e-3,
              "as train.optimizer: the paper's Adam weight decay.", _MK),
    Deviation(("maskd_tokens_frcnn_*",), "train.momentum", 0.9, ABSENT, "Adam has no momentum term.", _MK),
    Deviation(("maskd_tokens_frcnn_*",), "model.backbone", "resnet50", "resnet101",
              "[inferred] the official Faster R-CNN mask config extends the R50 config while loading the R101 "
              "teacher's checkpoint (a non-strict load that drops layer3 blocks 6-22); replic learns the tokens "
              "on the R101 teacher the students distil from, as the RetinaNet and FCOS mask configs do.", _MK),
    Deviation(("maskd_retinanet_r50_24ep_featonly",), "method.head_kd", "mmdet.L1Loss on bbox_head.retina_reg ×1",
              "none", "the ablation row without the official config's extras (replic's recipe before "
              "2026-12-07).", _MK),
    Deviation(("maskd_retinanet_r50_24ep_featonly",), "method.init_from_teacher", "neck, bbox_head", "none",
              "the ablation row without the official config's extras.", _MK),
    Deviation(("maskd_frcnn_r50_24ep*",), "impl.head_kd_outputs", "fc_reg: 80 classes × 4 per RoI",
              "bbox_pred without its background group: 90 raw COCO ids × 4 per RoI",
              "torchvision keeps a group per raw COCO id; the 10 unused ids' outputs are never trained in "
              "either model but enter the mean, so the term is 8/9 of the official one per real value.", _MK),
    Deviation(("maskd_*",), "impl.frozen_teacher_and_tokens", "lr_mult 0 / decay_mult 0 in the optimizer",
              "held outside the module tree (hold_frozen)", "the same update except on clipped steps (the official "
              "tokens still get gradients, which enter the clipped norm; docs/maskd.md); teacher and tokens are "
              "not copied into every student checkpoint (their sha256 is in the provenance).", _MK),
    Deviation(("maskd_*",), "impl.custom_mask_warmup_on_resume", "restarts at 0 (_iter)",
              "continues (optimizer steps counted in a saved buffer)", "a resumed run continues the warm-up.", _MK,
              exclude=("maskd_tokens_*",)),
    Deviation(("maskd_cdetr_*",), "method.name", "no MasKD config for a DETR", "maskd",
              "beyond the paper: MasKD on the C5 map of Conditional DETR (configs/tables.yaml marks the rows "
              "inferred).", _MK),
    Deviation(("maskd_tokens_cdetr_*",), "method.name", "no MasKD config for a DETR", "maskd_tokens",
              "beyond the paper: receptive tokens on the C5 map of the Conditional DETR teacher.", _MK),
    # --- CNN detectors (docs/cnn_detectors.md, "What differs from the mmdet recipe")
    Deviation(_CNN_ALL, "model.num_classes", 80, 91,
              "torchvision's COCO models: raw ids end to end, no mapping (11 never-positive logits).", _CNN),
    Deviation(_RETINA + _FRCNN, "model.backbone_norm", "affine trained, statistics frozen", "frozen",
              "torchvision's detection convention (FrozenBatchNorm2d); ~0.05 M affine terms differ.", _CNN),
    Deviation(_FCOS, "model.backbone_style", "caffe", "pytorch",
              "one weight-loading path (torchvision cache or local file), RGB ImageNet mean/std; no caffe "
              "weights offline.", _CNN),
    Deviation(_CNN_ALL, "data.filter_empty_gt", True, False,
              "replic's dataset keeps images without boxes (empty targets); torchvision handles them.", _CNN),
    Deviation(("retinanet_r50_*",), "train.warmup_iters", 500, 1000,
              "the numbers compared are MasKD's runs, whose RetinaNet KD configs warm up for 1000 iterations "
              "(the mmdet zoo RetinaNet, the teacher's recipe, uses 500).", _CNN),
    Deviation(_CNN_ALL, "impl.detector_code", "mmdet heads, assigners, samplers", "torchvision's",
              "the issue asked for an adapter only.", _CNN),
    Deviation(_CNN_ALL, "impl.fpn_init", "Xavier", "Kaiming-uniform(a=1)", "torchvision's FPN.", _CNN),
    Deviation(_CNN_ALL, "impl.resize_interpolation", "cv2 bilinear", "torchvision bilinear with antialias",
              "replic's one transform path; the sizes are mmdet's exactly.", _CNN),
    Deviation(_FRCNN, "impl.frcnn_losses_roialign", "L1 box losses; RoIAlign aligned=True",
              "smooth-L1 (β = 1/9); MultiScaleRoIAlign, not aligned", "torchvision's RPN / RoI heads.", _CNN),
    Deviation(_RETINA, "impl.retinanet_anchors", "octave scales 4·2^(k/3)·stride", "int()-truncated sizes",
              "torchvision's anchor generator.", _CNN),
    Deviation(_FCOS, "impl.fcos_head", "centerness on the classification branch; relu_before_extra_convs",
              "centerness on the regression branch; no ReLU before P6", "torchvision's FCOS head and FPN.", _CNN),
)


# --------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Difference:
    """One key where replic's value is not the authors'; ``declared`` is the covering deviation."""

    experiment: str
    key: str
    authors: Any
    replic: Any
    declared: Deviation | None = None

    def text(self) -> str:
        """One line for a test failure or the CLI."""
        where = f"declared ({self.declared.doc})" if self.declared else "NOT declared in replic/workflow/recipe.py"
        return (f"{self.experiment}: {self.key}: authors {format_value(self.authors)} != replic "
                f"{format_value(self.replic)} [{where}]")


def same_value(a: Any, b: Any) -> bool:
    """Equality for recipe values: numbers within 1e-9 relative, lists equal tuples, bools only bools."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def compare(experiment: str, replic: Mapping[str, Any], authors: Mapping[str, Any],
            deviations: Sequence[Deviation] = DELIBERATE) -> list[Difference]:
    """Every key of ``authors`` whose value differs from ``replic`` (a key replic lacks is
    :data:`ABSENT`), each with the deviation that declares it (same experiment, key and both
    values) or ``declared=None``. Keys only replic has are not compared."""
    out = []
    for key, theirs in authors.items():
        ours = replic.get(key, ABSENT)
        if same_value(theirs, ours):
            continue
        declared = next((d for d in deviations if d.key == key and d.applies(experiment)
                         and same_value(d.authors, theirs) and same_value(d.replic, ours)), None)
        out.append(Difference(experiment, key, theirs, ours, declared))
    return out


def undeclared(differences: Sequence[Difference]) -> list[Difference]:
    """The differences no deviation declares."""
    return [d for d in differences if d.declared is None]


# --------------------------------------------------------------------------- loading
def load_recipes(experiments_dir: str | Path = DEFAULT_EXPERIMENTS, registry: str | Path | None = DEFAULT_REGISTRY,
                 names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{experiment: recipe_values(...)}`` for every paper-scale experiment (or ``names``), sorted.

    Each experiment is resolved with ``load_experiment(path, None, {})`` (paper scale, no
    overrides); the GPU count is the registry's paper-scale training compute.
    """
    from replic.engine.config import load_experiment

    exp_dir = Path(experiments_dir)
    available = sorted(p.stem for p in exp_dir.glob("*.yaml"))
    if not available:
        raise FileNotFoundError(f"no experiment configs in {exp_dir}")
    wanted = list(names) if names else available
    for name in wanted:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown experiment '{name}' (no {exp_dir / (name + '.yaml')}){hint}")
    gpus = None
    if registry is not None and Path(registry).is_file():
        from replic.workflow.registry import load_registry

        gpus = load_registry(registry).compute["paper"].train.gpu
    configs: dict[str, Any] = {}

    def cfg(name: str) -> Any:
        if name not in configs:
            configs[name] = load_experiment(exp_dir / f"{name}.yaml", None, {})
        return configs[name]

    recipes = {}
    for name in sorted(wanted):
        c = cfg(name)
        teacher = c.method.get("teacher") if isinstance(c.method, dict) else None
        if isinstance(teacher, dict) and teacher.get("experiment") in available:
            cfg(teacher["experiment"])
        recipes[name] = recipe_values(c, gpus, configs)
    return recipes


# --------------------------------------------------------------------------- formatting
def format_value(value: Any, key: str = "") -> str:
    """A value as table text: long arithmetic sequences shortened, floats without noise."""
    if value is None:
        return "as weight decay" if key == "train.weight_decay_norm" else "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, (list, tuple)):
        items = list(value)
        if (len(items) >= 5 and all(isinstance(x, int) and not isinstance(x, bool) for x in items)
                and len({b - a for a, b in zip(items, items[1:])}) == 1):
            return f"{items[0]}–{items[-1]} step {items[1] - items[0]} ({len(items)} values)"
        return "[" + ", ".join(format_value(x) for x in items) + "]"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def family_members(recipes: Mapping[str, Any]) -> list[tuple[Family, list[str]]]:
    """Families in :data:`FAMILIES` order with their experiments (families without any dropped)."""
    members: dict[Family, list[str]] = {fam: [] for fam in FAMILIES}
    for name in sorted(recipes):
        members[family_of(name)].append(name)
    return [(fam, names) for fam, names in members.items() if names]


def _ordered_keys(keys: set[str], recipes: Sequence[Mapping[str, Any]]) -> list[str]:
    order = {k: i for i, k in enumerate(KEYS)}
    first_seen: dict[str, int] = {}
    for rec in recipes:
        for k in rec:
            first_seen.setdefault(k, len(first_seen))
    return sorted(keys, key=lambda k: (GROUPS.index(key_group(k)) if key_group(k) in GROUPS else len(GROUPS),
                                       order.get(k, len(order) + first_seen.get(k, 0))))


def split_common(recipes: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(keys every recipe has with one value, keys that vary or are missing somewhere), in table order."""
    all_keys = set().union(*(r.keys() for r in recipes.values()))
    values = list(recipes.values())
    common = {k for k in all_keys
              if all(k in r for r in values) and all(same_value(values[0][k], r[k]) for r in values[1:])}
    return _ordered_keys(common, values), _ordered_keys(all_keys - common, values)


def deviations_for(names: Sequence[str]) -> list[Deviation]:
    """The deliberate differences that apply to any of ``names``, in :data:`DELIBERATE` order."""
    return [d for d in DELIBERATE if any(d.applies(n) for n in names)]


def _applies_text(dev: Deviation, names: Sequence[str]) -> str:
    hit = [n for n in names if dev.applies(n)]
    if len(hit) == len(names):
        return "all"
    return ", ".join(f"`{n}`" for n in hit) if len(hit) <= 3 else ", ".join(f"`{g}`" for g in dev.experiments)


def render_family(fam: Family, recipes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The Markdown of one family: shared values with sources, the varying keys, the differences."""
    cb = CODEBASES[fam.codebase]
    names = sorted(recipes)
    common, varying = split_common(recipes)
    first = recipes[names[0]]
    lines = [f"### {fam.title}", "",
             f"Authors' code: {cb.repo}. Experiments ({len(names)}): " + ", ".join(f"`{n}`" for n in names) + ".", ""]
    if fam.note:
        lines += [fam.note, ""]
    files = sorted({f for n in names for f in AUTHORS_FILES.get(n, ())})
    if files:
        uses_config = any((src := cb.source(k)) is not None and "{config}" in src.file for k in first)
        lines += ["Authors' files of these runs: " + ", ".join(f"`{f}`" for f in files)
                  + (" (`{config}` below is the run's own file)." if uses_config else "."), ""]
    lines += ["| group | setting | replic key | value | authors' file: argument |", "|---|---|---|---|---|"]
    group = None
    for key in common:
        src = cb.source(key)
        g = key_group(key)
        lines.append(f"| {g if g != group else ''} | {_cell(key_label(key))} | `{key}` | "
                     f"{_cell(format_value(first[key], key))} | {_cell(src.text()) if src else '— (replic only)'} |")
        group = g
    if varying:
        lines += ["", "Varying across these experiments (— = not applicable):", ""]
        sources = {k: cb.source(k) for k in varying}
        src_text = {k: src.text() if src else "— (replic only)" for k, src in sources.items()}
        if len(varying) > len(names):
            # More keys than experiments: one row per key reads better than a very wide table.
            lines += ["| setting | replic key | " + " | ".join(f"`{n}`" for n in names)
                      + " | authors' file: argument |",
                      "|---|---|" + "---|" * len(names) + "---|"]
            for k in varying:
                row = [_cell(format_value(recipes[n][k], k)) if k in recipes[n] else ABSENT for n in names]
                lines.append(f"| {_cell(key_label(k))} | `{k}` | " + " | ".join(row) + f" | {_cell(src_text[k])} |")
        else:
            lines += ["| experiment | " + " | ".join(f"`{k}`" for k in varying) + " |",
                      "|---|" + "---|" * len(varying)]
            for n in names:
                row = [_cell(format_value(recipes[n][k], k)) if k in recipes[n] else ABSENT for k in varying]
                lines.append(f"| `{n}` | " + " | ".join(row) + " |")
            lines += ["", "Their sources:", ""] + [f"- `{k}`: {src_text[k]}" for k in varying]
    devs = deviations_for(names)
    lines += ["", "Deliberate differences from the authors' recipe:", ""]
    if devs:
        lines += ["| applies to | key | authors | replic | reason | explained in |", "|---|---|---|---|---|---|"]
        for d in devs:
            lines.append(f"| {_applies_text(d, names)} | `{d.key}` | {_cell(format_value(d.authors))} | "
                         f"{_cell(format_value(d.replic))} | {_cell(d.reason)} | {d.doc} |")
    else:
        lines.append("None declared.")
    return lines + [""]


def render_markdown(recipes: Mapping[str, Mapping[str, Any]]) -> str:
    """The whole ``docs/recipes.md`` for ``recipes`` (grouped by paper, one table per family)."""
    lines = [
        "# Training recipes of the paper-scale experiments",
        "",
        f"Generated by `{REGENERATE}` from replic's own config loader (each "
        "`configs/experiments/<name>.yaml` resolved by `load_experiment` at paper scale); do not edit by "
        "hand. `tests/test_recipe_table.py` fails when this file is out of date and, given the authors' "
        "checkouts (`REPLIC_OFFICIAL_CONDDETR`, `REPLIC_OFFICIAL_DETR`, `REPLIC_OFFICIAL_KSDETR`, "
        "`REPLIC_OFFICIAL_MASKD`), reads their files and fails on any difference not declared below.",
        "",
        "Each family lists the values its experiments share, with the authors' file and argument each "
        "corresponds to (the mapping and the deliberate differences are data in "
        "`replic/workflow/recipe.py`), then the keys that vary per experiment, then the deliberate "
        "differences from the authors' recipe with their reasons. `impl.*` keys are implementation "
        "choices no config holds. Batch sizes: per GPU × the registry's paper-scale GPUs "
        "(`configs/tables.yaml`, `compute.paper.train.gpu`) = total.",
        "",
    ]
    current = None
    for fam, names in family_members(recipes):
        if fam.paper != current:
            lines += [f"## {PAPERS[fam.paper]}", ""]
            current = fam.paper
        lines += render_family(fam, {n: recipes[n] for n in names})
    return "\n".join(lines).rstrip("\n") + "\n"


def render_text(recipes: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain text for the terminal: per experiment, key = value and the authors' source."""
    out = []
    for name, rec in recipes.items():
        fam = family_of(name)
        cb = CODEBASES[fam.codebase]
        out.append(f"{name}  [{fam.title}; authors: {cb.repo}]")
        width = max(len(k) for k in rec)
        for key, value in rec.items():
            src = cb.source(key)
            out.append(f"  {key:<{width}}  {format_value(value, key):<28}  {src.text() if src else '(replic only)'}")
        devs = [d for d in DELIBERATE if d.applies(name)]
        if devs:
            out.append("  deliberate differences:")
            out += [f"    {d.key}: authors {format_value(d.authors)} -> replic {format_value(d.replic)}: {d.reason}"
                    for d in devs]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- command
def _run(args: argparse.Namespace) -> int:
    recipes = load_recipes(args.experiments_dir, args.registry, args.experiment or None)
    if args.markdown:
        from replic.io import atomic_write_text

        atomic_write_text(args.markdown, render_markdown(recipes))
        print(f"wrote {args.markdown} ({len(recipes)} experiments)")
    else:
        print(render_text(recipes), end="")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``recipe`` to the ``replic`` command."""
    p = subparsers.add_parser("recipe", help="the resolved training recipe of each paper-scale experiment, "
                              "with the authors' sources and deliberate differences", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help="only this experiment (repeatable; default: all)")
    p.add_argument("--markdown", metavar="OUT", help=f"write the Markdown tables to OUT (e.g. {DEFAULT_DOC})")
    p.add_argument("--experiments-dir", default=DEFAULT_EXPERIMENTS)
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="table registry (the paper-scale GPU count)")
    p.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m replic.workflow.recipe``: the command without the ``replic`` wrapper."""
    parser = argparse.ArgumentParser(prog="replic")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["recipe", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
