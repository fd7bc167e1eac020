"""The CNN family (torchvision Faster R-CNN / RetinaNet / FCOS behind replic's model contract):
output contract, one training step, the evaluation protocol, the resize/normalise path against
the mmdet pipeline's arithmetic on a hand-made image, box round trips, parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from replic.data.collate import collate_fn
from replic.engine.config import load_experiment
from replic.engine.runtime import build_dataset
from replic.models.backbone import FrozenBatchNorm2d
from replic.models.cnn.build import LOSS_TERMS, build_criterion, build_model, build_postprocess
from replic.models.cnn.config import CnnModelConfig
from replic.models.cnn.detector import to_torchvision_targets
from replic.methods import build_method

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("faster_rcnn", "retinanet", "fcos")
STRIDES = {"P2": 4, "P3": 8, "P4": 16, "P5": 32, "P6": 64, "P7": 128}
# mmdet's img_norm_cfg for pytorch-style ResNets (0-255 scale, RGB).
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)


def tiny(arch: str, **kw) -> CnnModelConfig:
    base = dict(arch=arch, backbone="resnet18", fpn_channels=32, roi_head_dim=64, num_classes=4,
                rpn_post_nms_top_n_train=64, rpn_post_nms_top_n_test=64)
    return CnnModelConfig(**{**base, **kw})


def batch_of_two(seed: int = 0):
    """Two normalised images of different sizes, padded as replic's collate does, with targets."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for h, w, boxes, labels in ((64, 80, [[0.5, 0.5, 0.4, 0.5]], [1]),
                                (56, 72, [[0.3, 0.4, 0.3, 0.3], [0.7, 0.6, 0.3, 0.5]], [3, 1])):
        target = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
                  "size": torch.tensor([h, w]), "orig_size": torch.tensor([2 * h, 2 * w]),
                  "image_id": torch.tensor(len(items))}
        items.append((torch.randn(3, h, w, generator=gen), target))
    return collate_fn(items)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


def test_eval_output_contract(arch):
    torch.manual_seed(0)
    cfg = tiny(arch, score_thresh=0.0)  # untrained: keep every candidate to check the shapes
    model = build_model(cfg).eval()
    batch = batch_of_two()
    with torch.no_grad():
        out = model(batch.images, batch.mask)
    assert out["image_sizes"].tolist() == [[64, 80], [56, 72]]
    assert tuple(out["features"]) == cfg.levels
    padded = (64, 96)  # the batch 64 x 80 padded to multiples of 32
    for level, feature in out["features"].items():
        stride = STRIDES[level]
        assert feature.shape == (2, 32, -(-padded[0] // stride), -(-padded[1] // stride)), level
    assert len(out["detections"]) == 2
    for det, (h, w) in zip(out["detections"], out["image_sizes"].tolist()):
        n = det["boxes"].shape[0]
        assert 0 < n <= cfg.detections_per_img and det["scores"].shape == (n,)
        assert det["labels"].dtype == torch.int64
        # Raw ids: Faster R-CNN's softmax reserves 0 for background; the sigmoid heads have a
        # logit per id < num_classes (ids that are no category are dropped before scoring).
        lowest = 1 if arch == "faster_rcnn" else 0
        assert det["labels"].min() >= lowest and det["labels"].max() < cfg.num_classes
        boxes = det["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    results = build_postprocess(cfg)(out, torch.tensor([[128, 160], [112, 144]]))
    for det, res in zip(out["detections"], results):
        torch.testing.assert_close(res["boxes"], det["boxes"] * 2, rtol=0, atol=1e-4)
        assert torch.equal(res["labels"], det["labels"])


def test_training_step_has_finite_named_losses_and_trains_only_the_unfrozen_stages(arch):
    torch.manual_seed(0)
    cfg = tiny(arch, trainable_layers=3)
    model = build_model(cfg).train()
    criterion = build_criterion(cfg)
    batch = batch_of_two()
    out = model(batch.images, batch.mask, batch.targets)
    losses = criterion(out, batch.targets)
    assert set(losses) == set(criterion.weight_dict) == set(LOSS_TERMS[arch])
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert all(v > 0 for k, v in losses.items() if k in ("loss_classifier", "loss_objectness",
                                                          "classification"))
    sum(losses.values()).backward()
    body = model.neck.body
    for name, param in body.named_parameters():
        frozen = name.startswith(("conv1", "layer1"))  # mmdet frozen_stages=1
        assert param.requires_grad is not frozen, name
        if not frozen:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    # BN is frozen everywhere (mmdet norm_eval): statistics are buffers that never change.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) > 0
    # The FPN maps come back with the losses, with a graph: the tap point of feature distillation.
    assert all(f.requires_grad for f in out["features"].values())


def test_training_without_targets_is_a_clear_error():
    model = build_model(tiny("retinanet")).train()
    batch = batch_of_two()
    with pytest.raises(ValueError, match="needs the targets"):
        model(batch.images, batch.mask)


def test_method_forward_passes_targets_to_detectors_that_take_them(tmp_path):
    # The default TrainingMethod gives the targets only to detectors that declare takes_targets.
    cfg = load_experiment(REPO / "configs/experiments/fcos_r50_24ep.yaml", "paper",
                          {"model": {"backbone": "resnet18", "pretrained_backbone": "none",
                                     "fpn_channels": 32}})
    method = build_method(cfg)
    model = method.build_model().train()
    batch = batch_of_two()
    out = method.forward_train(model, batch.images, batch.mask, batch.targets)
    assert set(out["losses"]) == set(LOSS_TERMS["fcos"])


def test_evaluation_protocol_is_set_explicitly_on_the_torchvision_models():
    # torchvision defaults differ (FCOS keeps score > 0.2, RetinaNet up to 300 detections).
    frcnn = build_model(tiny("faster_rcnn")).model
    assert (frcnn.roi_heads.score_thresh, frcnn.roi_heads.nms_thresh, frcnn.roi_heads.detections_per_img) \
        == (0.05, 0.5, 100)
    retina = build_model(tiny("retinanet")).model
    assert (retina.score_thresh, retina.nms_thresh, retina.detections_per_img) == (0.05, 0.5, 100)
    fcos = build_model(tiny("fcos")).model
    assert (fcos.score_thresh, fcos.nms_thresh, fcos.detections_per_img) == (0.05, 0.6, 100)
    assert fcos.center_sampling_radius == 1.5


def test_extra_fpn_levels_come_from_c5_for_retinanet_and_p5_for_fcos():
    retina = build_model(tiny("retinanet")).neck.fpn.extra_blocks
    fcos = build_model(tiny("fcos")).neck.fpn.extra_blocks
    assert retina.use_P5 is False and retina.p6.in_channels == 512  # resnet18 C5 (mmdet on_input)
    assert fcos.use_P5 is True and fcos.p6.in_channels == 32        # P5 (mmdet on_output)


# ---------------------------------------------------------------- the data path, hand-made image
def _hand_made_coco(root: Path) -> tuple[Path, dict]:
    """One 200 x 150 image: left half (200, 40, 10), right half (10, 100, 250); one box."""
    pixels = np.zeros((150, 200, 3), dtype=np.uint8)
    pixels[:, :100] = (200, 40, 10)
    pixels[:, 100:] = (10, 100, 250)
    ann = {"id": 1, "image_id": 7, "category_id": 3, "bbox": [30.0, 20.0, 100.0, 90.0],
           "area": 9000.0, "iscrowd": 0}
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        Image.fromarray(pixels).save(root / split / "a.png")
    (root / "annotations").mkdir()
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 150, "width": 200}],
            "annotations": [ann], "categories": [{"id": 1, "name": "x"}, {"id": 3, "name": "y"}]}
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root, ann


def _mmcv_rescale(h: int, w: int, long_max: int, short_max: int) -> tuple[int, int]:
    """mmcv.imrescale(keep_ratio) size, written out independently of replic's code."""
    factor = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def test_the_network_sees_the_pixels_of_the_mmdet_pipeline_and_boxes_round_trip(tmp_path):
    root, ann = _hand_made_coco(tmp_path / "coco")
    cfg = load_experiment(REPO / "configs/experiments/frcnn_r50_24ep.yaml", "paper",
                          {"data": {"root": str(root), "val_size": 80, "val_max_size": 120,
                                    "num_workers": 0},
                           "model": {"backbone": "resnet18", "pretrained_backbone": "none",
                                     "fpn_channels": 32, "num_classes": 4}})
    image, target = build_dataset(cfg, "val")[0]
    # mmdet Resize((120, 80), keep_ratio): 150 x 200 -> 80 x 107 (DETR's rule would give 106).
    expected_hw = _mmcv_rescale(150, 200, 120, 80)
    assert expected_hw == (80, 107) and tuple(image.shape[-2:]) == expected_hw

    model = build_model(cfg.model).eval()
    seen = {}
    model.neck.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    batch = collate_fn([(image, target)])
    with torch.no_grad():
        out = model(batch.images, batch.mask)
    x = seen["x"]
    assert x.shape == (1, 3, 96, 128)  # mmdet Pad(size_divisor=32)
    assert (x[..., 80:, :] == 0).all() and (x[..., :, 107:] == 0).all()  # zero padding, post-normalise
    # Interior of each colour region (away from the resize's blended middle column):
    # (v - mean) / std with mmdet's 0-255 constants; normalised exactly once.
    for col, rgb in ((20, (200, 40, 10)), (90, (10, 100, 250))):
        want = torch.tensor([(v - m) / s for v, m, s in zip(rgb, MMDET_MEAN, MMDET_STD)])
        torch.testing.assert_close(x[0, :, 40, col], want, rtol=0, atol=2e-4)

    # Boxes: data contract -> torchvision's absolute xyxy in the network-input frame -> back to
    # the file's frame by the post-processor: the annotation again.
    (tv,) = to_torchvision_targets(batch.targets)
    sx, sy = 107 / 200, 80 / 150
    x0, y0, bw, bh = ann["bbox"]
    torch.testing.assert_close(tv["boxes"], torch.tensor([[x0 * sx, y0 * sy, (x0 + bw) * sx, (y0 + bh) * sy]]),
                               rtol=0, atol=1e-3)
    assert tv["labels"].tolist() == [3]  # raw COCO id
    fake = {"detections": [{"boxes": tv["boxes"], "scores": torch.ones(1), "labels": tv["labels"]}],
            "image_sizes": out["image_sizes"]}
    (res,) = build_postprocess(cfg.model)(fake, target["orig_size"][None])
    torch.testing.assert_close(res["boxes"], torch.tensor([[x0, y0, x0 + bw, y0 + bh]]), rtol=0, atol=1e-3)


# ------------------------------------------------------------------------- parameter counts
def _count(model: torch.nn.Module) -> int:
    """Parameters + FrozenBatchNorm affine terms (torchvision's untrained builders use BatchNorm2d,
    whose affine terms are parameters)."""
    frozen_affine = sum(m.weight.numel() + m.bias.numel() for m in model.modules()
                        if isinstance(m, (FrozenBatchNorm2d, torchvision.ops.misc.FrozenBatchNorm2d)))
    return sum(p.numel() for p in model.parameters()) + frozen_affine


def _torchvision_reference(arch: str, depth: int) -> torch.nn.Module:
    """The same detector from torchvision's own builders (num_classes 91, untrained)."""
    det = torchvision.models.detection
    if arch == "faster_rcnn":
        if depth == 50:
            return det.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
        return FasterRCNN(resnet_fpn_backbone(backbone_name="resnet101", weights=None), num_classes=91)
    if arch == "fcos":
        if depth == 50:
            return det.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
        backbone = _resnet_fpn_extractor(torchvision.models.resnet101(), 3, returned_layers=[2, 3, 4],
                                         extra_blocks=LastLevelP6P7(256, 256))
        return FCOS(backbone, num_classes=91)
    # RetinaNet: torchvision's v1 builder takes P6 from P5; mmdet (and ours) from C5, as v2's extractor.
    resnet = getattr(torchvision.models, f"resnet{depth}")()
    backbone = _resnet_fpn_extractor(resnet, 3, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(2048, 256))
    return RetinaNet(backbone, num_classes=91)


# Stated in docs/cnn_detectors.md (millions, 91 classes); the test compares with torchvision's builders.
PARAM_COUNTS_M = {("faster_rcnn", 50): 41.81, ("faster_rcnn", 101): 60.80, ("retinanet", 50): 38.20,
                  ("retinanet", 101): 57.19, ("fcos", 50): 32.32, ("fcos", 101): 51.31}


@pytest.mark.parametrize("arch_depth", sorted(PARAM_COUNTS_M), ids=lambda a: f"{a[0]}_r{a[1]}")
def test_parameter_counts_match_torchvision_builders(arch_depth):
    arch, depth = arch_depth
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ours = _count(build_model(CnnModelConfig(arch=arch, backbone=f"resnet{depth}")))
        reference = _count(_torchvision_reference(arch, depth))
    assert ours == reference
    assert abs(ours / 1e6 - PARAM_COUNTS_M[arch_depth]) < 0.05, ours


def test_retinanet_group_norm_head_is_torchvisions_v2_head():
    """``head_norm: group_norm`` gives RetinaNet torchvision's v2 head (GroupNorm after each conv):
    the same keys and shapes as ``retinanet_resnet50_fpn_v2``'s head, so its weights would load;
    the default stays the plain v1 head (no normalisation)."""
    with torch.device("meta"):
        ours = build_model(CnnModelConfig(arch="retinanet", head_norm="group_norm")).model.head
        plain = build_model(CnnModelConfig(arch="retinanet")).model.head
        v2 = torchvision.models.detection.retinanet_resnet50_fpn_v2(
            weights=None, weights_backbone=None, num_classes=91).head
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(v2)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in ours.modules()) == 8
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
