"""``replic data subset``: reproducible, correct slices of a COCO annotation file."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from replic.cli import main as cli_main
from replic.data import generate_synthetic_coco
from replic.data.coco import DatasetError
from replic.data.subset import subset_coco, write_subset


@pytest.fixture(scope="module")
def ann_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = generate_synthetic_coco(tmp_path_factory.mktemp("subset_src"), n_train=30, n_val=0, size=96, seed=3)
    return paths["train_annotations"]


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def test_same_seed_same_bytes_other_seed_other_images(ann_file: Path, tmp_path: Path) -> None:
    a = write_subset(ann_file, 8, seed=11, out_file=tmp_path / "a.json")
    b = write_subset(ann_file, 8, seed=11, out_file=tmp_path / "b.json")
    c = write_subset(ann_file, 8, seed=12, out_file=tmp_path / "c.json")
    assert a.read_bytes() == b.read_bytes()
    ids_a = {img["id"] for img in _load(a)["images"]}
    ids_c = {img["id"] for img in _load(c)["images"]}
    assert len(ids_a) == len(ids_c) == 8
    assert ids_a != ids_c


def test_subset_keeps_exactly_the_annotations_of_kept_images(ann_file: Path) -> None:
    source = _load(ann_file)
    subset = subset_coco(ann_file, 10, seed=0)
    kept = {img["id"] for img in subset["images"]}
    assert len(kept) == 10 and kept <= {img["id"] for img in source["images"]}
    expected = [a for a in source["annotations"] if a["image_id"] in kept]
    assert subset["annotations"] == expected
    assert subset["categories"] == source["categories"]
    assert isinstance(subset["info"], dict) and subset["licenses"] == []


def test_category_filter_keeps_only_those_categories(ann_file: Path) -> None:
    source = _load(ann_file)
    wanted = {c["id"] for c in source["categories"] if c["name"] in ("circle", "star")}
    assert len(wanted) == 2
    holders = {a["image_id"] for a in source["annotations"] if a["category_id"] in wanted}
    n = min(4, len(holders))
    assert n >= 2, "fixture too small for this test"
    # Names and ids may be mixed: 'circle' by name, star by its id as a string.
    star_id = next(c["id"] for c in source["categories"] if c["name"] == "star")
    subset = subset_coco(ann_file, n, seed=5, categories=["circle", str(star_id)])
    kept = {img["id"] for img in subset["images"]}
    assert len(kept) == n and kept <= holders
    assert {c["id"] for c in subset["categories"]} == wanted
    assert subset["annotations"], "kept images must keep their matching annotations"
    assert all(a["category_id"] in wanted and a["image_id"] in kept for a in subset["annotations"])
    expected = [a for a in source["annotations"] if a["image_id"] in kept and a["category_id"] in wanted]
    assert subset["annotations"] == expected


def test_subset_loads_in_pycocotools_and_via_the_cli(ann_file: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    out = tmp_path / "cli.json"
    rc = cli_main(["data", "subset", "--ann", str(ann_file), "--images", "5", "--seed", "2",
                   "--categories", "square", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes() == write_subset(ann_file, 5, 2, tmp_path / "api.json", ["square"]).read_bytes()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    assert len(coco.getImgIds()) == 5
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["square"]


def test_unknown_category_and_too_many_images_are_clear_errors(ann_file: Path) -> None:
    with pytest.raises(DatasetError, match=r"instances_train2017\.json.*'blob'"):
        subset_coco(ann_file, 2, seed=0, categories=["blob"])
    with pytest.raises(DatasetError, match="no category with id 4"):
        subset_coco(ann_file, 2, seed=0, categories=["4"])
    with pytest.raises(ValueError, match="only 30 are eligible"):
        subset_coco(ann_file, 31, seed=0)


def test_cli_reports_bad_input_with_exit_code_2(ann_file: Path, tmp_path: Path, capsys) -> None:
    rc = cli_main(["data", "subset", "--ann", str(tmp_path / "nope.json"), "--images", "1",
                   "--seed", "0", "--out", str(tmp_path / "x.json")])
    assert rc == 2
    assert "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
