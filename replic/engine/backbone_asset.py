"""The mini backbone shipped with the repository: the exact file ``replic pretrain-backbone`` wrote,
small enough to commit.

Pretraining the mini scale's ResNet-18 takes 30-55 minutes on two cores, longer than a newcomer's
first job should wait. Its ``layer4`` is never trained (the dense task stops at C4) and is saved
at its initialisation, which the same seed rebuilds; the other stages are 11 MB. So the asset is
the weights file with ``layer4``'s tensor bytes zeroed, xz-compressed, plus a manifest: the
file's sha256, where in the file each zeroed tensor lies, how to rebuild them, and the
pretraining's provenance record. Unpacking rebuilds ``layer4``, writes its bytes back and checks
the sha256 of the whole file: the result is byte for byte the file the pretraining wrote, so
runs made from either are the same runs (``inputs.json`` records that sha256).

``replic backbone-asset pack --weights W --out DIR`` makes the asset from a pretrained file;
``replic backbone-asset unpack --asset DIR --out W --data ROOT`` is the workflow's default way to
the mini backbone (``--config mini_backbone=pretrain`` trains it instead).
"""

from __future__ import annotations

import argparse
import json
import lzma
import struct
import zipfile
from pathlib import Path
from typing import Any

from replic.io import atomic_write_bytes, atomic_write_json, file_sha256

MANIFEST = "manifest.json"
FORMAT = 1
# Tensors rebuilt from the seed instead of stored: the stages the dense pretraining leaves untrained.
REBUILT_PREFIX = "layer4."


class AssetError(ValueError):
    """The asset, its data or the rebuilt file do not match what the manifest records."""


def _rebuilt_state(rebuild: dict[str, Any]) -> dict[str, Any]:
    """The untrained tensors as ``pretrain-backbone`` saves them: the trunk's initialisation under
    its seed, BatchNorm statistics reset (replic/engine/pretrain.py)."""
    import torch

    from replic.engine.runtime import seed_everything
    from replic.models.dense_pretrain import DensePretrainNet

    seed_everything(int(rebuild["seed"]))
    net = DensePretrainNet(rebuild["backbone"], int(rebuild["num_classes"]), roi_cls=bool(rebuild["roi_cls"]))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
    return {k: v for k, v in net.backbone_state_dict().items() if k.startswith(REBUILT_PREFIX)}


def _tensor_bytes(tensor: Any) -> bytes:
    return tensor.detach().contiguous().cpu().numpy().tobytes()


def _stored_entries(data: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, length) of every member of a torch zip file (stored, not deflated)."""
    import io

    entries = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise AssetError(f"{info.filename}: compressed zip member; torch.save stores members")
            header = data[info.header_offset:info.header_offset + 30]
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            entries.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
    return entries


def pack(weights: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write ``out_dir/<weights name>.xz`` and ``out_dir/manifest.json`` from a pretrained file."""
    from replic.io import load_torch_weights_only

    weights = Path(weights)
    provenance_file = weights.with_name(weights.name + ".provenance.json")
    if not provenance_file.is_file():
        raise AssetError(f"{provenance_file}: missing (pretrain-backbone writes it beside the weights)")
    provenance = json.loads(provenance_file.read_text())
    data = weights.read_bytes()
    sha256 = file_sha256(weights)
    if provenance.get("sha256") != sha256:
        raise AssetError(f"{weights}: sha256 {sha256} is not the one its provenance records "
                         f"({provenance.get('sha256')})")
    options = provenance["options"]
    rebuild = {"backbone": options["backbone"], "num_classes": len(provenance["classes"]),
               "roi_cls": options["roi_cls_weight"] > 0, "seed": options["seed"]}
    state = load_torch_weights_only(weights)["model"]
    rebuilt = _rebuilt_state(rebuild)
    for key, tensor in rebuilt.items():
        if key not in state or state[key].dtype != tensor.dtype or not bool((state[key] == tensor).all()):
            raise AssetError(f"{weights}: {key} is not its initialisation under seed {rebuild['seed']}; "
                             "only untrained stages can be rebuilt")
    by_bytes = {_tensor_bytes(t): k for k, t in rebuilt.items()}
    blob = bytearray(data)
    regenerated = []
    for name, offset, length in _stored_entries(data):
        key = by_bytes.get(bytes(data[offset:offset + length])) if "/data/" in name else None
        if key is not None:
            regenerated.append({"member": name, "offset": offset, "length": length, "key": key})
            blob[offset:offset + length] = bytes(length)
    # (Tensors with equal bytes, e.g. zero BN biases and running means, share one key.)
    missing = sorted(set(by_bytes.values()) - {r["key"] for r in regenerated})
    if missing:
        raise AssetError(f"{weights}: no zip member holds {missing[:3]}")
    compressed = lzma.compress(bytes(blob), preset=9 | lzma.PRESET_EXTREME)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / f"{weights.name}.xz", compressed)
    manifest = {
        "format": FORMAT,
        "what": "the mini scale's dense-pretrained ResNet-18 (replic pretrain-backbone), layer4 rebuilt "
                "from its seed at unpack (replic/engine/backbone_asset.py)",
        "file": weights.name, "size": len(data), "sha256": sha256,
        "compressed": f"{weights.name}.xz", "compressed_sha256": file_sha256(out_dir / f"{weights.name}.xz"),
        "rebuild": rebuild, "regenerated": regenerated, "provenance": provenance,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def unpack(asset_dir: str | Path, out: str | Path, train_annotations: str | Path) -> dict[str, Any]:
    """Rebuild the weights file at ``out`` (and ``out.provenance.json``) from the asset; refuse if
    ``train_annotations`` is not the file the backbone was pretrained on, or if the rebuilt file's
    sha256 is not the recorded one. Returns the provenance written."""
    asset_dir = Path(asset_dir)
    manifest_file = asset_dir / MANIFEST
    if not manifest_file.is_file():
        raise AssetError(f"{manifest_file}: missing")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise AssetError(f"{manifest_file}: format {manifest.get('format')!r}, this replic reads {FORMAT}")
    provenance = manifest["provenance"]
    want = provenance["train_annotations_sha256"]
    if not Path(train_annotations).is_file():
        raise AssetError(f"{train_annotations}: missing (the mini train annotations the backbone was pretrained on)")
    got = file_sha256(train_annotations)
    if got != want:
        raise AssetError(f"{train_annotations}: sha256 {got[:16]}..., but the shipped backbone was pretrained on "
                         f"{want[:16]}... (other mini data settings?); pretrain it on this data with "
                         "--config mini_backbone=pretrain")
    compressed = asset_dir / manifest["compressed"]
    if file_sha256(compressed) != manifest["compressed_sha256"]:
        raise AssetError(f"{compressed}: sha256 differs from {manifest_file} (a damaged or partial checkout?)")
    blob = bytearray(lzma.decompress(compressed.read_bytes()))
    if len(blob) != manifest["size"]:
        raise AssetError(f"{compressed}: {len(blob)} bytes after decompression, {manifest['size']} recorded")
    rebuilt = _rebuilt_state(manifest["rebuild"])
    for entry in manifest["regenerated"]:
        data = _tensor_bytes(rebuilt[entry["key"]])
        if len(data) != entry["length"]:
            raise AssetError(f"{entry['key']}: rebuilt {len(data)} bytes, {entry['length']} recorded")
        blob[entry["offset"]:entry["offset"] + entry["length"]] = data
    import hashlib

    sha256 = hashlib.sha256(blob).hexdigest()
    if sha256 != manifest["sha256"]:
        raise AssetError(f"rebuilt {manifest['file']} has sha256 {sha256[:16]}..., not the recorded "
                         f"{manifest['sha256'][:16]}... (another torch/torchvision initialises layer4 "
                         "differently?); use --config mini_backbone=pretrain")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, bytes(blob))
    record = {**provenance, "unpacked_from": {"asset": str(asset_dir), "manifest_sha256": file_sha256(manifest_file),
                                              "note": "byte-identical to the file the pretraining wrote"}}
    atomic_write_json(out.with_name(out.name + ".provenance.json"), record)
    return record


def _run(args: argparse.Namespace) -> int:
    try:
        if args.action == "pack":
            manifest = pack(args.weights, args.out)
            print(f"wrote {Path(args.out) / manifest['compressed']} and {Path(args.out) / MANIFEST} "
                  f"({len(manifest['regenerated'])} tensors rebuilt at unpack)")
        else:
            unpack(args.asset, args.out, Path(args.data) / "annotations" / "instances_train2017.json")
            print(f"wrote {args.out} (sha256 checked against {Path(args.asset) / MANIFEST})")
    except (AssetError, FileNotFoundError, KeyError) as err:
        print(f"backbone-asset: error: {err}", flush=True)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``backbone-asset`` to the ``replic`` command."""
    p = subparsers.add_parser(
        "backbone-asset", help="pack / unpack the shipped mini backbone (assets/mini_backbone)",
        description="pack: make the committed asset from a pretrain-backbone file; unpack: rebuild that "
        "file byte for byte (its sha256 checked) from the asset.")
    sub = p.add_subparsers(dest="action", required=True)
    pk = sub.add_parser("pack", help="weights file -> asset directory")
    pk.add_argument("--weights", required=True, help="a file written by replic pretrain-backbone")
    pk.add_argument("--out", required=True, help="asset directory to write")
    up = sub.add_parser("unpack", help="asset directory -> weights file")
    up.add_argument("--asset", required=True, help="asset directory (manifest.json)")
    up.add_argument("--out", required=True, help="weights file to write")
    up.add_argument("--data", required=True, help="the mini data root the backbone was pretrained on")
    p.set_defaults(func=_run)
