"""Load a model and images for the figures: replic runs and converted official checkpoints alike.

``load_model_for_viz`` finds the model configuration in this order: the ``config``
argument (an experiment YAML, a run's resolved ``config.yaml``, or a ``ModelConfig``);
the checkpoint's ``config`` entry (the resolved experiment a replic run stores); its
``model_config`` entry (converted official checkpoints); a ``config.yaml`` next to the checkpoint
or one directory up (``RUN_DIR/checkpoints/last.pt``). Weights load with
``weights_only=True`` and ``strict=True``, so a config that does not match the
weights fails with the offending keys named.

``load_images`` turns image files or dataset image ids into the collated batch the
model sees (the validation resize of the run's data config) plus the original
RGB pixels the figures are drawn on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replic.config import ConfigError, from_dict, load_yaml
from replic.data.config import DataConfig
from replic.models.config import ModelConfig


def _build_detector(model_cfg: ModelConfig, run_config: Any) -> torch.nn.Module:
    """The detector as the run's training method builds it (KS-DETR swaps an encoder layer),
    else the plain detector of ``model_cfg``."""
    from replic.models.build import build_model

    method = run_config.get("method") if isinstance(run_config, dict) else None
    if not isinstance(method, dict) or method.get("name", "none") == "none":
        return build_model(model_cfg)
    from replic.engine.config import build_config
    from replic.methods import build_method

    exp = build_config(dict(run_config))
    exp.model = model_cfg
    return build_method(exp).build_model()


@dataclass
class VizModel:
    """A detector ready for attention extraction, with what it was built from."""

    model: torch.nn.Module
    model_config: ModelConfig
    data_config: DataConfig | None  # None for converted checkpoints without a run config
    name: str
    checkpoint: Path

    @property
    def softmax(self) -> bool:
        """True when the classifier is DETR's softmax with a no-object logit."""
        return not bool(self.model_config.resolved().focal_loss)


def _configs_from_mapping(raw: dict[str, Any], origin: str) -> tuple[ModelConfig, DataConfig | None, str]:
    """(model, data, name) from a resolved experiment mapping or a bare model mapping."""
    if "model" in raw and isinstance(raw["model"], dict):
        from replic.engine.config import build_config

        try:
            exp = build_config(dict(raw))
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from err
        return exp.model, exp.data, exp.name
    try:
        return from_dict(ModelConfig, raw), None, ""
    except ConfigError as err:
        raise ConfigError(f"{origin}: not an experiment or model config: {err}") from err


def _config_from_file(path: Path, scale: str | None) -> tuple[ModelConfig, DataConfig | None, str]:
    raw = load_yaml(path)
    if "model" in raw or "extends" in raw or "base" in raw:
        from replic.engine.config import load_experiment

        exp = load_experiment(path, scale)
        return exp.model, exp.data, exp.name
    return _configs_from_mapping(raw, str(path))


def _run_config_beside(checkpoint: Path) -> Path | None:
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def load_model_for_viz(
    checkpoint: str | Path,
    config: str | Path | ModelConfig | None = None,
    scale: str | None = None,
    device: str | torch.device = "cpu",
) -> VizModel:
    """Build the detector of ``checkpoint`` and load its weights (eval mode).

    Args:
        checkpoint: a replic run checkpoint (``checkpoint_final.pt``, ``checkpoints/last.pt``)
            or a converted official checkpoint (``model`` + ``model_config``; ``.pt`` or
            ``.safetensors``, as ``replic convert`` writes them).
        config: optional experiment/run YAML or ``ModelConfig`` overriding what the checkpoint carries.
        scale: scale overlay applied when ``config`` is an experiment YAML.
        device: where the model lives.
    """
    from replic.engine.checkpoint import load_checkpoint, model_state_from_checkpoint

    path = Path(checkpoint)
    if path.suffix == ".safetensors":  # converted official weights: config in the metadata
        from replic.models.convert import load_replic_checkpoint

        model_config, state, _ = load_replic_checkpoint(path)
        data = {"model": state, "model_config": model_config}
    else:
        data = load_checkpoint(path)
    data_cfg: DataConfig | None = None
    name = ""
    if isinstance(config, ModelConfig):
        model_cfg = config
    elif config is not None:
        model_cfg, data_cfg, name = _config_from_file(Path(config), scale)
    elif isinstance(data.get("config"), dict):  # replic runs: the resolved experiment
        model_cfg, data_cfg, name = _configs_from_mapping(data["config"], f"{path}: config")
    elif isinstance(data.get("model_config"), dict):  # converted official checkpoints
        model_cfg, data_cfg, name = _configs_from_mapping(data["model_config"], f"{path}: model_config")
    else:
        beside = _run_config_beside(path)
        if beside is None:
            raise ConfigError(
                f"{path}: the checkpoint carries no 'model_config' or 'config' entry and no config.yaml "
                "was found beside it; pass --config"
            )
        model_cfg, data_cfg, name = _config_from_file(beside, None)
    if data_cfg is None:
        beside = _run_config_beside(path)
        if beside is not None and config is None:
            _, data_cfg, name = _config_from_file(beside, None)
    # The weights come from the checkpoint: never read or download a pretrained backbone.
    model_cfg = dataclasses.replace(model_cfg, pretrained_backbone="none")
    model = _build_detector(model_cfg, data.get("config") if config is None else None)
    state = model_state_from_checkpoint(data, path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(
            f"{path}: weights do not match the model config ({model_cfg.arch}, {model_cfg.backbone}): {err}"
        ) from err
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the model config ({model_cfg.arch}, {model_cfg.backbone}): "
            f"missing {sorted(missing)[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    model.to(device).eval()
    return VizModel(model, model_cfg, data_cfg, name or path.parent.name, path)


@dataclass
class ImageBatch:
    """What the model sees (collated, padded) and what the figures draw on (original RGB)."""

    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict[str, Any]]
    originals: list[np.ndarray]  # (h, w, 3) uint8, the files as on disk


def _transform_pil(pil, image_id: int, data_cfg: DataConfig):
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF

    from replic.data.transforms import make_transforms

    width, height = pil.size
    image = tv_tensors.Image(TF.pil_to_tensor(pil))
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "area": torch.zeros(0),
        "iscrowd": torch.zeros(0, dtype=torch.int64),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }
    return make_transforms("val", data_cfg)(image, target)


def load_images(sources: list[str | int | Path], data_cfg: DataConfig | None = None) -> ImageBatch:
    """Image files (paths) or val-split image ids (ints, or ``@N`` for the N-th image) → a batch.

    Ids are looked up in ``data_cfg``'s val split; files are read directly. Both go through
    the validation transforms of ``data_cfg`` (short side ``val_size``, capped at ``val_max_size``).
    """
    from PIL import Image

    from replic.data import annotation_file, collate_fn
    from replic.data.coco import CocoDetection

    data_cfg = data_cfg or DataConfig()
    if not sources:
        raise ValueError("no images given")
    dataset = None
    items, originals = [], []
    for position, source in enumerate(sources):
        text = str(source)
        if Path(text).is_file():
            with Image.open(text) as img:
                pil = img.convert("RGB")
            image_id = -(position + 1)  # files have no dataset id; negative marks that
        else:
            if dataset is None:
                ann = annotation_file(data_cfg, "val")
                if not ann.is_file():
                    raise FileNotFoundError(
                        f"image {text!r} is not a file, and there is no val annotation file {ann} to look "
                        "it up as an image id"
                    )
                dataset = CocoDetection(Path(data_cfg.root) / data_cfg.val_split, ann, transforms=None,
                                        check_files=False)
            if text.startswith("@") and text[1:].isdigit():
                index = int(text[1:])
                if index >= len(dataset.ids):
                    raise ValueError(f"image {text}: the val split has only {len(dataset.ids)} images")
                image_id = dataset.ids[index]
            elif text.lstrip("-").isdigit():
                image_id = int(text)
                if image_id not in dataset.index.images:
                    raise ValueError(f"image id {image_id} is not in {dataset.ann_file}")
            else:
                raise FileNotFoundError(f"image {text!r}: no such file, and not an image id or @N")
            pil = dataset.load_image(image_id)
        originals.append(np.asarray(pil, dtype=np.uint8))
        items.append(_transform_pil(pil, image_id, data_cfg))
    batch = collate_fn(items)
    return ImageBatch(batch.images, batch.mask, batch.targets, originals)
