"""Distillation losses between matched student and teacher queries of one decoder layer.

Matching gives, per image, ``n`` pairs (student query s_k, teacher query t_k), the same ``n``
in every image (``min(Qs, Qt)``), so pairs are stacked as index tensors (B, n).

* :func:`prediction_losses` — class: binary KL between the teacher's and the student's
  per-class sigmoid probabilities, Σ_c KL(Bern(σ(t)) ‖ Bern(σ(s))) = BCE(s, σ(t)) − H(σ(t)):
  the gradient of TPRD's BCE against the teacher's probabilities, minus a constant that makes
  the term 0 when the student agrees with the teacher; boxes: L1 (cxcywh) and 1 − GIoU. All
  three are summed over pairs and divided by the number of pairs (= TPRD's B·num_queries
  when the query counts are equal).
* :func:`attention_map_loss` — rows of attention maps (a distribution over keys each) compared
  by MSE (mean over the row's keys, TPRD) or KL(teacher ‖ student), then averaged over rows,
  heads and images. Padded keys are excluded: they are zeroed and every row is renormalised
  over the remaining keys, so the compared rows sum to 1 and padded values never matter.
* :func:`matched_self_attention` / :func:`matched_cross_attention` — the maps to compare:
  the matched queries' sub-matrix of self-attention (rows over the matched queries only), and
  the matched queries' rows of cross-attention over the H×W memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from replic.models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou

AttnForm = Literal["mse", "kl"]


def stack_indices(indices: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    """[(student_idx, teacher_idx)] per image → (B, n) student and teacher index tensors."""
    sizes = {len(s) for s, _ in indices}
    if len(sizes) != 1:
        raise ValueError(f"every image must have the same number of matched pairs, got {sorted(sizes)}")
    student = torch.stack([s for s, _ in indices]).to(device)
    teacher = torch.stack([t for _, t in indices]).to(device)
    return student, teacher


def _gather_queries(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, Q, ...) → (B, n, ...) at the query indices idx (B, n)."""
    shape = (*idx.shape, *x.shape[2:])
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


def binary_kl_with_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Element-wise KL(Bern(σ(t)) ‖ Bern(σ(s))); exactly 0 where the logits are equal."""
    p = teacher_logits.sigmoid()
    return (p * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits))
            + (1 - p) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)))


def prediction_losses(student: dict[str, Tensor], teacher: dict[str, Tensor],
                      indices: list[tuple[Tensor, Tensor]], unmatched: str = "ignore") -> dict[str, Tensor]:
    """``class`` / ``bbox`` / ``giou`` between matched predictions (see module docstring).

    ``unmatched: background`` also pushes the class probabilities of student queries without a
    teacher partner (Qs > Qt) towards 0 (BCE against 0, summed over classes, same normaliser).
    """
    s_logits, s_boxes = student["pred_logits"], student["pred_boxes"]
    t_logits, t_boxes = teacher["pred_logits"].detach(), teacher["pred_boxes"].detach()
    s_idx, t_idx = stack_indices(indices, s_logits.device)
    pairs = max(1, s_idx.numel())
    cls = binary_kl_with_logits(_gather_queries(s_logits, s_idx), _gather_queries(t_logits, t_idx)).sum()
    if unmatched == "background" and s_logits.shape[1] > s_idx.shape[1]:
        free = torch.ones(s_logits.shape[:2], dtype=torch.bool, device=s_logits.device)
        free.scatter_(1, s_idx, False)
        cls = cls + F.softplus(s_logits[free]).sum()  # BCE(s, 0) = softplus(s)
    sb, tb = _gather_queries(s_boxes, s_idx).flatten(0, 1), _gather_queries(t_boxes, t_idx).flatten(0, 1)
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(sb), box_cxcywh_to_xyxy(tb))
    return {"class": cls / pairs, "bbox": F.l1_loss(sb, tb, reduction="sum") / pairs,
            "giou": (1 - giou).sum() / pairs}


def normalise_rows(maps: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """maps (B, M, n, K) ≥ 0 → rows that sum to 1 over the keys not padded (key_mask (B, K) True = pad)."""
    if key_mask is not None:
        maps = maps.masked_fill(key_mask[:, None, None, :], 0.0)
    return maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)


def attention_map_loss(student: Tensor, teacher: Tensor, key_mask: Tensor | None = None,
                       form: AttnForm = "mse", per_head: bool = True) -> Tensor:
    """Mean over images, heads and rows of a per-row distance between attention rows.

    student, teacher: (B, M, n, K) attention weights of matched rows; ``key_mask`` (B, K) True =
    padded key. ``per_head=False`` compares the head-averaged maps. ``mse``: mean over the row's
    valid keys of the squared difference; ``kl``: Σ_k t_k (log t_k − log s_k).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"attention maps differ in shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    if not per_head:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    s = normalise_rows(student, key_mask)
    t = normalise_rows(teacher.detach(), key_mask)
    if form == "mse":
        valid = (torch.full(s.shape[:1], s.shape[-1], device=s.device, dtype=s.dtype) if key_mask is None
                 else (~key_mask).sum(-1).to(s.dtype))
        per_row = (s - t).pow(2).sum(-1) / valid.clamp_min(1)[:, None, None]
    elif form == "kl":
        per_row = (torch.xlogy(t, t) - torch.xlogy(t, s.clamp_min(1e-12))).sum(-1)
    else:
        raise ValueError(f"attention loss form must be 'mse' or 'kl', got {form!r}")
    return per_row.mean()


def matched_self_attention(attn: Tensor, idx: Tensor) -> Tensor:
    """attn (B, M, Q, Q), idx (B, n) → (B, M, n, n): rows and columns of the matched queries, in pair order."""
    b, m, q, _ = attn.shape
    n = idx.shape[1]
    rows = attn.gather(2, idx[:, None, :, None].expand(b, m, n, q))
    return rows.gather(3, idx[:, None, None, :].expand(b, m, n, n))


def matched_cross_attention(attn: Tensor, idx: Tensor) -> Tensor:
    """attn (B, M, Q, HW), idx (B, n) → (B, M, n, HW): the matched queries' rows over the memory."""
    b, m, _, hw = attn.shape
    return attn.gather(2, idx[:, None, :, None].expand(b, m, idx.shape[1], hw))
