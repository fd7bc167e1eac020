"""Configuration of the CNN detector family (torchvision Faster R-CNN, RetinaNet, FCOS with FPN).

An experiment selects this family with ``model: {family: cnn, arch: ...}``; a model section
without ``family`` is a DETR (:class:`replic.models.config.ModelConfig`). Defaults follow the
MMDetection 2.x configs MasKD trains with (hunto/MasKD mmrazor/configs/distill/maskd/, mmdet 2.14 _base_ schedules); every difference from
them is listed in docs/cnn_detectors.md. Torch-free, so loading a config imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from replic.config import ADDED_KEY, ConfigError

CnnArch = Literal["faster_rcnn", "retinanet", "fcos"]
ResNetName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]

#: FPN levels each detector uses (mmdet ``neck``): P2-P6 for Faster R-CNN, P3-P7 for the others.
FPN_LEVELS: dict[str, tuple[str, ...]] = {
    "faster_rcnn": ("P2", "P3", "P4", "P5", "P6"),
    "retinanet": ("P3", "P4", "P5", "P6", "P7"),
    "fcos": ("P3", "P4", "P5", "P6", "P7"),
}
#: mmdet test-time NMS IoU per detector (FCOS: 0.6 in MasKD's FCOS configs).
DEFAULT_NMS: dict[str, float] = {"faster_rcnn": 0.5, "retinanet": 0.5, "fcos": 0.6}


@dataclass
class CnnModelConfig:
    """One torchvision detector with a ResNet-FPN backbone.

    Keys:
        family: ``cnn`` (required; it is what tells this section from a DETR one).
        arch: ``faster_rcnn`` (FPN P2-P6, RPN + RoI heads) | ``retinanet`` | ``fcos`` (P3-P7;
            P6/P7 from C5 for RetinaNet as mmdet ``add_extra_convs='on_input'``, from P5 for FCOS
            as ``'on_output'``).
        backbone: torchvision ResNet depth; FrozenBatchNorm everywhere (mmdet ``norm_eval``).
        pretrained_backbone: ``none`` (never downloads) | ``torchvision`` (ImageNet-1k V1 from the
            torch hub cache, downloads if absent) | a local ResNet state-dict file; the same loader
            as the DETR backbones.
        trainable_layers: ResNet stages that train, counted from the top: 3 = layer2-4 (mmdet
            ``frozen_stages=1``: stem and stage 1 frozen), 0 = the whole ResNet frozen.
        fpn_channels: FPN width (256 in mmdet; smaller at smoke scale; FCOS needs a multiple of 32
            for its GroupNorm head).
        num_classes: classifier size = max category id + 1 with raw COCO ids (91), as torchvision's
            COCO models (id 0 is Faster R-CNN's background; never a target for RetinaNet / FCOS).
        score_thresh, nms_thresh, detections_per_img: the evaluation protocol (mmdet test_cfg:
            0.05, NMS 0.5 (``null`` = per arch: FCOS 0.6), 100 per image).
        rpn_*: Faster R-CNN proposal counts (mmdet 2.x: 2000 per level before NMS and 1000 kept in
            training; 1000 / 1000 at test).
        roi_head_dim: Faster R-CNN box head width (two shared FCs; mmdet ``fc_out_channels`` 1024).
        topk_candidates: RetinaNet / FCOS candidates per level before NMS (mmdet ``nms_pre``).
        size_divisible: pad the batch to a multiple of this (mmdet ``Pad(size_divisor=32)``).
        head_norm: RetinaNet's head convs: ``none`` (mmdet / torchvision v1: plain convs with
            N(0, 0.01) weights) | ``group_norm`` (GroupNorm(32) after each, torchvision's
            RetinaNet v2 head). The plain head shrinks narrow FPN maps ~10^3-fold at
            initialisation and barely learns at the mini scale's width (docs/cnn_detectors.md).
            FCOS's head always has GroupNorm; Faster R-CNN has no such head.
    """

    family: Literal["cnn"] = "cnn"
    arch: CnnArch = "faster_rcnn"
    backbone: ResNetName = "resnet50"
    pretrained_backbone: str = "none"
    trainable_layers: int = 3
    fpn_channels: int = 256
    num_classes: int = 91
    score_thresh: float = 0.05
    nms_thresh: float | None = None
    detections_per_img: int = 100
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    roi_head_dim: int = 1024
    topk_candidates: int = 1000
    size_divisible: int = 32
    # ADDED_KEY: omitted from the resolved config at its default, so earlier runs keep their hash.
    head_norm: Literal["none", "group_norm"] = field(default="none", metadata=ADDED_KEY)

    @property
    def levels(self) -> tuple[str, ...]:
        """Names of the FPN levels this detector returns under ``outputs["features"]``."""
        return FPN_LEVELS[self.arch]

    @property
    def nms(self) -> float:
        """The test-time NMS IoU (``nms_thresh`` or the arch default)."""
        return self.nms_thresh if self.nms_thresh is not None else DEFAULT_NMS[self.arch]

    def validate(self) -> None:
        """Reject impossible combinations before anything is built."""
        if not 0 <= self.trainable_layers <= 5:
            raise ConfigError(f"trainable_layers: must be in 0..5, got {self.trainable_layers}")
        for name in ("fpn_channels", "num_classes", "detections_per_img", "rpn_pre_nms_top_n_train",
                     "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                     "roi_head_dim", "topk_candidates", "size_divisible"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.head_norm != "none" and self.arch != "retinanet":
            raise ConfigError(f"head_norm: only RetinaNet's head has the choice (FCOS always uses "
                              f"GroupNorm, Faster R-CNN has no conv head); got arch {self.arch!r}")
        if (self.arch == "fcos" or self.head_norm == "group_norm") and self.fpn_channels % 32:
            raise ConfigError(f"fpn_channels: a GroupNorm(32) head ({self.arch}) needs a multiple of 32, "
                              f"got {self.fpn_channels}")
        if not 0.0 <= self.score_thresh < 1.0:
            raise ConfigError(f"score_thresh: must be in [0, 1), got {self.score_thresh}")
        if self.nms_thresh is not None and not 0.0 < self.nms_thresh <= 1.0:
            raise ConfigError(f"nms_thresh: must be in (0, 1], got {self.nms_thresh}")
        if not self.pretrained_backbone:
            raise ConfigError('pretrained_backbone: must be "none", "torchvision" or a file path')
