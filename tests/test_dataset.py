"""CocoDetection validation, the DETR transforms, collate and DataConfig."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from replic.config import ConfigError, from_dict
from replic.data import (
    Batch,
    CocoDetection,
    DataConfig,
    DatasetError,
    build_dataset,
    collate_fn,
    generate_synthetic_coco,
    make_transforms,
    num_classes_for,
)
from replic.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormalizeToContract,
    RandomHorizontalFlip,
    RandomSizeCrop,
    crop,
    detr_resize_size,
)

torch.set_num_threads(1)

SMALL = {
    "train_scales": [96, 112, 128],
    "max_size": 200,
    "crop_scales": [80, 100],
    "crop_size": [48, 96],
    "val_size": 96,
    "val_max_size": 160,
    "num_workers": 0,
}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_coco(tmp_path_factory.mktemp("ds"), n_train=10, n_val=5, size=128, seed=4)["root"]


@pytest.fixture
def broken_copy(synth_root: Path, tmp_path: Path):
    """A private copy of the train split whose JSON a test may edit."""
    root = tmp_path / "copy"
    shutil.copytree(synth_root / "train2017", root / "train2017")
    ann = root / "instances_train2017.json"
    shutil.copyfile(synth_root / "annotations" / "instances_train2017.json", ann)
    data = json.loads(ann.read_text())

    def write(mutated: dict) -> Path:
        ann.write_text(json.dumps(mutated))
        return ann

    return root / "train2017", ann, data, write


def small_cfg(root: Path, **overrides) -> DataConfig:
    return from_dict(DataConfig, {"root": str(root), **SMALL, **overrides})


# --------------------------------------------------------------------------- validation


def test_missing_image_file_is_named_at_construction(broken_copy) -> None:
    folder, ann, data, _ = broken_copy
    victim = data["images"][2]["file_name"]
    (folder / victim).unlink()
    with pytest.raises(DatasetError, match=rf"{victim}: image file not found.*instances_train2017\.json"):
        CocoDetection(folder, ann)


def test_truncated_json_names_the_file(broken_copy) -> None:
    folder, ann, _, _ = broken_copy
    raw = ann.read_bytes()
    ann.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match=r"instances_train2017\.json: malformed or truncated JSON"):
        CocoDetection(folder, ann)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nothere\.json: annotation file not found"):
        CocoDetection(tmp_path, tmp_path / "nothere.json")


def test_annotation_with_unknown_image_id(broken_copy) -> None:
    folder, _, data, write = broken_copy
    data["annotations"][1]["image_id"] = 987654
    ann_id = data["annotations"][1]["id"]
    with pytest.raises(DatasetError, match=rf"annotations\[1\] \(id {ann_id}\) points to unknown image id 987654"):
        CocoDetection(folder, write(data))


def test_annotation_with_unknown_category_id(broken_copy) -> None:
    folder, _, data, write = broken_copy
    data["annotations"][0]["category_id"] = 4  # a gap in the synthetic ids
    with pytest.raises(DatasetError, match=r"instances_train2017\.json: annotations\[0\].*unknown category id 4"):
        CocoDetection(folder, write(data))


@pytest.mark.parametrize(
    ("section", "key"),
    [("annotations", "bbox"), ("annotations", "category_id"), ("images", "file_name"), ("categories", "id")],
)
def test_missing_required_key_names_key_and_record(broken_copy, section: str, key: str) -> None:
    folder, _, data, write = broken_copy
    del data[section][0][key]
    with pytest.raises(DatasetError, match=rf"{section}\[0\].*missing required key '{key}'"):
        CocoDetection(folder, write(data))


@pytest.mark.parametrize(("key", "value"), [("bbox", [1, 2, 3]), ("bbox", [1, 2, "a", 4]), ("area", "big"), ("iscrowd", 2)])
def test_malformed_annotation_values_are_named(broken_copy, key: str, value) -> None:
    folder, _, data, write = broken_copy
    data["annotations"][2][key] = value
    with pytest.raises(DatasetError, match=rf"annotations\[2\] \(id \d+\) '{key}' must be"):
        CocoDetection(folder, write(data))


def test_missing_top_level_key(broken_copy) -> None:
    folder, _, data, write = broken_copy
    del data["categories"]
    with pytest.raises(DatasetError, match="missing required top-level key 'categories'"):
        CocoDetection(folder, write(data))


def test_degenerate_boxes_are_dropped_with_a_logged_count(broken_copy, caplog) -> None:
    folder, _, data, write = broken_copy
    anns = data["annotations"]
    anns[0]["bbox"][2] = 0.0
    anns[1]["bbox"][3] = -3.0
    bad_ids = {anns[0]["id"], anns[1]["id"]}
    with caplog.at_level(logging.WARNING, logger="replic.data.coco"):
        ds = CocoDetection(folder, write(data))
    assert "dropped 2 annotation(s) with non-positive box" in caplog.text
    assert ds.index.dropped_degenerate == 2
    kept = {a["id"] for anns_ in ds.index.annotations_by_image.values() for a in anns_}
    assert not kept & bad_ids
    assert len(kept) == len(anns) - 2


# --------------------------------------------------------------------------- items


def test_items_follow_the_data_contract(synth_root: Path) -> None:
    cfg = small_cfg(synth_root)
    ds = build_dataset(cfg, "val")
    gt = json.loads((synth_root / "annotations" / "instances_val2017.json").read_text())
    images = {img["id"]: img for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    assert ds.ids == sorted(images)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor
        h, w = image.shape[-2:]
        record = images[int(target["image_id"])]
        assert (h, w) == detr_resize_size(record["height"], record["width"], 96, 160)
        assert target["orig_size"].tolist() == [record["height"], record["width"]]
        assert target["size"].tolist() == [h, w]
        n_plain = sum(1 for a in gt["annotations"] if a["image_id"] == record["id"] and not a["iscrowd"])
        assert target["boxes"].shape == (n_plain, 4) and target["labels"].shape == (n_plain,)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert set(target["labels"].tolist()) <= cat_ids
        assert (target["boxes"] >= 0).all() and (target["boxes"] <= 1).all()


def test_crowd_annotations_removed_unless_asked(synth_root: Path) -> None:
    folder = synth_root / "train2017"
    ann = synth_root / "annotations" / "instances_train2017.json"
    crowd_images = {a["image_id"] for a in json.loads(ann.read_text())["annotations"] if a["iscrowd"]}
    assert crowd_images
    image_id = min(crowd_images)
    with_crowd = CocoDetection(folder, ann, remove_crowd=False)
    without = CocoDetection(folder, ann, remove_crowd=True)
    idx = with_crowd.ids.index(image_id)
    _, t_with = with_crowd[idx]
    _, t_without = without[idx]
    assert int(t_with["iscrowd"].sum()) >= 1
    assert int(t_without["iscrowd"].sum()) == 0
    assert len(t_without["labels"]) == len(t_with["labels"]) - int(t_with["iscrowd"].sum())


def test_loader_is_reproducible_under_the_torch_seed(synth_root: Path) -> None:
    ds = build_dataset(small_cfg(synth_root), "train")

    def first_batch(python_seed: int) -> Batch:
        torch.manual_seed(123)
        random.seed(python_seed)  # the transforms must not depend on Python's RNG
        loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate_fn)
        return next(iter(loader))

    a, b = first_batch(1), first_batch(2)
    assert torch.equal(a.images, b.images) and torch.equal(a.mask, b.mask)
    for ta, tb in zip(a.targets, b.targets):
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    torch.manual_seed(124)
    c = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate_fn)))
    assert c.images.shape != a.images.shape or not torch.equal(c.images, a.images)


def test_num_classes_is_max_id_plus_one(synth_root: Path) -> None:
    assert num_classes_for(synth_root / "annotations" / "instances_train2017.json") == 18


# --------------------------------------------------------------------------- transforms


def _two_box_sample(h: int = 120, w: int = 180):
    """Black image with a solid red and a solid green rectangle, boxes exactly on them."""
    pixels = torch.zeros(3, h, w, dtype=torch.uint8)
    red, green = (30, 20, 90, 70), (120, 60, 170, 110)  # x1, y1, x2, y2
    pixels[0, red[1] : red[3], red[0] : red[2]] = 255
    pixels[1, green[1] : green[3], green[0] : green[2]] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([red, green], dtype=torch.float32), format="XYXY",
                                          canvas_size=(h, w)),
        "labels": torch.tensor([1, 3]),
        "area": torch.tensor([60.0 * 50, 50.0 * 50]),
        "iscrowd": torch.tensor([0, 0]),
        "image_id": torch.tensor(1),
        "orig_size": torch.tensor([h, w]),
        "size": torch.tensor([h, w]),
    }
    return tv_tensors.Image(pixels), target


def _unnormalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


def _abs_xyxy(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    cx, cy, bw, bh = boxes.unbind(-1)
    return torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_boxes_on_their_pixels(seed: int) -> None:
    cfg = from_dict(DataConfig, {**SMALL, "crop_size": [40, 80]})
    transform = make_transforms("train", cfg)
    torch.manual_seed(seed)
    image, target = transform(*_two_box_sample())
    h, w = image.shape[-2:]
    assert target["size"].tolist() == [h, w]
    rgb = _unnormalise(image)
    boxes = _abs_xyxy(target["boxes"], h, w)
    for label, channel in ((1, 0), (3, 1)):
        others = [c for c in range(3) if c != channel]
        solid = (rgb[channel] > 0.75) & (rgb[others] < 0.25).all(0)
        present = (target["labels"] == label).nonzero().flatten()
        if len(present) == 0:
            # A dropped box must have no trace of its colour left (the crop missed it).
            assert not solid.any()
            continue
        x1, y1, x2, y2 = boxes[present[0]].tolist()
        ys, xs = solid.nonzero(as_tuple=True)
        if len(xs) == 0:
            # A sliver thinner than a pixel after downscaling: the box must be tiny too.
            assert (x2 - x1) < 2 or (y2 - y1) < 2
            continue
        tol = 1.5  # bilinear blur at the edges
        # Every solid-colour pixel lies inside the box, and the box is tight around them.
        assert xs.min() >= x1 - tol and xs.max() + 1 <= x2 + tol
        assert ys.min() >= y1 - tol and ys.max() + 1 <= y2 + tol
        assert abs(xs.min() - x1) <= 2 and abs(xs.max() + 1 - x2) <= 2
        assert abs(ys.min() - y1) <= 2 and abs(ys.max() + 1 - y2) <= 2


def test_flip_maps_cx_to_one_minus_cx() -> None:
    image, target = _two_box_sample()
    plain_img, plain = NormalizeToContract()(image, target)
    flip_img, flipped = NormalizeToContract()(*RandomHorizontalFlip(p=1.0)(image, target))
    torch.testing.assert_close(flipped["boxes"][:, 0], 1 - plain["boxes"][:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(flipped["boxes"][:, 1:], plain["boxes"][:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(flip_img, plain_img.flip(-1), rtol=0, atol=0)
    assert torch.equal(flipped["labels"], plain["labels"])


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((100, 150), (96, 144)),  # short side to val_size, cap not reached
        # Cap binds: short = round(160 * 100 / 300) = 53, long = int(53 * 300 / 100) = 159.
        ((100, 300), (53, 159)),
        ((300, 100), (159, 53)),
        ((96, 120), (96, 120)),  # already at size: untouched
    ],
)
def test_val_transform_short_side_and_long_side_cap(hw: tuple[int, int], expected: tuple[int, int]) -> None:
    h, w = hw
    cfg = from_dict(DataConfig, SMALL)
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    box = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    target = {"boxes": tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(h, w)),
              "labels": torch.tensor([1]), "area": torch.tensor([1600.0]), "iscrowd": torch.tensor([0])}
    out, out_t = make_transforms("val", cfg)(image, target)
    assert tuple(out.shape[-2:]) == expected == detr_resize_size(h, w, 96, 160)
    # A pure resize leaves normalised boxes unchanged.
    x1, y1, x2, y2 = box[0].tolist()
    expected_box = torch.tensor([[(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]])
    torch.testing.assert_close(out_t["boxes"], expected_box, rtol=0, atol=1e-5)
    sx, sy = expected[1] / w, expected[0] / h
    torch.testing.assert_close(out_t["area"], torch.tensor([1600.0 * sx * sy]))


def test_detr_resize_size_matches_the_official_arithmetic() -> None:
    # 480x640 at 800/1333: 640/480*800 = 1066 <= 1333, so the short side is 800.
    assert detr_resize_size(480, 640, 800, 1333) == (800, 1066)
    # 400x1200: 3 * 800 > 1333 -> short = round(1333 / 3) = 444, long = int(444 * 3) = 1332.
    assert detr_resize_size(400, 1200, 800, 1333) == (444, 1332)
    # 300x1000 at 96/160: short = round(48.0) = 48, long = int(48 * 1000 / 300) = 160.
    assert detr_resize_size(300, 1000, 96, 160) == (48, 160)
    assert detr_resize_size(640, 480, 800, None) == (1066, 800)


def test_crop_clamps_boxes_and_drops_those_outside() -> None:
    image = tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8))
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 80, 80], [5, 5, 40, 40]])
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(100, 100)),
              "labels": torch.tensor([1, 2, 3]), "area": torch.tensor([100.0, 900, 1225]),
              "iscrowd": torch.tensor([0, 0, 1])}
    out, t = crop(image, target, top=20, left=20, height=40, width=40)
    assert tuple(out.shape[-2:]) == (40, 40)
    assert t["boxes"].canvas_size == (40, 40)
    assert t["boxes"].tolist() == [[30.0, 30.0, 40.0, 40.0], [0.0, 0.0, 20.0, 20.0]]
    assert t["labels"].tolist() == [2, 3] and t["iscrowd"].tolist() == [0, 1]
    assert t["area"].tolist() == [100.0, 400.0]
    assert t["size"].tolist() == [40, 40]


def test_random_size_crop_on_an_image_smaller_than_min_size_keeps_it_whole() -> None:
    image = tv_tensors.Image(torch.zeros(3, 50, 60, dtype=torch.uint8))
    boxes = torch.tensor([[5.0, 6.0, 40.0, 45.0]])
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(50, 60)),
              "labels": torch.tensor([2])}
    out, t = RandomSizeCrop(384, 600)(image, target)
    assert tuple(out.shape[-2:]) == (50, 60)
    assert torch.equal(t["boxes"].as_subclass(torch.Tensor), boxes)


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="'test'"):
        make_transforms("test", DataConfig())


# --------------------------------------------------------------------------- collate


def test_collate_pads_bottom_right_and_masks_padding() -> None:
    a, b = torch.rand(3, 4, 5) + 1, torch.rand(3, 6, 3) + 1  # +1: no real pixel is 0
    ta = {"boxes": torch.rand(2, 4), "labels": torch.tensor([1, 2]), "image_id": torch.tensor(7)}
    tb = {"boxes": torch.rand(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(8)}
    batch = collate_fn([(a, ta), (b, tb)])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 6, 5) and batch.mask.shape == (2, 6, 5)
    assert batch.mask.dtype == torch.bool
    assert torch.equal(batch.images[0, :, :4, :5], a) and torch.equal(batch.images[1, :, :6, :3], b)
    expected_mask = torch.ones(2, 6, 5, dtype=torch.bool)
    expected_mask[0, :4, :5] = False
    expected_mask[1, :6, :3] = False
    assert torch.equal(batch.mask, expected_mask)
    assert (batch.images.permute(1, 0, 2, 3)[:, batch.mask] == 0).all()
    assert (batch.images.permute(1, 0, 2, 3)[:, ~batch.mask] != 0).all()
    assert batch.targets[0] is ta and batch.targets[1] is tb

    moved = batch.to("meta")
    assert moved.images.device.type == "meta" and moved.mask.device.type == "meta"
    assert all(t["boxes"].device.type == "meta" for t in moved.targets)
    assert batch.images.device.type == "cpu"  # .to returns a new batch


def test_collate_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])


# --------------------------------------------------------------------------- config


def test_data_config_defaults_are_the_detr_recipe() -> None:
    cfg = DataConfig()
    assert cfg.train_scales == list(range(480, 801, 32)) and len(cfg.train_scales) == 11
    assert (cfg.max_size, cfg.crop_scales, cfg.crop_size) == (1333, [400, 500, 600], (384, 600))
    assert (cfg.val_size, cfg.val_max_size) == (800, 1333)
    assert (cfg.train_split, cfg.val_split) == ("train2017", "val2017")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train_scale": [128]}, "did you mean 'train_scales'"),
        ({"crop_size": [600, 384]}, "crop_size"),
        ({"crop_size": [384, 500, 600]}, "expected 2 items"),
        ({"train_scales": []}, "train_scales"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
    ],
)
def test_data_config_is_strict(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(DataConfig, data)
