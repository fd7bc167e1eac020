"""Feature cell → original-image pixel mapping, with resize and (large) padding."""

from __future__ import annotations

import numpy as np
import pytest

from replic.viz.geometry import ImageGeometry, attention_to_image, infer_stride


def _peak_centroid(image_map: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel-centre coordinates of the centroid of the pixels at the maximum."""
    ys, xs = np.nonzero(image_map >= image_map.max() * 0.999)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


@pytest.mark.parametrize(
    ("orig", "resized", "padded", "cell"),
    [
        # No padding, downscaled 2x by the transform.
        ((512, 384), (256, 192), (256, 192), (3, 4)),
        # Padded on the right and bottom by another (wider, taller) image in the batch.
        ((300, 200), (240, 160), (320, 480), (5, 2)),
        # Large padding: the valid image occupies a small top-left corner of the canvas.
        ((128, 80), (64, 40), (256, 256), (1, 0)),
        # Upscaled by the transform (small original).
        ((50, 70), (160, 224), (192, 256), (4, 6)),
    ],
)
def test_one_hot_cell_lands_on_its_original_pixel(orig, resized, padded, cell):
    stride = 32
    feature = (-(-padded[0] // stride), -(-padded[1] // stride))
    geometry = ImageGeometry(orig, resized, padded, feature, stride)
    grid = np.zeros(feature, dtype=np.float32)
    grid[cell] = 1.0
    on_image = attention_to_image(grid, geometry)
    assert on_image.shape == orig
    # Expected: the cell centre in resized pixels, scaled by original/resized per axis.
    expected_x = (cell[1] + 0.5) * stride * orig[1] / resized[1]
    expected_y = (cell[0] + 0.5) * stride * orig[0] / resized[0]
    peak_x, peak_y = _peak_centroid(on_image)
    tol_x = stride * orig[1] / resized[1]
    tol_y = stride * orig[0] / resized[0]
    # Cells cut by the image border have their centroid pulled inwards, never beyond a stride.
    assert abs(peak_x - expected_x) <= tol_x, (peak_x, expected_x)
    assert abs(peak_y - expected_y) <= tol_y, (peak_y, expected_y)
    # The map is zero more than two strides away from the cell (no leak across the image).
    ys, xs = np.mgrid[0 : orig[0], 0 : orig[1]]
    far = (np.abs(xs + 0.5 - expected_x) > 2 * tol_x) | (np.abs(ys + 0.5 - expected_y) > 2 * tol_y)
    assert on_image[far].max(initial=0.0) == 0.0


def test_padding_cells_are_cropped_away():
    """A map that is non-zero only in padding cells contributes nothing to the original image."""
    geometry = ImageGeometry((64, 64), (64, 64), (256, 256), (8, 8), 32)
    grid = np.zeros((8, 8), dtype=np.float32)
    grid[3:, :] = 1.0
    grid[:, 3:] = 1.0
    assert attention_to_image(grid, geometry).max() == 0.0
    grid[1, 1] = 2.0
    assert attention_to_image(grid, geometry).max() == pytest.approx(2.0)


def test_wrong_map_shape_is_rejected():
    geometry = ImageGeometry((64, 64), (64, 64), (64, 64), (2, 2), 32)
    with pytest.raises(ValueError, match="feature_size"):
        attention_to_image(np.zeros((3, 2)), geometry)


def test_geometry_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="exceeds padded_size"):
        ImageGeometry((10, 10), (100, 50), (64, 64), (2, 2), 32)
    with pytest.raises(ValueError, match="cannot cover"):
        ImageGeometry((10, 10), (64, 64), (256, 256), (2, 2), 32)


@pytest.mark.parametrize(("padded", "feature", "stride"), [((100, 70), (4, 3), 32), ((800, 1216), (25, 38), 32),
                                                             ((800, 1216), (50, 76), 16)])
def test_infer_stride(padded, feature, stride):
    assert infer_stride(padded, feature) == stride
