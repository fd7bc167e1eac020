"""The shipped mini backbone: packing a pretrain-backbone file and unpacking it gives the same
bytes; the committed asset unpacks to the file the pretraining wrote on the data the workflow
generates; bad data, damage and a trained layer4 are refused with the file named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from replic.cli import main as replic_main
from replic.data.synth import generate_synthetic_coco
from replic.engine.backbone_asset import MANIFEST, AssetError, pack, unpack
from replic.engine.pretrain import PretrainOptions, pretrain_backbone, provenance_path
from replic.io import file_sha256

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "assets" / "mini_backbone"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_synthetic_coco(tmp_path_factory.mktemp("data"), n_train=16, n_val=4, size=160)["root"]


@pytest.fixture(scope="module")
def pretrained(tiny, tmp_path_factory) -> Path:
    """Two steps of the real pretraining (conv1..layer3 trained, layer4 at its initialisation)."""
    out = tmp_path_factory.mktemp("backbone") / "resnet18_dense.pt"
    pretrain_backbone(PretrainOptions(data_root=str(tiny), steps=2, batch_size=4, calib_batches=1, val_batches=1,
                                      roi_cls_weight=1.0), out, progress=False)
    return out


def _ann(root: Path) -> Path:
    return root / "annotations" / "instances_train2017.json"


def test_pack_then_unpack_gives_the_pretrained_file_byte_for_byte(pretrained, tiny, tmp_path):
    manifest = pack(pretrained, tmp_path / "asset")
    # Only layer4 is rebuilt: 25 tensors of a ResNet-18 (2 blocks x 10 + downsample 5).
    assert len(manifest["regenerated"]) == 25
    assert all(r["key"].startswith("layer4.") for r in manifest["regenerated"])
    # The compressed file holds zeros where layer4 was: far smaller than the weights.
    assert (tmp_path / "asset" / manifest["compressed"]).stat().st_size < 0.5 * pretrained.stat().st_size
    out = tmp_path / "unpacked" / "resnet18_dense.pt"
    record = unpack(tmp_path / "asset", out, _ann(tiny))
    assert out.read_bytes() == pretrained.read_bytes()
    written = json.loads(provenance_path(out).read_text())
    original = json.loads(provenance_path(pretrained).read_text())
    assert written == record and written["sha256"] == original["sha256"] == file_sha256(out)
    assert {k: v for k, v in written.items() if k != "unpacked_from"} == original


def test_unpack_refuses_other_data_damage_and_a_wrong_rebuild(pretrained, tiny, tmp_path):
    asset = tmp_path / "asset"
    pack(pretrained, asset)
    other = generate_synthetic_coco(tmp_path / "other", n_train=16, n_val=4, size=160, seed=1)["root"]
    with pytest.raises(AssetError, match=r"instances_train2017\.json.*mini_backbone=pretrain"):
        unpack(asset, tmp_path / "a.pt", _ann(other))
    assert not (tmp_path / "a.pt").exists()
    # A rebuild that does not give the recorded bytes (here: another seed for layer4).
    manifest = json.loads((asset / MANIFEST).read_text())
    manifest["rebuild"]["seed"] += 1
    (asset / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AssetError, match="not the recorded"):
        unpack(asset, tmp_path / "b.pt", _ann(tiny))
    assert not (tmp_path / "b.pt").exists()
    # A damaged compressed file.
    pack(pretrained, asset)
    xz = asset / json.loads((asset / MANIFEST).read_text())["compressed"]
    data = bytearray(xz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    xz.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="resnet18_dense.pt.xz: sha256 differs"):
        unpack(asset, tmp_path / "c.pt", _ann(tiny))


def test_pack_refuses_a_trained_layer4(pretrained, tmp_path):
    data = torch.load(pretrained, weights_only=True)
    data["model"]["layer4.1.conv2.weight"] += 1e-3
    bad = tmp_path / "trained.pt"
    torch.save(data, bad)
    record = json.loads(provenance_path(pretrained).read_text()) | {"sha256": file_sha256(bad)}
    provenance_path(bad).write_text(json.dumps(record))
    with pytest.raises(AssetError, match="layer4.1.conv2.weight is not its initialisation"):
        pack(bad, tmp_path / "asset")


def test_the_committed_asset_unpacks_to_the_pretrained_file_on_the_workflows_mini_data(tmp_path, capsys):
    """The mini data the workflow generates (config mini_data) is the data the shipped backbone was
    pretrained on, and this machine's torch rebuilds layer4 to the recorded bytes."""
    import yaml

    mini = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["mini_data"]
    root = generate_synthetic_coco(tmp_path / "mini", n_train=mini["train"], n_val=mini["val"], size=mini["size"],
                                   seed=mini["seed"])["root"]
    out = tmp_path / "resnet18_dense.pt"
    assert replic_main(["backbone-asset", "unpack", "--asset", str(SHIPPED), "--out", str(out),
                        "--data", str(root)]) == 0
    manifest = json.loads((SHIPPED / MANIFEST).read_text())
    assert file_sha256(out) == manifest["sha256"] == manifest["provenance"]["sha256"]
    assert manifest["provenance"]["options"]["steps"] == 1200  # the workflow's mini_pretrain
    shutil.rmtree(root / "train2017")
    # Through the CLI, an error is one line naming the file, exit 2.
    (root / "annotations" / "instances_train2017.json").write_text("{}")
    capsys.readouterr()
    assert replic_main(["backbone-asset", "unpack", "--asset", str(SHIPPED), "--out", str(tmp_path / "x.pt"),
                        "--data", str(root)]) == 2
    assert "instances_train2017.json: sha256" in capsys.readouterr().out

