"""Where a feature-map cell lands on the original image: resize and padding undone.

A detector sees the image resized (short side ``val_size``, long side capped) and
zero-padded bottom/right to the batch's largest size; its C5 feature map has one
cell per ``stride`` × ``stride`` block of that padded canvas. To overlay an
attention map on the *original* picture we therefore (1) spread every cell over
its stride block, (2) crop away the padding, keeping the resized image's valid
top-left region, and (3) rescale that region to the original size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageGeometry:
    """Sizes (h, w) that link one image's feature map to its original pixels."""

    orig_size: tuple[int, int]  # the file on disk
    resized_size: tuple[int, int]  # after the transforms, before padding (target["size"])
    padded_size: tuple[int, int]  # the batch tensor (B, 3, Hp, Wp)
    feature_size: tuple[int, int]  # the feature map the decoder attends to
    stride: int  # padded-canvas pixels per feature cell

    def __post_init__(self) -> None:
        for name in ("orig_size", "resized_size", "padded_size", "feature_size"):
            h, w = getattr(self, name)
            if h <= 0 or w <= 0:
                raise ValueError(f"ImageGeometry.{name} must be positive, got {(h, w)}")
        rh, rw = self.resized_size
        ph, pw = self.padded_size
        if rh > ph or rw > pw:
            raise ValueError(
                f"ImageGeometry: resized_size {self.resized_size} exceeds padded_size {self.padded_size}"
            )
        fh, fw = self.feature_size
        if fh * self.stride < ph - self.stride or fw * self.stride < pw - self.stride:
            raise ValueError(
                f"ImageGeometry: feature map {self.feature_size} at stride {self.stride} "
                f"cannot cover the padded image {self.padded_size}"
            )

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Original pixels per resized pixel, along x and along y."""
        return (
            self.orig_size[1] / self.resized_size[1],
            self.orig_size[0] / self.resized_size[0],
        )

    def cell_center_in_original(self, row: int, col: int) -> tuple[float, float]:
        """(x, y) in original-image pixels of the centre of feature cell (row, col)."""
        sx, sy = self.scale_xy
        return ((col + 0.5) * self.stride * sx, (row + 0.5) * self.stride * sy)

    def stride_in_original(self) -> tuple[float, float]:
        """One feature stride measured in original-image pixels (x, y)."""
        sx, sy = self.scale_xy
        return (self.stride * sx, self.stride * sy)


def infer_stride(padded_size: tuple[int, int], feature_size: tuple[int, int]) -> int:
    """The backbone stride: the power of two closest to padded/feature size (32, or 16 for DC5).

    ResNet rounds odd sizes up at every stride-2 stage, so padded/feature is not an
    exact integer (e.g. 100 px → 4 cells); the nearest power of two is.
    """
    ratio = max(padded_size[0] / feature_size[0], padded_size[1] / feature_size[1])
    return int(2 ** round(math.log2(ratio)))


def attention_to_image(attn_map: torch.Tensor | np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Map a (H_f, W_f) feature-grid map to a (h_orig, w_orig) array over the original image.

    Each cell's value covers its whole stride block (nearest), padding is cropped, and
    the valid region is resized bilinearly to the original size. Values are per-pixel
    intensities (not renormalised): the peak stays where the cell was.
    """
    grid = torch.as_tensor(np.asarray(attn_map, dtype=np.float32))
    if grid.shape != torch.Size(geometry.feature_size):
        raise ValueError(
            f"attention map shape {tuple(grid.shape)} does not match feature_size {geometry.feature_size}"
        )
    s = geometry.stride
    canvas = grid.repeat_interleave(s, dim=0).repeat_interleave(s, dim=1)
    rh, rw = geometry.resized_size
    valid = canvas[:rh, :rw]
    if valid.shape != (rh, rw):  # feature map one cell short of the canvas: pad with zeros
        valid = F.pad(valid, (0, rw - valid.shape[1], 0, rh - valid.shape[0]))
    oh, ow = geometry.orig_size
    if (oh, ow) == (rh, rw):
        return valid.numpy().copy()
    out = F.interpolate(valid[None, None], size=(oh, ow), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def feature_cell_centers(geometry: ImageGeometry, subdivisions: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) coordinates, in *normalised valid-image* units, of sample points of every cell.

    Returns arrays of shape (H_f, W_f, n*n): each cell is split into ``subdivisions``²
    sub-cells so that region masses can be measured finer than one stride. Normalised
    coordinates are what ``pred_boxes`` use (relative to the resized, unpadded image).
    """
    n = subdivisions
    fh, fw = geometry.feature_size
    s = geometry.stride
    rh, rw = geometry.resized_size
    offsets = (np.arange(n) + 0.5) / n
    rows = (np.arange(fh)[:, None] + offsets[None, :]) * s / rh  # (fh, n)
    cols = (np.arange(fw)[:, None] + offsets[None, :]) * s / rw  # (fw, n)
    ys = np.broadcast_to(rows[:, None, :, None], (fh, fw, n, n)).reshape(fh, fw, n * n)
    xs = np.broadcast_to(cols[None, :, None, :], (fh, fw, n, n)).reshape(fh, fw, n * n)
    return xs, ys
