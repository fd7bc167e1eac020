"""Frozen-backbone feature caching: compute each (train image, flip)'s backbone maps once.

With a frozen backbone and a deterministic resize, the only randomness of a training sample
is its horizontal flip, so the backbone's output for every (image, flip) can be computed once
and training steps cost only the transformer (issue 12: ~33 ms instead of 80-210 ms a step at
mini scale). What the engine promises still holds:

* **Same outputs.** Maps are computed per image, unpadded, in eval mode; a batch pads them
  with zeros and keeps the *pixel* padding mask, which the detector interpolates exactly as
  for images (:class:`replic.models.backbone.BackboneFeatures`). A cached batch therefore
  gives every image the outputs the uncached detector gives it alone (and equals the uncached
  batch when the batch's images share a size; with mixed sizes the uncached backbone also sees
  the zero padding near the borders). ``tests/test_feature_cache.py`` checks both.
* **Determinism and exact resume.** The flip of sample (seed, epoch, index) is drawn exactly as
  :class:`replic.data.transforms.RandomHorizontalFlip` draws it under
  :class:`replic.engine.sampling.SeededDataset`, so the cached and uncached runs see the same
  flips, and a resumed run the same as an uninterrupted one.
* **Never stale.** The cache file is named by a sha256 over everything its contents depend on:
  the backbone's weights (every tensor), its levels and memory format, the annotation file and
  every image file's bytes, the transform settings, and the torch version. The same key is
  stored inside the file and checked on load.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from replic.config import ConfigError

log = logging.getLogger("replic.engine")

CACHE_FORMAT = 1


def unsupported_reason(cfg: Any) -> str | None:
    """Why this experiment trains uncached although ``train.feature_cache`` is on (None: it can use it).

    A scale overlay (mini) turns the cache on for every experiment; a non-DETR model family, or a
    training method that needs the images themselves, cannot use cached DETR-backbone maps, so those
    runs train from images, and their provenance says why. A method can also decline once its
    inputs are loaded (:meth:`replic.methods.base.TrainingMethod.feature_cache_reason`: a D³ETR
    teacher whose backbone is not the student's).
    """
    family = getattr(cfg.model, "family", "detr")
    if family != "detr":
        return f"model family '{family}' has no cached-feature path"
    from replic.methods import method_classes

    # Each method declares whether its step can read cached maps (TrainingMethod.uses_cached_features).
    for cls in method_classes(cfg.method):
        if not cls.uses_cached_features:
            return f"method '{cls.name}' runs its own forward on the images"
    return None


def check_cacheable(cfg: Any) -> None:
    """``ConfigError`` naming the key when ``train.feature_cache`` cannot give the uncached result."""
    if unsupported_reason(cfg) is not None:
        return  # trains from images (see unsupported_reason); nothing to check
    data = cfg.data
    if cfg.model.train_backbone:
        raise ConfigError("train.feature_cache: needs a frozen backbone (model.train_backbone: false)")
    if len(data.train_scales) != 1 or data.resize_only_prob != 1.0:
        raise ConfigError(
            "train.feature_cache: needs a deterministic train resize: one data.train_scales size "
            f"(got {data.train_scales}) and data.resize_only_prob: 1.0 (got {data.resize_only_prob})")


def _hash_update_tensor(digest: Any, name: str, tensor: Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of ``module`` (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        _hash_update_tensor(digest, name, tensor)
    return digest.hexdigest()


def data_sha256(dataset: Any) -> str:
    """sha256 over the annotation file and every image file the dataset reads, in order."""
    digest = hashlib.sha256()
    digest.update(Path(dataset.ann_file).read_bytes())
    for image_id in dataset.ids:
        name = dataset.index.images[image_id]["file_name"]
        digest.update(name.encode())
        digest.update((Path(dataset.img_folder) / name).read_bytes())
    return digest.hexdigest()


def cache_inputs(cfg: Any, dataset: Any, backbone: torch.nn.Module) -> dict[str, Any]:
    """Everything the cached maps and targets depend on (hashed into the cache key)."""
    data = cfg.data
    return {
        "format": CACHE_FORMAT,
        "backbone_weights_sha256": weights_sha256(backbone),
        "backbone": cfg.model.backbone,
        "levels": list(backbone.levels),
        "channels_last": bool(backbone.channels_last),
        "data_sha256": data_sha256(dataset),
        "images": len(dataset),
        "transform": {"size": data.train_scales[0], "max_size": data.max_size,
                      "remove_crowd": data.remove_crowd, "flips": [False, True]},
        "torch": str(torch.__version__),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    """The cache file's name: sha256 of the canonical JSON of ``inputs``."""
    import json

    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _deterministic_dataset(cfg: Any, flip: bool) -> Any:
    """The train split with the train transform, its one random choice (the flip) fixed."""
    import dataclasses

    from replic.data import build_dataset

    fixed = dataclasses.replace(cfg.data, hflip_prob=1.0 if flip else 0.0, check_files=False)
    return build_dataset(fixed, "train")


@torch.no_grad()
def compute_cache(cfg: Any, backbone: torch.nn.Module, device: torch.device, batch_size: int = 16,
                  progress: bool = True) -> dict[str, Any]:
    """Maps (per level, per (index, flip): index 2i = unflipped, 2i + 1 = flipped) and targets."""
    from replic.engine.progress import Progress

    was_training = backbone.training
    backbone.eval()
    maps: dict[str, list[Tensor]] = {level: [] for level in backbone.levels}
    targets: list[dict[str, Any]] = []
    sets = [_deterministic_dataset(cfg, False), _deterministic_dataset(cfg, True)]
    n = len(sets[0])
    bar = Progress(n, "feature cache", enabled=progress, plain_every=500)
    for i in range(n):
        for flip in (0, 1):
            image, target = sets[flip][i]
            mask = torch.zeros(1, *image.shape[-2:], dtype=torch.bool, device=device)
            out = backbone(image[None].to(device), mask)
            for level, (feature, _) in out.items():
                maps[level].append(feature[0].contiguous().to("cpu"))
            targets.append({k: (v.clone() if isinstance(v, Tensor) else v) for k, v in target.items()})
        bar.update()
    bar.close()
    backbone.train(was_training)
    return {"maps": maps, "targets": targets}


def load_or_build(cfg: Any, dataset: Any, backbone: torch.nn.Module, device: torch.device, *,
                  is_main: bool = True, progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cache of this (backbone, data, transform): loaded if present and valid, else built.

    Returns ``(cache, info)``; ``info`` (key, path, whether it was built, the inputs) goes into
    the run's provenance. Under DDP only the main process builds; call it on every process
    with a barrier between (the engine does).
    """
    from replic.engine import distributed
    from replic.engine.checkpoint import atomic_torch_save
    from replic.io import load_torch_weights_only

    check_cacheable(cfg)
    inputs = cache_inputs(cfg, dataset, backbone)
    key = cache_key(inputs)
    directory = Path(cfg.train.feature_cache_dir)
    path = directory / f"{key}.pt"
    built = False
    if is_main and not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        # Runs started together (workflow jobs) share one cache: the first builds it under an
        # exclusive lock, the others wait for it instead of computing it again.
        with open(directory / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                log.info("feature cache: computing the backbone maps of %d images x 2 flips -> %s",
                         len(dataset), path)
                cache = compute_cache(cfg, backbone, device, progress=progress)
                atomic_torch_save({"key": key, "inputs": inputs, **cache}, path)
                built = True
    distributed.barrier()
    data = load_torch_weights_only(path)
    if not isinstance(data, dict) or data.get("key") != key:
        raise ValueError(f"{path}: feature cache does not hold key {key} (stale or foreign file); delete it")
    info = {"used": True, "key": key, "path": str(path), "built_by_this_run": built, "inputs": inputs}
    return {"maps": data["maps"], "targets": data["targets"]}, info


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Training items ``(maps, target)`` from a feature cache, flip drawn as the transform draws it.

    Wrap it in :class:`replic.engine.sampling.SeededDataset` like the image dataset: the one
    ``torch.rand`` it draws is the first draw of the uncached train transform (the flip).
    """

    def __init__(self, cache: dict[str, Any], hflip_prob: float) -> None:
        self.maps = cache["maps"]
        self.targets = cache["targets"]
        self.hflip_prob = hflip_prob
        self.levels = list(self.maps)

    def __len__(self) -> int:
        return len(self.targets) // 2

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        flip = float(torch.rand(()).item()) < self.hflip_prob
        key = 2 * index + int(flip)
        return {level: self.maps[level][key] for level in self.levels}, self.targets[key]

    @staticmethod
    def collate_fn(items: list[tuple[dict[str, Tensor], dict[str, Any]]]) -> Any:
        """Pad maps with zeros (bottom/right) and build the pixel padding mask, as ``collate_fn``."""
        from replic.data.collate import Batch
        from replic.models.backbone import BackboneFeatures

        sizes = [tuple(int(v) for v in target["size"]) for _, target in items]
        max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        mask = torch.ones(len(items), max_h, max_w, dtype=torch.bool)
        for i, (h, w) in enumerate(sizes):
            mask[i, :h, :w] = False
        maps = {}
        for level in items[0][0]:
            feats = [m[level] for m, _ in items]
            fh = max(int(f.shape[-2]) for f in feats)
            fw = max(int(f.shape[-1]) for f in feats)
            out = feats[0].new_zeros(len(feats), feats[0].shape[0], fh, fw)
            for i, f in enumerate(feats):
                out[i, :, : f.shape[-2], : f.shape[-1]].copy_(f)
            maps[level] = out
        images = BackboneFeatures(maps, (len(items), 3, max_h, max_w))
        return Batch(images=images, mask=mask, targets=[target for _, target in items])
