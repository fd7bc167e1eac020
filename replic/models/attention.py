"""Multi-head attention that can return per-head weights.

Two modules, both batch-first ``(B, N, E)``:

* :class:`PackedMultiheadAttention` — the maths and parameter names of
  ``torch.nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), used
  by the encoder and the DETR decoder so official checkpoints load unchanged.
* :class:`MultiheadAttentionNoProj` — the Conditional DETR attention (``models/attention.py``
  in the official code): no input projection (the decoder layer projects q, k, v itself),
  query/key head width may differ from the value head width, scale = (E_qk / M)^-0.5, and
  ``out_proj`` maps vdim → vdim.

When weights are not requested the product goes through
``F.scaled_dot_product_attention`` (same maths, fused); when they are, it is computed
explicitly and the **pre-dropout** softmax weights are returned per head, ``(B, M, Nq, Nk)``.
Masks follow the PyTorch convention: ``key_padding_mask`` (B, Nk) and boolean
``attn_mask`` (Nq, Nk) with **True = not allowed**.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention_bias(key_padding_mask: Tensor | None, attn_mask: Tensor | None, num_queries: int,
                   num_keys: int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Combine boolean masks (True = blocked) into an additive bias, or None.

    The bias is (B, 1, 1, Nk) with a key-padding mask only (broadcast over heads and queries,
    so the DC5 encoder does not materialise HW × HW per image), else (B, 1, Nq, Nk).
    """
    if key_padding_mask is None and attn_mask is None:
        return None
    rows = 1 if attn_mask is None else num_queries
    bias = torch.zeros(batch, 1, rows, num_keys, dtype=dtype, device=device)
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be boolean (True = not allowed)")
        bias = bias.masked_fill(attn_mask[None, None], float("-inf"))
    return bias


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float,
                         need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """q (B, M, Nq, Dqk), k (B, M, Nk, Dqk), v (B, M, Nk, Dv) → (B, M, Nq, Dv), weights or None.

    Scale is Dqk^-0.5. Dropout applies to the attention weights (training only: the caller
    passes dropout_p = 0 in eval).
    """
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        return out, None
    logits = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + bias
    weights = logits.softmax(dim=-1)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return torch.matmul(dropped, v), weights


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, M·D) → (B, M, N, D)."""
    b, n, e = x.shape
    return x.view(b, n, num_heads, e // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, M, N, D) → (B, N, M·D)."""
    b, m, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, m * d)


class PackedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``-compatible attention (batch-first) that can return per-head weights."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # As torch.nn.MultiheadAttention: xavier in-projection, zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """query (B, Nq, E), key/value (B, Nk, E) → output (B, Nq, E), weights (B, M, Nq, Nk) or None."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = split_heads(F.linear(query, w_q, b_q), self.num_heads)
        k = split_heads(F.linear(key, w_k, b_k), self.num_heads)
        v = split_heads(F.linear(value, w_v, b_v), self.num_heads)
        bias = attention_bias(key_padding_mask, attn_mask, q.shape[2], k.shape[2], q.shape[0], q.dtype, q.device)
        out, weights = multi_head_attention(q, k, v, bias, self.dropout if self.training else 0.0, need_weights)
        return self.out_proj(merge_heads(out)), weights


class MultiheadAttentionNoProj(nn.Module):
    """Conditional DETR's attention: inputs are already projected; only ``out_proj`` has weights.

    ``embed_dim`` is the query/key width (512 in the decoder cross-attention, where each head
    holds [content; spatial] = 2 × 32 channels), ``vdim`` the value width (256).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, vdim: int | None = None) -> None:
        super().__init__()
        vdim = embed_dim if vdim is None else vdim
        if embed_dim % num_heads or vdim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} / vdim {vdim} not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.vdim = vdim
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.zeros_(self.out_proj.bias)  # as the official custom attention

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """query (B, Nq, E), key (B, Nk, E), value (B, Nk, vdim) → (B, Nq, vdim), weights or None."""
        q = split_heads(query, self.num_heads)
        k = split_heads(key, self.num_heads)
        v = split_heads(value, self.num_heads)
        bias = attention_bias(key_padding_mask, attn_mask, q.shape[2], k.shape[2], q.shape[0], q.dtype, q.device)
        out, weights = multi_head_attention(q, k, v, bias, self.dropout if self.training else 0.0, need_weights)
        return self.out_proj(merge_heads(out)), weights
