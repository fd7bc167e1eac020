"""Head-extremity statistics on synthetic attention maps with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from replic.viz.attention import AttentionResult
from replic.viz.extremity import (
    REGIONS,
    extremity_records,
    merge_summaries,
    region_areas,
    region_fractions,
    summarize_by_head,
)
from replic.viz.geometry import ImageGeometry

# A 256 x 256 image, stride 8 → a 32 x 32 grid; the box spans pixels 64..192 both ways.
GEOMETRY = ImageGeometry((256, 256), (256, 256), (256, 256), (32, 32), 8)
BOX = (0.5, 0.5, 0.5, 0.5)  # normalised cxcywh
# band_frac 0.25 → bands are 0.125 x 128 px = 32 px wide, centred on the edges:
# left x in 48..80 (cells 6..9), right 176..208 (cells 22..25), same rows for top/bottom.
EDGE_CELLS = {
    "left": (slice(11, 21), slice(6, 10)),
    "right": (slice(11, 21), slice(22, 26)),
    "top": (slice(6, 10), slice(11, 21)),
    "bottom": (slice(22, 26), slice(11, 21)),
    "core": (slice(12, 20), slice(12, 20)),
    "outside": (slice(0, 4), slice(0, 4)),
}


@pytest.mark.parametrize("region", list(EDGE_CELLS))
def test_mass_in_one_region_is_measured_there(region):
    grid = np.zeros((32, 32))
    grid[EDGE_CELLS[region]] = 1.0
    fractions = region_fractions(grid, BOX, GEOMETRY, band_frac=0.25)
    assert fractions[region] == pytest.approx(1.0, abs=1e-9)
    assert sum(fractions.values()) == pytest.approx(1.0)
    for other in REGIONS:
        if other != region:
            assert fractions[other] == pytest.approx(0.0, abs=1e-9)


def test_fractions_partition_random_maps_and_uniform_matches_area():
    rng = np.random.default_rng(0)
    for _ in range(5):
        grid = rng.random((32, 32))
        fractions = region_fractions(grid, BOX, GEOMETRY)
        assert sum(fractions.values()) == pytest.approx(1.0)
    uniform = region_fractions(np.ones((32, 32)), BOX, GEOMETRY)
    areas = region_areas(BOX, GEOMETRY)
    for name in REGIONS:
        assert uniform[name] == pytest.approx(areas[name], abs=1e-9)
    # Four 32 px bands along 128(+) px edges, minus corner overlaps: about a quarter of the image.
    band_total = sum(areas[e] for e in ("left", "right", "top", "bottom"))
    assert 0.2 < band_total < 0.3
    assert areas["core"] == pytest.approx((96 / 256) ** 2, abs=1e-9)


def test_band_width_is_configurable():
    grid = np.zeros((32, 32))
    grid[11:21, 9] = 1.0  # cell 9: x 72..80, i.e. 8..16 px right of the left edge
    assert region_fractions(grid, BOX, GEOMETRY, band_frac=0.25)["left"] == pytest.approx(1.0)
    narrow = region_fractions(grid, BOX, GEOMETRY, band_frac=0.125)  # band ±8 px: cell is outside it
    assert narrow["left"] == pytest.approx(0.0, abs=1e-9)
    assert narrow["core"] == pytest.approx(1.0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="band_frac"):
        region_fractions(np.ones((32, 32)), BOX, GEOMETRY, band_frac=0.0)
    with pytest.raises(ValueError, match="positive width"):
        region_fractions(np.ones((32, 32)), (0.5, 0.5, 0.0, 0.2), GEOMETRY)
    with pytest.raises(ValueError, match="positive finite mass"):
        region_fractions(np.zeros((32, 32)), BOX, GEOMETRY)


def _result(maps: torch.Tensor, box=BOX, spatial: torch.Tensor | None = None) -> AttentionResult:
    k = maps.shape[0]
    boxes = torch.tensor([box] * k, dtype=torch.float32)
    return AttentionResult(
        image_id=7, layer=5, query_indices=torch.arange(k), scores=torch.full((k,), 0.9),
        labels=torch.ones(k, dtype=torch.int64), boxes_cxcywh=boxes, boxes_xyxy=boxes * 256,
        cross_attn=maps, cross_attn_spatial=spatial, key_padding=torch.zeros(32, 32, dtype=torch.bool),
        geometry=GEOMETRY,
    )  # fmt: skip


def test_summary_per_head_finds_each_heads_edge():
    """Head h puts its mass on edge h for every query: the summary names that edge with share 1."""
    edges = ["left", "right", "top", "bottom"]
    maps = torch.zeros(3, 4, 32, 32)
    for head, edge in enumerate(edges):
        rows, cols = EDGE_CELLS[edge]
        maps[:, head, rows, cols] = 1.0
    maps /= maps.sum(dim=(-2, -1), keepdim=True)
    spread = torch.full((3, 4, 32, 32), 1.0 / 1024)  # "full" attention: uniform, no preference
    records = extremity_records([_result(spread, spatial=maps)], band_frac=0.25, kind="spatial", run="cdetr")
    assert len(records) == 3 * 4
    summary = summarize_by_head(records)
    assert list(summary["head"]) == [0, 1, 2, 3]
    assert list(summary["dominant_edge"]) == edges
    assert np.allclose(summary["dominant_share"], 1.0)
    assert np.allclose(summary["edges"], 1.0)
    assert (summary["edge_lift"] > 3).all()
    assert (summary["n"] == 3).all()
    # The full maps of the same results: uniform, so edge mass ≈ band area and lift ≈ 1.
    full = summarize_by_head(extremity_records([_result(spread, spatial=maps)], kind="full", run="cdetr"))
    assert np.allclose(full["edge_lift"], 1.0, atol=1e-6)
    assert (full["map"] == "full").all()


def test_models_without_spatial_maps_fall_back_to_full():
    maps = torch.full((1, 2, 32, 32), 1.0 / 1024)
    records = extremity_records([_result(maps)], kind="spatial", run="detr")
    assert {r["map"] for r in records} == {"full"}


def test_degenerate_boxes_are_skipped_and_empty_summary_is_an_error():
    maps = torch.full((1, 2, 32, 32), 1.0 / 1024)
    records = extremity_records([_result(maps, box=(0.5, 0.5, 0.0, 0.3))])
    assert records == []
    with pytest.raises(ValueError, match="no attention records"):
        summarize_by_head(records)


def test_merge_summaries_labels_runs_and_rejects_other_csvs(tmp_path):
    maps = torch.full((1, 2, 32, 32), 1.0 / 1024)
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.csv"
        summarize_by_head(extremity_records([_result(maps)], kind="full", run="x")).to_csv(path, index=False)
        paths.append(str(path))
    out = tmp_path / "merged.csv"
    merge_summaries(paths, ["detr_r50", "cdetr_r50"], str(out))
    merged = pd.read_csv(out)
    assert list(merged["run"]) == ["detr_r50", "detr_r50", "cdetr_r50", "cdetr_r50"]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv: not an extremity summary"):
        merge_summaries([str(other)], ["x"], str(out))
