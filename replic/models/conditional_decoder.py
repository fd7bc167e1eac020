"""Conditional DETR decoder (Meng et al., ICCV 2021), with the paper's ablations as switches.

One decoder layer (official ``TransformerDecoderLayer`` of ConditionalDETR) does:

1. self-attention, content and position **added**:
   q = sa_qcontent(tgt) + sa_qpos(P), k = sa_kcontent(tgt) + sa_kpos(P), v = sa_v(tgt);
2. conditional cross-attention, content and spatial parts **concatenated per head**:
   Q_h = [q_c,h ; q_s,h], K_h = [k_c,h ; k_p,h], scale (2·d/M)^-0.5 (= 1/8 at d = 256, M = 8),
   with q_s = ca_qpos_sine_proj(p_q) and k_p = ca_kpos_proj(pos). Layer 0 also adds
   ca_qpos_proj(P) to q_c and k_p to k_c; later layers have no ``ca_qpos_proj`` at all;
3. FFN. Each sub-block is post-norm (norm1/2/3).

The decoder computes reference points once, p_s = sinusoid(reference point), forms p_q per
layer according to ``spatial_query`` / ``lambda_form`` (see :class:`ModelConfig`), appends
``norm(output)`` to ``hs`` after every layer, and feeds the **raw** output to the next
layer and to ``query_scale``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from replic.models.attention import MultiheadAttentionNoProj, attention_bias, split_heads
from replic.models.position_encoding import gen_sineembed_for_position
from replic.models.transformer import MLP, ReferencePointSource


class ConditionalDecoderLayer(nn.Module):
    """One Conditional DETR decoder layer, split into its three post-norm blocks."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, is_first: bool) -> None:
        super().__init__()
        self.is_first = is_first
        self.nhead = nhead
        # Self-attention projections (no packed in_proj in the official layer).
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = MultiheadAttentionNoProj(d_model, nhead, dropout=dropout, vdim=d_model)
        # Cross-attention projections; ca_qpos_proj only in layer 0 (absent from later state dicts).
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        if is_first:
            self.ca_qpos_proj = nn.Linear(d_model, d_model)
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = MultiheadAttentionNoProj(2 * d_model, nhead, dropout=dropout, vdim=d_model)
        # FFN and norms.
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def self_attention_block(self, tgt: Tensor, query_pos: Tensor, attn_mask: Tensor | None,
                             need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """tgt, query_pos (B, Q, D) → tgt after self-attention + norm1, per-head weights."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        v = self.sa_v_proj(tgt)
        out, weights = self.self_attn(q, k, v, attn_mask=attn_mask, need_weights=need_weights)
        return self.norm1(tgt + self.dropout1(out)), weights

    def cross_attention_block(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                              query_spatial: Tensor, memory_mask: Tensor | None,
                              need_weights: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Conditional cross-attention; query_spatial = p_q (B, Q, D) before ``ca_qpos_sine_proj``."""
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.is_first:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q_spatial = self.ca_qpos_sine_proj(query_spatial)
        b, nq, d = q.shape
        hw = k.shape[1]
        head = d // self.nhead
        # Per head: [content (d/M) ; spatial (d/M)] → queries/keys of width 2d laid out head by head.
        q_cat = torch.cat((q.view(b, nq, self.nhead, head), q_spatial.view(b, nq, self.nhead, head)), dim=3)
        k_cat = torch.cat((k.view(b, hw, self.nhead, head), k_pos.view(b, hw, self.nhead, head)), dim=3)
        out, weights = self.cross_attn(q_cat.view(b, nq, 2 * d), k_cat.view(b, hw, 2 * d), v,
                                       key_padding_mask=memory_mask, need_weights=need_weights)
        tgt = self.norm2(tgt + self.dropout2(out))
        extras: dict[str, Tensor] = {}
        if need_weights:
            extras["cross_attn"] = weights
            extras["cross_attn_spatial"] = self._spatial_attention(q_spatial, k_pos, memory_mask)
        return tgt, extras

    def _spatial_attention(self, q_spatial: Tensor, k_pos: Tensor, memory_mask: Tensor | None) -> Tensor:
        """Softmax over keys of the spatial term alone, q_s,h · k_p,h, at the same scale (2d/M)^-0.5."""
        qs = split_heads(q_spatial, self.nhead)
        kp = split_heads(k_pos, self.nhead)
        logits = torch.matmul(qs, kp.transpose(-2, -1)) * (2 * qs.shape[-1]) ** -0.5
        bias = attention_bias(memory_mask, None, qs.shape[2], kp.shape[2], qs.shape[0], qs.dtype, qs.device)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1)

    def ffn_block(self, tgt: Tensor) -> Tensor:
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class QueryScale(nn.Module):
    """The transformation T of p_q = T(f) p_s, in the form of Figure 5.

    Holds the official ``query_scale`` MLP (d→d→out, 2 layers) under ``layers`` so the
    ``diagonal`` form has the official names ``transformer.decoder.query_scale.layers.*``.
    """

    def __init__(self, form: str, d_model: int, nhead: int) -> None:
        super().__init__()
        self.form = form
        self.d_model = d_model
        self.nhead = nhead
        head = d_model // nhead
        out_dim = {"diagonal": d_model, "scalar": 1, "block_diagonal": nhead * head * head,
                   "full": d_model * d_model}[form]
        self.layers = MLP(d_model, d_model, out_dim, 2).layers

    def _mlp(self, f: Tensor) -> Tensor:
        return self.layers[1](F.relu(self.layers[0](f)))

    def forward(self, f: Tensor, p: Tensor) -> Tensor:
        """f (B, Q, D) drives T; p (B, Q, D) is transformed → T(f) p (B, Q, D)."""
        t = self._mlp(f)
        if self.form in ("diagonal", "scalar"):
            return t * p
        b, q, d = p.shape
        if self.form == "block_diagonal":
            head = d // self.nhead
            blocks = t.view(b, q, self.nhead, head, head)
            return torch.einsum("bqmij,bqmj->bqmi", blocks, p.view(b, q, self.nhead, head)).reshape(b, q, d)
        return torch.einsum("bqij,bqj->bqi", t.view(b, q, d, d), p)


class ConditionalDecoder(ReferencePointSource):
    """Stack of :class:`ConditionalDecoderLayer` with the shared final ``norm``.

    Args:
        spatial_query: ``csq`` | ``csq_c`` | ``csq_t`` | ``csq_p`` | ``csq_i`` (Table 3).
        lambda_form: ``diagonal`` | ``identity`` | ``scalar`` | ``block_diagonal`` | ``full`` (Figure 5).
        reference_point: ``predicted`` | ``learned`` | ``zero`` (§3.6).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int,
                 spatial_query: str = "csq", lambda_form: str = "diagonal", reference_point: str = "predicted",
                 num_queries: int = 300) -> None:
        super().__init__()
        if spatial_query == "none":
            raise ValueError("ConditionalDecoder needs a conditional spatial query; use TransformerDecoder for 'none'")
        self.d_model = d_model
        self.spatial_query = spatial_query
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, is_first=(i == 0))
            for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        uses_lambda = spatial_query in ("csq", "csq_t", "csq_i") and lambda_form != "identity"
        self.query_scale = QueryScale(lambda_form, d_model, nhead) if uses_lambda else None
        self._init_reference_points(d_model, reference_point, num_queries)

    def _transform(self, f: Tensor, p: Tensor) -> Tensor:
        return p if self.query_scale is None else self.query_scale(f, p)

    def _spatial_query(self, layer_id: int, p_s: Tensor, prev_output: Tensor, c_q: Tensor) -> Tensor:
        """p_q for one layer; prev_output is the raw previous output f (tgt in layer 0)."""
        mode = self.spatial_query
        if mode == "csq":
            return p_s if layer_id == 0 else self._transform(prev_output, p_s)
        if mode == "csq_c":
            return prev_output
        if mode == "csq_t":
            ones = torch.ones_like(p_s)
            return ones if layer_id == 0 else self._transform(prev_output, ones)
        if mode == "csq_p":
            return p_s
        if mode == "csq_i":
            return self._transform(c_q, p_s)
        raise ValueError(f"spatial_query: unknown mode {mode!r}")

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, memory_mask: Tensor | None,
                reference_points: Tensor | None = None, self_attn_mask: Tensor | None = None,
                return_attention: bool = False) -> dict[str, Any]:
        """tgt/query_pos (B, Q, D), memory/pos (B, HW, D) → {hs (L, B, Q, D), reference_points (B, Q, 2), attention}."""
        if reference_points is None:
            reference_points = self.make_reference_points(query_pos)
        p_s = gen_sineembed_for_position(reference_points[..., :2], self.d_model)
        output = tgt
        intermediate, attention = [], []
        for layer_id, layer in enumerate(self.layers):
            prev_output = output
            output, sa_w = layer.self_attention_block(output, query_pos, self_attn_mask, return_attention)
            p_q = self._spatial_query(layer_id, p_s, prev_output, output)
            output, ca = layer.cross_attention_block(output, memory, pos, query_pos, p_q, memory_mask,
                                                     return_attention)
            output = layer.ffn_block(output)
            intermediate.append(self.norm(output))
            if return_attention:
                attention.append({"self_attn": sa_w, **ca})
        result: dict[str, Any] = {"hs": torch.stack(intermediate), "reference_points": reference_points}
        if return_attention:
            result["attention"] = attention
        return result
