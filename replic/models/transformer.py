"""DETR transformer: post-norm encoder, DETR decoder, and the shared :class:`Transformer` wrapper.

Everything is batch-first here — (B, N, D) — while the official code is sequence-first;
the maths is identical. Parameter names follow the official state dict
(``transformer.encoder.layers.i.self_attn.in_proj_weight``, ``…linear1``, ``…norm1`` …).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from replic.models.attention import PackedMultiheadAttention


def float32_region(tensor: Tensor) -> torch.autocast:
    """A region where autocast is off (fp32 maths) on ``tensor``'s device type."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is a half type (bf16/fp16 autocast), else unchanged.

    Unlike ``.float()`` this keeps float64, so the same code runs the float64 parity checks.
    """
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


class MLP(nn.Module):
    """Linear layers with ReLU in between (``layers.{i}`` names as the official ``MLP``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TransformerEncoderLayer(nn.Module):
    """Post-norm DETR encoder layer: self-attention with q = k = src + pos, then FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = PackedMultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        q = k = src + pos
        attn, _ = self.self_attn(q, k, src, key_padding_mask=key_padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers; no final norm (post-norm, as the official default).

    Hook for methods that swap a layer (KS-DETR's triple attention): a layer whose class sets
    ``takes_layer_inputs = True`` is called with ``layer_inputs=`` (per-forward extras such as a
    ground-truth mask, plus ``feature_size`` (H, W) of the token grid). Such a layer may return
    more *streams* than it got — e.g. teacher memories — stacked after its input on the batch
    dim, (S·B, N, D); later layers then process every stream like more images.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None,
                layer_inputs: dict[str, Any] | None = None) -> Tensor:
        """src, pos (B, N, D), key_padding_mask (B, N) → memory (S·B, N, D); S = 1 unless a layer adds streams."""
        batch = src.shape[0]
        for layer in self.layers:
            streams = src.shape[0] // batch
            if streams > 1:  # positions and padding are the same for every stream of an image
                pos = pos[:batch].repeat(streams, 1, 1)
                key_padding_mask = None if key_padding_mask is None else key_padding_mask[:batch].repeat(streams, 1)
            if layer_inputs is not None and getattr(layer, "takes_layer_inputs", False):
                src = layer(src, pos, key_padding_mask, layer_inputs=layer_inputs)
            else:
                src = layer(src, pos, key_padding_mask)
        return src


class ReferencePointSource(nn.Module):
    """Base for decoders that may carry reference points (``predicted`` / ``learned`` / ``zero``).

    Registers ``ref_point_head`` (MLP d→d→2, official name) or ``ref_point_embed`` (learned,
    one (x, y) per query, un-normalised) on the decoder, so state-dict names stay official.
    """

    reference_point: str | None

    def _init_reference_points(self, d_model: int, reference_point: str | None, num_queries: int) -> None:
        self.reference_point = reference_point
        if reference_point == "predicted":
            self.ref_point_head = MLP(d_model, d_model, 2, 2)
        elif reference_point == "learned":
            self.ref_point_embed = nn.Embedding(num_queries, 2)

    def reset_reference_points(self) -> None:
        """[inferred] Learned points start spread uniformly over the image (sigmoid space)."""
        if self.reference_point == "learned":
            with torch.no_grad():
                self.ref_point_embed.weight.uniform_(0.0, 1.0)
                self.ref_point_embed.weight.copy_(torch.logit(self.ref_point_embed.weight.clamp(1e-3, 1 - 1e-3)))

    def make_reference_points(self, query_pos: Tensor) -> Tensor | None:
        """query_pos (B, Q, D) → reference points (B, Q, 2) in sigmoid space, or None."""
        if self.reference_point is None:
            return None
        if self.reference_point == "predicted":
            with float32_region(query_pos):  # points feed the box offsets: keep them fp32
                return self.ref_point_head(at_least_float32(query_pos)).sigmoid()
        b, q, _ = query_pos.shape
        if self.reference_point == "learned":
            weight = self.ref_point_embed.weight
            if q != weight.shape[0]:
                raise ValueError(
                    f"learned reference points exist for the {weight.shape[0]} main queries, got {q}; "
                    "pass 'reference_points' with extra query groups")
            return weight.sigmoid()[None].expand(b, -1, -1)
        return query_pos.new_full((b, q, 2), 0.5)  # "zero": s = (0, 0) before the sigmoid


class TransformerDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: query_pos added to q/k in self-attention and to q in
    cross-attention; memory pos added to the cross-attention keys."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = PackedMultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = PackedMultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, memory_mask: Tensor | None,
                self_attn_mask: Tensor | None, need_weights: bool) -> tuple[Tensor, dict[str, Tensor]]:
        q = k = tgt + query_pos
        sa, sa_w = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=need_weights)
        tgt = self.norm1(tgt + self.dropout1(sa))
        ca, ca_w = self.multihead_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=memory_mask,
                                       need_weights=need_weights)
        tgt = self.norm2(tgt + self.dropout2(ca))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout3(ffn))
        weights = {"self_attn": sa_w, "cross_attn": ca_w} if need_weights else {}
        return tgt, weights


class TransformerDecoder(ReferencePointSource):
    """DETR decoder. ``hs`` holds ``norm(output)`` after every layer; the running output stays raw.

    With ``reference_point`` set (Table 4 rows with offset regression but no CSQ) it also
    returns reference points for the box head; they do not enter the attention.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int,
                 reference_point: str | None = None, num_queries: int = 100) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self._init_reference_points(d_model, reference_point, num_queries)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, memory_mask: Tensor | None,
                reference_points: Tensor | None = None, self_attn_mask: Tensor | None = None,
                return_attention: bool = False) -> dict[str, Any]:
        output = tgt
        intermediate, attention = [], []
        for layer in self.layers:
            output, weights = layer(output, memory, pos, query_pos, memory_mask, self_attn_mask, return_attention)
            intermediate.append(self.norm(output))
            attention.append(weights)
        result: dict[str, Any] = {"hs": torch.stack(intermediate), "reference_points": reference_points}
        if return_attention:
            result["attention"] = attention
        return result


class Transformer(nn.Module):
    """Encoder + decoder over a projected, flattened C5 map.

    ``_reset_parameters`` applies xavier_uniform_ to every parameter with dim > 1 (official
    ``Transformer._reset_parameters``); learned reference points are re-initialised after.
    """

    def __init__(self, encoder: TransformerEncoder, decoder: nn.Module, d_model: int, nhead: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if isinstance(self.decoder, ReferencePointSource):
            self.decoder.reset_reference_points()

    def encode(self, src: Tensor, mask: Tensor, pos: Tensor,
               layer_inputs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """src (B, D, H, W), mask (B, H, W), pos (B, D, H, W) → memory, memory_mask, memory_pos (B, HW, ·).

        ``layer_inputs`` go to the encoder layers that take them (:class:`TransformerEncoder`),
        with ``feature_size`` = (H, W) added; memory is then (S·B, HW, D) if a layer adds
        streams, memory_mask and memory_pos stay (B, HW, ·).
        """
        feature_size = tuple(src.shape[-2:])
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        if layer_inputs is not None:
            layer_inputs = {**layer_inputs, "feature_size": feature_size}
        memory = self.encoder(src, pos, mask, layer_inputs)
        return memory, mask, pos
