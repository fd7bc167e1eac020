"""Decoder cross-attention extraction: per-query, per-head maps on the feature grid.

``extract_attention`` runs a detector with ``return_attention=True`` (the model
contract in docs/architecture.md), keeps the top-scoring queries of each image and
returns, per query and head, the full cross-attention map and — for Conditional
DETR — the spatial-only map (softmax of q_s·k_p), both reshaped to the feature map
(H_f, W_f), together with the ``ImageGeometry`` that maps cells back to original
pixels (resize and padding undone, see ``replic.viz.geometry``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replic.viz.geometry import ImageGeometry, attention_to_image, infer_stride

__all__ = [
    "AttentionResult",
    "ImageGeometry",
    "attention_to_image",
    "extract_attention",
    "query_scores",
    "uses_softmax_classifier",
]


@dataclass
class AttentionResult:
    """Attention of the K selected queries of one image at one decoder layer.

    ``cross_attn`` / ``cross_attn_spatial``: (K, M, H_f, W_f) float32 on CPU, each
    (query, head) map summing to 1 over the non-padded cells; ``cross_attn_spatial``
    is None for models without a separate spatial term (DETR).
    ``boxes_cxcywh``: (K, 4) normalised to the resized unpadded image (``pred_boxes``);
    ``boxes_xyxy``: (K, 4) absolute pixels of the original image.
    """

    image_id: int
    layer: int
    query_indices: torch.Tensor  # (K,) int64
    scores: torch.Tensor  # (K,)
    labels: torch.Tensor  # (K,) raw category ids
    boxes_cxcywh: torch.Tensor
    boxes_xyxy: torch.Tensor
    cross_attn: torch.Tensor
    cross_attn_spatial: torch.Tensor | None
    key_padding: torch.Tensor  # (H_f, W_f) bool, True = padded cell
    geometry: ImageGeometry

    @property
    def num_heads(self) -> int:
        """Number of attention heads M."""
        return int(self.cross_attn.shape[1])

    def image_map(self, query: int, head: int, spatial: bool = False):
        """One head's map for the k-th selected query, over the original image (h, w) numpy."""
        maps = self.cross_attn_spatial if spatial else self.cross_attn
        if maps is None:
            raise ValueError("this model has no spatial-only attention (cross_attn_spatial)")
        return attention_to_image(maps[query, head], self.geometry)


def uses_softmax_classifier(model: torch.nn.Module, num_logits: int) -> bool:
    """True for DETR's softmax + no-object logit, False for sigmoid/focal classifiers.

    Read from the Detector's ``focal_loss`` flag; failing that, from a ``num_classes``
    attribute and the logit count (num_classes + 1 ⇒ softmax).
    """
    focal = getattr(model, "focal_loss", None)
    if isinstance(focal, bool):
        return not focal
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        return num_logits == num_classes + 1
    raise ValueError(
        "cannot tell whether the model's classifier is softmax or sigmoid: it has neither a "
        "focal_loss flag nor num_classes; pass softmax= explicitly"
    )


def query_scores(pred_logits: torch.Tensor, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query confidence and class: (B, Q) scores and (B, Q) labels.

    Softmax models ignore the last (no-object) logit, as DETR's PostProcess does;
    sigmoid models take the best class probability.
    """
    if softmax:
        probs = pred_logits.softmax(-1)[..., :-1]
    else:
        probs = pred_logits.sigmoid()
    return probs.max(-1)


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@torch.no_grad()
def extract_attention(
    model: torch.nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor,
    targets: list[dict],
    layer: int = -1,
    num_queries: int = 3,
    query_indices: list[torch.Tensor] | None = None,
    stride: int | None = None,
    softmax: bool | None = None,
) -> list[AttentionResult]:
    """Run ``model`` on a padded batch and return the selected queries' attention per image.

    Args:
        model: a ``replic.models`` Detector (put in eval mode here).
        images, mask: the collated batch (``mask`` True = padding).
        targets: per image, at least ``size`` and ``orig_size`` (h, w) and ``image_id``.
        layer: decoder layer (negative counts from the last).
        num_queries: K, the number of top-scoring queries kept per image.
        query_indices: explicit query indices per image instead of the top-K.
        stride: backbone stride; inferred from padded vs feature size when None.
        softmax: whether the classifier is DETR's softmax (+ no-object); inferred from the
            model when None (see ``uses_softmax_classifier``).
    """
    if images.dim() != 4 or mask.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"images must be (B, 3, H, W) with mask (B, H, W); got {tuple(images.shape)} "
            f"and {tuple(mask.shape)}"
        )
    if len(targets) != images.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {images.shape[0]} images")
    if num_queries <= 0:
        raise ValueError(f"num_queries must be positive, got {num_queries}")
    model.eval()
    out = model(images, mask, return_attention=True)
    attention = out.get("attention")
    if not attention:
        raise ValueError("the model returned no 'attention' (does it implement return_attention?)")
    num_layers = len(attention)
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range: the decoder has {num_layers} layers")
    layer_idx = layer % num_layers
    per_layer = attention[layer_idx]
    cross = per_layer["cross_attn"].float().cpu()  # (B, M, Q, HW)
    spatial = per_layer.get("cross_attn_spatial")
    spatial = spatial.float().cpu() if spatial is not None else None
    fh, fw = (int(v) for v in out["feature_size"])
    if cross.shape[-1] != fh * fw:
        raise ValueError(f"cross_attn has {cross.shape[-1]} keys but feature_size is {(fh, fw)}")
    key_padding = out["memory_mask"].cpu().reshape(-1, fh, fw)

    # Scores and boxes of the chosen layer's own prediction (aux heads for earlier layers).
    if layer_idx == num_layers - 1 or not out.get("aux_outputs"):
        head_out = out
    else:
        head_out = out["aux_outputs"][layer_idx]
    logits = head_out["pred_logits"].float().cpu()
    boxes = head_out["pred_boxes"].float().cpu()
    if softmax is None:
        softmax = uses_softmax_classifier(model, logits.shape[-1])
    scores, labels = query_scores(logits, softmax)

    padded = (int(images.shape[-2]), int(images.shape[-1]))
    stride = stride or infer_stride(padded, (fh, fw))
    results = []
    for b, target in enumerate(targets):
        if query_indices is not None:
            chosen = torch.as_tensor(query_indices[b], dtype=torch.int64)
        else:
            k = min(num_queries, scores.shape[1])
            chosen = scores[b].topk(k).indices
        orig_h, orig_w = (int(v) for v in target["orig_size"])
        geometry = ImageGeometry(
            orig_size=(orig_h, orig_w),
            resized_size=tuple(int(v) for v in target["size"]),
            padded_size=padded,
            feature_size=(fh, fw),
            stride=stride,
        )
        scale = torch.tensor([orig_w, orig_h, orig_w, orig_h], dtype=torch.float32)
        results.append(
            AttentionResult(
                image_id=int(target["image_id"]),
                layer=layer_idx,
                query_indices=chosen,
                scores=scores[b, chosen],
                labels=labels[b, chosen],
                boxes_cxcywh=boxes[b, chosen],
                boxes_xyxy=_cxcywh_to_xyxy(boxes[b, chosen]) * scale,
                cross_attn=cross[b][:, chosen].transpose(0, 1).reshape(len(chosen), -1, fh, fw),
                cross_attn_spatial=(
                    spatial[b][:, chosen].transpose(0, 1).reshape(len(chosen), -1, fh, fw)
                    if spatial is not None
                    else None
                ),
                key_padding=key_padding[b],
                geometry=geometry,
            )
        )
    return results
