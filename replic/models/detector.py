"""The detector: backbone → input_proj → transformer → class/box heads.

Module names reproduce the official state dict: ``transformer``, ``class_embed``,
``bbox_embed``, ``query_embed``, ``input_proj``, ``backbone.0.body``. One class serves DETR and
Conditional DETR; the decoder type and the ablation switches come from the config
(:func:`replic.models.build.build_model`).

Extra query groups (D³ETR "fixed matching", Group-DETR style) are decoded together with the
main queries in one pass: a block-diagonal self-attention mask keeps every group blind to
the others, and cross-attention is per query anyway, so the main group's outputs do not
depend on the extra groups (up to float summation order).
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from replic.models.backbone import Joiner
from replic.models.box_ops import inverse_sigmoid
from replic.models.transformer import MLP, Transformer, at_least_float32, float32_region


class ExtraQueries(TypedDict, total=False):
    """One extra query group passed to :meth:`Detector.forward`.

    ``query_pos`` (Qe, D) or (B, Qe, D) is required — the positional object queries (for
    Conditional DETR, a teacher's ``query_embed.weight``). ``content`` (B, Qe, D) is the initial
    content query (default zeros, as the main group). ``reference_points`` (B, Qe, 2) in
    sigmoid space overrides the ones this model would derive from ``query_pos`` (required
    when ``reference_point: learned``).
    """

    query_pos: Tensor
    content: Tensor
    reference_points: Tensor


class Detector(nn.Module):
    """DETR / Conditional DETR. See ``docs/architecture.md`` "Model contract" for the outputs."""

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, focal_loss: bool = True, offset_regression: bool = True,
                 conditional_init: bool = True) -> None:
        super().__init__()
        d = transformer.d_model
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.focal_loss = focal_loss
        self.offset_regression = offset_regression
        # Registration order = official state-dict order.
        self.transformer = transformer
        self.class_embed = nn.Linear(d, num_classes if focal_loss else num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d)
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
        self.backbone = backbone
        if focal_loss:
            prior = 0.01
            nn.init.constant_(self.class_embed.bias, -math.log((1 - prior) / prior))
        if conditional_init:
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Tensor | None = None, return_attention: bool = False,
                extra_queries: list[ExtraQueries] | None = None,
                encoder_inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """images (B, 3, H, W), mask (B, H, W) bool True = padding → outputs dict (model contract).

        ``encoder_inputs``: per-forward extras for swapped-in encoder layers that take them
        (KS-DETR's ground-truth mask; see :class:`~replic.models.transformer.TransformerEncoder`).
        If such a layer adds memory streams (teacher memories), each extra stream is decoded by
        the same decoder and heads, in the same pass, and returned under ``encoder_streams``
        (one outputs dict per stream); every other key describes stream 0, the plain path.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        if mask.shape != (images.shape[0], *images.shape[2:]) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (B, H, W) matching images, got {mask.dtype} {tuple(mask.shape)}")

        features, (memory, memory_mask, memory_pos) = self.encode(images, mask, encoder_inputs)
        c5 = features[self.backbone[0].input_level][0]
        batch = images.shape[0]
        streams = memory.shape[0] // batch
        main = self._main_group(memory.shape[0])
        extra = [self._extra_group(g, batch, i) for i, g in enumerate(extra_queries or [])]
        if streams > 1:
            # Every stream is decoded as more images of the same batch: one decoder pass. Extra
            # query groups read the plain memory only, in a pass of their own (groups never attend
            # to each other, so this is the joint decode's function).
            per_group = self._decode([main], memory, memory_pos.repeat(streams, 1, 1),
                                     memory_mask.repeat(streams, 1), return_attention)
            if extra:
                per_group += self._decode(extra, memory[:batch], memory_pos, memory_mask, return_attention)
        else:
            per_group = self._decode([main, *extra], memory, memory_pos, memory_mask, return_attention)
        per_stream = _split_streams(per_group[0], batch, streams)
        out = self._head_outputs(per_stream[0])
        if streams > 1:
            out["encoder_streams"] = [self._head_outputs(d) for d in per_stream[1:]]
        out.update({
            "memory": memory[:batch],
            "memory_mask": memory_mask,
            "memory_pos": memory_pos,
            "feature_size": tuple(c5.shape[-2:]),
            "features": {level: feature for level, (feature, _) in features.items()},
        })
        if extra_queries:
            out["extra_groups"] = [self._head_outputs(g) for g in per_group[1:]]
        return out

    def encode(self, images: Tensor, mask: Tensor,
               encoder_inputs: dict[str, Any] | None = None) -> tuple[dict[str, Any], tuple[Tensor, Tensor, Tensor]]:
        """Backbone and encoder only: the backbone maps by level and (memory, memory_mask, memory_pos),
        (B, HW, ·). The transformer reads ``input_level`` (C5 official; C4 at mini scale)."""
        features, pos = self.backbone(images, mask)
        c5, c5_mask = features[self.backbone[0].input_level]
        return features, self.transformer.encode(self.input_proj(c5), c5_mask, pos, encoder_inputs)

    # ------------------------------------------------------------------ helpers
    def _decode(self, groups: list[dict[str, Any]], memory: Tensor, pos: Tensor, mask: Tensor,
                return_attention: bool) -> list[dict[str, Any]]:
        """One decoder pass over query groups (self-attention kept within each group) → per group."""
        sizes = [g["query_pos"].shape[1] for g in groups]
        query_pos = torch.cat([g["query_pos"] for g in groups], dim=1)
        tgt = torch.cat([g["content"] for g in groups], dim=1)
        refs = [g["reference_points"] for g in groups]
        reference_points = None if refs[0] is None else torch.cat(refs, dim=1)
        self_attn_mask = _group_mask(sizes, memory.device) if len(groups) > 1 else None
        decoded = self.transformer.decoder(tgt, memory, pos, query_pos, mask,
                                           reference_points=reference_points, self_attn_mask=self_attn_mask,
                                           return_attention=return_attention)
        return _split_groups(decoded, sizes, return_attention)

    def _main_group(self, batch: int) -> dict[str, Tensor | None]:
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        return {"query_pos": query_pos, "content": torch.zeros_like(query_pos),
                "reference_points": self._reference_points(query_pos)}

    def _extra_group(self, group: ExtraQueries, batch: int, index: int) -> dict[str, Tensor | None]:
        if "query_pos" not in group:
            raise ValueError(f"extra_queries[{index}]: 'query_pos' is required")
        unknown = set(group) - {"query_pos", "content", "reference_points"}
        if unknown:
            raise ValueError(f"extra_queries[{index}]: unknown keys {sorted(unknown)}")
        query_pos = group["query_pos"]
        if query_pos.dim() == 2:
            query_pos = query_pos[None].expand(batch, -1, -1)
        if query_pos.shape[0] != batch or query_pos.shape[-1] != self.query_embed.embedding_dim:
            raise ValueError(f"extra_queries[{index}]: query_pos must be (Qe, D) or (B, Qe, D) with D = "
                             f"{self.query_embed.embedding_dim}, got {tuple(group['query_pos'].shape)}")
        content = group.get("content")
        if content is None:
            content = torch.zeros_like(query_pos)
        elif content.shape != query_pos.shape:
            raise ValueError(f"extra_queries[{index}]: content {tuple(content.shape)} must match query_pos "
                             f"{tuple(query_pos.shape)}")
        refs = group.get("reference_points")
        if refs is None:
            refs = self._reference_points(query_pos)
        elif getattr(self.transformer.decoder, "reference_point", None) is None:
            raise ValueError(f"extra_queries[{index}]: this model has no reference points")
        elif refs.shape != (*query_pos.shape[:2], 2):
            raise ValueError(f"extra_queries[{index}]: reference_points must be (B, Qe, 2), got {tuple(refs.shape)}")
        return {"query_pos": query_pos, "content": content, "reference_points": refs}

    def _reference_points(self, query_pos: Tensor) -> Tensor | None:
        return self.transformer.decoder.make_reference_points(query_pos)

    def _head_outputs(self, decoded: dict[str, Any]) -> dict[str, Any]:
        """Shared class/box heads on every decoder layer of one query group."""
        hs = decoded["hs"]
        reference_points = decoded["reference_points"]
        # Heads in fp32 even under bf16/fp16 autocast: bf16 keeps ~3 significant digits, i.e.
        # box coordinates quantised to ~2-3 px at 1333 px. The heads are a negligible cost.
        with float32_region(hs):
            logits = self.class_embed(at_least_float32(hs))
            box_raw = self.bbox_embed(at_least_float32(hs))
            if self.offset_regression:
                # Centre as an offset from the reference point in inverse-sigmoid space.
                offset = inverse_sigmoid(at_least_float32(reference_points))
                box_raw = torch.cat((box_raw[..., :2] + offset, box_raw[..., 2:]), dim=-1)
            boxes = box_raw.sigmoid()
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs": hs}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if reference_points is not None:
            out["reference_points"] = reference_points
        if "attention" in decoded:
            out["attention"] = decoded["attention"]
        return out


def _group_mask(sizes: list[int], device: torch.device) -> Tensor:
    """Block-diagonal self-attention mask (True = blocked) so query groups never see each other."""
    group_id = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return group_id[:, None] != group_id[None, :]


def _split_streams(decoded: dict[str, Any], batch: int, streams: int) -> list[dict[str, Any]]:
    """Cut one group's decoder outputs over S·B images back into S streams of B images."""
    if streams == 1:
        return [decoded]
    out = []
    for s in range(streams):
        part = slice(s * batch, (s + 1) * batch)
        refs = decoded["reference_points"]
        stream: dict[str, Any] = {"hs": decoded["hs"][:, part], "reference_points": None if refs is None else refs[part]}
        if "attention" in decoded:
            stream["attention"] = [{name: w[part] for name, w in layer.items()} for layer in decoded["attention"]]
        out.append(stream)
    return out


def _split_groups(decoded: dict[str, Any], sizes: list[int], with_attention: bool) -> list[dict[str, Any]]:
    """Cut the jointly decoded queries back into their groups (attention: diagonal blocks / rows)."""
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    groups = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        refs = decoded["reference_points"]
        group: dict[str, Any] = {
            "hs": decoded["hs"][:, :, start:end],
            "reference_points": None if refs is None else refs[:, start:end],
        }
        if with_attention:
            group["attention"] = [
                {name: (w[:, :, start:end, start:end] if name == "self_attn" else w[:, :, start:end])
                 for name, w in layer.items()}
                for layer in decoded["attention"]
            ]
        groups.append(group)
    return groups
