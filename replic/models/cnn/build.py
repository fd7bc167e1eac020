"""Builders of the CNN family: config → torchvision detector (behind :class:`CnnDetector`),
loss reader, post-processor. Only the adapter is ours; the detectors are torchvision's."""

from __future__ import annotations

from functools import partial

import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from replic.models.backbone import FrozenBatchNorm2d, _load_resnet_weights
from replic.models.cnn.config import CnnModelConfig
from replic.models.cnn.criterion import DetectorLosses
from replic.models.cnn.detector import CnnDetector
from replic.models.cnn.postprocess import CnnPostProcess

# ResNet stage widths (C2..C5): BasicBlock (18/34) and Bottleneck (50/101).
_STAGE_CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
                   "resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048)}
# torchvision's loss names per detector; all weighted 1 as in mmdet.
LOSS_TERMS: dict[str, tuple[str, ...]] = {
    "faster_rcnn": ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"),
    "retinanet": ("classification", "bbox_regression"),
    "fcos": ("classification", "bbox_regression", "bbox_ctrness"),
}
# Trainable ResNet parts for trainable_layers = 1..5 (torchvision's convention).
_TRAIN_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


def build_backbone(cfg: CnnModelConfig) -> BackboneWithFPN:
    """ResNet (FrozenBatchNorm, replic's weight loader) + FPN with the arch's extra levels."""
    resnet = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    _load_resnet_weights(resnet, cfg.backbone, cfg.pretrained_backbone)
    trainable = _TRAIN_ORDER[: cfg.trainable_layers]
    for name, param in resnet.named_parameters():
        param.requires_grad_(name.startswith(trainable))
    channels = _STAGE_CHANNELS[cfg.backbone]
    if cfg.arch == "faster_rcnn":
        stages = (1, 2, 3, 4)
        extra: nn.Module = LastLevelMaxPool()  # P6 = max-pool(P5, 1, stride 2), as mmdet
    else:
        stages = (2, 3, 4)
        # RetinaNet builds P6 from C5 (mmdet add_extra_convs='on_input'), FCOS from P5
        # ('on_output'). torchvision infers that from the channel counts; set it explicitly.
        from_p5 = cfg.arch == "fcos"
        extra = LastLevelP6P7(cfg.fpn_channels if from_p5 else channels[3], cfg.fpn_channels)
        extra.use_P5 = from_p5
    return_layers = {f"layer{s}": str(i) for i, s in enumerate(stages)}
    return BackboneWithFPN(resnet, return_layers, [channels[s - 1] for s in stages], cfg.fpn_channels,
                           extra_blocks=extra)


def build_torchvision_detector(cfg: CnnModelConfig) -> nn.Module:
    """The torchvision detector with the evaluation protocol set explicitly (torchvision's
    defaults differ: FCOS keeps score > 0.2, RetinaNet up to 300 detections)."""
    backbone = build_backbone(cfg)
    if cfg.arch == "faster_rcnn":
        # torchvision's default box head and predictor, with the width as a key.
        resolution = 7  # MultiScaleRoIAlign output (mmdet RoIAlign 7x7)
        return FasterRCNN(
            backbone, num_classes=None,
            box_head=TwoMLPHead(cfg.fpn_channels * resolution**2, cfg.roi_head_dim),
            box_predictor=FastRCNNPredictor(cfg.roi_head_dim, cfg.num_classes),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms,
            box_detections_per_img=cfg.detections_per_img)
    common = dict(num_classes=cfg.num_classes, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms,
                  detections_per_img=cfg.detections_per_img, topk_candidates=cfg.topk_candidates)
    if cfg.arch == "retinanet":
        model = RetinaNet(backbone, **common)  # torchvision's plain (v1) head
        if cfg.head_norm == "group_norm":  # torchvision's v2 head on the same anchors
            anchors = model.anchor_generator.num_anchors_per_location()[0]
            model.head = RetinaNetHead(cfg.fpn_channels, anchors, cfg.num_classes,
                                       norm_layer=partial(nn.GroupNorm, 32))
        return model
    return FCOS(backbone, center_sampling_radius=1.5, **common)


def build_model(cfg: CnnModelConfig) -> CnnDetector:
    """The detector of ``cfg`` behind replic's model contract (downloads only with
    ``pretrained_backbone: torchvision`` and an empty torch hub cache)."""
    cfg.validate()
    return CnnDetector(build_torchvision_detector(cfg), cfg.levels, cfg.size_divisible)


def build_criterion(cfg: CnnModelConfig) -> DetectorLosses:
    """Reads the detector's own loss terms, each with weight 1 (mmdet's loss weights)."""
    return DetectorLosses({name: 1.0 for name in LOSS_TERMS[cfg.arch]})


def build_postprocess(cfg: CnnModelConfig) -> CnnPostProcess:
    """Detections (already thresholded, NMS'd, top-k) → boxes in the original image frame."""
    return CnnPostProcess()
