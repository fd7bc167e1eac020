"""Deterministic synthetic detection data in the exact COCO 2017 layout.

``generate_synthetic_coco`` writes::

    OUT/annotations/instances_train2017.json
    OUT/annotations/instances_val2017.json
    OUT/train2017/000000000001.jpg ...
    OUT/val2017/000001000001.jpg ...

What the data looks like, and why:

* Each category is a distinct shape (circle, square, triangle, ring, cross, star,
  diamond, hexagon) so the class is learnable from the shape; colour and texture
  (solid, stripes, checker, noise) are drawn independently of the class.
* Category ids are non-contiguous with supercategories (1, 2, 3, 5, 7, 11, 13, 17),
  like COCO's gaps in 1..90, so ``num_classes = max id + 1`` code paths are exercised.
* Backgrounds are gradients plus pixel noise plus unannotated distractor scribbles.
* Objects overlap (larger ones are drawn first so small ones stay visible).
* Object sizes target all three COCO area buckets (small < 32², medium, large > 96²);
  buckets are absolute pixel areas, so a large object needs an image of more than
  96² px: the first object of every third image (index 2, 5, ...) targets the large
  bucket, and from ``size`` 160 up every split with three or more non-empty images
  has all three buckets (smaller sizes still get some large objects where an image
  allows). The default ``size`` is 320 (longest image side); image sizes and aspect
  ratios vary (landscape and portrait).
* Every 10th image (index 9, 19, ...) has no objects; images with index 3 mod 7
  carry one ``iscrowd: 1`` cluster of small shapes with an uncompressed-RLE
  segmentation. Ordinary objects have a polygon segmentation (the outline that was
  rasterised; a ring lists its outer outline only).
* ``area`` is the pixel count of the object's full rasterised shape (COCO uses the
  segmentation area; here occlusion by later objects is not subtracted). ``bbox``
  is the tight pixel box of that shape, ``[x, y, w, h]`` in COCO's convention.

Reproducibility: each image is drawn from its own generator seeded with
``(seed, split, index)``, JPEGs are written by PIL at a fixed quality without
metadata, and the JSON is encoded with sorted keys, so the same arguments give
byte-identical files. Files are written atomically; existing annotation files are
removed first and both are written after all images, so a dataset with its JSON
present is complete. (Re-using a folder with fewer images leaves the extra old
JPEGs on disk, unreferenced.)
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from replic.data.io import atomic_write_bytes, atomic_write_json

DEFAULT_SIZE = 320
MIN_SIZE = 64
JPEG_QUALITY = 90

# (id, name, supercategory, fill fraction of its box, max aspect ratio of its box)
SHAPES: tuple[tuple[int, str, str, float, float], ...] = (
    (1, "circle", "round", 0.78, 1.25),
    (2, "square", "polygon", 1.0, 1.25),
    (3, "triangle", "polygon", 0.5, 1.8),
    (5, "ring", "round", 0.5, 1.25),
    (7, "cross", "symbol", 0.56, 1.5),
    (11, "star", "symbol", 0.35, 1.25),
    (13, "diamond", "polygon", 0.5, 1.6),
    (17, "hexagon", "polygon", 0.75, 1.3),
)
CATEGORIES: list[dict[str, Any]] = [
    {"id": cid, "name": name, "supercategory": sup} for cid, name, sup, _, _ in SHAPES
]
# Shapes that fill most of their box: used when a large object must fit a small image.
COMPACT_SHAPES = (0, 1, 7)

SPLITS = {"train": ("train2017", 0, 0), "val": ("val2017", 1, 1_000_000)}

# Target pixel areas per COCO bucket: small < 32², 32² <= medium <= 96², large > 96².
SMALL_AREA = (8.0**2, 30.0**2)
MEDIUM_AREA = (36.0**2, 88.0**2)
LARGE_MIN_AREA = 104.0**2
BUCKET_PROBS = (0.4, 0.35, 0.25)
EMPTY_EVERY = 10
CROWD_MOD = (7, 3)


@dataclass
class _Object:
    category_id: int
    bbox: list[float]
    area: int
    segmentation: Any
    iscrowd: int


def _shape_polygon(shape_index: int, w: int, h: int) -> list[list[tuple[float, float]]]:
    """Outline polygon(s) of a shape filling a w x h box, in local pixel coordinates.

    The first polygon is the filled outline; a second one (rings only) is the hole.
    """
    x1, y1 = w - 1.0, h - 1.0
    cx, cy = x1 / 2, y1 / 2
    name = SHAPES[shape_index][1]

    def ellipse(rx: float, ry: float, n: int = 32) -> list[tuple[float, float]]:
        return [
            (cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n))
            for k in range(n)
        ]

    if name == "circle":
        return [ellipse(cx, cy)]
    if name == "ring":
        return [ellipse(cx, cy), ellipse(cx * 0.55, cy * 0.55)]
    if name == "square":
        return [[(0, 0), (x1, 0), (x1, y1), (0, y1)]]
    if name == "triangle":
        return [[(cx, 0), (x1, y1), (0, y1)]]
    if name == "diamond":
        return [[(cx, 0), (x1, cy), (cx, y1), (0, cy)]]
    if name == "hexagon":
        return [[(x1 * 0.25, 0), (x1 * 0.75, 0), (x1, cy), (x1 * 0.75, y1), (x1 * 0.25, y1), (0, cy)]]
    if name == "cross":
        a, b = 1 / 3, 2 / 3
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
        return [[(x * x1, y * y1) for x, y in pts]]
    if name == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            ang = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + r * cx * math.cos(ang), cy + r * cy * math.sin(ang)))
        return [pts]
    raise AssertionError(name)


def _rasterise(polygons: list[list[tuple[float, float]]], w: int, h: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(polygons[0], fill=1)
    for hole in polygons[1:]:
        draw.polygon(hole, fill=0)
    return np.asarray(canvas, dtype=bool)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], amplitude: int) -> np.ndarray:
    """Uniform integer pixel noise in [-amplitude, amplitude] (much cheaper than Gaussian draws)."""
    return rng.integers(-amplitude, amplitude + 1, size=shape, dtype=np.int16).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (h, w, 3) float texture: solid, stripes, checker or noise."""
    kind = int(rng.integers(0, 4))
    c1 = _colour(rng)
    if kind == 0:
        return np.broadcast_to(c1, (h, w, 3))
    if kind == 3:
        return np.clip(c1 + _noise(rng, (h, w, 3), 50), 0, 255)
    c2 = _colour(rng)
    # Make sure the two colours of a pattern are distinguishable.
    if np.abs(c1 - c2).sum() < 120:
        c2 = 255.0 - c1
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    period = float(rng.uniform(3.0, 10.0))
    if kind == 1:
        theta = float(rng.uniform(0, math.pi))
        phase = np.floor((xx * math.cos(theta) + yy * math.sin(theta)) / period) % 2
    else:
        phase = (np.floor(xx / period) + np.floor(yy / period)) % 2
    return np.where(phase[..., None] > 0, c1, c2)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Linear colour gradient in a random direction plus pixel noise (float32 for speed)."""
    c1, c2 = _colour(rng), _colour(rng)
    theta = float(rng.uniform(0, 2 * math.pi))
    ys = np.arange(h, dtype=np.float32)[:, None] * np.float32(math.sin(theta))
    xs = np.arange(w, dtype=np.float32)[None, :] * np.float32(math.cos(theta))
    t = xs + ys
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c1 + (c2 - c1) * t[..., None]
    img += _noise(rng, (h, w, 3), int(rng.integers(3, 21)))
    return img


def _scribbles(rng: np.random.Generator, img: np.ndarray, count: int) -> np.ndarray:
    """Unannotated distractors: thin random polylines and arcs."""
    h, w = img.shape[:2]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        width = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            n = int(rng.integers(2, 6))
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(n)]
            draw.line(pts, fill=colour, width=width)
        else:
            x0, y0 = float(rng.uniform(-w / 4, w)), float(rng.uniform(-h / 4, h))
            box = (x0, y0, x0 + float(rng.uniform(10, w / 2)), y0 + float(rng.uniform(10, h / 2)))
            start = float(rng.uniform(0, 360))
            draw.arc(box, start, start + float(rng.uniform(40, 300)), fill=colour, width=width)
    return np.asarray(pil, dtype=np.float32).copy()


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(height, width): long side in [0.85, 1] * size, aspect 0.6..1, landscape or portrait."""
    long_side = int(round(size * rng.uniform(0.85, 1.0)))
    short_side = int(round(long_side * rng.uniform(0.6, 1.0)))
    if rng.random() < 0.6:
        return short_side, long_side
    return long_side, short_side


def _box_dims(
    rng: np.random.Generator, shape_index: int, bucket: int, img_h: int, img_w: int
) -> tuple[int, int]:
    """Box (w, h) whose shape area falls in the requested bucket, as far as the image allows."""
    _, _, _, fill, max_ar = SHAPES[shape_index]
    max_w, max_h = img_w - 2, img_h - 2
    if bucket == 0:
        lo, hi = SMALL_AREA
    elif bucket == 1:
        lo, hi = MEDIUM_AREA
    else:
        lo = LARGE_MIN_AREA
        hi = max(lo, min(240.0**2, 0.7 * max_w * max_h * fill))
    target = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    box_area = target / fill
    ar = math.exp(rng.uniform(-math.log(max_ar), math.log(max_ar)))
    bw, bh = math.sqrt(box_area * ar), math.sqrt(box_area / ar)
    # Shrink to fit the image, trading aspect ratio for area where one side is too long.
    if bw > max_w:
        bw, bh = max_w, min(max_h, box_area / max_w)
    if bh > max_h:
        bh, bw = max_h, min(max_w, box_area / max_h)
    return max(3, int(round(bw))), max(3, int(round(bh)))


def _paint(img: np.ndarray, mask: np.ndarray, tex: np.ndarray, x0: int, y0: int) -> None:
    h, w = mask.shape
    np.copyto(img[y0 : y0 + h, x0 : x0 + w], tex, where=mask[..., None])


def _tight_bbox(mask: np.ndarray, x0: int, y0: int) -> list[float]:
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [
        float(x0 + cols[0]),
        float(y0 + rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    ]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


MAX_COVER = 0.5
PLACEMENT_TRIES = 8


def _place(
    rng: np.random.Generator, bw: int, bh: int, img_w: int, img_h: int, placed: list[list[float]]
) -> tuple[int, int]:
    """Top-left corner for a bw x bh box: overlaps are allowed, near-total occlusion is avoided.

    Tries a few random positions and keeps the first that covers at most ``MAX_COVER`` of
    every earlier box (else the least covering one), so objects stay learnable.
    """
    best, best_cover = (0, 0), math.inf
    for _ in range(PLACEMENT_TRIES):
        x0 = int(rng.integers(0, img_w - bw + 1))
        y0 = int(rng.integers(0, img_h - bh + 1))
        cover = 0.0
        for px, py, pw, ph in placed:
            iw = min(x0 + bw, px + pw) - max(x0, px)
            ih = min(y0 + bh, py + ph) - max(y0, py)
            if iw > 0 and ih > 0:
                cover = max(cover, iw * ih / (pw * ph))
        if cover <= MAX_COVER:
            return x0, y0
        if cover < best_cover:
            best, best_cover = (x0, y0), cover
    return best


def _crowd(rng: np.random.Generator, img: np.ndarray) -> _Object | None:
    """A cluster of small same-class shapes, annotated once with iscrowd=1."""
    img_h, img_w = img.shape[:2]
    shape_index = int(rng.integers(0, len(SHAPES)))
    rw = int(min(img_w - 2, rng.uniform(0.25, 0.45) * img_w))
    rh = int(min(img_h - 2, rng.uniform(0.25, 0.45) * img_h))
    if rw < 20 or rh < 20:
        return None
    rx, ry = int(rng.integers(0, img_w - rw)), int(rng.integers(0, img_h - rh))
    full = np.zeros((img_h, img_w), dtype=bool)
    tex_all = _texture(rng, img_h, img_w)
    for _ in range(int(rng.integers(5, 13))):
        s = int(rng.integers(5, 13))
        x0 = rx + int(rng.integers(0, max(1, rw - s)))
        y0 = ry + int(rng.integers(0, max(1, rh - s)))
        mask = _rasterise(_shape_polygon(shape_index, s, s), s, s)
        full[y0 : y0 + s, x0 : x0 + s] |= mask
    if not full.any():
        return None
    np.copyto(img, tex_all, where=full[..., None])
    return _Object(
        category_id=SHAPES[shape_index][0],
        bbox=_tight_bbox(full, 0, 0),
        area=int(full.sum()),
        segmentation=_uncompressed_rle(full),
        iscrowd=1,
    )


def _render_image(seed: int, split_code: int, index: int, size: int) -> tuple[np.ndarray, list[_Object]]:
    """Draw one image and its annotations from a generator seeded by (seed, split, index)."""
    rng = np.random.default_rng([seed, split_code, index])
    img_h, img_w = _image_size(rng, size)
    img = _background(rng, img_h, img_w)
    img = _scribbles(rng, img, int(rng.integers(2, 9)))
    objects: list[_Object] = []

    if index % CROWD_MOD[0] == CROWD_MOD[1]:
        crowd = _crowd(rng, img)
        if crowd is not None:
            objects.append(crowd)

    n_objects = 0 if index % EMPTY_EVERY == EMPTY_EVERY - 1 else int(rng.integers(1, 7))
    plans = []
    for k in range(n_objects):
        # The first object cycles through the buckets so every split covers all three.
        bucket = index % 3 if k == 0 else int(rng.choice(3, p=BUCKET_PROBS))
        if k == 0 and bucket == 2:
            shape_index = int(rng.choice(COMPACT_SHAPES))
            # In a small image only a square (fill 1) is sure to exceed 96² px.
            if (img_w - 2) * (img_h - 2) * SHAPES[shape_index][3] < 1.3 * LARGE_MIN_AREA:
                shape_index = 1
        else:
            shape_index = int(rng.integers(0, len(SHAPES)))
        bw, bh = _box_dims(rng, shape_index, bucket, img_h, img_w)
        plans.append((bw * bh, shape_index, bw, bh))
    # Large first, so small objects drawn later stay visible where they overlap.
    plans.sort(key=lambda p: -p[0])
    for _, shape_index, bw, bh in plans:
        polygons = _shape_polygon(shape_index, bw, bh)
        mask = _rasterise(polygons, bw, bh)
        if not mask.any():
            continue
        x0, y0 = _place(rng, bw, bh, img_w, img_h, [o.bbox for o in objects if not o.iscrowd])
        _paint(img, mask, _texture(rng, bh, bw), x0, y0)
        outline = [round(v, 2) for x, y in polygons[0] for v in (x + x0, y + y0)]
        objects.append(
            _Object(
                category_id=SHAPES[shape_index][0],
                bbox=_tight_bbox(mask, x0, y0),
                area=int(mask.sum()),
                segmentation=[outline],
                iscrowd=0,
            )
        )
    # A few distractors on top of the objects as well, for clutter.
    img = _scribbles(rng, img, int(rng.integers(0, 3)))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # No EXIF, no timestamps: PIL writes only the JFIF header, so bytes depend on pixels only.
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


def _annotation_path(out_dir: Path, split: str) -> Path:
    return out_dir / "annotations" / f"instances_{SPLITS[split][0]}.json"


def _generate_split(out_dir: Path, split: str, n_images: int, size: int, seed: int) -> dict[str, Any]:
    """Write the split's images; return its COCO payload (written later, last)."""
    folder, split_code, id_offset = SPLITS[split]
    image_dir = out_dir / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = id_offset + 1
    for index in range(n_images):
        image_id = id_offset + index + 1
        pixels, objects = _render_image(seed, split_code, index, size)
        file_name = f"{image_id:012d}.jpg"
        atomic_write_bytes(image_dir / file_name, _jpeg_bytes(pixels))
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": int(pixels.shape[0]),
                "width": int(pixels.shape[1]),
                "license": 0,
            }
        )
        for obj in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": obj.category_id,
                    "bbox": obj.bbox,
                    "area": obj.area,
                    "iscrowd": obj.iscrowd,
                    "segmentation": obj.segmentation,
                }
            )
            ann_id += 1
    payload = {
        "info": {
            "description": f"replic synthetic COCO-format detection data (seed={seed}, size={size})",
            "version": "1.0",
            "year": 2017,
            "contributor": "replic.data.synth",
            "date_created": "",
            "url": "",
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    return payload


def _check_root_is_a_folder(out: Path) -> None:
    """Refuse a dataset root that is (or lies under) an existing file, before writing anything.

    ``mkdir`` would fail there with a bare FileExistsError / NotADirectoryError traceback.
    """
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == out else f"lies under {path}, which is"
                raise ValueError(f"{out}: the dataset root must be a directory, but it {where} "
                                 "an existing file")
            return


def generate_synthetic_coco(
    out_dir: str | Path,
    n_train: int = 128,
    n_val: int = 32,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
) -> dict[str, Path]:
    """Write a synthetic COCO-2017-layout detection dataset and return its paths.

    Args:
        out_dir: dataset root (created if missing).
        n_train, n_val: number of images per split (>= 0).
        size: longest image side in pixels (>= 64); sides vary in [0.85, 1] * size
            with aspect ratios 0.6..1.
        seed: generator seed; the same arguments give byte-identical files.

    Returns:
        ``{"root", "train_images", "val_images", "train_annotations", "val_annotations"}``.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError(f"image counts must be >= 0, got train={n_train} val={n_val}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    out = Path(out_dir)
    _check_root_is_a_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    # A stale annotation file would mark a half-rewritten dataset as complete: remove it first.
    for split in SPLITS:
        _annotation_path(out, split).unlink(missing_ok=True)
    counts = {"train": n_train, "val": n_val}
    payloads = {split: _generate_split(out, split, n, size, seed) for split, n in counts.items()}
    # Annotation files are written last: their presence marks the dataset as complete.
    for split, payload in payloads.items():
        atomic_write_json(_annotation_path(out, split), payload)
    train_ann, val_ann = _annotation_path(out, "train"), _annotation_path(out, "val")
    return {
        "root": out,
        "train_images": out / SPLITS["train"][0],
        "val_images": out / SPLITS["val"][0],
        "train_annotations": train_ann,
        "val_annotations": val_ann,
    }
