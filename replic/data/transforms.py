"""The DETR / Conditional DETR augmentation recipe on ``torchvision.transforms.v2`` tensors.

Every transform is a callable ``(image, target) -> (image, target)`` where ``image``
is a ``tv_tensors.Image`` and ``target["boxes"]`` a ``tv_tensors.BoundingBoxes`` in
absolute XYXY; the geometric work is done by ``torchvision.transforms.v2.functional``
so image and boxes are always transformed by the same kernel. Randomness comes only
from torch's global generator (``torch.rand`` / ``torch.randint``), so the engine
seeds and checkpoints it, and ``DataLoader`` workers get distinct derived seeds.

Training (official ``datasets/coco.py``): horizontal flip, then with probability
``resize_only_prob`` (a) a random short-side resize to one of ``train_scales`` with
the long side capped at ``max_size``, otherwise (b) a resize to one of
``crop_scales``, a random crop with sides in ``crop_size``, then (a). Validation:
short side ``val_size``, long side capped at ``val_max_size``. Both end with
ImageNet normalisation and normalised cxcywh boxes (the data contract).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from replic.data.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict[str, Any]
Pair = tuple[Any, Target]

# Per-box target fields that must be filtered together with the boxes.
PER_BOX_KEYS = ("labels", "area", "iscrowd")


def _rand() -> float:
    return float(torch.rand(()).item())


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive), from torch's generator."""
    return int(torch.randint(low, high + 1, ()).item())


def detr_resize_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) for a short side of ``size`` with the long side capped near ``max_size``.

    Same arithmetic as DETR's ``get_size_with_aspect_ratio``: when the cap binds, the
    short side becomes ``round(max_size * short / long)`` and the long side is
    ``int(short_new * long / short)``, which can exceed ``max_size`` by one pixel.
    Kept as is, so sizes match the official pipeline.
    """
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def mmdet_resize_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) of mmcv's ``imrescale`` with ``keep_ratio`` to the scale (max_size, size).

    The factor is min(max_size / long side, size / short side) (no cap without ``max_size``),
    each side becomes ``int(side * factor + 0.5)``: the MMDetection 2.x ``Resize`` arithmetic.
    """
    factor = size / min(height, width)
    if max_size is not None:
        factor = min(factor, max_size / max(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


_SIZE_RULES = {"detr": detr_resize_size, "mmdet": mmdet_resize_size}


def _canvas(image: torch.Tensor) -> tuple[int, int]:
    return int(image.shape[-2]), int(image.shape[-1])


def _filter_boxes(target: Target, keep: torch.Tensor) -> Target:
    out = dict(target)
    out["boxes"] = tv_tensors.wrap(target["boxes"][keep], like=target["boxes"])
    for key in PER_BOX_KEYS:
        if key in out:
            out[key] = out[key][keep]
    return out


def resize(image: tv_tensors.Image, target: Target, out_hw: tuple[int, int]) -> Pair:
    """Resize image and boxes to exactly ``out_hw``; areas scale with the pixel ratio."""
    old_h, old_w = _canvas(image)
    new_h, new_w = out_hw
    image = F.resize(image, [new_h, new_w], antialias=True)
    target = dict(target)
    target["boxes"] = F.resize(target["boxes"], [new_h, new_w])
    if "area" in target:
        target["area"] = target["area"] * ((new_w / old_w) * (new_h / old_h))
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return image, target


def crop(image: tv_tensors.Image, target: Target, top: int, left: int, height: int, width: int) -> Pair:
    """Crop; boxes are clamped to the crop and those left with no area are dropped (DETR)."""
    image = F.crop(image, top, left, height, width)
    target = dict(target)
    boxes = F.crop(target["boxes"], top, left, height, width)
    target["boxes"] = boxes
    xyxy = boxes.as_subclass(torch.Tensor)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    if "area" in target:
        target["area"] = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return image, _filter_boxes(target, keep)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[..., Pair]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> Pair:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Flip image and boxes left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: tv_tensors.Image, target: Target) -> Pair:
        if _rand() < self.p:
            image = F.horizontal_flip(image)
            target = dict(target)
            target["boxes"] = F.horizontal_flip(target["boxes"])
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the short side to one of ``sizes`` (uniform), long side capped at ``max_size``.

    ``rule``: the size arithmetic, ``"detr"`` (:func:`detr_resize_size`) or ``"mmdet"``
    (:func:`mmdet_resize_size`).
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None, rule: str = "detr") -> None:
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size
        self.rule = rule
        self._size_fn = _SIZE_RULES[rule]

    def __call__(self, image: tv_tensors.Image, target: Target) -> Pair:
        # A single size draws nothing, so validation leaves the RNG stream untouched.
        size = self.sizes[0] if len(self.sizes) == 1 else self.sizes[_randint(0, len(self.sizes) - 1)]
        h, w = _canvas(image)
        return resize(image, target, self._size_fn(h, w, size, self.max_size))

    def __repr__(self) -> str:
        rule = "" if self.rule == "detr" else f", rule={self.rule!r}"
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size}{rule})"


class RandomSizeCrop:
    """Crop a random region whose sides are uniform in [min_size, min(side, max_size)].

    A side already shorter than ``min_size`` (possible at smoke scale) is kept whole.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: tv_tensors.Image, target: Target) -> Pair:
        img_h, img_w = _canvas(image)
        hi_w, hi_h = min(img_w, self.max_size), min(img_h, self.max_size)
        crop_w = _randint(min(self.min_size, hi_w), hi_w)
        crop_h = _randint(min(self.min_size, hi_h), hi_h)
        top = _randint(0, img_h - crop_h)
        left = _randint(0, img_w - crop_w)
        return crop(image, target, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Callable[..., Pair], second: Callable[..., Pair], p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Any, target: Target) -> Pair:
        if _rand() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


class NormalizeToContract:
    """Float image with ImageNet normalisation; boxes to normalised cxcywh plain tensors."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: tv_tensors.Image, target: Target) -> Pair:
        h, w = _canvas(image)
        pixels = F.to_dtype(image, torch.float32, scale=True)
        pixels = F.normalize(pixels, mean=self.mean, std=self.std).as_subclass(torch.Tensor)
        target = dict(target)
        boxes = F.convert_bounding_box_format(
            target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH
        ).as_subclass(torch.Tensor)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        target["boxes"] = (boxes.to(torch.float32) / scale).reshape(-1, 4)
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
        return pixels.contiguous(), target

    def __repr__(self) -> str:
        return "NormalizeToContract()"


def make_transforms(split: str, cfg: DataConfig | None = None) -> Compose:
    """The DETR augmentation recipe for ``split`` ("train" or "val"), sized by ``cfg``."""
    cfg = cfg or DataConfig()
    if split == "train":
        rule = cfg.resize_rule
        resize_a = RandomResize(cfg.train_scales, max_size=cfg.max_size, rule=rule)
        branch_b = Compose(
            [
                RandomResize(cfg.crop_scales),
                RandomSizeCrop(*cfg.crop_size),
                RandomResize(cfg.train_scales, max_size=cfg.max_size, rule=rule),
            ]
        )
        return Compose(
            [
                RandomHorizontalFlip(cfg.hflip_prob),
                RandomSelect(resize_a, branch_b, p=cfg.resize_only_prob),
                NormalizeToContract(),
            ]
        )
    if split == "val":
        return Compose([RandomResize([cfg.val_size], max_size=cfg.val_max_size, rule=cfg.resize_rule),
                        NormalizeToContract()])
    raise ValueError(f"unknown split {split!r}: expected 'train' or 'val'")
