"""The maths of MasKD (Huang et al., ICLR 2023, arXiv 2205.14589), free of checkpoints and training.

Read next to the paper's method section (overview: its Fig. 2) and the authors' file
``mmrazor/mmrazor/models/losses/maskd.py`` (``hunto/MasKD`` @ b5af34f). Most of the paper's
equation numbers are not in our sources (docs/maskd.md cites only Eq. 10, for the loss weight
λ = 1), so each piece is named by the paper's own word for it:

* **receptive tokens** and their masks by pixel-wise attention, M_t = sigmoid(token_t · x) per
  pixel: :class:`ReceptiveTokens`, :meth:`~ReceptiveTokens.masks` (official ``MaskModule``,
  ``mask_token``, ``forward_mask``);
* **mask weighting module**, p = softmax_T(Conv1×1(GAP(Conv3×3(x)))) per image:
  :meth:`~ReceptiveTokens.weights` (official ``prob``, ``forward_prob``);
* **mask learning** (stage 1): the frozen teacher's task loss on Σ_t p_t (x ⊙ M_t):
  :meth:`ReceptiveTokens.forward` (official ``forward_train``; the hook is in
  ``mmdetection/maskd_hook.py``);
* **Dice loss** making the masks diverse: :func:`dice_diversity` (official ``dice_coeff``);
* **masked distillation** (stage 2), the student reconstructs the teacher's features under each mask,
  weighted by p: :func:`masked_distillation` (official ``MasKDLoss.forward``, its loop body);
* **student-customised masks**, M ← M(T) ⊙ stopgrad(M(S)) after a warm-up, and the per-level
  assembly: :func:`level_loss` (official ``custom_mask`` branch of ``MasKDLoss.forward``).

Shapes: features (N, C, H, W); masks (N, T, H, W); token weights (N, T). The checkpoint layout of
the tokens, the feature taps and the two training stages are in :mod:`replic.methods.maskd`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ReceptiveTokens", "dice_diversity", "level_loss", "masked_distillation"]


class ReceptiveTokens(nn.Module):
    """T receptive tokens on one feature level (official ``MaskModule``,
    ``mmrazor/mmrazor/models/losses/maskd.py``).

    Parameters (official names, so released checkpoints load): ``mask_token`` (T, C), initialised
    N(0, 0.01); with ``weighting``, ``prob`` = Conv3×3(C→C) → global average pool → Conv1×1(C→T),
    He-normal (fan-out) weights and zero biases.
    """

    def __init__(self, channels: int, num_tokens: int, weighting: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weighting = weighting
        self.mask_token = nn.Parameter(torch.empty(num_tokens, channels).normal_(0.0, 0.01, generator=generator))
        if weighting:
            self.prob = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                      nn.Conv2d(channels, num_tokens, 1))
            for conv in (self.prob[0], self.prob[2]):
                fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
                conv.weight.data.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
                conv.bias.data.zero_()

    @property
    def num_tokens(self) -> int:
        return self.mask_token.shape[0]

    def masks(self, x: Tensor) -> Tensor:
        """(N, C, H, W) features → (N, T, H, W) masks ``sigmoid(token_t · x[:, :, h, w])``."""
        return torch.einsum("tc,nchw->nthw", self.mask_token, x).sigmoid()

    def weights(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, T) token weights p, a softmax over the tokens (uniform without weighting)."""
        if not self.weighting:
            return x.new_full((x.shape[0], self.num_tokens), 1.0 / self.num_tokens)
        return self.prob(x).flatten(1).softmax(dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 1: (masked features Σ_t p_t (x ⊙ M_t), masks). Without weighting: Σ_t x ⊙ M_t (official)."""
        masks = self.masks(x)
        if self.weighting:
            coeff = masks * self.weights(x)[:, :, None, None]
        else:
            coeff = masks
        return x * coeff.sum(dim=1, keepdim=True), masks


def dice_diversity(masks: Tensor, eps: float = 1e-12) -> Tensor:
    """Dice coefficient between every ordered pair (i ≠ j) of token masks, averaged (``dice_coeff``).

    ``masks`` (N, T, H, W); d_ij = 2 Σ M_i M_j / (Σ M_i² + Σ M_j² + 2 eps), the mean over the batch and
    the T(T−1) off-diagonal pairs. Minimising it makes the tokens look at different pixels. One
    token has no pair: 0.
    """
    flat = masks.flatten(2)
    num_tokens = flat.shape[1]
    if num_tokens < 2:
        return flat.sum() * 0.0
    inter = flat @ flat.transpose(1, 2)  # (N, T, T): Σ M_i M_j
    sq = (flat * flat).sum(-1) + eps  # (N, T)
    dice = 2 * inter / (sq[:, :, None] + sq[:, None, :])
    off = ~torch.eye(num_tokens, dtype=torch.bool, device=masks.device)
    return dice[:, off].mean()


def masked_distillation(student: Tensor, teacher: Tensor, masks: Tensor, weights: Tensor | None,
                        eps: float = 1e-12) -> Tensor:
    """One level of the MasKD loss (official ``MasKDLoss.forward``).

    ``student`` / ``teacher`` (N, C, H, W) (student already aligned), ``masks`` (N, T, H, W),
    ``weights`` (N, T) or None. Per (image, token, channel): Σ_pixels (M ⊙ (S − T))² / Σ_pixels M;
    mean over channels, weighted sum over tokens, mean over images. Without weights: the mean over
    images, tokens and channels (official ``weight_mask=False``). A mask with zero mass contributes
    0 (its numerator is 0; the denominator is clamped at ``eps`` — the official code divides by 0).
    """
    diff = (masks[:, :, None] * (student - teacher)[:, None]) ** 2  # (N, T, C, H, W)
    per = diff.sum((3, 4)) / masks.sum((2, 3)).clamp_min(eps)[:, :, None]  # (N, T, C)
    if weights is None:
        return per.mean()
    return (per.mean(-1) * weights).sum(-1).mean()


def level_loss(student: Tensor, teacher: Tensor, tokens: ReceptiveTokens, customise: bool,
               weighting: bool) -> Tensor:
    """Stage 2 on one level: :func:`masked_distillation` of the aligned ``student`` towards the
    ``teacher`` under the teacher's token masks (official ``MasKDLoss.forward`` loop body).

    With ``customise`` (after the warm-up) the masks are multiplied by the student's own masks
    ("student-customised masks"); with ``weighting`` the tokens are weighted by p(teacher). Masks and
    weights carry no gradient (frozen tokens; the official code computes the student's masks under
    ``no_grad``): only the student's features receive one.
    """
    with torch.no_grad():
        masks = tokens.masks(teacher)
        if customise:
            masks = masks * tokens.masks(student)
        weights = tokens.weights(teacher) if weighting else None
    return masked_distillation(student, teacher, masks, weights)
