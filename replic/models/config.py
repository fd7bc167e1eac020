"""Model and criterion configuration (strict-loadable with :func:`replic.config.from_dict`).

``arch`` picks the defaults of every ablation switch left unset (``null``); the switches
can then override them one by one, so each paper row is the same model with a few keys
changed. :meth:`ModelConfig.resolved` returns a copy with every default filled in;
:meth:`ModelConfig.validate` (run by ``from_dict``) rejects impossible combinations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from replic.config import ADDED_KEY, ConfigError

Arch = Literal["detr", "conditional_detr"]
SpatialQuery = Literal["csq", "csq_c", "csq_t", "csq_p", "csq_i", "none"]
LambdaForm = Literal["diagonal", "identity", "scalar", "block_diagonal", "full"]
ReferencePoint = Literal["predicted", "learned", "zero"]
BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
BackboneLevel = Literal["C2", "C3", "C4", "C5"]


@dataclass
class CriterionConfig:
    """Matcher costs, loss weights and classification-loss constants.

    Unset (``null``) weights take the defaults of the classification loss in use:
    focal (Conditional DETR, ``main.py``): cost_class 2, cls_loss_coef 2;
    softmax CE (DETR): cost_class 1, cls_loss_coef 1. Box terms are 5 (L1) and 2 (GIoU)
    for both, in the matcher and in the loss.

    Keys:
        cost_class, cost_bbox, cost_giou: Hungarian matching cost weights.
        cls_loss_coef, bbox_loss_coef, giou_loss_coef: loss weights (same for aux layers).
        focal_alpha, focal_gamma: sigmoid focal loss constants (0.25, 2), also used by the
            focal-style matching cost.
        eos_coef: DETR's relative weight of the no-object class in softmax CE (0.1).
    """

    cost_class: float | None = None
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cls_loss_coef: float | None = None
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    eos_coef: float = 0.1

    def validate(self) -> None:
        for name in ("cost_class", "cost_bbox", "cost_giou", "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ConfigError(f"focal_alpha: must be in [0, 1], got {self.focal_alpha}")
        if self.focal_gamma < 0:
            raise ConfigError(f"focal_gamma: must be >= 0, got {self.focal_gamma}")
        if not 0.0 < self.eos_coef <= 1.0:
            raise ConfigError(f"eos_coef: must be in (0, 1], got {self.eos_coef}")


# Defaults that ``arch`` selects for every switch left at None.
_ARCH_DEFAULTS: dict[str, dict[str, object]] = {
    "conditional_detr": {
        "num_queries": 300,
        "spatial_query": "csq",
        "lambda_form": "diagonal",
        "reference_point": "predicted",
        "focal_loss": True,
        "offset_regression": True,
    },
    "detr": {
        "num_queries": 100,
        "spatial_query": "none",
        "lambda_form": "identity",
        "reference_point": "predicted",
        "focal_loss": False,
        "offset_regression": False,
    },
}


@dataclass
class ModelConfig:
    """One detector: DETR or Conditional DETR, with every paper ablation as a key.

    Official settings (Conditional DETR R50, ``main.py`` defaults) are the defaults.

    Backbone:
        backbone: torchvision ResNet depth (``resnet18|34|50|101``), FrozenBatchNorm, stem and
            layer1 frozen.
        dilation: DC5 — replace the stride of the last stage by dilation 2 (Table 1 "DC5" rows).
        pretrained_backbone: ``"none"`` (random init, never downloads), ``"torchvision"``
            (torchvision ImageNet-1k V1 weights via the weights API; uses the torch hub cache
            and **downloads if not cached**), or a path to a local ResNet state dict
            (loaded with ``weights_only=True``; missing/unexpected keys are reported).
        train_backbone: False freezes the whole backbone (official: ``lr_backbone <= 0``).
        backbone_levels: which maps the detector returns under ``outputs["features"]``
            (C2..C5 = layer1..layer4).
        input_level: the map that feeds the transformer: ``C5`` (official, stride 32) or
            ``C4`` (stride 16: the mini scale, 8-10 px maps at 128-160 px images); stages after
            it are not built.
        channels_last: run the ResNet body in channels-last (NHWC) memory order — faster
            convolutions (measured on CPU: benchmarks/results_cpu.md); outputs differ from
            NCHW by float rounding only (tests/test_models_channels_last.py). Not part of
            the architecture: checkpoints load either way.

    Transformer (``main.py`` defaults): hidden_dim 256, nheads 8, enc_layers 6, dec_layers 6,
    dim_feedforward 2048, dropout 0.1 (attention weights and FFN), post-norm.

    Heads: num_classes (91 = max COCO id + 1; logits are num_classes for sigmoid/focal models,
    num_classes + 1 with the no-object class for softmax CE), num_queries (300 Conditional DETR,
    100 DETR), aux_loss (predictions and losses on every decoder layer).

    Ablation switches (``null`` = the default of ``arch``):
        arch: ``conditional_detr`` | ``detr`` — picks the defaults below.
        spatial_query (Table 3, Table 4 "CSQ" column): what forms the spatial query p_q that is
            concatenated per head with the content query in decoder cross-attention.
            ``csq`` = λ(f) ⊙ p_s (official: λ = 1 in layer 0, λ from the previous layer's
            un-normalised output f); ``csq_c`` = f itself (CSQ-C); ``csq_t`` = the
            transformation alone, λ(f) (CSQ-T; for non-diagonal forms T(f)·1);
            ``csq_p`` = p_s alone (CSQ-P); ``csq_i`` = λ(c_q) ⊙ p_s with c_q the current layer's
            self-attention output (CSQ-I); ``none`` = no conditional spatial query: the DETR
            decoder (query_pos added to queries and keys, memory pos added to keys) — the
            Table 4 rows without CSQ.
            [inferred] layer 0: csq_c uses f = the initial content query (zeros), csq_t uses
            λ = 1 (as csq), csq_i predicts λ from c_q in every layer including 0.
        lambda_form (Figure 5): the form of T in p_q = T(f) p_s. ``diagonal`` (official
            ``query_scale`` MLP d→d→d, 2 layers), ``identity`` (no T, no query_scale),
            ``scalar`` (MLP d→d→1: one scalar per query), ``block_diagonal`` (MLP d→d→M·(d/M)²:
            a (d/M)×(d/M) matrix per head and query), ``full`` (MLP d→d→d²: a d×d matrix per
            query; [inferred] materialised per query — 16.8M extra parameters and
            B·Q·d² activations per layer at d = 256).
        reference_point (§3.6): ``predicted`` s = ref_point_head(query_pos) (official);
            ``learned`` free per-query parameters (``transformer.decoder.ref_point_embed``,
            [inferred] initialised uniform in [0,1] sigmoid space); ``zero`` s = (0, 0)
            in un-normalised space as in DETR, i.e. sigmoid(s) = (0.5, 0.5) for p_s and
            no offset on the boxes ([inferred] reading of "s = (0, 0) as in DETR").
        focal_loss (Table 4 "FL"): sigmoid focal loss, num_classes logits, prior-0.01 class
            bias; false = softmax CE with a no-object logit (DETR).
        offset_regression (Table 4 "OR"): predict box centres as offsets from the reference
            point in inverse-sigmoid space; with ``spatial_query: none`` the reference point
            comes from ``ref_point_head`` as well. False = DETR's plain box head.

    Post-processing:
        postprocess_topk: (query, class) pairs kept per image — 100 (Conditional DETR
            protocol), 300 (KS-DETR protocol).

    [inferred] Initialisation follows the ``arch``: ``conditional_detr`` applies the official
    head init (last bbox layer zero; class bias −log(99) when focal), ``detr`` keeps PyTorch
    defaults for the heads (plus the prior bias if focal_loss is switched on).
    """

    arch: Arch = "conditional_detr"
    backbone: BackboneName = "resnet50"
    dilation: bool = False
    pretrained_backbone: str = "none"
    train_backbone: bool = True
    backbone_levels: list[BackboneLevel] = field(default_factory=lambda: ["C5"])
    input_level: BackboneLevel = field(default="C5", metadata=ADDED_KEY)  # omitted while C5: hashes kept
    channels_last: bool = True
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_classes: int = 91
    num_queries: int | None = None
    aux_loss: bool = True
    spatial_query: SpatialQuery | None = None
    lambda_form: LambdaForm | None = None
    reference_point: ReferencePoint | None = None
    focal_loss: bool | None = None
    offset_regression: bool | None = None
    postprocess_topk: int = 100
    criterion: CriterionConfig = field(default_factory=CriterionConfig)

    def resolved(self) -> ModelConfig:
        """A copy with every ``None`` switch replaced by the ``arch`` default."""
        defaults = dict(_ARCH_DEFAULTS[self.arch])
        spatial = self.spatial_query if self.spatial_query is not None else defaults["spatial_query"]
        if spatial not in ("csq", "csq_t", "csq_i"):
            defaults["lambda_form"] = "identity"  # λ is not used by these spatial queries
        values = {name: (getattr(self, name) if getattr(self, name) is not None else default)
                  for name, default in defaults.items()}
        values["spatial_query"] = spatial
        focal = bool(values["focal_loss"])
        crit = dataclasses.replace(
            self.criterion,
            cost_class=self.criterion.cost_class if self.criterion.cost_class is not None else (2.0 if focal else 1.0),
            cls_loss_coef=(self.criterion.cls_loss_coef if self.criterion.cls_loss_coef is not None
                           else (2.0 if focal else 1.0)),
        )
        return dataclasses.replace(self, criterion=crit, **values)

    def validate(self) -> None:
        positive = ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_classes",
                    "postprocess_topk")
        for name in positive:
            if getattr(self, name) < 1 and not (name == "enc_layers" and self.enc_layers == 0):
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_queries is not None and self.num_queries < 1:
            raise ConfigError(f"num_queries: must be >= 1, got {self.num_queries}")
        if self.hidden_dim % self.nheads:
            raise ConfigError(f"hidden_dim {self.hidden_dim} must be divisible by nheads {self.nheads}")
        if self.hidden_dim % 4:
            raise ConfigError(f"hidden_dim {self.hidden_dim} must be divisible by 4 (sine position encoding)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.backbone_levels or len(set(self.backbone_levels)) != len(self.backbone_levels):
            raise ConfigError(f"backbone_levels: must be a non-empty list without repeats, got {self.backbone_levels}")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ConfigError(f"dilation: DC5 needs a bottleneck ResNet (resnet50/101), got {self.backbone}")
        if not self.pretrained_backbone:
            raise ConfigError('pretrained_backbone: must be "none", "torchvision" or a file path')
        spatial = self.spatial_query if self.spatial_query is not None else _ARCH_DEFAULTS[self.arch]["spatial_query"]
        if self.lambda_form is not None and self.lambda_form != "identity" and spatial not in ("csq", "csq_t", "csq_i"):
            raise ConfigError(
                f"lambda_form: {self.lambda_form!r} has no effect with spatial_query {spatial!r} "
                "(only csq, csq_t and csq_i use the transformation λ); leave it unset or 'identity'")
        if self.reference_point is not None and self.reference_point != "predicted":
            offset = (self.offset_regression if self.offset_regression is not None
                      else _ARCH_DEFAULTS[self.arch]["offset_regression"])
            if spatial == "none" and not offset:
                raise ConfigError(f"reference_point: {self.reference_point!r} has no effect without "
                                  "reference points (spatial_query none and offset_regression false)")
        if self.criterion is not None:
            self.criterion.validate()
