"""Data-pipeline parity with the official code: Conditional DETR (Atten4Vis/ConditionalDETR) and
DETR (facebookresearch/detr) ``datasets/coco.py``, ``datasets/transforms.py``, ``util/misc.py``.

Each test runs only when ``REPLIC_OFFICIAL_CONDDETR`` / ``REPLIC_OFFICIAL_DETR`` points at a
checkout of the official repository (never vendored here)::

    REPLIC_OFFICIAL_CONDDETR=<ConditionalDETR checkout> REPLIC_OFFICIAL_DETR=<detr checkout> \\
        .venv/bin/python -m pytest -p no:xdist tests/test_data_official_parity.py -q -s

(about 31 s for both checkouts on 2 busy cores, 15 s of it the ``slow`` distribution test; ``-s``
prints the measured differences). The authors' modules are imported in-process from the checkout;
``sys.path`` and ``sys.modules`` are put back right after, so their top-level ``datasets``/``util``
shadow nothing, and ``torchvision.__version__`` is patched around the import of ``util/misc.py``
(its version check breaks on some torchvision versions).

Inputs: a synthetic COCO set written by the test, 8 PNG images (noise on a colour gradient, the
hardest case for two resamplers to agree on): 640x480, 427x640, 500x500, 640x200 and 150x613 (the
1333 cap binds at every scale), 1200x800 (val resizes nothing), one without annotations, one with
only a crowd box; ids non-contiguous and out of order. Boxes: a grid of 13 float boxes plus edge
cases (partly outside on each side, wholly outside left and right, zero width, zero height,
negative width, crowd, no ``iscrowd`` key, 0.001 px wide, the whole image, an integer area). Both
sides read the same files through their own dataset class (the authors' ``CocoDetection`` +
``ConvertCocoPolysToMask``, replic's ``build_dataset``), sized by the paper-scale data config of
``configs/experiments/cdetr_r50_50ep.yaml``.

What is compared, and how:

* **Recipe**: scales, caps, crop sizes, probabilities, normalisation and crowd handling of that
  config against the authors' ``make_coco_transforms`` objects: equal.
* **Resize arithmetic**: the authors' ``get_size_with_aspect_ratio`` (nested in ``resize``, called
  through its code object) against :func:`replic.data.transforms.detr_resize_size`, 4,489 (h, w)
  x 15 (size, cap) settings: equal.
* **The random streams cannot be aligned**: the authors draw the flip, the branch, the scales and
  the crop size from Python's ``random`` (``random()``, ``choice``, ``randint``) and the crop
  offsets from torch (``RandomCrop.get_params``, which draws nothing for a whole-image crop);
  replic draws everything from torch (``torch.rand`` / ``torch.randint``), always draws both
  offsets, and draws nothing for a one-size list (val). Hence two train tests:

  - **Same decisions, same outputs**: the authors' draws are logged (their module's ``random``
    replaced by a logging wrapper around a seeded ``random.Random``, their ``crop`` by a logging
    pass-through) and replayed into replic's ``_rand`` / ``_randint``, which check that every call
    comes in the same order with the same range; replic must not touch Python's ``random``.
    8 images x 10 seeds (asserted to cover both flips, both branches and crops that drop boxes);
    every output compared in full.
  - **Same distribution**: 1,000 draws per side for each of the 6 annotated image sizes, on
    stand-in images that cost nothing to resize (PIL mode "1" for the authors, a 0-channel tensor
    for replic) through the real pipelines minus the final normalisation. Flip and branch rates:
    binomial test against 0.5 on each side and Fisher's exact test between the sides; output
    (h, w), output short side, branch-(a) (h, w), branch-(b) resized (h, w) before the crop and
    kept-box counts: chi-square homogeneity (categories under 10 draws pooled); crop height,
    width, relative offsets and branch-(b) output height and width: two-sample Kolmogorov-Smirnov.
    Each of the 102 tests needs p > 1e-4 (so about 1e-2 chance of a false alarm on other seeds).
    Exact: on both sides the branch-(a) sizes and the pre-crop sizes are the theoretical supports,
    crop sides lie in [384, min(side, 600)] and crops inside the image.
* **Val**: the same files through both val pipelines, every image compared in full.
* **Batch padding**: the authors' ``collate_fn`` / ``nested_tensor_from_tensor_list`` against
  replic's ``collate_fn`` on the val outputs (up to 800 x 1333) and on mixed-size random tensors:
  ``torch.equal`` on images and masks, targets passed through as the same objects.
* **Annotation conversion**: both datasets without transforms: pixels, boxes (clipped xyxy),
  labels, area, iscrowd, size, orig_size, image ids and order equal exactly; 18 of the 24
  annotations of each annotated image kept on both sides.

Tolerances, on full tensors: images (normalised) at most PIXEL_LEVELS = 2 uint8 levels apart per
element (|diff| x 255 x std_c) and PIXEL_MEAN_LEVELS = 0.1 on average; boxes (normalised cxcywh)
2e-6 absolute; area 1e-6 relative; labels, iscrowd, size, orig_size, image_id values, padded batches
and masks exact.

Measured (2026-12-07, 2 busy CPU cores, torch 2.14.1, torchvision 0.29.1, Pillow 13.0.0; the same with
both checkouts, whose data code differs only in comments and dataset paths):

* The one numeric difference is resampling: the authors resize PIL images (Pillow's bilinear
  filter), replic uint8 tensors (torch's antialiased bilinear). One resize: at most 1 uint8 level
  apart on up to 1.8% of the pixels at val (some scale factors, e.g. 384 -> 912, give 2 levels on
  ~2% of them), mean <= 0.02 level. The crop branch resizes twice and compounds it: 2 levels, on
  up to 7.5% of the pixels, mean <= 0.075 level. Images that are never resized differ by
  <= 7.2e-7 (normalised), as ``ToTensor`` divides by 255 and ``to_dtype`` multiplies by 1/255.
* Boxes <= 6e-8 apart (torchvision's xyxy -> cxcywh computes (2 x0 + w) / 2, the authors'
  (x0 + x1) / 2); area, labels, iscrowd, sizes identical; batches and masks identical.
* Distribution tests: smallest p-value 0.0033 of 102 (the authors' branch-(a) rate at 640x200,
  0.453 against 0.5); flip and branch rates 0.45-0.54 on both sides.
* Differences in structure only: the authors' ``image_id`` is ``tensor([id])`` (shape (1,)),
  replic's ``tensor(id)`` (shape ()); for an image without boxes the authors' ``area`` and
  ``iscrowd`` are ``torch.tensor([])`` (float32), replic's iscrowd is int64; an image whose areas
  are all JSON integers gets int64 areas from the authors (float32 after any resize), float32 from
  replic. Both sides keep DETR's long side of max_size + 1 (640x200 at 800 -> 417 x 1334).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import random
import sys
import types
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy import stats
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from replic.data import build_dataset
from replic.data import transforms as R
from replic.data.collate import collate_fn
from replic.data.config import DataConfig
from replic.engine.config import load_experiment

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIG = ROOT / "configs" / "experiments" / "cdetr_r50_50ep.yaml"

CHECKOUTS = [
    pytest.param("REPLIC_OFFICIAL_CONDDETR", id="cdetr", marks=pytest.mark.skipif(
        not os.environ.get("REPLIC_OFFICIAL_CONDDETR"), reason="set REPLIC_OFFICIAL_CONDDETR to an official checkout")),
    pytest.param("REPLIC_OFFICIAL_DETR", id="detr", marks=pytest.mark.skipif(
        not os.environ.get("REPLIC_OFFICIAL_DETR"), reason="set REPLIC_OFFICIAL_DETR to an official checkout")),
]

# Tolerances (see the module docstring for what was measured).
PIXEL_LEVELS = 2.0  # uint8 levels between Pillow's and torch's bilinear resampling, per element
PIXEL_MEAN_LEVELS = 0.1  # the same, averaged over an image
BOX_ATOL = 2e-6  # normalised cxcywh
AREA_RTOL = 1e-6
P_MIN = 1e-4  # every statistical test
DRAWS = 1000  # per side, per image size, in the distribution test
REPLAY_SEEDS = 10  # per image, in the same-decisions test

# (width, height): COCO-like landscape and portrait, square, 3.2:1 and 1:4.1 (the 1333 cap binds at
# every scale), a short side already 800 (val resizes nothing), then two small ones for the
# no-annotation and crowd-only images. Ids are non-contiguous and listed out of order on purpose.
IMAGES = [
    (42, (640, 480)), (7, (427, 640)), (1001, (640, 200)), (3, (500, 500)),
    (77, (1200, 800)), (500, (150, 613)), (12, (320, 240)), (13, (256, 384)),
]
EMPTY_IMAGE, CROWD_ONLY_IMAGE = 12, 13
CATEGORY_IDS = (1, 3, 17, 90)


# --------------------------------------------------------------------------- the authors' code

@dataclasses.dataclass
class Official:
    """The authors' data modules, imported from one checkout."""

    name: str
    T: types.ModuleType  # datasets/transforms.py
    coco: types.ModuleType  # datasets/coco.py
    misc: types.ModuleType  # util/misc.py


def _import_official(repo: str, name: str) -> Official:
    """Import ``datasets.coco`` (and with it ``datasets.transforms``) and ``util.misc`` from ``repo``.

    Their top-level names would shadow other packages, so ``sys.path`` and ``sys.modules`` are put
    back as they were afterwards; the module objects keep working through their own globals.
    """
    tops = ("datasets", "util", "models")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in tops}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, repo)
    real_tv = torchvision.__version__
    try:
        torchvision.__version__ = "0.99"  # util/misc.py parses it at import (breaks on some versions)
        misc = importlib.import_module("util.misc")
        coco = importlib.import_module("datasets.coco")
        T = importlib.import_module("datasets.transforms")
    finally:
        torchvision.__version__ = real_tv
        sys.path.remove(repo)
        for key in [k for k in sys.modules if k.split(".")[0] in tops]:
            del sys.modules[key]
        sys.modules.update(saved)
    assert Path(T.__file__).resolve().is_relative_to(Path(repo).resolve()), T.__file__
    return Official(name=name, T=T, coco=coco, misc=misc)


@pytest.fixture(scope="module", params=CHECKOUTS)
def official(request: pytest.FixtureRequest) -> Official:
    """The authors' modules from the checkout named by the parameter's environment variable."""
    name = {"REPLIC_OFFICIAL_CONDDETR": "cdetr", "REPLIC_OFFICIAL_DETR": "detr"}[request.param]
    return _import_official(os.environ[request.param], name)


@pytest.fixture(autouse=True)
def _restore_rngs() -> Iterator[None]:
    """These tests seed Python's and torch's global generators; leave them as they were."""
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    yield
    random.setstate(py_state)
    torch.set_rng_state(torch_state)


# --------------------------------------------------------------------------- synthetic COCO set

def _annotations(image_id: int, width: int, height: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """A 4 x 3 grid of float boxes plus every edge case the conversion must handle."""
    if image_id == EMPTY_IMAGE:
        return []
    if image_id == CROWD_ONLY_IMAGE:
        return [{"bbox": [20.0, 30.0, 100.0, 80.0], "iscrowd": 1, "area": 8000.0, "category_id": 3}]
    anns: list[dict[str, Any]] = [
        # First box: asymmetric, so a flip is visible on boxes[0] (the distribution test uses it).
        {"bbox": [2.5, 3.0, 9.0, 12.0], "iscrowd": 0},
    ]
    for row in range(3):
        for col in range(4):
            bw = float(rng.uniform(0.08, 0.3) * width)
            bh = float(rng.uniform(0.08, 0.3) * height)
            x = float((col + rng.uniform(0.0, 0.6)) * width / 4)
            y = float((row + rng.uniform(0.0, 0.6)) * height / 3)
            anns.append({"bbox": [x, y, bw, bh], "iscrowd": 0})
    anns += [
        {"bbox": [width - 30.5, height - 20.25, 60.0, 50.0], "iscrowd": 0},  # out right/bottom: clipped
        {"bbox": [-12.5, -7.0, 40.0, 30.0], "iscrowd": 0},  # out left/top: clipped
        {"bbox": [width + 5.0, 10.0, 20.0, 20.0], "iscrowd": 0},  # wholly outside: dropped
        {"bbox": [-40.0, 10.0, 30.0, 20.0], "iscrowd": 0},  # wholly outside (left): dropped
        {"bbox": [15.0, 15.0, 0.0, 10.0], "iscrowd": 0},  # zero width: dropped
        {"bbox": [15.0, 15.0, 10.0, 0.0], "iscrowd": 0},  # zero height: dropped
        {"bbox": [50.0, 40.0, -5.0, 10.0], "iscrowd": 0},  # negative width: dropped
        {"bbox": [20.0, 20.0, 100.0, 80.0], "iscrowd": 1},  # crowd: dropped from targets (DETR)
        {"bbox": [30.0, 40.0, 50.0, 60.0]},  # no iscrowd key: an ordinary box
        {"bbox": [5.0, 5.0, 1e-3, 3.0], "iscrowd": 0},  # sub-pixel width: kept
        {"bbox": [0.0, 0.0, float(width), float(height)], "iscrowd": 0},  # the whole image
    ]
    for i, ann in enumerate(anns):
        ann["category_id"] = CATEGORY_IDS[i % len(CATEGORY_IDS)]
        x, y, w, h = ann["bbox"]
        ann["area"] = float(abs(w * h)) * 0.9  # a segmentation area: not the box area
    anns[3]["area"] = 1234  # an integer area among floats (JSON ints happen)
    return anns


def _image_pixels(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Noise on a colour gradient: the hardest case for two resampling implementations to agree on."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    noise = rng.normal(0.0, 40.0, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO-layout root with the same images and annotations for train2017 and val2017."""
    root = tmp_path_factory.mktemp("parity_coco")
    rng = np.random.default_rng(20240601)
    images, annotations = [], []
    for folder in ("train2017", "val2017"):
        (root / folder).mkdir()
    (root / "annotations").mkdir()
    for image_id, (width, height) in IMAGES:
        name = f"{image_id:012d}.png"
        Image.fromarray(_image_pixels(width, height, rng)).save(root / "train2017" / name)
        os.link(root / "train2017" / name, root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for ann in _annotations(image_id, width, height, rng):
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": image_id})
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    data = {"images": images, "annotations": annotations, "categories": categories}
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def paper_cfg() -> DataConfig:
    """The paper-scale data config (Conditional DETR R50, 50 epochs)."""
    return load_experiment(PAPER_CONFIG, None, {}).data


def _datasets(official: Official, cfg: DataConfig, root: Path, split: str | None) -> tuple[Any, Any]:
    """(the authors' dataset, replic's dataset) over the same files; ``split=None``: no transforms."""
    folder = "train2017" if split in (None, "train") else "val2017"
    theirs = official.coco.CocoDetection(
        root / folder, root / "annotations" / f"instances_{folder}.json",
        transforms=official.coco.make_coco_transforms(split) if split else None, return_masks=False)
    ours = build_dataset(dataclasses.replace(cfg, root=str(root)), split or "train")
    if split is None:
        ours.transforms = None
    assert list(theirs.ids) == list(ours.ids) == sorted(i for i, _ in IMAGES)
    return theirs, ours


# --------------------------------------------------------------------------- comparisons

_STD = torch.tensor(R.IMAGENET_STD).view(3, 1, 1)


def _compare_items(theirs: tuple[torch.Tensor, dict], ours: tuple[torch.Tensor, dict],
                   where: str, worst: dict[str, float]) -> None:
    """Full comparison of one transformed item; ``worst`` collects the largest differences seen."""
    img_a, tgt_a = theirs
    img_b, tgt_b = ours
    assert type(img_b) is torch.Tensor and img_b.dtype == img_a.dtype == torch.float32, where
    assert img_a.shape == img_b.shape, f"{where}: image {tuple(img_a.shape)} vs {tuple(img_b.shape)}"
    # In uint8 levels: normalised difference x 255 x std of the channel.
    levels = (img_a - img_b).abs() * 255.0 * _STD
    top, mean = float(levels.max()), float(levels.mean())
    assert top <= PIXEL_LEVELS + 1e-3, f"{where}: pixels {top:.3f} uint8 levels apart"
    assert mean <= PIXEL_MEAN_LEVELS, f"{where}: pixels {mean:.3f} uint8 levels apart on average"
    worst["levels"] = max(worst.get("levels", 0.0), top)
    worst["mean_levels"] = max(worst.get("mean_levels", 0.0), mean)
    worst["fraction"] = max(worst.get("fraction", 0.0), float((levels > 1e-3).float().mean()))
    if tuple(img_a.shape[-2:]) == tuple(int(v) for v in tgt_a["orig_size"]):  # never resampled
        worst["unresized"] = max(worst.get("unresized", 0.0), float((img_a - img_b).abs().max()))

    assert set(tgt_a) == set(tgt_b), f"{where}: keys {sorted(tgt_a)} vs {sorted(tgt_b)}"
    boxes_b = tgt_b["boxes"]
    assert type(boxes_b) is torch.Tensor and boxes_b.dtype == torch.float32, where
    assert tgt_a["boxes"].shape == boxes_b.shape, f"{where}: {len(tgt_a['boxes'])} vs {len(boxes_b)} boxes"
    torch.testing.assert_close(boxes_b, tgt_a["boxes"], atol=BOX_ATOL, rtol=0, msg=f"{where}: boxes")
    if len(boxes_b):
        worst["boxes"] = max(worst.get("boxes", 0.0), float((boxes_b - tgt_a["boxes"]).abs().max()))
    assert torch.equal(tgt_b["labels"], tgt_a["labels"]), f"{where}: labels"
    # The authors build area/iscrowd with torch.tensor(list): float32 / int64, but float32 for an
    # image without boxes and int64 area when every area in the file is an integer.
    assert tgt_b["area"].dtype == torch.float32 and tgt_b["iscrowd"].dtype == torch.int64, where
    torch.testing.assert_close(tgt_b["area"], tgt_a["area"].to(torch.float32), rtol=AREA_RTOL, atol=0,
                               msg=f"{where}: area")
    if len(boxes_b):
        assert tgt_a["iscrowd"].dtype == torch.int64, where
        area_a = tgt_a["area"].to(torch.float32)
        worst["area"] = max(worst.get("area", 0.0), float(((tgt_b["area"] - area_a) / area_a).abs().max()))
    assert torch.equal(tgt_b["iscrowd"], tgt_a["iscrowd"].to(torch.int64)), f"{where}: iscrowd"
    for key in ("size", "orig_size"):
        assert tgt_b[key].dtype == tgt_a[key].dtype == torch.int64, f"{where}: {key}"
        assert torch.equal(tgt_b[key], tgt_a[key]), f"{where}: {key} {tgt_b[key]} vs {tgt_a[key]}"
    # The authors' image_id is tensor([id]) (shape (1,)), replic's tensor(id) (shape ()).
    assert tgt_a["image_id"].shape == (1,) and tgt_b["image_id"].shape == (), where
    assert int(tgt_b["image_id"]) == int(tgt_a["image_id"]), where


def _pixel_summary(worst: dict[str, float]) -> str:
    return (f"pixels <= {worst['levels']:.2f} uint8 levels apart (mean <= {worst['mean_levels']:.3f}, "
            f"on <= {worst['fraction']:.2%} of an image)")


# --------------------------------------------------------------------------- 1. recipe numbers

def test_paper_config_matches_official_recipe(official: Official, paper_cfg: DataConfig) -> None:
    """The paper-scale config builds the authors' recipe: same scales, caps, crops, probabilities."""
    train = official.coco.make_coco_transforms("train")
    flip, select, normalize = train.transforms
    resize_a = select.transforms1
    resize_b, crop, resize_b2 = select.transforms2.transforms
    assert type(flip).__name__ == "RandomHorizontalFlip" and type(select).__name__ == "RandomSelect"
    assert [type(t).__name__ for t in normalize.transforms] == ["ToTensor", "Normalize"]
    norm = normalize.transforms[1]

    ours = R.make_transforms("train", paper_cfg)
    o_flip, o_select, o_norm = ours.transforms
    o_b1, o_crop, o_b2 = o_select.second.transforms
    assert (o_flip.p, o_select.p) == (flip.p, select.p) == (0.5, 0.5)
    assert o_select.first.sizes == resize_a.sizes == resize_b2.sizes == o_b2.sizes
    assert o_select.first.max_size == resize_a.max_size == resize_b2.max_size == o_b2.max_size == 1333
    assert o_b1.sizes == resize_b.sizes == [400, 500, 600]
    assert o_b1.max_size is None and resize_b.max_size is None
    assert (o_crop.min_size, o_crop.max_size) == (crop.min_size, crop.max_size) == (384, 600)
    assert {o_select.first.rule, o_b1.rule, o_b2.rule} == {"detr"}
    assert (o_norm.mean, o_norm.std) == (list(norm.mean), list(norm.std))

    val = official.coco.make_coco_transforms("val")
    v_resize, v_normalize = val.transforms
    o_val = R.make_transforms("val", paper_cfg)
    assert (o_val.transforms[0].sizes, o_val.transforms[0].max_size) == (v_resize.sizes, v_resize.max_size)
    assert (o_val.transforms[1].mean, o_val.transforms[1].std) == (
        list(v_normalize.transforms[1].mean), list(v_normalize.transforms[1].std))
    # ConvertCocoPolysToMask drops crowd boxes for every split; so does build_dataset.
    assert paper_cfg.remove_crowd is True


# --------------------------------------------------------------------------- resize arithmetic

def _official_size_rule(official: Official) -> Callable[..., tuple[int, int]]:
    """The authors' ``get_size_with_aspect_ratio`` (nested in ``resize``), as a callable."""
    code = next(c for c in official.T.resize.__code__.co_consts
                if isinstance(c, types.CodeType) and c.co_name == "get_size_with_aspect_ratio")
    return types.FunctionType(code, official.T.__dict__)


def test_resize_arithmetic_matches_official(official: Official) -> None:
    """Output (h, w) for a short side and cap: the authors' rule and replic's, on a grid of shapes."""
    theirs = _official_size_rule(official)
    rng = np.random.default_rng(0)
    sides = sorted({*range(16, 2049, 61), 1, 2, 200, 333, 427, 480, 500, 640, 799, 800, 801, 1333, 1334,
                    *rng.integers(1, 4000, 20).tolist()})
    settings = [(s, 1333) for s in range(480, 801, 32)] + [(s, None) for s in (400, 500, 600)] + [(800, 1333)]
    checked = 0
    for h in sides:
        for w in sides:
            for size, cap in settings:
                assert R.detr_resize_size(h, w, size, cap) == theirs((w, h), size, cap), (h, w, size, cap)
                checked += 1
    print(f"\n[{official.name}] resize arithmetic: {len(sides) ** 2} (h, w) x {len(settings)} settings equal")
    assert checked >= 50_000


# --------------------------------------------------------------------------- 2. train: same decisions

class _LoggingRandom:
    """Stands in for ``random`` inside the authors' transforms: a seeded stream, every draw logged.

    The log is in replic's terms: ``("rand", v)`` for ``random()``, ``("randint", lo, hi, v)`` for
    ``randint`` and for ``choice`` over more than one size (replic draws an index; one size draws
    nothing in replic).
    """

    def __init__(self, seed: int, log: list[tuple]) -> None:
        self._rng = random.Random(seed)
        self.log = log

    def random(self) -> float:
        value = self._rng.random()
        self.log.append(("rand", value))
        return value

    def choice(self, seq: list[int]) -> int:
        value = self._rng.choice(seq)
        if len(seq) > 1:
            self.log.append(("randint", 0, len(seq) - 1, list(seq).index(value)))
        return value

    def randint(self, low: int, high: int) -> int:
        value = self._rng.randint(low, high)
        self.log.append(("randint", low, high, value))
        return value


class _Replay:
    """replic's ``_rand`` / ``_randint`` answering from a log; each call must match the next entry."""

    def __init__(self, log: list[tuple]) -> None:
        self.pending = deque(log)

    def rand(self) -> float:
        assert self.pending, "replic drew more numbers than the authors"
        kind, *rest = self.pending.popleft()
        assert kind == "rand", f"replic drew a float where the authors drew {kind}{tuple(rest)}"
        return rest[0]

    def randint(self, low: int, high: int) -> int:
        assert self.pending, "replic drew more numbers than the authors"
        kind, *rest = self.pending.popleft()
        assert kind == "randint" and tuple(rest[:2]) == (low, high), (
            f"replic drew an integer in [{low}, {high}] where the authors drew {kind}{tuple(rest)}")
        return rest[2]


def test_train_same_decisions_identical_outputs(official: Official, paper_cfg: DataConfig, coco_root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The authors' train draws replayed into replic: full outputs equal (within resampling)."""
    theirs_ds, ours_ds = _datasets(official, paper_cfg, coco_root, "train")
    log: list[tuple] = []
    real_crop = official.T.crop

    def logging_crop(image: Image.Image, target: dict, region: tuple[int, int, int, int]) -> Any:
        top, left, height, width = region  # from RandomCrop.get_params (torch), in replic's terms
        log.append(("randint", 0, image.height - height, top))
        log.append(("randint", 0, image.width - width, left))
        return real_crop(image, target, region)

    monkeypatch.setattr(official.T, "crop", logging_crop)
    seen: Counter[str] = Counter()
    worst: dict[str, float] = {}
    for idx, image_id in enumerate(ours_ds.ids):
        info = ours_ds.index.images[image_id]
        n_raw = len(ours_ds.raw_target(image_id, info["height"], info["width"])["boxes"])
        for seed in range(REPLAY_SEEDS):
            log.clear()
            torch.manual_seed(1000 * idx + seed)
            with monkeypatch.context() as patch:
                patch.setattr(official.T, "random", _LoggingRandom(1000 * idx + seed, log))
                theirs = theirs_ds[idx]
            flipped, cropped = log[0][1] < 0.5, log[1][1] >= 0.5  # flip, then RandomSelect
            seen["flip"] += flipped
            seen["crop"] += cropped
            seen["dropped"] += cropped and len(theirs[1]["boxes"]) < n_raw
            replay = _Replay(log)
            state = random.getstate()
            with monkeypatch.context() as patch:
                patch.setattr(R, "_rand", replay.rand)
                patch.setattr(R, "_randint", replay.randint)
                ours = ours_ds[idx]
            assert random.getstate() == state, "replic drew from Python's random"
            assert not replay.pending, f"replic drew fewer numbers than the authors: {list(replay.pending)}"
            _compare_items(theirs, ours, f"image {image_id} seed {seed}", worst)
    total = len(ours_ds) * REPLAY_SEEDS
    print(f"\n[{official.name}] train, same decisions: {total} items, {seen['flip']} flipped, {seen['crop']} "
          f"crop branch ({seen['dropped']} dropped boxes); {_pixel_summary(worst)}, boxes {worst['boxes']:.2g}, "
          f"area (relative) {worst.get('area', 0):.2g}")
    # Every path was exercised: both flips, both branches, crops that drop boxes.
    assert 0 < seen["flip"] < total and 0 < seen["crop"] < total and seen["dropped"] > 0


# --------------------------------------------------------------------------- 2. train: same distribution

def _homogeneity_p(a: Counter, b: Counter) -> float:
    """Chi-square homogeneity p-value of two samples of categories (categories under 10 pooled)."""
    keys = set(a) | set(b)
    cols = sorted(([a[k], b[k]] for k in keys if a[k] + b[k] >= 10), key=sum, reverse=True)
    rest = [sum(a[k] for k in keys if a[k] + b[k] < 10), sum(b[k] for k in keys if a[k] + b[k] < 10)]
    if sum(rest) >= 10 or not cols:
        cols.append(rest)
    elif sum(rest):
        cols[-1] = [cols[-1][0] + rest[0], cols[-1][1] + rest[1]]
    if len(cols) < 2:
        return 1.0
    return float(stats.chi2_contingency(np.array(cols).T, correction=False).pvalue)


def _sample_official(official: Official, width: int, height: int, target: dict, seed: int,
                     monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """DRAWS runs of the authors' train transforms (without ToTensor/Normalize) on a stand-in image."""
    pipeline = official.coco.make_coco_transforms("train")
    flip, select, normalize = pipeline.transforms
    assert [type(t).__name__ for t in normalize.transforms] == ["ToTensor", "Normalize"]
    record: dict[str, Any] = {}

    def run_flip(image: Image.Image, tgt: dict) -> tuple[Image.Image, dict]:
        out = flip(image, tgt)
        record["flip"] = bool(out[1]["boxes"][0, 0] != tgt["boxes"][0, 0])
        return out

    def branch(step: Callable, name: str) -> Callable:
        def run(image: Image.Image, tgt: dict) -> tuple[Image.Image, dict]:
            record["branch"] = name
            return step(image, tgt)
        return run

    real_crop = official.T.crop

    def logging_crop(image: Image.Image, tgt: dict, region: tuple[int, int, int, int]) -> Any:
        record["crop_in"], record["crop"] = (image.height, image.width), tuple(region)
        return real_crop(image, tgt, region)

    select.transforms1, select.transforms2 = branch(select.transforms1, "a"), branch(select.transforms2, "b")
    stand_in = Image.new("1", (width, height))  # resizing a 1-bit image costs next to nothing
    random.seed(seed)
    torch.manual_seed(seed)
    draws = []
    with monkeypatch.context() as patch:
        patch.setattr(official.T, "crop", logging_crop)
        for _ in range(DRAWS):
            record.clear()
            image, out = select(*run_flip(stand_in, target))
            draws.append({**record, "size": (image.height, image.width), "kept": len(out["boxes"])})
    return draws


def _sample_replic(cfg: DataConfig, width: int, height: int, target: dict, seed: int,
                   monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """DRAWS runs of replic's train transforms (without normalisation) on a 0-channel image."""
    flip, select, normalize = R.make_transforms("train", cfg).transforms
    assert isinstance(normalize, R.NormalizeToContract)
    record: dict[str, Any] = {}

    def run_flip(image: tv_tensors.Image, tgt: dict) -> tuple[tv_tensors.Image, dict]:
        out = flip(image, tgt)
        record["flip"] = bool(out[1]["boxes"][0, 0] != tgt["boxes"][0, 0])
        return out

    def branch(step: Callable, name: str) -> Callable:
        def run(image: tv_tensors.Image, tgt: dict) -> tuple[tv_tensors.Image, dict]:
            record["branch"] = name
            return step(image, tgt)
        return run

    real_crop = R.crop

    def logging_crop(image: tv_tensors.Image, tgt: dict, top: int, left: int, h: int, w: int) -> Any:
        record["crop_in"], record["crop"] = tuple(image.shape[-2:]), (top, left, h, w)
        return real_crop(image, tgt, top, left, h, w)

    select.first, select.second = branch(select.first, "a"), branch(select.second, "b")
    stand_in = tv_tensors.Image(torch.empty(0, height, width, dtype=torch.uint8))  # nothing to resample
    torch.manual_seed(seed)
    draws = []
    with monkeypatch.context() as patch:
        patch.setattr(R, "crop", logging_crop)
        for _ in range(DRAWS):
            record.clear()
            image, out = select(*run_flip(stand_in, target))
            draws.append({**record, "size": tuple(image.shape[-2:]), "kept": len(out["boxes"])})
    return draws


@pytest.mark.slow  # about 8 s per checkout on 2 cores
def test_train_same_distribution(official: Official, paper_cfg: DataConfig,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Flip and branch rates, output sizes, crop sizes and offsets, kept boxes: same distributions."""
    rule = _official_size_rule(official)
    scales = paper_cfg.train_scales
    p_values: dict[str, float] = {}
    rates: list[float] = []
    rng = np.random.default_rng(5)
    for image_id, (width, height) in IMAGES:
        if image_id in (EMPTY_IMAGE, CROWD_ONLY_IMAGE):
            continue
        anns = _annotations(image_id, width, height, rng)
        theirs_t = official.coco.ConvertCocoPolysToMask(False)(Image.new("1", (width, height)),
                                                               {"image_id": image_id, "annotations": anns})[1]
        ours_t = {**theirs_t, "iscrowd": theirs_t["iscrowd"].to(torch.int64),
                  "boxes": tv_tensors.BoundingBoxes(theirs_t["boxes"].clone(), format="XYXY",
                                                    canvas_size=(height, width))}
        a = _sample_official(official, width, height, theirs_t, 11 + image_id, monkeypatch)
        b = _sample_replic(paper_cfg, width, height, ours_t, 22 + image_id, monkeypatch)
        tag = f"{width}x{height}"

        for what, key, value in (("flip", "flip", True), ("branch a", "branch", "a")):
            hits = [sum(d[key] == value for d in side) for side in (a, b)]
            rates += [h / DRAWS for h in hits]
            p_values[f"{tag} {what} rate, authors"] = stats.binomtest(hits[0], DRAWS, 0.5).pvalue
            p_values[f"{tag} {what} rate, replic"] = stats.binomtest(hits[1], DRAWS, 0.5).pvalue
            p_values[f"{tag} {what} rate, between"] = stats.fisher_exact(
                [[hits[0], DRAWS - hits[0]], [hits[1], DRAWS - hits[1]]]).pvalue

        # Exact supports: branch (a) gives one size per scale, the crop branch starts with one of 3 sizes.
        support_a = {rule((width, height), s, paper_cfg.max_size) for s in scales}
        support_b = {rule((width, height), s, None) for s in paper_cfg.crop_scales}
        for side, draws in (("authors", a), ("replic", b)):
            assert {d["size"] for d in draws if d["branch"] == "a"} == support_a, (tag, side)
            crops = [d for d in draws if d["branch"] == "b"]
            assert all("crop" in d for d in crops) and not any("crop" in d for d in draws if d["branch"] == "a")
            assert {d["crop_in"] for d in crops} == support_b, (tag, side)
            for d in crops:  # sides uniform in [384, min(side, 600)], the crop inside the image
                (in_h, in_w), (top, left, h, w) = d["crop_in"], d["crop"]
                assert 384 <= h <= min(in_h, 600) and 384 <= w <= min(in_w, 600), (tag, side, d)
                assert 0 <= top <= in_h - h and 0 <= left <= in_w - w, (tag, side, d)

        def counts(draws: list[dict], fn: Callable[[dict], Any], branch: str | None = None) -> Counter:
            return Counter(fn(d) for d in draws if branch is None or d["branch"] == branch)

        p_values[f"{tag} output (h, w)"] = _homogeneity_p(counts(a, lambda d: d["size"]),
                                                          counts(b, lambda d: d["size"]))
        p_values[f"{tag} output short side"] = _homogeneity_p(counts(a, lambda d: min(d["size"])),
                                                              counts(b, lambda d: min(d["size"])))
        p_values[f"{tag} branch (a) (h, w)"] = _homogeneity_p(counts(a, lambda d: d["size"], "a"),
                                                              counts(b, lambda d: d["size"], "a"))
        p_values[f"{tag} crop input (h, w)"] = _homogeneity_p(counts(a, lambda d: d["crop_in"], "b"),
                                                              counts(b, lambda d: d["crop_in"], "b"))
        p_values[f"{tag} kept boxes"] = _homogeneity_p(counts(a, lambda d: d["kept"]),
                                                       counts(b, lambda d: d["kept"]))
        crop_a = [d for d in a if d["branch"] == "b"]
        crop_b = [d for d in b if d["branch"] == "b"]
        extract: dict[str, Callable[[dict], float]] = {
            "crop height": lambda d: d["crop"][2],
            "crop width": lambda d: d["crop"][3],
            "crop top / room": lambda d: d["crop"][0] / max(d["crop_in"][0] - d["crop"][2], 1),
            "crop left / room": lambda d: d["crop"][1] / max(d["crop_in"][1] - d["crop"][3], 1),
            "crop-branch output height": lambda d: d["size"][0],
            "crop-branch output width": lambda d: d["size"][1],
        }
        for what, fn in extract.items():
            p_values[f"{tag} {what}"] = float(stats.ks_2samp([fn(d) for d in crop_a],
                                                             [fn(d) for d in crop_b]).pvalue)

    worst = min(p_values, key=p_values.get)
    print(f"\n[{official.name}] train distribution: {len(p_values)} tests, {DRAWS} draws per side and image; "
          f"smallest p {p_values[worst]:.2g} ({worst}); rates {min(rates):.3f}..{max(rates):.3f}")
    failed = {k: v for k, v in p_values.items() if not v > P_MIN}
    assert not failed, f"distributions differ (p <= {P_MIN}): {failed}"


# --------------------------------------------------------------------------- 3. val

def test_val_identical_outputs(official: Official, paper_cfg: DataConfig, coco_root: Path) -> None:
    """The val pipelines on the same files: equal outputs (images within resampling)."""
    theirs_ds, ours_ds = _datasets(official, paper_cfg, coco_root, "val")
    worst: dict[str, float] = {}
    for idx, image_id in enumerate(ours_ds.ids):
        _compare_items(theirs_ds[idx], ours_ds[idx], f"val image {image_id}", worst)
    print(f"\n[{official.name}] val: {len(ours_ds)} images; {_pixel_summary(worst)}, "
          f"{worst['unresized']:.2g} (normalised) where not resized; "
          f"boxes {worst['boxes']:.2g}, area (relative) {worst['area']:.2g}")


# --------------------------------------------------------------------------- 4. batch padding

def test_batch_padding_identical(official: Official, paper_cfg: DataConfig, coco_root: Path) -> None:
    """``nested_tensor_from_tensor_list`` / ``collate_fn`` against replic's collate: equal tensors."""
    _, ours_ds = _datasets(official, paper_cfg, coco_root, "val")
    g = torch.Generator().manual_seed(3)
    mixed = [torch.randn(3, h, w, generator=g) for h, w in ((50, 70), (64, 40), (33, 90), (64, 90))]
    batches = [
        [ours_ds[i] for i in range(len(ours_ds))],  # all val outputs: sizes up to 800 x 1333
        [ours_ds[i] for i in (0, 2, 5)],
        [(img, {"boxes": torch.zeros(0, 4)}) for img in mixed[:3]],  # the max h and max w from different images
        [(img, {"boxes": torch.zeros(0, 4)}) for img in mixed],
        [(mixed[1], {"boxes": torch.zeros(0, 4)})],  # one image: no padding
    ]
    for n, items in enumerate(batches):
        nested, theirs_targets = official.misc.collate_fn(list(items))
        ours = collate_fn(items)
        assert ours.images.dtype == nested.tensors.dtype and ours.mask.dtype == nested.mask.dtype == torch.bool
        assert torch.equal(ours.images, nested.tensors), f"batch {n}: images"
        assert torch.equal(ours.mask, nested.mask), f"batch {n}: mask"
        assert all(a is b for a, b in zip(ours.targets, theirs_targets, strict=True)), f"batch {n}: targets"
        assert torch.equal(collate_fn(items).images, official.misc.nested_tensor_from_tensor_list(
            [img for img, _ in items]).tensors)
    assert batches[0] and len({tuple(img.shape) for img, _ in batches[0]}) > 3  # sizes really differ


# --------------------------------------------------------------------------- 5. annotation conversion

def test_annotation_conversion_identical(official: Official, paper_cfg: DataConfig, coco_root: Path) -> None:
    """``ConvertCocoPolysToMask`` against replic's loading, before any transform: equal targets."""
    theirs_ds, ours_ds = _datasets(official, paper_cfg, coco_root, None)
    for idx, image_id in enumerate(ours_ds.ids):
        (pil, theirs), (image, ours) = theirs_ds[idx], ours_ds[idx]
        where = f"image {image_id}"
        assert torch.equal(image.as_subclass(torch.Tensor), F.pil_to_tensor(pil)), where
        assert set(theirs) == set(ours), where
        boxes = ours["boxes"].as_subclass(torch.Tensor)
        assert ours["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
        assert tuple(ours["boxes"].canvas_size) == (pil.height, pil.width), where
        assert boxes.dtype == theirs["boxes"].dtype == torch.float32
        assert torch.equal(boxes, theirs["boxes"]), f"{where}: boxes\n{boxes}\n{theirs['boxes']}"
        assert torch.equal(ours["labels"], theirs["labels"]), where
        assert torch.equal(ours["area"], theirs["area"].to(torch.float32)), where
        assert torch.equal(ours["iscrowd"], theirs["iscrowd"].to(torch.int64)), where
        for key in ("size", "orig_size"):
            assert torch.equal(ours[key], theirs[key]), f"{where}: {key}"
        assert int(ours["image_id"]) == int(theirs["image_id"]) == image_id
        # 13 grid boxes, 2 clipped, no-iscrowd, sub-pixel, whole image; dropped: 2 outside, zero w,
        # zero h, negative w, crowd.
        expected = 0 if image_id in (EMPTY_IMAGE, CROWD_ONLY_IMAGE) else 18
        assert len(boxes) == expected, f"{where}: {len(boxes)} boxes kept"
        if expected:
            assert theirs["area"].dtype == torch.float32 and theirs["iscrowd"].dtype == torch.int64
            assert bool((boxes[:, 2:] <= torch.tensor([pil.width, pil.height])).all() and (boxes >= 0).all())
        else:  # the authors' torch.tensor([]) is float32 for both
            assert theirs["area"].dtype == theirs["iscrowd"].dtype == torch.float32
            assert ours["iscrowd"].dtype == torch.int64 and ours["area"].dtype == torch.float32
            assert boxes.shape == theirs["boxes"].shape == (0, 4)
