"""Head-extremity statistics: how much of a head's attention sits on each box edge.

Conditional DETR's claim (§4.5 / Fig. 1 of the paper) is that the spatial attention
of each decoder head concentrates on one extremity of the object (left, right, top or
bottom edge), whereas DETR's heads spread over the object. This module measures that.

For one attention map and one box, every point of the map is assigned to exactly one
region (so the six fractions sum to 1):

* ``left`` / ``right`` / ``top`` / ``bottom``: a band centred on that box edge, of
  total width ``band_frac`` × the box width (left/right) or height (top/bottom),
  running along the edge. Where two bands overlap (corners) the point goes to the edge
  it is relatively closer to.
* ``core``: inside the box, not in a band.
* ``outside``: everything else.

Coordinates are normalised to the resized, unpadded image (the ``pred_boxes``
convention), so the statistic does not depend on resize or padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from replic.viz.geometry import ImageGeometry, feature_cell_centers

REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "core", "outside")
EDGES: tuple[str, ...] = REGIONS[:4]


def region_labels(
    xs: np.ndarray, ys: np.ndarray, box_cxcywh: Sequence[float], band_frac: float = 0.25
) -> np.ndarray:
    """Region index (into ``REGIONS``) of every point (xs, ys) for one normalised cxcywh box."""
    if not 0.0 < band_frac <= 1.0:
        raise ValueError(f"band_frac must be in (0, 1], got {band_frac}")
    cx, cy, w, h = (float(v) for v in box_cxcywh)
    if w <= 0 or h <= 0:
        raise ValueError(f"box must have positive width and height, got cxcywh={list(box_cxcywh)}")
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    half_w, half_h = band_frac * w / 2, band_frac * h / 2
    # Distance to each edge in units of that band's half-width; <= 1 means inside the band.
    # A vertical-edge band only spans the box height (± the horizontal bands' reach).
    in_y_span = (ys >= y0 - half_h) & (ys <= y1 + half_h)
    in_x_span = (xs >= x0 - half_w) & (xs <= x1 + half_w)
    dist = np.stack(
        [
            np.where(in_y_span, np.abs(xs - x0) / half_w, np.inf),
            np.where(in_y_span, np.abs(xs - x1) / half_w, np.inf),
            np.where(in_x_span, np.abs(ys - y0) / half_h, np.inf),
            np.where(in_x_span, np.abs(ys - y1) / half_h, np.inf),
        ]
    )
    nearest = np.argmin(dist, axis=0)
    in_band = np.min(dist, axis=0) <= 1.0
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    labels = np.where(in_band, nearest, np.where(inside, 4, 5))
    return labels.astype(np.int64)


def region_fractions(
    attn_map: np.ndarray,
    box_cxcywh: Sequence[float],
    geometry: ImageGeometry,
    band_frac: float = 0.25,
    subdivisions: int = 8,
) -> dict[str, float]:
    """Fraction of one (H_f, W_f) map's mass in each region of ``REGIONS`` (sums to 1).

    Each feature cell's mass is spread evenly over ``subdivisions``² sample points, so a
    band narrower than a stride still receives its share of a cell it partly covers.
    """
    attn = np.asarray(attn_map, dtype=np.float64)
    if attn.shape != tuple(geometry.feature_size):
        raise ValueError(f"attention map shape {attn.shape} != feature_size {geometry.feature_size}")
    total = attn.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"attention map must have positive finite mass, got sum={total}")
    xs, ys = feature_cell_centers(geometry, subdivisions)
    labels = region_labels(xs, ys, box_cxcywh, band_frac)
    weights = np.broadcast_to((attn / total)[..., None] / xs.shape[-1], labels.shape)
    mass = np.bincount(labels.ravel(), weights=weights.ravel(), minlength=len(REGIONS))
    return {name: float(mass[i]) for i, name in enumerate(REGIONS)}


def region_areas(
    box_cxcywh: Sequence[float], geometry: ImageGeometry, band_frac: float = 0.25, subdivisions: int = 8
) -> dict[str, float]:
    """Each region's share of the valid image: the fractions a uniform attention map would give."""
    fh, fw = geometry.feature_size
    xs, ys = feature_cell_centers(geometry, subdivisions)
    valid = (xs < 1.0) & (ys < 1.0)
    labels = region_labels(xs, ys, box_cxcywh, band_frac)[valid]
    counts = np.bincount(labels, minlength=len(REGIONS)).astype(np.float64)
    counts /= max(counts.sum(), 1.0)
    return {name: float(counts[i]) for i, name in enumerate(REGIONS)}


def extremity_records(
    results: Iterable,  # Iterable[AttentionResult]; untyped to avoid an import cycle
    band_frac: float = 0.25,
    kind: str = "spatial",
    run: str = "",
) -> list[dict]:
    """One row per (image, query, head): region fractions of that head's map for that query's box.

    ``kind`` is ``"spatial"`` (Conditional DETR's spatial-only term; falls back to the full
    map for models that have none, recorded in the ``map`` column) or ``"full"``.
    """
    if kind not in ("spatial", "full"):
        raise ValueError(f"kind must be 'spatial' or 'full', got {kind!r}")
    rows: list[dict] = []
    for res in results:
        maps = res.cross_attn_spatial if kind == "spatial" and res.cross_attn_spatial is not None else res.cross_attn
        used = "spatial" if maps is res.cross_attn_spatial else "full"
        for k in range(maps.shape[0]):
            box = res.boxes_cxcywh[k].tolist()
            if box[2] <= 0 or box[3] <= 0:
                continue  # a degenerate predicted box has no edges to measure
            areas = region_areas(box, res.geometry, band_frac)
            for head in range(maps.shape[1]):
                fractions = region_fractions(maps[k, head].numpy(), box, res.geometry, band_frac)
                row = {
                    "run": run,
                    "image_id": res.image_id,
                    "layer": res.layer,
                    "query": int(res.query_indices[k]),
                    "score": float(res.scores[k]),
                    "head": head,
                    "map": used,
                }
                row.update(fractions)
                row["edge_area"] = sum(areas[e] for e in EDGES)
                rows.append(row)
    return rows


def summarize_by_head(records: Any) -> Any:
    """Aggregate per-query rows (list of dicts or DataFrame) into a DataFrame, one row per (run, layer, head).

    Extra columns: ``edges`` (sum of the four bands), ``edge_lift`` (``edges`` divided by
    the bands' mean share of the image, i.e. how much more than uniform attention sits on
    the box edges), ``dominant_edge`` (the band with the largest mean mass),
    ``dominant_share`` (its share of the four bands' mass, 0.25 = no preference) and
    ``n`` (number of query maps averaged).
    """
    import pandas as pd

    df = records if isinstance(records, pd.DataFrame) else pd.DataFrame(records)
    if df.empty:
        raise ValueError("no attention records to summarise (no query had a valid box)")
    keys = ["run", "layer", "head", "map"]
    summary = df.groupby(keys, sort=True)[[*REGIONS, "edge_area"]].mean()
    summary["n"] = df.groupby(keys, sort=True).size()
    summary["edges"] = summary[list(EDGES)].sum(axis=1)
    summary["edge_lift"] = summary["edges"] / summary["edge_area"].clip(lower=1e-12)
    edge_means = summary[list(EDGES)]
    summary["dominant_edge"] = edge_means.idxmax(axis=1)
    summary["dominant_share"] = edge_means.max(axis=1) / summary["edges"].clip(lower=1e-12)
    return summary.reset_index()


def merge_summaries(paths: Sequence[str], runs: Sequence[str], out: str) -> None:
    """Concatenate per-run summary CSVs into one table (``run`` column = the given names), atomically."""
    import pandas as pd

    from replic.data.io import atomic_write_bytes

    if len(paths) != len(runs):
        raise ValueError(f"{len(paths)} summary files but {len(runs)} run names")
    frames = []
    for path, run in zip(paths, runs):
        frame = pd.read_csv(path)
        missing = [c for c in ("head", *REGIONS) if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: not an extremity summary (missing columns {missing})")
        frame["run"] = run
        frames.append(frame)
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "head", *REGIONS])
    atomic_write_bytes(out, merged.to_csv(index=False, float_format="%.4f").encode())
