"""KS-DETR: knowledge sharing in attention learning (Zhao & Ukita, arXiv 2302.11208).

Read next to the authors' code (``edocanonymous/KS-DETR`` @ df0f2f6; the paths below are under
``projects/ks_detr/modeling/``). One encoder layer (the last, by default) is replaced by a
*triple-attention* layer. Besides the plain ("student") attention it runs two "teachers" whose
inputs carry the ground-truth foreground/background mask:

* **GT mask** (``ks_utils/gt_mask_generator.py``, ``ks_utils/ksgt.py``): every GT box is painted
  1 on a canvas of the padded input size (optionally dilated by ``pad_fg_pixel``), resized to
  the token grid with bilinear ``align_corners=True``, and any non-zero value counts as
  foreground (a slight dilation). Padding tokens are never foreground.
* **Token modification**: foreground tokens of the teacher input become ``ReLU(Linear(x))``
  (``sMLP``, one shared linear layer) or get their last channel overwritten by the mask
  (``Mark``); ``masking_loc`` says whether the teacher's q/k/v (``X``), only v (``V``), only
  q/k (``QK``) … are built from the modified tokens.
* **Triple attention** (``layers/attn/triple_attn_share_AV.py``): one packed input projection
  (6E × E: student q/k/v, teacher q/k/v). Student A·V; teacher 1 A_t·V (shares the student's
  V); teacher 2 A·V_t (shares the student's attention map A). All three go through the same
  out-projection, LayerNorms and FFN. The dual variants ``share_a`` (4E: q, k, v, v_t → A·V_t)
  and ``share_v`` (5E: q, k, v, q_t, k_t → A_t·V) are the same module with fewer rows.
* **Decoding and losses** (``ks_conditional_detr.py``, ``ks_conditional_transformer.py``): each
  teacher memory goes through the same decoder and heads (one batched pass,
  :meth:`Detector.forward` ``encoder_inputs``); the last decoder layer of each teacher is one
  more prediction set, matched on its own and weighted like the student's sets. No
  distillation loss: knowledge flows only through the shared weights.
* **Inference**: without ``encoder_inputs`` the layer computes the student path only (the
  first 3E rows of the projection), so a KS checkpoint evaluates as a plain detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from replic.config import ConfigError
from replic.methods.base import TrainingMethod
from replic.models.attention import attention_bias, merge_heads, multi_head_attention, split_heads
from replic.models.box_ops import box_cxcywh_to_xyxy
from replic.models.transformer import TransformerEncoderLayer

Variant = Literal["triple", "share_a", "share_v"]
TokenMasking = Literal["sMLP", "Mark"]
MaskingLoc = Literal["X", "V", "QK", "Q", "K", "KV"]
MaskCriterion = Literal["Fg1Bg0", "significance_value"]

#: Rows of the packed input projection per variant, in order (official chunk order).
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "triple": ("q", "k", "v", "q_t", "k_t", "v_t"),
    "share_a": ("q", "k", "v", "v_t"),
    "share_v": ("q", "k", "v", "q_t", "k_t"),
}
#: Teacher branches per variant: the name used in loss keys and what it computes.
TEACHERS: dict[str, tuple[str, ...]] = {
    "triple": ("share_v", "share_a"),  # teacher 1 = A_t·V, teacher 2 = A·V_t (official order)
    "share_a": ("share_a",),
    "share_v": ("share_v",),
}
#: The masking location each variant uses in the official configs.
DEFAULT_LOC: dict[str, str] = {"triple": "X", "share_a": "V", "share_v": "QK"}


@dataclass
class KSOptions:
    """The ``method`` section of a KS-DETR experiment (``name: ks_detr``).

    Keys:
        variant: ``triple`` (share A and V, the paper's method), ``share_a`` or ``share_v``
            (the dual-attention ablations).
        token_masking: ``sMLP`` (foreground tokens → ReLU(Linear(x)); official default) or
            ``Mark`` (last channel := the 0/1 mask; official ``MarkFg1Bg0``).
        masking_loc: which teacher inputs are built from the modified tokens: ``X`` (q, k, v),
            ``V``, ``QK``, ``Q``, ``K``, ``KV``; null = the variant's official pairing
            (triple X, share_a V, share_v QK).
        pad_fg_pixel: dilate every GT box by this many input pixels before painting (≥ 0;
            official 0).
        mask_criterion: ``Fg1Bg0`` (1 inside boxes) or ``significance_value`` (a soft value
            from 1.0 for area < 32² down to 0.6 above 512², max over overlapping boxes). As in
            the official code the resized mask is binarised (any non-zero = foreground), so
            both criteria give the same encoder mask.
        encoder_layer: index of the encoder layer replaced (negative counts from the end;
            official: the last, -1). Teacher memories of an earlier layer continue through the
            later (plain) layers [inferred; the official configs only use the last].
    """

    variant: Variant = "triple"
    token_masking: TokenMasking = "sMLP"
    masking_loc: MaskingLoc | None = None
    pad_fg_pixel: int = 0
    mask_criterion: MaskCriterion = "Fg1Bg0"
    encoder_layer: int = -1

    def validate(self) -> None:
        """Reject impossible values (the caller prefixes ``method``)."""
        if self.pad_fg_pixel < 0:
            raise ConfigError(f"pad_fg_pixel: the GT-mask dilation must be >= 0 pixels, got {self.pad_fg_pixel}")
        loc = self.location
        # A location that reaches none of the variant's teacher projections would make the
        # teacher a copy of the student.
        if self.variant == "share_a" and not ("V" in loc or loc == "X"):
            raise ConfigError(f"masking_loc: variant share_a has only a teacher V projection; {loc!r} does not "
                              "reach it (use V, KV or X)")
        if self.variant == "share_v" and loc == "V":
            raise ConfigError("masking_loc: variant share_v has no teacher V projection; 'V' does not reach its "
                              "teacher (use Q, K, QK, KV or X)")

    @property
    def location(self) -> str:
        """``masking_loc`` with the variant's default filled in."""
        return self.masking_loc if self.masking_loc is not None else DEFAULT_LOC[self.variant]


# --------------------------------------------------------------------------- GT mask
def significance_value(area: float) -> float:
    """Official piecewise-linear soft foreground value: 1.0 below 32², 0.6 above 512²."""
    bases = [32.0 ** 2, 64.0 ** 2, 128.0 ** 2, 256.0 ** 2, 512.0 ** 2]
    lowest = 0.6
    step = (1.0 - lowest) / (len(bases) - 1)
    count = sum(area > b for b in bases)
    if count == 0:
        return 1.0
    if count == len(bases):
        return lowest
    left, right = bases[count - 1], bases[count]
    return 1.0 - step * (count - (right - area) / (right - left))


def gt_foreground_mask(targets: list[dict[str, Tensor]], padded_size: tuple[int, int], pad_fg_pixel: int = 0,
                       criterion: str = "Fg1Bg0") -> Tensor:
    """GT boxes painted on the padded input canvas → (B, H_pad, W_pad) float.

    Boxes are the data contract's normalised cxcywh relative to ``target["size"]`` (the
    unpadded input); they become absolute xyxy pixels truncated to integers (official), are
    dilated by ``pad_fg_pixel`` and clamped to the image, and fill ``[y1:y2, x1:x2]``.
    """
    if criterion not in ("Fg1Bg0", "significance_value"):
        raise ValueError(f"mask criterion must be Fg1Bg0 or significance_value, got {criterion!r}")
    h_pad, w_pad = padded_size
    device = targets[0]["boxes"].device if targets else torch.device("cpu")
    canvas = torch.zeros(len(targets), h_pad, w_pad, device=device)
    for i, target in enumerate(targets):
        boxes = target["boxes"]
        if not len(boxes):
            continue
        h, w = (int(v) for v in target["size"])
        scale = boxes.new_tensor([w, h, w, h])
        xyxy = (box_cxcywh_to_xyxy(boxes) * scale).long()
        if pad_fg_pixel:
            xyxy = xyxy + xyxy.new_tensor([-pad_fg_pixel, -pad_fg_pixel, pad_fg_pixel, pad_fg_pixel])
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        for x1, y1, x2, y2 in xyxy.tolist():
            if criterion == "Fg1Bg0":
                canvas[i, y1:y2, x1:x2] = 1.0
            else:
                value = significance_value(float((x2 - x1) * (y2 - y1)))
                canvas[i, y1:y2, x1:x2] = canvas[i, y1:y2, x1:x2].clamp(min=value)
    return canvas


def mask_on_grid(fg_mask: Tensor, feature_size: tuple[int, int], key_padding_mask: Tensor | None) -> Tensor:
    """(B, H_pad, W_pad) canvas → (B, h·w) 0/1 foreground tokens; padding tokens are 0.

    Bilinear with ``align_corners=True``, then any non-zero value is foreground (official
    ``resize_ksgt_target``: cast to bool and back).
    """
    grid = F.interpolate(fg_mask[:, None].float(), size=tuple(feature_size), mode="bilinear", align_corners=True)
    fg = (grid[:, 0] != 0).flatten(1).float()
    if key_padding_mask is not None:
        fg = fg * (~key_padding_mask).float()
    return fg


# --------------------------------------------------------------------------- token modification
class SMLP(nn.Module):
    """``sMLP``: foreground tokens → ReLU(Linear(x)); other tokens unchanged (official ``smlp.py``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: Tensor, fg: Tensor) -> Tensor:
        """x (B, N, D), fg (B, N) 0/1 → (B, N, D)."""
        return torch.where(fg[..., None] > 0, F.relu(self.linear(x)), x)


def mark_tokens(x: Tensor, fg: Tensor) -> Tensor:
    """``Mark``: the last channel of every token := its 0/1 foreground value (official ``MarkFg1Bg0``)."""
    return torch.cat((x[..., :-1], fg[..., None].to(x.dtype)), dim=-1)


# --------------------------------------------------------------------------- attention
class TripleAttention(nn.Module):
    """Student + teacher attention with one packed input projection and one out-projection.

    ``in_proj_weight`` is (P·E, E) with the rows of :data:`PROJECTIONS` [variant]; the first 3E
    rows are the student's and equal a ``PackedMultiheadAttention``'s. Batch-first.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, variant: str = "triple") -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.variant = variant
        self.rows = PROJECTIONS[variant]
        self.in_proj_weight = nn.Parameter(torch.empty(len(self.rows) * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(len(self.rows) * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # Official MultiheadTripleAttention: xavier over the whole packed matrix, zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, name: str, x: Tensor) -> Tensor:
        i = self.rows.index(name)
        e = self.embed_dim
        return split_heads(F.linear(x, self.in_proj_weight[i * e:(i + 1) * e], self.in_proj_bias[i * e:(i + 1) * e]),
                           self.num_heads)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, teacher: dict[str, Tensor] | None = None,
                key_padding_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[list[Tensor], list[Tensor] | None]:
        """Student (and teacher) outputs, each (B, Nq, E) after the shared out-projection.

        ``teacher``: the teacher inputs ``q_t``, ``k_t``, ``v_t`` (those the variant uses);
        None → student only. Returns ([student, *teachers in :data:`TEACHERS` order],
        weights): with ``need_weights`` the pre-dropout per-head maps [A] or [A, A_t]
        (B, M, Nq, Nk); A_t only for variants with teacher Q/K.
        """
        q, k, v = (self._project(n, x) for n, x in (("q", query), ("k", key), ("v", value)))
        bias = attention_bias(key_padding_mask, None, q.shape[2], k.shape[2], q.shape[0], q.dtype, q.device)
        p = self.dropout if self.training else 0.0
        d = v.shape[-1]
        if teacher is None:
            out, w = multi_head_attention(q, k, v, bias, p, need_weights)
            return [self.out_proj(merge_heads(out))], (None if w is None else [w])
        uses_a = "v_t" in self.rows     # a teacher A·V_t (shares the student's attention map)
        uses_v = "q_t" in self.rows     # a teacher A_t·V (shares the student's values)
        weights = []
        outs = {}
        if uses_a:
            # One fused call: A·[V | V_t] shares A (and its dropout mask) between student and teacher.
            values = torch.cat((v, self._project("v_t", teacher["v_t"])), dim=-1)
            both, w = multi_head_attention(q, k, values, bias, p, need_weights)
            outs["student"], outs["share_a"] = both[..., :d], both[..., d:]
        else:
            outs["student"], w = multi_head_attention(q, k, v, bias, p, need_weights)
        weights.append(w)
        if uses_v:
            q_t, k_t = self._project("q_t", teacher["q_t"]), self._project("k_t", teacher["k_t"])
            outs["share_v"], w_t = multi_head_attention(q_t, k_t, v, bias, p, need_weights)
            weights.append(w_t)
        names = ("student",) + TEACHERS[self.variant]
        # One out-projection call over all branches (stacked on the batch dim).
        merged = self.out_proj(torch.cat([merge_heads(outs[n]) for n in names], dim=0))
        return list(merged.chunk(len(names), dim=0)), (weights if need_weights else None)


# --------------------------------------------------------------------------- encoder layer
class KSEncoderLayer(nn.Module):
    """A post-norm encoder layer with triple attention; drop-in for ``TransformerEncoderLayer``.

    Called without ``layer_inputs["ks_fg_mask"]`` it is exactly the plain layer on the
    student rows. With it (training), it returns the student and teacher outputs stacked on
    the batch dim, (S·B, N, D), S = 1 + number of teachers (see ``TransformerEncoder``).
    """

    takes_layer_inputs: ClassVar[bool] = True

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, options: KSOptions) -> None:
        super().__init__()
        self.options = options
        self.self_attn = TripleAttention(d_model, nhead, dropout=dropout, variant=options.variant)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        # The layer is built after the detector's Transformer._reset_parameters ran, so redo what it
        # does to every dim > 1 parameter (xavier_uniform_; official detrex
        # ConditionalDetrTransformer.init_weights covers the KS layer too): the packed in-projection,
        # out_proj (else PyTorch's default Linear init) and the FFN.
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        # Teacher-only module (official: one sMLP instance on the model); unused at test time. Built
        # after the loop: the official sMLP sits on the model's ksgt, outside the transformer whose
        # init_weights runs xavier, so it keeps PyTorch's default Linear init.
        self.smlp = SMLP(d_model) if options.token_masking == "sMLP" else None

    @classmethod
    def replacing(cls, layer: TransformerEncoderLayer, options: KSOptions) -> KSEncoderLayer:
        """A KS layer with the dimensions of ``layer`` (freshly initialised)."""
        attn = layer.self_attn
        return cls(attn.embed_dim, attn.num_heads, layer.linear1.out_features, attn.dropout, options)

    def modify_tokens(self, x: Tensor, fg: Tensor) -> Tensor:
        """The teacher's view of the tokens: foreground tokens modified (sMLP or Mark)."""
        return self.smlp(x, fg) if self.smlp is not None else mark_tokens(x, fg)

    def teacher_inputs(self, src: Tensor, pos: Tensor, fg: Tensor) -> dict[str, Tensor]:
        """q_t, k_t, v_t per ``masking_loc``: modified tokens where the location says, else the student's."""
        loc = self.options.location
        x_t = self.modify_tokens(src, fg)
        q_src = x_t if "Q" in loc or loc == "X" else src
        k_src = x_t if "K" in loc or loc == "X" else src
        v_src = x_t if "V" in loc or loc == "X" else src
        return {"q_t": q_src + pos, "k_t": k_src + pos, "v_t": v_src}

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None,
                layer_inputs: dict[str, Any] | None = None) -> Tensor:
        """src, pos (B, N, D) → (B, N, D), or (S·B, N, D) with ``layer_inputs["ks_fg_mask"]``."""
        teacher = None
        if layer_inputs is not None and layer_inputs.get("ks_fg_mask") is not None:
            fg = mask_on_grid(layer_inputs["ks_fg_mask"], layer_inputs["feature_size"], key_padding_mask)
            teacher = self.teacher_inputs(src, pos, fg)
        q = k = src + pos
        outs, _ = self.self_attn(q, k, src, teacher, key_padding_mask=key_padding_mask)
        streams = len(outs)
        # The residual of every branch is the student's input x (official identity = query).
        if streams > 1:
            identity, attn = src.repeat(streams, 1, 1), torch.cat(outs, dim=0)
        else:
            identity, attn = src, outs[0]
        # dropout1 as in the plain layer this one replaces; the official (detrex) layers have none after
        # attention, regular or KS alike (proj_drop 0): kept so KS and baseline differ only in attention.
        x = self.norm1(identity + self.dropout1(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ffn))

    def attention_maps(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None,
                       fg: Tensor) -> dict[str, Tensor]:
        """Per-head attention (B, M, N, N) of the student (``A``) and, if any, the teacher Q/K (``A_t``)."""
        teacher = self.teacher_inputs(src, pos, fg)
        q = k = src + pos
        _, weights = self.self_attn(q, k, src, teacher, key_padding_mask=key_padding_mask, need_weights=True)
        assert weights is not None
        maps = {"A": weights[0]}
        if len(weights) > 1:
            maps["A_t"] = weights[1]
        return maps


# --------------------------------------------------------------------------- the method
class KSDetr(TrainingMethod):
    """KS-DETR training: swap in the KS layer, feed it the GT mask, score the teachers' predictions."""

    name: ClassVar[str] = "ks_detr"
    Options: ClassVar[type] = KSOptions
    model_input_keys = frozenset({"encoder_inputs"})

    def __init__(self, cfg: Any, options: KSOptions) -> None:
        super().__init__(cfg, options)
        self.check_config(cfg, options)

    @classmethod
    def check_config(cls, cfg: Any, options: KSOptions) -> None:
        """The model must have the encoder layer to replace (checked when the config loads)."""
        enc_layers = getattr(cfg.model, "enc_layers", None)
        if enc_layers is None:  # e.g. model.family: cnn
            raise ConfigError("method.name: ks_detr replaces a transformer encoder layer, but this model "
                              f"({type(cfg.model).__name__}) has no transformer encoder")
        if enc_layers < 1:
            raise ConfigError(f"method.encoder_layer: KS-DETR replaces an encoder layer, but model.enc_layers is "
                              f"{enc_layers} (this model has no encoder layer to replace)")
        if not -enc_layers <= options.encoder_layer < enc_layers:
            raise ConfigError(f"method.encoder_layer: {options.encoder_layer} is out of range for "
                              f"model.enc_layers = {enc_layers}")
        if options.token_masking == "Mark" and cfg.model.hidden_dim < 2:
            raise ConfigError("method.token_masking: Mark needs model.hidden_dim >= 2")

    @property
    def teachers(self) -> tuple[str, ...]:
        """Names of the teacher branches, in the order of ``outputs["encoder_streams"]``."""
        return TEACHERS[self.options.variant]

    def build_model(self) -> nn.Module:
        """The config's detector with encoder layer ``encoder_layer`` replaced by a :class:`KSEncoderLayer`."""
        model = super().build_model()
        layers = model.transformer.encoder.layers
        index = self.options.encoder_layer % len(layers)
        layers[index] = KSEncoderLayer.replacing(layers[index], self.options)
        return model

    def setup(self, model: nn.Module, criterion: nn.Module, device: torch.device) -> None:
        """Register the teachers' prediction sets: matched on their own, weighted as the student's."""
        base = {k: criterion.weight_dict[k] for k in ("loss_ce", "loss_bbox", "loss_giou")}
        names = self.teachers

        def teacher_losses(outputs: dict[str, Any], targets: list[dict[str, Tensor]],
                           context: dict[str, Any]) -> dict[str, Tensor]:
            streams = outputs.get("encoder_streams")
            if streams is None:
                raise KeyError("KS-DETR: the outputs have no 'encoder_streams' (teacher predictions); "
                               "was the model called with encoder_inputs?")
            losses = {}
            for name, stream in zip(names, streams):
                # Official: only the teachers' last decoder layer is kept (teacher_attn_return_no_intermediate_out).
                terms, _ = criterion.prediction_set_terms(stream, targets, context["num_boxes"])
                losses.update({f"{k}_teacher_{name}": terms[k] for k in base})
            return losses

        criterion.register_loss(teacher_losses, {f"{k}_teacher_{name}": w for name in names for k, w in base.items()})

    def encoder_inputs(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The per-forward input of the KS layer: the GT canvas at the padded input size."""
        o = self.options
        return {"ks_fg_mask": gt_foreground_mask(targets, tuple(images.shape[-2:]), o.pad_fg_pixel, o.mask_criterion)}

    def model_inputs(self, model: nn.Module, images: Tensor, mask: Tensor,
                     targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        return {"encoder_inputs": self.encoder_inputs(images, targets)}

    def provenance(self) -> dict[str, Any]:
        return {"variant": self.options.variant, "masking_loc": self.options.location,
                "teachers": list(self.teachers)}
