"""Reproducible subsets of a COCO instances file (for smoke runs and CI on real COCO)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from replic.data.coco import DatasetError, load_coco_index, read_annotation_json
from replic.data.io import atomic_write_json


def _resolve_categories(
    ann_file: Path, categories: list[dict[str, Any]], wanted: Sequence[str | int]
) -> set[int]:
    """Map names or ids (ints or digit strings) to category ids, naming any unknown one."""
    by_name = {c["name"]: c["id"] for c in categories}
    ids = {c["id"] for c in categories}
    resolved = set()
    for item in wanted:
        if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
            cid = int(item)
            if cid not in ids:
                raise DatasetError(f"{ann_file}: no category with id {cid}; ids are {sorted(ids)}")
            resolved.add(cid)
        elif item in by_name:
            resolved.add(by_name[item])
        else:
            raise DatasetError(f"{ann_file}: no category named {item!r}; names are {sorted(by_name)}")
    return resolved


def subset_coco(
    ann_file: str | Path,
    n_images: int,
    seed: int,
    categories: Sequence[str | int] | None = None,
) -> dict[str, Any]:
    """Return a COCO dict with ``n_images`` images sampled with ``seed``.

    Without ``categories`` every image is eligible and all its annotations and all
    categories are kept (so category ids and ``num_classes`` stay those of the source).
    With ``categories`` (names or ids) only images holding at least one annotation
    of those categories are eligible, and only those annotations and categories are
    kept. Images are sampled without replacement from the eligible ids in ascending
    order, so the result depends only on the file contents, ``n_images`` and ``seed``.
    """
    path = Path(ann_file)
    data = read_annotation_json(path)
    index = load_coco_index(path, data)  # validates the file, naming problems
    if n_images <= 0:
        raise ValueError(f"--images must be positive, got {n_images}")
    keep_cats: set[int] | None = None
    if categories:
        keep_cats = _resolve_categories(path, data["categories"], categories)
        eligible = sorted(
            image_id
            for image_id, anns in index.annotations_by_image.items()
            if any(a["category_id"] in keep_cats for a in anns)
        )
    else:
        eligible = list(index.image_ids)
    if n_images > len(eligible):
        raise ValueError(
            f"{path}: asked for {n_images} images but only {len(eligible)} are eligible"
            + (f" for categories {sorted(keep_cats)}" if keep_cats else "")
        )
    rng = np.random.default_rng(seed)
    picked = set(int(i) for i in np.asarray(eligible)[rng.choice(len(eligible), n_images, replace=False)])

    images = [img for img in data["images"] if img["id"] in picked]
    images.sort(key=lambda img: img["id"])
    # Annotations come from the raw file (not the index) so degenerate boxes are carried
    # over untouched: the subset is a faithful slice, and the loader reports them.
    annotations = [
        ann
        for ann in data["annotations"]
        if ann["image_id"] in picked and (keep_cats is None or ann["category_id"] in keep_cats)
    ]
    cats = [c for c in data["categories"] if keep_cats is None or c["id"] in keep_cats]
    info = data.get("info")
    if not isinstance(info, dict):
        info = {}
    info = dict(info)
    info["description"] = (
        f"{info.get('description', '')} [subset of {path.name}: {n_images} images, seed {seed}"
        + (f", categories {sorted(keep_cats)}" if keep_cats else "")
        + "]"
    ).strip()
    return {
        "info": info,
        "licenses": data.get("licenses", []) if isinstance(data.get("licenses"), list) else [],
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }


def write_subset(
    ann_file: str | Path,
    n_images: int,
    seed: int,
    out_file: str | Path,
    categories: Sequence[str | int] | None = None,
) -> Path:
    """Compute ``subset_coco`` and write it atomically to ``out_file`` (stable JSON)."""
    subset = subset_coco(ann_file, n_images, seed, categories)
    out = Path(out_file)
    atomic_write_json(out, subset)
    return out
