"""The synthetic COCO generator: determinism, COCO layout and quirks, area buckets, pycocotools."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from replic.cli import main as cli_main
from replic.data import generate_synthetic_coco
from replic.data.synth import CATEGORIES


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # size 160 is the documented minimum for all three area buckets; 12/10 images cover the
    # index-driven quirks (empty image at index 9, crowd at index 3).
    return generate_synthetic_coco(tmp_path_factory.mktemp("synth"), n_train=12, n_val=10, size=160, seed=7)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_synthetic_coco(tmp_path / "a", 5, 2, size=128, seed=1)["root"]
    b = generate_synthetic_coco(tmp_path / "b", 5, 2, size=128, seed=1)["root"]
    c = generate_synthetic_coco(tmp_path / "c", 5, 2, size=128, seed=2)["root"]
    hashes_a, hashes_b, hashes_c = _hash_tree(a), _hash_tree(b), _hash_tree(c)
    assert len(hashes_a) == 5 + 2 + 2
    assert hashes_a == hashes_b
    # Same file names (ids do not depend on the seed) but different contents.
    assert hashes_a.keys() == hashes_c.keys()
    differing = [name for name in hashes_a if hashes_a[name] != hashes_c[name]]
    assert "annotations/instances_train2017.json" in differing
    assert sum(name.endswith(".jpg") for name in differing) == 7


def test_interrupted_rewrite_leaves_no_annotation_file(tmp_path: Path, monkeypatch) -> None:
    import replic.data.synth as synth_module

    paths = generate_synthetic_coco(tmp_path, 4, 2, size=96, seed=0)
    calls = {"n": 0}
    real = synth_module._jpeg_bytes

    def failing_jpeg(pixels):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the val split
            raise KeyboardInterrupt
        return real(pixels)

    monkeypatch.setattr(synth_module, "_jpeg_bytes", failing_jpeg)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_coco(tmp_path, 4, 2, size=96, seed=1)
    # Neither the old (stale) nor a new annotation file marks the half-written set as complete.
    assert not paths["train_annotations"].exists() and not paths["val_annotations"].exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_writes_the_same_bytes_as_the_api(tmp_path: Path) -> None:
    api = generate_synthetic_coco(tmp_path / "api", 3, 1, size=96, seed=5)["root"]
    rc = cli_main(["data", "synth", "--out", str(tmp_path / "cli"), "--train", "3", "--val", "1",
                   "--size", "96", "--seed", "5"])
    assert rc == 0
    assert _hash_tree(tmp_path / "cli") == _hash_tree(api)


def test_coco_layout(synth: dict[str, Path]) -> None:
    root = synth["root"]
    assert synth["train_annotations"] == root / "annotations" / "instances_train2017.json"
    assert synth["val_annotations"] == root / "annotations" / "instances_val2017.json"
    for split, ann, n in (("train2017", synth["train_annotations"], 12), ("val2017", synth["val_annotations"], 10)):
        data = _load(ann)
        assert isinstance(data["info"], dict) and data["licenses"] == []
        assert len(data["images"]) == n
        files = sorted(p.name for p in (root / split).iterdir())
        assert files == sorted(img["file_name"] for img in data["images"])
        for img in data["images"]:
            assert re.fullmatch(r"\d{12}\.jpg", img["file_name"])
            assert int(img["file_name"][:12]) == img["id"]
    assert not list(root.rglob("*.tmp")), "temporary files left behind"
    train_ids = {img["id"] for img in _load(synth["train_annotations"])["images"]}
    val_ids = {img["id"] for img in _load(synth["val_annotations"])["images"]}
    assert not train_ids & val_ids


def test_image_sizes_vary_and_match_the_json(synth: dict[str, Path]) -> None:
    from PIL import Image

    data = _load(synth["train_annotations"])
    shapes = set()
    for img in data["images"]:
        with Image.open(synth["train_images"] / img["file_name"]) as pil:
            assert pil.size == (img["width"], img["height"])
            assert pil.mode == "RGB"
        shapes.add((img["height"], img["width"]))
    assert len(shapes) > 3
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)


def test_all_three_area_buckets_present_in_each_split(synth: dict[str, Path]) -> None:
    for ann in (synth["train_annotations"], synth["val_annotations"]):
        areas = np.array([a["area"] for a in _load(ann)["annotations"] if not a["iscrowd"]])
        assert (areas < 32**2).any()
        assert ((areas >= 32**2) & (areas <= 96**2)).any()
        assert (areas > 96**2).any()


@pytest.mark.parametrize("seed", range(5))
def test_three_images_at_size_160_cover_all_buckets(tmp_path: Path, seed: int) -> None:
    paths = generate_synthetic_coco(tmp_path, n_train=3, n_val=0, size=160, seed=seed)
    areas = np.array([a["area"] for a in _load(paths["train_annotations"])["annotations"] if not a["iscrowd"]])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas <= 96**2)).any() and (areas > 96**2).any()


def test_coco_quirks_are_present(synth: dict[str, Path]) -> None:
    data = _load(synth["train_annotations"])
    cat_ids = sorted(c["id"] for c in data["categories"])
    assert cat_ids != list(range(1, len(cat_ids) + 1)), "category ids must have gaps"
    assert all("supercategory" in c for c in data["categories"])
    anns = data["annotations"]
    crowd = [a for a in anns if a["iscrowd"] == 1]
    assert crowd, "need at least one iscrowd annotation"
    for a in crowd:
        seg = a["segmentation"]
        assert isinstance(seg, dict) and isinstance(seg["counts"], list)
        assert sum(seg["counts"]) == seg["size"][0] * seg["size"][1]
    for a in anns:
        if a["iscrowd"] == 0:
            assert isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6
    annotated = {a["image_id"] for a in anns}
    assert any(img["id"] not in annotated for img in data["images"]), "need an image without objects"
    used = {a["category_id"] for a in anns}
    assert used <= set(cat_ids) and len(used) >= 4


def test_boxes_lie_inside_their_images(synth: dict[str, Path]) -> None:
    data = _load(synth["train_annotations"])
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert w > 0 and h > 0
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
        assert a["area"] <= w * h


def test_pycocotools_loads_and_scores_perfect_detections(synth: dict[str, Path]) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(synth["val_annotations"]))
        # Annotation masks decode (polygons and uncompressed RLE alike).
        for ann in gt.loadAnns(gt.getAnnIds()):
            assert gt.annToMask(ann).sum() > 0
        dets = [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.loadAnns(gt.getAnnIds(iscrowd=False))
        ]
        res = gt.loadRes(dets)
        ev = COCOeval(gt, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap_small, ap_medium, ap_large = ev.stats[0], ev.stats[3], ev.stats[4], ev.stats[5]
    # Every bucket is defined (pycocotools writes -1 for an empty one) and perfect boxes score 1.
    assert ap == pytest.approx(1.0)
    for bucket in (ap_small, ap_medium, ap_large):
        assert bucket == pytest.approx(1.0)


def test_categories_are_the_documented_shapes() -> None:
    assert [c["id"] for c in CATEGORIES] == [1, 2, 3, 5, 7, 11, 13, 17]
    assert len({c["name"] for c in CATEGORIES}) == len(CATEGORIES)


@pytest.mark.parametrize("kwargs", [{"size": 32}, {"n_train": -1}])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    args = {"n_train": 1, "n_val": 1, "size": 128, "seed": 0} | kwargs
    with pytest.raises(ValueError):
        generate_synthetic_coco(tmp_path, **args)


@pytest.mark.parametrize("below", [False, True], ids=["out-is-a-file", "out-under-a-file"])
def test_synth_out_that_is_a_file_is_one_clear_line_exit_2(tmp_path: Path, below: bool) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("not a folder")
    out = existing / "data" if below else existing
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["data", "synth", "--out", str(out), "--train", "1", "--val", "1", "--size", "64"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    assert lines[0].startswith(f"replic data: error: {out}: ") and "must be a directory" in lines[0]
    assert str(existing) in lines[0]
    assert existing.read_text() == "not a folder"  # untouched
