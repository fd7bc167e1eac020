"""Figure functions: non-blank PNGs, and the overlay peak drawn where the feature cell is."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from replic.viz.attention import AttentionResult
from replic.viz.geometry import ImageGeometry
from replic.viz.plots import (
    figure_png_bytes,
    matching_query,
    plot_heads,
    plot_model_comparison,
    plot_spatial_vs_full,
    save_figure,
)

STRIDE = 32


def _result(geometry: ImageGeometry, heads: int = 2, queries: int = 1, spatial: bool = True,
            cell: tuple[int, int] = (0, 0), box_xyxy=(10.0, 10.0, 40.0, 50.0)) -> AttentionResult:
    fh, fw = geometry.feature_size
    maps = torch.zeros(queries, heads, fh, fw)
    maps[:, :, cell[0], cell[1]] = 1.0
    h, w = geometry.orig_size
    xyxy = torch.tensor([box_xyxy] * queries, dtype=torch.float32)
    cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                          (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h], dim=-1)
    return AttentionResult(
        image_id=1, layer=5, query_indices=torch.arange(queries), scores=torch.linspace(0.9, 0.5, queries),
        labels=torch.ones(queries, dtype=torch.int64), boxes_cxcywh=cxcywh, boxes_xyxy=xyxy,
        cross_attn=maps, cross_attn_spatial=maps.clone() if spatial else None,
        key_padding=torch.zeros(fh, fw, dtype=torch.bool), geometry=geometry,
    )  # fmt: skip


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int32)


def _image(geometry: ImageGeometry, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (*geometry.orig_size, 3), dtype=np.uint8)


def test_figures_write_non_blank_pngs(tmp_path):
    geometry = ImageGeometry((120, 90), (240, 180), (256, 224), (8, 7), STRIDE)
    result = _result(geometry, heads=3, queries=2, cell=(2, 3))
    image = _image(geometry)
    figures = {
        "heads": plot_heads(image, result, query=1),
        "spatial": plot_heads(image, result, query=0, spatial=True),
        "pair": plot_spatial_vs_full(image, result),
        "compare": plot_model_comparison(image, _result(geometry, heads=3, spatial=False), result),
    }
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / f"{name}.png")
        with Image.open(path) as png:
            assert png.format == "PNG"
            assert png.width > 0 and png.height > 0
        pixels = _png_pixels(path.read_bytes())
        # Not a blank canvas: many distinct colours (image + colormap), not one flat fill.
        assert pixels.std() > 10, name
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, name
    # Nothing but the PNG is left in the folder (atomic write leaves no temp file).
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in figures)


def test_same_figure_gives_same_bytes():
    geometry = ImageGeometry((64, 64), (64, 64), (64, 64), (2, 2), STRIDE)
    result = _result(geometry)
    image = _image(geometry)
    assert figure_png_bytes(plot_heads(image, result)) == figure_png_bytes(plot_heads(image, result))


@pytest.mark.parametrize(
    ("orig", "resized", "padded", "cell"),
    [
        ((200, 300), (160, 240), (160, 256), (2, 5)),  # downscaled, a little padding
        ((100, 60), (64, 40), (256, 256), (1, 0)),  # large padding: valid image is a small corner
    ],
)
def test_overlay_peak_is_drawn_at_the_cells_original_pixel(orig, resized, padded, cell):
    """Render one head over a black image and find the hottest colour in the PNG.

    The jet colormap's top is dark red; its location in figure pixels, mapped back through
    the axes' data transform, must be the cell centre in original-image coordinates.
    """
    feature = (-(-padded[0] // STRIDE), -(-padded[1] // STRIDE))
    geometry = ImageGeometry(orig, resized, padded, feature, STRIDE)
    result = _result(geometry, heads=1, spatial=False, cell=cell, box_xyxy=(0.0, 0.0, 1.0, 1.0))
    fig = plot_heads(np.zeros((*orig, 3), dtype=np.uint8), result)
    pixels = _png_pixels(figure_png_bytes(fig))
    ax = fig.axes[0]
    # The overlay layer has the original image's shape and extent.
    overlay = ax.images[1]
    assert overlay.get_array().shape == orig
    assert tuple(overlay.get_extent()) == (0, orig[1], orig[0], 0)
    # "Hot" pixels: red well above blue (jet's top end is dark red, its bottom dark blue;
    # image, text and box are grey levels with red == blue).
    red = (pixels[..., 0] - pixels[..., 2]) > 40
    assert red.any()
    rows, cols = np.nonzero(red)
    inv = ax.transData.inverted()
    height = pixels.shape[0]
    data_x, data_y = inv.transform(np.column_stack([cols + 0.5, height - (rows + 0.5)])).mean(axis=0)
    expected_x = (cell[1] + 0.5) * STRIDE * orig[1] / resized[1]
    expected_y = (cell[0] + 0.5) * STRIDE * orig[0] / resized[0]
    assert abs(data_x - expected_x) <= STRIDE * orig[1] / resized[1]
    assert abs(data_y - expected_y) <= STRIDE * orig[0] / resized[0]


def test_wrong_image_and_missing_spatial_maps_are_clear_errors():
    geometry = ImageGeometry((64, 48), (64, 48), (64, 64), (2, 2), STRIDE)
    result = _result(geometry, spatial=False)
    with pytest.raises(ValueError, match="original"):
        plot_heads(np.zeros((32, 48, 3), dtype=np.uint8), result)
    with pytest.raises(ValueError, match="spatial"):
        plot_spatial_vs_full(_image(geometry), result)
    with pytest.raises(ValueError, match="PNG"):
        save_figure(plot_heads(_image(geometry), result), "figure.jpg")


def test_comparison_picks_the_overlapping_baseline_query():
    geometry = ImageGeometry((64, 64), (64, 64), (64, 64), (2, 2), STRIDE)
    baseline = _result(geometry, queries=3, spatial=False)
    baseline.boxes_xyxy = torch.tensor([[0.0, 0, 10, 10], [30, 30, 60, 60], [5, 40, 20, 60]])
    assert matching_query(baseline, torch.tensor([32.0, 28, 58, 62])) == 1
    assert matching_query(baseline, torch.tensor([6.0, 42, 18, 58])) == 2
