"""Sinusoidal position encodings.

* :class:`PositionEmbeddingSine` — DETR's 2-D encoding of the image feature map
  (normalised coordinates, scale 2π, temperature 10000, **y channels before x**).
* :func:`gen_sineembed_for_position` — Conditional DETR's encoding of the (sigmoid-space)
  reference points, the same frequencies and layout so p_s and the keys' positions live
  in one space.

In both, channel 2j holds sin(c / T_j) and channel 2j+1 holds cos(c / T_j) with
T_j = temperature^(2j / num_pos_feats) — sin and cos interleaved, as in the official code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _frequencies(num_pos_feats: int, temperature: float, device: torch.device) -> Tensor:
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """(..., F) angles → (..., F) with even channels sin, odd channels cos."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """2-D sine position encoding of a padded feature map (no parameters).

    Coordinates are the cumulative count of non-padded cells along each axis, divided by
    the last value (+1e-6) and multiplied by ``scale`` (2π), so padding does not shift the
    encoding of the real image region.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale given but normalize is False")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, H, W) bool, True = padding → position encoding (B, 2·num_pos_feats, H, W)."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def gen_sineembed_for_position(points: Tensor, d_model: int = 256, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of (x, y) points in [0, 1]: (..., 2) → (..., d_model), laid out (pos_y, pos_x).

    The official code hard-codes 128 features per coordinate (d_model = 256); here it is
    d_model / 2 so tiny test models work — identical at d_model = 256.
    """
    num_feats = d_model // 2
    dim_t = _frequencies(num_feats, temperature, points.device)
    scale = 2 * math.pi
    pos_x = _interleave_sin_cos(points[..., 0, None] * scale / dim_t)
    pos_y = _interleave_sin_cos(points[..., 1, None] * scale / dim_t)
    return torch.cat((pos_y, pos_x), dim=-1)
