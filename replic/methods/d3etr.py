"""D³ETR: Decoder Distillation for Detection Transformer (Chen et al., arXiv 2211.09768; IJCAI 2024).

No official code exists; this is, to our knowledge, the first public implementation. Read it
next to the paper's abstract and figure caption (docs/d3etr.md lists every choice the paper
leaves open, with its default and where that default comes from).

A frozen teacher detector and the student see the same augmented batch in the same step.
The student's decoder outputs are tied to the teacher's by **MixMatcher**:

* **adaptive matching** — at every decoder layer, Hungarian matching between the student's
  and the teacher's predictions of that layer (:class:`~replic.distill.TeacherStudentMatcher`);
* **fixed matching** — the teacher's object queries are decoded by the student as one extra
  query group (Group-DETR style: block-diagonal self-attention, shared decoder and heads,
  training only), whose query i corresponds to teacher query i.

For every matched pair and layer the student learns the teacher's **predictions** (class
probabilities; boxes by L1 + GIoU), **self-attention** (the matched queries' sub-matrix) and
**cross-attention** (the matched queries' rows over the H×W memory), on top of its own
ground-truth set loss. At test time nothing of this runs: the student is a plain detector
and its checkpoint loads into one.

Loss terms (criterion keys; ``_<l>`` = decoder layer l < L−1, no suffix = last layer):
``d3_ada_{class,bbox,giou,self_attn,cross_attn}`` (adaptive) and ``d3_fix_…`` (fixed), plus
``d3_fix_gt_{loss_ce,loss_bbox,loss_giou}`` when the auxiliary group also takes a GT loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from replic.config import ConfigError
from replic.distill import (
    TeacherError,
    TeacherSpec,
    TeacherStudentMatcher,
    attention_map_loss,
    build_teacher,
    check_teacher_fits,
    identity_indices,
    matched_cross_attention,
    matched_self_attention,
    prediction_losses,
    read_teacher,
    shares_backbone,
    teacher_facts,
    teacher_path,
)
from replic.distill.losses import stack_indices
from replic.methods.base import TrainingMethod

SIGNALS = ("predictions", "self_attn", "cross_attn")
# A distillation term's criterion key: matching, term (its weight option is <term>_weight), layer.
_TERM = re.compile(r"d3_(?:ada|fix)_(class|bbox|giou|self_attn|cross_attn)(?:_\d+)?")


@dataclass
class D3ETROptions:
    """The ``method`` section of a D³ETR experiment. Provenance of each default in brackets.

    teacher: ``{experiment: NAME}`` (a run of the DAG, trained first) or ``{checkpoint: FILE}``
        (e.g. a converted official Conditional DETR-R101 release).
    matching: ``mix`` (adaptive + fixed, MixMatcher [paper]) | ``adaptive`` | ``fixed`` — the
        matching ablation [paper].
    signals: which decoder signals are distilled [paper: predictions, self- and cross-attention].
    layers: ``all`` — layer l of the student learns from layer l of the teacher, re-matched per
        layer [paper: "in each decoder layer"]; ``last`` — the last layer only.
    cost_class / cost_bbox / cost_giou: adaptive-matching costs, 1 / 5 / 2 [unofficial TPRD].
    class_weight / bbox_weight / giou_weight: prediction-loss weights, 1 / 5 / 2 [unofficial TPRD].
    self_attn_weight / cross_attn_weight: attention-loss weights, 1e4 / 1e3 [unofficial TPRD, with
        MSE averaged over keys as there].
    attn_loss: ``mse`` [unofficial TPRD] | ``kl`` (KL(teacher ‖ student) per row).
    attn_per_head: compare each head's map (true) or the head-averaged map [inferred].
    fixed_reference_points: reference points of the auxiliary group: ``student`` — the student's
        ``ref_point_head`` applied to the teacher's queries [inferred: the student decodes the
        teacher's object queries as its own]; ``teacher`` — the teacher's reference points.
    fixed_group_gt_loss: ``none`` — the auxiliary group learns only from the teacher [inferred];
        ``teacher_assignment`` — it also takes the GT set loss, with the GT assignment of the
        teacher's predictions (a survey's description, [third-party, unverified]).
    unmatched: student queries without a teacher partner (more student than teacher queries):
        ``ignore`` [inferred] | ``background`` (their class probabilities pushed to 0).
    weight_rule: at a scale other than the paper's, the five distillation weights come from the
        weight rule (docs/weight_rule.md); false = as written (the tables' paper-weight rows).
    """

    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    matching: Literal["mix", "adaptive", "fixed"] = "mix"
    signals: list[Literal["predictions", "self_attn", "cross_attn"]] = field(
        default_factory=lambda: list(SIGNALS))
    layers: Literal["all", "last"] = "all"
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    self_attn_weight: float = 1.0e4
    cross_attn_weight: float = 1.0e3
    attn_loss: Literal["mse", "kl"] = "mse"
    attn_per_head: bool = True
    fixed_reference_points: Literal["student", "teacher"] = "student"
    fixed_group_gt_loss: Literal["none", "teacher_assignment"] = "none"
    unmatched: Literal["ignore", "background"] = "ignore"
    weight_rule: bool = True

    def validate(self) -> None:
        if not self.signals or len(set(self.signals)) != len(self.signals):
            raise ConfigError(f"signals: a non-empty list without repeats of {list(SIGNALS)}, got {self.signals}")
        for name in ("cost_class", "cost_bbox", "cost_giou", "class_weight", "bbox_weight", "giou_weight",
                     "self_attn_weight", "cross_attn_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.cost_class == self.cost_bbox == self.cost_giou == 0:
            raise ConfigError("cost_class, cost_bbox, cost_giou: not all 0 (adaptive matching needs a cost)")


class D3ETR(TrainingMethod):
    """Decoder distillation with MixMatcher (see the module docstring)."""

    name = "d3etr"
    Options = D3ETROptions
    model_input_keys = frozenset({"return_attention", "extra_queries"})

    def __init__(self, cfg: Any, options: D3ETROptions) -> None:
        super().__init__(cfg, options)
        self.check_config(cfg, options)  # also when built from a config that skipped validation
        self.matcher = TeacherStudentMatcher(options.cost_class, options.cost_bbox, options.cost_giou)
        self._teacher_ckpt: Any = None
        self._num_layers: int | None = None  # the student's decoder layers, known at setup
        self._refs: dict[str, Any] = {}  # the criterion, kept out of the module tree

    # ------------------------------------------------------------------ inputs
    @property
    def uses_adaptive(self) -> bool:
        return self.options.matching in ("mix", "adaptive")

    @property
    def uses_fixed(self) -> bool:
        return self.options.matching in ("mix", "fixed")

    @property
    def uses_attention(self) -> bool:
        return "self_attn" in self.options.signals or "cross_attn" in self.options.signals

    @classmethod
    def check_config(cls, cfg: Any, options: D3ETROptions) -> None:
        """Student-side checks, when the config loads (the teacher is checked in :meth:`check_inputs`)."""
        model = cfg.model
        if getattr(model, "dec_layers", None) is None:  # e.g. model.family: cnn
            raise ConfigError(f"method.name: d3etr distils a DETR decoder, but this model ({type(model).__name__}) "
                              "has no transformer decoder")
        student = model.resolved()
        if not student.focal_loss:
            raise ConfigError(f"method.name: d3etr: {_softmax_kind('the student', student)}")
        if not student.aux_loss and options.layers == "all":
            raise ConfigError("method.layers: 'all' distils every decoder layer, which needs model.aux_loss: true")
        uses_attention = "self_attn" in options.signals or "cross_attn" in options.signals
        if not student.aux_loss and uses_attention:
            # The decoder returns attention maps of every layer but, without aux outputs, predictions of
            # the last only: the per-layer pairing of maps and predictions has nothing to pair with.
            raise ConfigError(f"method.signals: {list(options.signals)} distil attention maps layer by layer, "
                              "which needs model.aux_loss: true (with model.aux_loss: false and method.layers: "
                              f"{options.layers!r} use method.signals: [predictions])")

    def input_files(self) -> dict[str, Path]:
        return {"method.teacher": teacher_path(self.options.teacher, self.run_dir)}

    def check_inputs(self) -> None:
        """Read the teacher checkpoint and check it fits the student, before any data or model."""
        spec = self.options.teacher
        path = teacher_path(spec, self.run_dir)
        ckpt = read_teacher(path, expect_experiment=spec.experiment)
        student = self.cfg.model
        if getattr(ckpt.model_config, "dec_layers", None) is None:
            raise TeacherError(f"{path}: the teacher ({type(ckpt.model_config).__name__}) has no transformer decoder "
                               "to distil (method d3etr needs a DETR-family teacher)")
        teacher = ckpt.model_config.resolved()
        if not teacher.focal_loss:
            raise TeacherError(f"{path}: method d3etr: {_softmax_kind('the teacher', teacher)}")
        if not teacher.aux_loss and self.uses_attention:
            raise TeacherError(f"{path}: the teacher was trained with aux_loss: false (predictions of its last "
                               f"decoder layer only), so method.signals {list(self.options.signals)} cannot pair its "
                               "attention maps with predictions: use a teacher with aux_loss: true or "
                               "method.signals: [predictions]")
        check_teacher_fits(ckpt.model_config, student, path,
                           same_hidden=self.uses_fixed,
                           same_layers=self.options.layers == "all",
                           same_heads=self.uses_attention and self.options.attn_per_head)
        if self.options.fixed_group_gt_loss != "none" and not self.uses_fixed:
            raise ConfigError("method.fixed_group_gt_loss: needs fixed matching (matching: mix or fixed)")
        self._teacher_ckpt = ckpt

    def setup(self, model: nn.Module, criterion: nn.Module, device: torch.device) -> None:
        """Load the frozen teacher onto ``device``; register the distillation terms."""
        if self._teacher_ckpt is None:
            self.check_inputs()
        self.frozen_teacher(self._teacher_ckpt, device)
        self._teacher_ckpt.state = {}  # weights now live in the module
        self._refs["criterion"] = criterion
        self._num_layers = len(model.transformer.decoder.layers)
        criterion.register_loss(self.loss_terms, self.weights(self._num_layers))

    def feature_cache_reason(self, model: nn.Module) -> str | None:
        """The cached maps stand in for both models' images only if the teacher's frozen backbone
        is the student's (the shared mini-scale backbone); otherwise the run trains from images."""
        if not shares_backbone(model, self.frozen("teacher")):
            return "the D³ETR teacher's backbone differs from the student's (its maps are not the cached ones)"
        return None

    def provenance(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"options": _plain(self.options)}
        if self._teacher_ckpt is not None:
            facts["teacher"] = teacher_facts(self._teacher_ckpt)
        return facts

    # ------------------------------------------------------------------ forward
    def model_inputs(self, model: nn.Module, images: Tensor, mask: Tensor,
                     targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        """The teacher (no grad) on the batch; the student is asked for its attention maps and to
        decode the teacher's queries as an extra group."""
        teacher = self.frozen("teacher")
        with torch.no_grad():
            t_out = teacher(images, mask, return_attention=self.uses_attention)
        self._refs["teacher_outputs"] = t_out
        extra = None
        if self.uses_fixed:
            group: dict[str, Tensor] = {"query_pos": teacher.query_embed.weight.detach()}
            if self.options.fixed_reference_points == "teacher":
                if "reference_points" not in t_out:
                    raise ValueError("method.fixed_reference_points: teacher, but the teacher has no reference points")
                group["reference_points"] = t_out["reference_points"]
            extra = [group]
        return {"return_attention": self.uses_attention, "extra_queries": extra}

    def after_forward(self, model: nn.Module, outputs: dict[str, Any], images: Tensor, mask: Tensor,
                      targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        """The teacher's predictions and maps beside the student's, for the distillation terms."""
        t_out = self._refs.pop("teacher_outputs")
        outputs["distill_teacher"] = {k: t_out[k] for k in ("pred_logits", "pred_boxes", "aux_outputs", "attention",
                                                            "memory_mask") if k in t_out}
        return outputs

    # ------------------------------------------------------------------ losses
    def _layer_keys(self, num_layers: int) -> list[tuple[int, str]]:
        """(layer index, criterion-key suffix) of the distilled layers."""
        last = [(num_layers - 1, "")]
        if self.options.layers == "last":
            return last
        return [(i, f"_{i}") for i in range(num_layers - 1)] + last

    def weights(self, num_layers: int) -> dict[str, float]:
        """The criterion weight of every term this method returns."""
        o = self.options
        per_signal = {"predictions": {"class": o.class_weight, "bbox": o.bbox_weight, "giou": o.giou_weight},
                      "self_attn": {"self_attn": o.self_attn_weight},
                      "cross_attn": {"cross_attn": o.cross_attn_weight}}
        base: dict[str, float] = {}
        for signal in o.signals:
            base.update(per_signal[signal])
        prefixes = (["d3_ada_"] if self.uses_adaptive else []) + (["d3_fix_"] if self.uses_fixed else [])
        weights = {f"{p}{k}{sfx}": w for p in prefixes for k, w in base.items() for _, sfx in self._layer_keys(num_layers)}
        if o.fixed_group_gt_loss != "none":
            gt = self._refs_criterion_weights()
            weights.update({f"d3_fix_gt_{k}{sfx}": w for k, w in gt.items() for _, sfx in self._layer_keys(num_layers)})
        return weights

    def distillation_weights(self) -> dict[str, tuple[float, list[str]]]:
        """The five weight options and their terms (not the auxiliary group's GT terms, which take
        the criterion's own weights)."""
        if not self.options.weight_rule or self._num_layers is None:
            return {}
        groups: dict[str, tuple[float, list[str]]] = {}
        for key in self.weights(self._num_layers):
            found = _TERM.fullmatch(key)
            if found:
                option = f"{found[1]}_weight"
                groups.setdefault(f"method.{option}", (getattr(self.options, option), []))[1].append(key)
        return groups

    def _refs_criterion_weights(self) -> dict[str, float]:
        w = self._refs["criterion"].weight_dict
        return {k: w[k] for k in ("loss_ce", "loss_bbox", "loss_giou")}

    def loss_terms(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]],
                   context: dict[str, Any]) -> dict[str, Tensor]:
        """Every distillation term of one step (registered on the criterion)."""
        teacher = outputs["distill_teacher"]
        t_layers = layer_outputs(teacher)
        losses: dict[str, Tensor] = {}
        if self.uses_adaptive:
            s_layers = layer_outputs(outputs)
            for layer, sfx in self._layer_keys(len(s_layers)):
                t_layer = t_layers[layer - len(s_layers) + len(t_layers)]
                indices = self.matcher(s_layers[layer], t_layer)
                losses.update(self._pair_terms("d3_ada_", sfx, s_layers[layer], t_layer, indices, outputs, teacher))
        if self.uses_fixed:
            group = outputs["extra_groups"][0]
            g_layers = layer_outputs(group)
            batch, queries = group["pred_logits"].shape[:2]
            indices = identity_indices(batch, queries)
            for layer, sfx in self._layer_keys(len(g_layers)):
                t_layer = t_layers[layer - len(g_layers) + len(t_layers)]
                losses.update(self._pair_terms("d3_fix_", sfx, g_layers[layer], t_layer, indices, outputs, teacher))
                if self.options.fixed_group_gt_loss == "teacher_assignment":
                    losses.update(self._gt_terms(sfx, g_layers[layer], t_layer, targets, context["num_boxes"]))
        return losses

    def _pair_terms(self, prefix: str, sfx: str, student: dict[str, Any], teacher: dict[str, Any],
                    indices: list[tuple[Tensor, Tensor]], s_out: dict[str, Any],
                    t_out: dict[str, Any]) -> dict[str, Tensor]:
        """The distilled signals of one layer for one matching."""
        o = self.options
        terms: dict[str, Tensor] = {}
        if "predictions" in o.signals:
            for key, value in prediction_losses(student, teacher, indices, o.unmatched).items():
                terms[f"{prefix}{key}{sfx}"] = value
        if self.uses_attention:
            s_idx, t_idx = stack_indices(indices, student["pred_logits"].device)
            s_att, t_att = student["attention"], teacher["attention"]
            if "self_attn" in o.signals:
                terms[f"{prefix}self_attn{sfx}"] = attention_map_loss(
                    matched_self_attention(s_att["self_attn"], s_idx),
                    matched_self_attention(t_att["self_attn"], t_idx), None, o.attn_loss, o.attn_per_head)
            if "cross_attn" in o.signals:
                s_mask, t_mask = s_out["memory_mask"], t_out["memory_mask"]
                if s_mask.shape != t_mask.shape or not torch.equal(s_mask, t_mask):
                    raise ValueError(f"cross-attention distillation needs the teacher's H×W memory grid to equal the "
                                     f"student's: teacher {tuple(t_mask.shape)}, student {tuple(s_mask.shape)} "
                                     "(same backbone stride, e.g. R101-C5 → R50-C5)")
                terms[f"{prefix}cross_attn{sfx}"] = attention_map_loss(
                    matched_cross_attention(s_att["cross_attn"], s_idx),
                    matched_cross_attention(t_att["cross_attn"], t_idx), s_mask, o.attn_loss, o.attn_per_head)
        return terms

    def _gt_terms(self, sfx: str, group: dict[str, Any], teacher: dict[str, Any],
                  targets: list[dict[str, Tensor]], num_boxes: float) -> dict[str, Tensor]:
        """GT set loss of the auxiliary group under the teacher's GT assignment (query i ↔ teacher query i)."""
        criterion = self._refs["criterion"]
        indices = criterion.matcher(teacher, targets)
        terms = {**criterion.loss_labels(group, targets, indices, num_boxes),
                 **criterion.loss_boxes(group, targets, indices, num_boxes)}
        return {f"d3_fix_gt_{k}{sfx}": v for k, v in terms.items()}


def layer_outputs(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Per decoder layer, first to last: predictions (and attention maps when returned)."""
    preds = [*out.get("aux_outputs", []), {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    attention = out.get("attention")
    if attention is not None:
        if len(attention) != len(preds):
            raise ValueError(f"{len(attention)} attention layers for {len(preds)} prediction layers (aux_loss off?)")
        preds = [{**p, "attention": a} for p, a in zip(preds, attention)]
    return preds


def _softmax_kind(who: str, model: Any) -> str:
    """Why a softmax (no-object) model cannot take part; ``model`` is a resolved ModelConfig."""
    kind = "DETR" if model.arch == "detr" else f"{model.arch} with focal_loss: false"
    return (f"{who}'s model is {kind} (model.arch: {model.arch}, model.focal_loss: false): softmax classes with "
            "a no-object column, but D³ETR's class terms and matching cost are sigmoid (focal), as in TPRD; use a "
            "Conditional DETR student and teacher (or model.focal_loss: true)")


def _plain(options: D3ETROptions) -> dict[str, Any]:
    from replic.config import to_dict

    return to_dict(options)
