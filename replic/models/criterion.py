"""Set-prediction losses (SetCriterion) for DETR and Conditional DETR.

Terms (unweighted; ``weight_dict`` holds the weights):

* ``loss_ce`` — sigmoid focal loss over all queries × classes against one-hot targets
  (unmatched queries: all zeros), normalised as the official code: mean over queries,
  summed, ÷ num_boxes, × num_queries (= Σ ÷ num_boxes); or, with ``focal=False``, DETR's
  softmax cross-entropy with the no-object class weighted by ``eos_coef``;
* ``loss_bbox`` — Σ L1(cxcywh) over matched pairs ÷ num_boxes;
* ``loss_giou`` — Σ (1 − GIoU) over matched pairs ÷ num_boxes;
* logging only (not in ``weight_dict``): ``class_error`` (top-1 error % on matched queries,
  last layer) and ``cardinality_error``.

Every ``aux_outputs[i]`` gets the same terms (and ``cardinality_error_i``) with suffix ``_i``,
each **matched on its own** — the official key set. num_boxes = total GT boxes in the batch, all-reduced across processes when
torch.distributed is initialised, ÷ world size, clamped ≥ 1.

Extra terms (distillation, KS-DETR branches …) plug in with :meth:`SetCriterion.register_loss`:
a callable ``fn(outputs, targets, context) -> dict[str, Tensor]`` whose keys get weights
in ``weight_dict``; ``context`` carries ``indices`` (last-layer matching), ``aux_indices`` and
``num_boxes``. ``outputs["extra_groups"]`` (D³ETR query groups) is not scored by the built-in
terms; a registered loss decides what those groups learn from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from replic.models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from replic.models.matcher import HungarianMatcher

LossFn = Callable[[dict[str, Any], list[dict[str, Tensor]], dict[str, Any]], dict[str, Tensor]]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Official Conditional DETR normalisation: element-wise focal loss, mean over dim 1
    (queries), summed, ÷ num_boxes. The caller multiplies by num_queries."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


class ExtraLosses:
    """Registered extra loss terms, shared by every criterion (this module's and the CNN
    detectors'): ``weight_dict`` holds the weights, :meth:`register_loss` adds a term."""

    weight_dict: dict[str, float]
    _extra: list[LossFn]

    def register_loss(self, fn: LossFn, weights: dict[str, float]) -> None:
        """Add an extra loss callable; every key it returns must be in ``weights``."""
        clash = set(weights) & set(self.weight_dict)
        if clash:
            raise ValueError(f"register_loss: loss names already used: {sorted(clash)}")
        self._extra.append(fn)
        self.weight_dict.update(weights)

    def add_extra_losses(self, losses: dict[str, Tensor], outputs: dict[str, Any],
                         targets: list[dict[str, Tensor]], context: dict[str, Any]) -> dict[str, Tensor]:
        """Run every registered term into ``losses``; a term without a weight or one that
        overwrites an existing term is an error (it would be silently dropped or replaced)."""
        for fn in self._extra:
            extra = fn(outputs, targets, context)
            unknown = set(extra) - set(self.weight_dict)
            if unknown:
                raise KeyError(f"extra loss returned terms without a weight: {sorted(unknown)}")
            clash = set(extra) & set(losses)
            if clash:
                raise KeyError(f"extra loss overwrites existing terms: {sorted(clash)}")
            losses.update(extra)
        return losses


class SetCriterion(ExtraLosses, nn.Module):
    """Hungarian-matched losses on the last layer and every auxiliary layer."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal: bool = True, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 eos_coef: float = 0.1, num_aux: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.eos_coef = eos_coef
        base = dict(weight_dict)
        self.weight_dict = dict(base)
        for i in range(num_aux):
            self.weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
        self._extra: list[LossFn] = []
        if not focal:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight, persistent=False)

    # ----------------------------------------------------------------- terms
    def _check_labels(self, targets: list[dict[str, Tensor]]) -> None:
        for i, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"targets[{i}]['labels'] must be in [0, {self.num_classes}), "
                                 f"got [{int(labels.min())}, {int(labels.max())}]")

    def loss_labels(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]],
                    indices: list[tuple[Tensor, Tensor]], num_boxes: float, log: bool = False) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        b, q, c = logits.shape
        batch_idx, query_idx = _flat_indices(indices, logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        # Unmatched queries get class num_classes = "no object".
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = matched_labels.long()
        if self.focal:
            onehot = torch.zeros(b, q, c + 1, dtype=logits.dtype, device=logits.device)
            onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
            onehot = onehot[:, :, :-1]
            loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma) * q
        else:
            loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        losses = {"loss_ce": loss}
        if log:
            with torch.no_grad():
                if matched_labels.numel():
                    correct = (logits[batch_idx, query_idx].argmax(-1) == matched_labels).float().mean()
                    losses["class_error"] = 100 - 100 * correct
                else:
                    losses["class_error"] = logits.new_zeros(())
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """|#predicted objects − #GT| per image, averaged (logging; as official: argmax ≠ last class)."""
        logits = outputs["pred_logits"]
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float32)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        return {"cardinality_error": F.l1_loss(predicted, lengths)}

    def loss_boxes(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]],
                   indices: list[tuple[Tensor, Tensor]], num_boxes: float) -> dict[str, Tensor]:
        batch_idx, query_idx = _flat_indices(indices, outputs["pred_boxes"].device)
        src = outputs["pred_boxes"][batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    # ----------------------------------------------------------------- forward
    def num_boxes(self, targets: list[dict[str, Tensor]], device: torch.device) -> float:
        """Total GT boxes, averaged over processes, clamped at 1 (official normalisation)."""
        total = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            world = dist.get_world_size()
        return torch.clamp(total / world, min=1).item()

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Unweighted loss terms (see module docstring); weight with ``weight_dict`` / :meth:`total`."""
        self._check_labels(targets)
        device = outputs["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        indices = self.matcher(outputs, targets)
        losses: dict[str, Tensor] = {}
        losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log=True))
        losses.update(self.loss_cardinality(outputs, targets))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        aux_indices = []
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            terms, aux_idx = self.prediction_set_terms(aux, targets, num_boxes)
            aux_indices.append(aux_idx)
            losses.update({f"{k}_{i}": v for k, v in terms.items()})
        context = {"indices": indices, "aux_indices": aux_indices, "num_boxes": num_boxes}
        self.add_extra_losses(losses, outputs, targets, context)
        return losses

    def prediction_set_terms(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]],
                             num_boxes: float) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
        """One prediction set (``pred_logits``, ``pred_boxes``) matched on its own → (terms, indices).

        Terms are unsuffixed ``loss_ce``, ``loss_bbox``, ``loss_giou`` and ``cardinality_error``
        (logging). Used for every aux layer, and by registered losses that score extra
        prediction sets (KS-DETR's teacher branches) exactly as an aux layer is scored.
        """
        indices = self.matcher(outputs, targets)
        terms = {**self.loss_labels(outputs, targets, indices, num_boxes), **self.loss_cardinality(outputs, targets),
                 **self.loss_boxes(outputs, targets, indices, num_boxes)}
        return terms, indices

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Σ weight · term over the terms that have a weight (logging terms are skipped)."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


def _flat_indices(indices: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([src for src, _ in indices]).to(device)
    return batch_idx, query_idx
