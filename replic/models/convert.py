"""Official DETR / Conditional DETR checkpoints → replic checkpoints.

The authors' ``.pth`` files are ``{"model": state_dict, "args": argparse.Namespace, ...}``
(sometimes with ``optimizer``, ``lr_scheduler``, ``epoch``). They are read with
``torch.load(weights_only=True)`` and exactly one extra allowed global,
``argparse.Namespace``; anything else pickled inside is refused, never executed.

The architecture comes from the saved ``args`` and is cross-checked against the
tensor shapes; DETR vs Conditional DETR is read from the keys (``ref_point_head``).
The state dict is then checked key by key and shape by shape against a replic model
built from those options, and written as a replic checkpoint::

    {"model": state_dict, "model_config": {...ModelConfig keys...},
     "source": {"format": "official", "file": name, "sha256": ..., "epoch": ..., "args": {...}}}

(``torch.save``, loadable with ``weights_only=True``), or as ``.safetensors`` with the
``model_config`` and ``source`` dicts as JSON strings in the metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from replic.io import CheckpointReadError, atomic_path, file_sha256, load_torch_weights_only  # noqa: I001

log = logging.getLogger(__name__)

# Backbone depth from the number of blocks in layer3 and the block type.
_RESNET_BY_LAYER3 = {("basic", 2): "resnet18", ("basic", 6): "resnet34",
                     ("bottleneck", 6): "resnet50", ("bottleneck", 23): "resnet101"}  # fmt: skip
# Official build(): num_classes by dataset_file (max category id + 1).
_OFFICIAL_NUM_CLASSES = {"coco": 91, "coco_panoptic": 250}


class CheckpointError(ValueError):
    """The checkpoint cannot be converted; the message names the file and the keys."""


def _torch_load_restricted(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with ``argparse.Namespace`` as the only extra global."""
    try:
        return load_torch_weights_only(path, extra_globals=[argparse.Namespace])
    except CheckpointReadError as err:  # the same message as `replic eval` / `train` give
        raise CheckpointError(str(err)) from err


def _plain(value: Any) -> Any:
    """Keep JSON-compatible values (for recording the official args); drop the rest."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if all(v is not _DROP for v in items) else _DROP
    return _DROP


_DROP = object()


def _count_layers(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    if indices and indices != set(range(len(indices))):
        raise CheckpointError(f"non-contiguous layer indices under {prefix}: {sorted(indices)}")
    return len(indices)


def _infer_backbone(state: Mapping[str, Tensor]) -> str | None:
    blocks = _count_layers(state, "backbone.0.body.layer3")
    kind = "bottleneck" if "backbone.0.body.layer1.0.conv3.weight" in state else "basic"
    return _RESNET_BY_LAYER3.get((kind, blocks))


def architecture_from_checkpoint(
    state: Mapping[str, Tensor], args: Mapping[str, Any] | None, source: str
) -> dict[str, Any]:
    """ModelConfig options for an official state dict, from ``args`` checked against shapes."""
    def need(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"{source}: expected key {key!r} is missing from the state dict")
        return state[key]

    arch = "conditional_detr" if any(".ref_point_head." in k for k in state) else "detr"
    query_embed = need("query_embed.weight")
    class_rows = need("class_embed.weight").shape[0]
    inferred = {
        "backbone": _infer_backbone(state),
        "hidden_dim": int(query_embed.shape[1]),
        "num_queries": int(query_embed.shape[0]),
        "enc_layers": _count_layers(state, "transformer.encoder.layers"),
        "dec_layers": _count_layers(state, "transformer.decoder.layers"),
        "dim_feedforward": int(need("transformer.decoder.layers.0.linear1.weight").shape[0]),
        # Softmax-CE DETR has one extra no-object logit; focal Conditional DETR has none.
        "num_classes": int(class_rows) if arch == "conditional_detr" else int(class_rows) - 1,
    }
    if inferred["backbone"] is None:
        raise CheckpointError(f"{source}: backbone is not a ResNet-18/34/50/101 layout")

    args = dict(args or {})
    if args.get("masks"):
        raise CheckpointError(f"{source}: segmentation checkpoints (args.masks=True) are not supported")
    if args.get("pre_norm"):
        raise CheckpointError(f"{source}: pre-norm transformers (args.pre_norm=True) are not supported")
    if args.get("position_embedding", "sine") not in ("sine", "v2"):
        raise CheckpointError(
            f"{source}: position_embedding {args['position_embedding']!r} is not supported (only sine)"
        )
    for key, value in inferred.items():
        if key == "num_classes" or key not in args:
            continue
        if args[key] != value:
            raise CheckpointError(f"{source}: args.{key} = {args[key]!r} but the weights say {value!r}")
    expected_classes = _OFFICIAL_NUM_CLASSES.get(args.get("dataset_file"), None)
    if expected_classes is not None and expected_classes != inferred["num_classes"]:
        log.warning("%s: dataset_file %r implies num_classes %d but class_embed gives %d; using the weights",
                    source, args.get("dataset_file"), expected_classes, inferred["num_classes"])
    if not args:
        log.warning("%s: no 'args' in the checkpoint; nheads=8, dilation=False and dropout=0.1 are assumed", source)
    return {
        "arch": arch,
        "backbone": inferred["backbone"],
        "dilation": bool(args.get("dilation", False)),
        "pretrained_backbone": "none",
        "hidden_dim": inferred["hidden_dim"],
        "nheads": int(args.get("nheads", 8)),
        "enc_layers": inferred["enc_layers"],
        "dec_layers": inferred["dec_layers"],
        "dim_feedforward": inferred["dim_feedforward"],
        "dropout": float(args.get("dropout", 0.1)),
        "num_classes": inferred["num_classes"],
        "num_queries": inferred["num_queries"],
        "aux_loss": bool(args.get("aux_loss", True)),
    }


def check_against_model(state: Mapping[str, Tensor], model_config: Mapping[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys
    of ``state`` relative to the replic model built from ``model_config``."""
    expected = expected_state_shapes(model_config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or mis_shaped:
        parts = [f"{source}: state dict does not match the replic model for {dict(model_config)}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if mis_shaped:
            parts.append(f"shape mismatches ({len(mis_shaped)}): {mis_shaped}")
        raise CheckpointError("\n  ".join(parts))


def expected_state_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key → shape of the state dict of the replic model built from ``model_config``."""
    from replic.config import from_dict
    from replic.models import build_model
    from replic.models.config import ModelConfig

    cfg = from_dict(ModelConfig, dict(model_config))
    # Build without allocating real weights where the model allows it (an R101 is 60M floats).
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except Exception:  # noqa: BLE001 - some init code cannot run on meta tensors; fall back
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_official_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read an official DETR / Conditional DETR ``.pth`` safely.

    Returns ``(model_config, state_dict)``: the full ModelConfig as a plain dict (for
    ``replic.config.from_dict(ModelConfig, ...)``; the architecture keys come from the
    checkpoint, every other key is the ModelConfig default, as training runs record it)
    and the float state dict, checked against the replic model. ``num_batches_tracked``
    entries are dropped.
    """
    model_config, state, _, _ = _read_official(Path(path))
    return model_config, state


def _read_official(path: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any], int | None]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = _torch_load_restricted(path)
    state, args = _split_checkpoint(ckpt, str(path))
    options = architecture_from_checkpoint(state, args, str(path))
    check_against_model(state, options, str(path))
    model_config = _full_model_config(options)
    epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
    return model_config, state, args or {}, epoch


def _full_model_config(options: Mapping[str, Any]) -> dict[str, Any]:
    from replic.config import from_dict, to_dict
    from replic.models.config import ModelConfig

    return to_dict(from_dict(ModelConfig, dict(options)))


def _split_checkpoint(ckpt: Any, source: str) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise CheckpointError(f"{source}: expected a dict with the state dict under 'model'")
    state = {}
    for key, value in ckpt["model"].items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: model[{key!r}] is a {type(value).__name__}, not a tensor")
        if key.endswith("num_batches_tracked"):
            continue
        state[key] = value
    raw_args = ckpt.get("args")
    if raw_args is None:
        args = None
    elif isinstance(raw_args, argparse.Namespace):
        args = vars(raw_args)
    elif isinstance(raw_args, Mapping):
        args = dict(raw_args)
    else:
        raise CheckpointError(f"{source}: 'args' is a {type(raw_args).__name__}, expected argparse.Namespace")
    return state, args


def convert_official(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Convert an official checkpoint to a replic checkpoint at ``out`` (atomic write).

    ``out`` ending in ``.safetensors`` writes safetensors; anything else ``torch.save``.
    Returns the ``source`` record (with the input's sha256).
    """
    path = Path(path)
    model_config, state, args, epoch = _read_official(path)
    recorded_args = {k: v for k, v in ((k, _plain(v)) for k, v in sorted(args.items())) if v is not _DROP}
    source = {
        "format": "official",
        "file": path.name,
        "sha256": file_sha256(path),
        "epoch": epoch,
        "args": recorded_args,
    }
    state = {k: v.detach().contiguous() for k, v in state.items()}
    write_replic_checkpoint(out, state, model_config, source)
    return source


def write_replic_checkpoint(
    out: str | os.PathLike, state: Mapping[str, Tensor], model_config: Mapping[str, Any], source: Mapping[str, Any]
) -> None:
    """Write ``{model, model_config, source}`` atomically (torch or safetensors by suffix)."""
    out = Path(out)
    # Plain NCHW layout on disk (a channels-last model's conv weights are strided views that
    # safetensors refuses and other code may not expect); values are unchanged.
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    with atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {"model_config": json.dumps(dict(model_config), sort_keys=True),
                        "source": json.dumps(dict(source), sort_keys=True)}  # fmt: skip
            save_file(dict(state), str(tmp), metadata=metadata)
        else:
            torch.save({"model": dict(state), "model_config": dict(model_config), "source": dict(source)}, tmp)


def load_replic_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """Read a converted checkpoint (``.pt`` or ``.safetensors``) → (model_config, state_dict, source)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "model_config" not in metadata:
            raise CheckpointError(f"{path}: safetensors metadata has no 'model_config'")
        return json.loads(metadata["model_config"]), state, json.loads(metadata.get("source", "{}"))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not a replic checkpoint (needs 'model' and 'model_config')")
    return dict(ckpt["model_config"]), dict(ckpt["model"]), dict(ckpt.get("source") or {})
