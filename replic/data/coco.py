"""COCO annotation loading with validation, and the one dataset class for real COCO and tiny sets.

Validation happens once, at construction, before any training work: malformed or
truncated JSON, missing required keys, duplicate ids, annotations pointing to unknown
images or categories and missing image files all raise ``DatasetError`` naming the
file and the offending record. Boxes with non-positive width or height are dropped
with a logged count, as they carry no trainable signal and break GIoU.

Semantics follow pycocotools: images are indexed in ascending id order (like
``sorted(coco.imgs)``), and each image's annotations keep their order in the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("id", "file_name", "height", "width")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")


class DatasetError(ValueError):
    """The dataset on disk is unusable; the message names the file and the problem."""


@dataclass
class CocoIndex:
    """A validated COCO annotation file: records by id and annotations grouped per image.

    Grouped annotations keep ``id``, ``category_id``, ``bbox``, ``area`` (``w*h`` if absent)
    and ``iscrowd`` (0 if absent), in file order.
    """

    path: Path
    images: dict[int, dict[str, Any]]
    categories: dict[int, dict[str, Any]]
    annotations_by_image: dict[int, list[dict[str, Any]]]
    image_ids: list[int] = field(default_factory=list)
    dropped_degenerate: int = 0


def read_annotation_json(path: str | Path) -> Any:
    """Parse a COCO annotation file; ``DatasetError`` naming the file if missing, truncated or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path}: malformed or truncated JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 JSON: {err}") from err


def _require(path: Path, record: Any, keys: tuple[str, ...], what: str, position: int) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"{path}: {what}[{position}] is not an object: {record!r:.80}")
    for key in keys:
        if key not in record:
            ident = f" (id {record['id']})" if "id" in record else ""
            raise DatasetError(f"{path}: {what}[{position}]{ident} is missing required key '{key}'")


def _require_int(path: Path, record: dict[str, Any], key: str, what: str, position: int) -> None:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{path}: {what}[{position}] '{key}' must be an integer, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_coco_index(ann_file: str | Path, data: Any = None) -> CocoIndex:
    """Read and validate a COCO instances file; raise ``DatasetError`` on the first problem.

    ``data`` may pass the already-parsed JSON of ``ann_file`` to avoid reading it twice.
    """
    path = Path(ann_file)
    if data is None:
        data = read_annotation_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: missing required top-level key '{key}'")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")

    categories: dict[int, dict[str, Any]] = {}
    for i, cat in enumerate(data["categories"]):
        _require(path, cat, CATEGORY_KEYS, "categories", i)
        _require_int(path, cat, "id", "categories", i)
        if cat["id"] in categories:
            raise DatasetError(f"{path}: categories[{i}] repeats category id {cat['id']}")
        categories[cat["id"]] = cat

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        _require(path, img, IMAGE_KEYS, "images", i)
        _require_int(path, img, "id", "images", i)
        if img["id"] in images:
            raise DatasetError(f"{path}: images[{i}] repeats image id {img['id']}")
        images[img["id"]] = img

    by_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    seen_ann_ids: set[Any] = set()
    dropped = 0
    for i, ann in enumerate(data["annotations"]):
        _require(path, ann, ANNOTATION_KEYS, "annotations", i)
        if ann["id"] in seen_ann_ids:
            raise DatasetError(f"{path}: annotations[{i}] repeats annotation id {ann['id']}")
        seen_ann_ids.add(ann["id"])
        if ann["image_id"] not in images:
            raise DatasetError(
                f"{path}: annotations[{i}] (id {ann['id']}) points to unknown image id {ann['image_id']!r}"
            )
        if ann["category_id"] not in categories:
            raise DatasetError(
                f"{path}: annotations[{i}] (id {ann['id']}) has unknown category id {ann['category_id']!r}"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(
                f"{path}: annotations[{i}] (id {ann['id']}) 'bbox' must be 4 finite numbers, got {bbox!r}"
            )
        where = f"{path}: annotations[{i}] (id {ann['id']})"
        if "area" in ann and not _is_number(ann["area"]):
            raise DatasetError(f"{where} 'area' must be a number, got {ann['area']!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise DatasetError(f"{where} 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            dropped += 1
            continue
        # Keep only what targets need: segmentations are most of real COCO's memory, and the
        # index is copied into every DataLoader worker.
        by_image[ann["image_id"]].append(
            {
                "id": ann["id"],
                "category_id": ann["category_id"],
                "bbox": [float(v) for v in bbox],
                "area": float(ann.get("area", bbox[2] * bbox[3])),
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )
    if dropped:
        log.warning("%s: dropped %d annotation(s) with non-positive box width or height", path, dropped)

    return CocoIndex(
        path=path,
        images=images,
        categories=categories,
        annotations_by_image=by_image,
        image_ids=sorted(images),
        dropped_degenerate=dropped,
    )


def check_image_files(index: CocoIndex, img_folder: str | Path) -> None:
    """Raise ``DatasetError`` naming the first image referenced by ``index`` that is not on disk."""
    folder = Path(img_folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found (annotations: {index.path})")
    root = os.fspath(folder)
    missing = [
        image_id
        for image_id in index.image_ids
        if not os.path.isfile(os.path.join(root, index.images[image_id]["file_name"]))
    ]
    if missing:
        first = index.images[missing[0]]["file_name"]
        raise DatasetError(
            f"{os.path.join(root, first)}: image file not found (image id {missing[0]}, "
            f"referenced by {index.path}); {len(missing)} of {len(index.image_ids)} images missing"
        )


def num_classes_for(annotation_file: str | Path) -> int:
    """Number of class logits under the official convention: max category id + 1 (91 for COCO)."""
    index = load_coco_index(annotation_file)
    if not index.categories:
        raise DatasetError(f"{annotation_file}: no categories")
    return max(index.categories) + 1


Transform = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset (real COCO 2017 or the synthetic/subset sets).

    Items are ``(image, target)``. Before ``transforms`` the image is a
    ``tv_tensors.Image`` (uint8, 3 x H x W) and the target holds ``boxes`` as
    ``tv_tensors.BoundingBoxes`` in absolute XYXY, ``labels`` (raw category ids),
    ``area``, ``iscrowd``, ``image_id`` and ``orig_size`` (h, w) / ``size``. The
    transforms from ``make_transforms`` turn this into the data contract of
    docs/architecture.md (normalised image, normalised cxcywh boxes).

    Args:
        img_folder: folder with the image files named in the annotation file.
        ann_file: COCO instances JSON.
        transforms: callable ``(image, target) -> (image, target)``, or None.
        remove_crowd: drop ``iscrowd=1`` annotations from targets (DETR does).
        check_files: verify every referenced image exists, at construction.
    """

    def __init__(
        self,
        img_folder: str | Path,
        ann_file: str | Path,
        transforms: Transform | None = None,
        remove_crowd: bool = True,
        check_files: bool = True,
    ) -> None:
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.index = load_coco_index(self.ann_file)
        if check_files:
            check_image_files(self.index, self.img_folder)
        self.transforms = transforms
        self.remove_crowd = remove_crowd
        self.ids = list(self.index.image_ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def categories(self) -> dict[int, dict[str, Any]]:
        """Category records by (raw, non-contiguous) id."""
        return self.index.categories

    def load_image(self, image_id: int) -> Image.Image:
        """Open one image as RGB, naming the file if it cannot be decoded."""
        path = self.img_folder / self.index.images[image_id]["file_name"]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError) as err:
            raise DatasetError(f"{path}: cannot read image (image id {image_id}): {err}") from err

    def raw_target(self, image_id: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Boxes (absolute XYXY, clipped to the image), labels, area, iscrowd, as DETR prepares them."""
        anns = self.index.annotations_by_image[image_id]
        if self.remove_crowd:
            anns = [a for a in anns if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        # Boxes lying wholly outside the image collapse to zero size after clipping.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        area = torch.tensor([a["area"] for a in anns], dtype=torch.float32)
        iscrowd = torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64)
        return {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "area": area[keep],
            "iscrowd": iscrowd[keep],
        }

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, Any]]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        image_id = self.ids[idx]
        pil = self.load_image(image_id)
        width, height = pil.size
        raw = self.raw_target(image_id, height, width)
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(raw["boxes"], format="XYXY", canvas_size=(height, width)),
            "labels": raw["labels"],
            "area": raw["area"],
            "iscrowd": raw["iscrowd"],
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
