"""Hugging Face ``ConditionalDetrForObjectDetection`` (transformers 5.x) → replic weights.

replic uses the official Conditional DETR parameter names, so this is the HF 5.x →
official map (the inverse of HF's own conversion script plus the 5.x renames; see
the transformers ``ConditionalDetrForObjectDetection`` weight names). It is written out rule by rule so
that a key HF adds or renames fails loudly instead of being dropped. HF splits the
encoder self-attention ``in_proj`` into ``q_proj``/``k_proj``/``v_proj``; they are
stacked back in q, k, v order.

Only used as a forward-parity reference (tests): HF's ``auxiliary_loss=True`` decoder
differs from the official one in its auxiliary outputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# (HF 5.x regex, official replacement), tried in order; the first match wins.
_RULES: tuple[tuple[str, str], ...] = (
    (r"model\.backbone\.model\.(.+)", r"backbone.0.body.\1"),
    (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
    (r"model\.input_projection\.(weight|bias)", r"input_proj.\1"),
    # encoder layer i (q/k/v are merged separately, see _ENCODER_QKV)
    (r"model\.encoder\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)",
     r"transformer.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"transformer.encoder.layers.\1.norm1.\2"),
    (r"model\.encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.encoder.layers.\1.linear1.\2"),
    (r"model\.encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.encoder.layers.\1.linear2.\2"),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"transformer.encoder.layers.\1.norm2.\2"),
    # decoder layer i: self-attention
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.q_content_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.sa_qcontent_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.q_pos_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.sa_qpos_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.k_content_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.sa_kcontent_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.k_pos_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.sa_kpos_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"transformer.decoder.layers.\1.sa_v_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.self_attn.out_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"transformer.decoder.layers.\1.norm1.\2"),
    # decoder layer i: conditional cross-attention (q_pos_proj only in layer 0)
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.q_content_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.ca_qcontent_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.q_pos_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.ca_qpos_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.k_content_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.ca_kcontent_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.k_pos_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.ca_kpos_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.v_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.ca_v_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.q_pos_sine_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.ca_qpos_sine_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.o_proj\.(weight|bias)",
     r"transformer.decoder.layers.\1.cross_attn.out_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.(weight|bias)", r"transformer.decoder.layers.\1.norm2.\2"),
    # decoder layer i: FFN
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.decoder.layers.\1.linear1.\2"),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.decoder.layers.\1.linear2.\2"),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"transformer.decoder.layers.\1.norm3.\2"),
    # decoder globals and heads
    (r"model\.decoder\.layernorm\.(weight|bias)", r"transformer.decoder.norm.\1"),
    (r"model\.decoder\.query_scale\.layers\.(\d+)\.(weight|bias)", r"transformer.decoder.query_scale.layers.\1.\2"),
    (r"model\.decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)",
     r"transformer.decoder.ref_point_head.layers.\1.\2"),
    (r"class_labels_classifier\.(weight|bias)", r"class_embed.\1"),
    (r"bbox_predictor\.layers\.(\d+)\.(weight|bias)", r"bbox_embed.layers.\1.\2"),
)  # fmt: skip
_COMPILED = tuple((re.compile(pattern), repl) for pattern, repl in _RULES)
_ENCODER_QKV = re.compile(r"model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def official_name(hf_key: str) -> str:
    """The official/replic name of one HF 5.x key (not for the split encoder q/k/v)."""
    for pattern, repl in _COMPILED:
        if pattern.fullmatch(hf_key):
            return pattern.sub(repl, hf_key)
    raise KeyError(f"no mapping for Hugging Face key {hf_key!r}")


def hf_to_official_state_dict(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a HF 5.x ``ConditionalDetrForObjectDetection`` state dict to official names.

    Raises ``KeyError`` listing every key without a rule, and ``ValueError`` when an
    encoder layer lacks one of q/k/v.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unmapped = []
    for key, value in hf_state.items():
        if key.endswith("num_batches_tracked"):
            continue  # FrozenBN keeps no counter; an ordinary BN's counter carries no weights
        match = _ENCODER_QKV.fullmatch(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        try:
            out[official_name(key)] = value
        except KeyError:
            unmapped.append(key)
    if unmapped:
        raise KeyError(f"Hugging Face keys without a mapping rule: {unmapped}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"encoder layer {layer} self_attn {kind}: has {sorted(parts)}, needs q, k and v")
        # nn.MultiheadAttention packs in_proj as [W_q; W_k; W_v].
        out[f"transformer.encoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


def model_config_from_hf(config: Any) -> dict[str, Any]:
    """ModelConfig options (plain dict) equivalent to a HF ``ConditionalDetrConfig``.

    Refuses settings replic has no counterpart for (learned position embedding,
    non-ReLU activation, a non-timm backbone).
    """
    backbone_cfg = config.backbone_config
    backbone = getattr(backbone_cfg, "backbone", None)
    if backbone is None and isinstance(backbone_cfg, Mapping):
        backbone = backbone_cfg.get("backbone")
    if backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ValueError(f"HF config: backbone {backbone!r} has no replic counterpart (needs a timm ResNet)")
    if config.position_embedding_type != "sine":
        raise ValueError(f"HF config: position_embedding_type {config.position_embedding_type!r} is not supported")
    if config.activation_function != "relu":
        raise ValueError(f"HF config: activation_function {config.activation_function!r} is not supported")
    if config.encoder_attention_heads != config.decoder_attention_heads:
        raise ValueError("HF config: encoder and decoder head counts differ; replic has one nheads")
    if config.encoder_ffn_dim != config.decoder_ffn_dim:
        raise ValueError("HF config: encoder and decoder FFN sizes differ; replic has one dim_feedforward")
    return {
        "arch": "conditional_detr",
        "backbone": backbone,
        "dilation": bool(config.dilation),
        "pretrained_backbone": "none",
        "hidden_dim": int(config.d_model),
        "nheads": int(config.encoder_attention_heads),
        "enc_layers": int(config.encoder_layers),
        "dec_layers": int(config.decoder_layers),
        "dim_feedforward": int(config.encoder_ffn_dim),
        "dropout": float(config.dropout),
        "num_classes": int(config.num_labels),
        "num_queries": int(config.num_queries),
        "aux_loss": bool(config.auxiliary_loss),
    }
