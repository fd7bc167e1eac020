"""ResNet backbone with frozen BatchNorm, as DETR / Conditional DETR.

The module tree reproduces the official state-dict names: the detector holds
``backbone = Joiner(Backbone, PositionEmbeddingSine)`` so the ResNet weights live under
``backbone.0.body.{conv1,bn1,layer1..layer4}.*`` (torchvision names, no ``fc``).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from replic.models.position_encoding import PositionEmbeddingSine

# Stage name in torchvision → level name returned by the detector.
_LEVELS = {"layer1": "C2", "layer2": "C3", "layer3": "C4", "layer4": "C5"}

_TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms (4 buffers, no parameters).

    y = x · w / sqrt(running_var + eps) + (b − running_mean · w / sqrt(running_var + eps)),
    eps = 1e-5. ``num_batches_tracked`` entries of ordinary BatchNorm state dicts are dropped
    on load.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook signature
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _load_resnet_weights(resnet: nn.Module, name: str, pretrained: str) -> None:
    """Load ImageNet weights into ``resnet`` as ``pretrained`` asks ("none" does nothing)."""
    if pretrained == "none":
        return
    if pretrained == "torchvision":
        # Uses the torch hub cache ($TORCH_HOME); downloads the file if it is not cached.
        weights = getattr(torchvision.models, _TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1
        # check_hash verifies a fresh download against the hash in the file name.
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True, map_location="cpu")
        source = f"torchvision {weights}"
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_backbone: file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise ValueError(f"pretrained_backbone: {path} does not hold a state dict")
        source = str(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = {k: v.shape for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(shape)}" for k, shape in expected.items()
                  if k in state and state[k].shape != shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"pretrained_backbone: {source} does not match torchvision {name}: "
            f"missing keys {_head(missing)}, unexpected keys {_head(unexpected)}, "
            f"shape mismatches {_head(mismatched)}")
    resnet.load_state_dict(state, strict=False)  # only fc.* is absent, checked above


def _head(items: list[str], n: int = 5) -> str:
    """A short list for error messages: the first n items and the count."""
    return f"{items[:n]}{' …' if len(items) > n else ''} ({len(items)})"


class Backbone(nn.Module):
    """torchvision ResNet body returning the requested stages (always C5).

    Stem (conv1/bn1) and layer1 never train; with ``train_backbone=False`` nothing does.
    ``channels_last`` keeps the convolution weights and activations in NHWC memory order,
    which oneDNN (CPU) and cuDNN run faster; the values differ by float rounding only. The
    returned feature maps are then channels-last too (same shape, other strides).
    """

    def __init__(self, name: str = "resnet50", train_backbone: bool = True, dilation: bool = False,
                 pretrained: str = "none", levels: tuple[str, ...] = ("C5",), channels_last: bool = False,
                 input_level: str = "C5") -> None:
        super().__init__()
        if name not in _TORCHVISION_WEIGHTS:
            raise ValueError(f"backbone: unknown ResNet {name!r}; choose from {sorted(_TORCHVISION_WEIGHTS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5): torchvision {name} (BasicBlock) does not support dilation")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d)
        _load_resnet_weights(resnet, name, pretrained)
        for pname, param in resnet.named_parameters():
            trainable = train_backbone and any(s in pname for s in ("layer2", "layer3", "layer4"))
            param.requires_grad_(trainable)
        if input_level not in _LEVELS.values():
            raise ValueError(f"input_level: unknown level {input_level!r}; choose from {list(_LEVELS.values())}")
        # Stages after the last wanted level are not built (C4 input: no layer4 compute).
        wanted = set(levels) | {input_level}
        return_layers = {stage: level for stage, level in _LEVELS.items() if level in wanted}
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)
        # Channels of the map that feeds the transformer.
        c5 = 512 if name in ("resnet18", "resnet34") else 2048
        self.num_channels = c5 >> (3 - list(_LEVELS.values()).index(input_level))
        self.input_level = input_level
        self.levels = tuple(level for level in _LEVELS.values() if level in wanted)
        self.channels_last = channels_last
        if channels_last:
            self.body.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor, mask: Tensor) -> OrderedDict[str, tuple[Tensor, Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) True = pad → {level: (feature, mask at its size)}."""
        out: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        if isinstance(images, BackboneFeatures):
            maps = images.level_maps(self.levels)  # computed ahead by this (frozen) backbone
        else:
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            maps = self.body(images)
        for level, feature in maps.items():
            # Nearest-neighbour on a float copy, then back to bool, as the official code.
            level_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
            out[level] = (feature, level_mask)
        return out


class BackboneFeatures:
    """A padded image batch represented by its frozen backbone maps (``replic.engine.feature_cache``).

    Passed to the detector in place of the (B, 3, H, W) image tensor: it reports that tensor's
    ``shape``, ``device`` and ``dim()``, so the detector's checks and the padding mask (always at
    pixel level) work unchanged, and :class:`Backbone` returns ``maps`` instead of running its
    body. Only valid for a frozen backbone whose weights computed ``maps``.

    Args:
        maps: level name → (B, C, h, w) map of the padded batch.
        image_shape: (B, 3, H, W) of the padded pixel batch the maps stand for.
    """

    def __init__(self, maps: dict[str, Tensor], image_shape: tuple[int, int, int, int]) -> None:
        self.maps = dict(maps)
        self.shape = torch.Size(image_shape)

    @property
    def device(self) -> torch.device:
        return next(iter(self.maps.values())).device

    def dim(self) -> int:
        return len(self.shape)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BackboneFeatures:
        return BackboneFeatures({k: v.to(device, non_blocking=non_blocking) for k, v in self.maps.items()},
                                tuple(self.shape))

    def level_maps(self, levels: tuple[str, ...]) -> OrderedDict[str, Tensor]:
        """The maps of ``levels``; a clear error if the cache lacks one."""
        missing = [level for level in levels if level not in self.maps]
        if missing:
            raise ValueError(f"cached backbone features lack levels {missing} (have {sorted(self.maps)})")
        return OrderedDict((level, self.maps[level]) for level in levels)


class Joiner(nn.Sequential):
    """``backbone.0`` = the ResNet body, ``backbone.1`` = the (parameter-free) position encoding."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[OrderedDict[str, tuple[Tensor, Tensor]], Tensor]:
        """→ ({level: (feature, mask)}, position encoding of the input level (B, D, H, W))."""
        features = self[0](images, mask)
        source, source_mask = features[self[0].input_level]
        pos = self[1](source_mask).to(source.dtype)
        return features, pos
