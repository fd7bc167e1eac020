"""Linear probe: how well a frozen backbone's C4 features tell the classes apart at each box.

``python -m replic.eval.backbone_probe --weights W.pt --data data/mini`` takes each ground-truth
box's C4 features (ROI-aligned to 2 x 2 cells) from a ``pretrain-backbone`` weights file at the
mini scale's deterministic resize, fits a logistic-regression classifier on the first
``--train-images`` train images and prints its accuracy on the val boxes, overall and by box
size. It measures the class information a frozen mini backbone hands the detector (docs/mini.md,
"Where AP50 is lost"), in a minute, without training a detector.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

# Box-size bins on the resized image, side of the square of the same area (px).
SIZE_BINS = (("small (< 16 px)", 0.0, 16.0), ("medium (16-32 px)", 16.0, 32.0), ("large (>= 32 px)", 32.0, 1e9))


def box_features(weights: str, data_root: str, split: str, max_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, 1024), contiguous labels (N,), box side sqrt(w h) in px (N,)) of a split."""
    from torchvision.ops import roi_align

    from replic.data import build_dataset
    from replic.engine.pretrain import PretrainOptions, _data_config
    from replic.io import load_torch_weights_only
    from replic.models.dense_pretrain import STRIDE, DensePretrainNet, box_class_targets

    dataset = build_dataset(_data_config(PretrainOptions(data_root=data_root), train=False), split)
    class_index = {cid: i for i, cid in enumerate(sorted(dataset.categories))}
    net = DensePretrainNet("resnet18", len(class_index))  # only its trunk (``c4``) is used
    state = load_torch_weights_only(weights)
    net.resnet.load_state_dict(state["model"] if "model" in state else state, strict=False)
    net.eval()
    feats, labels, sides = [], [], []
    with torch.no_grad():
        for i in range(min(max_images, len(dataset))):
            image, target = dataset[i]
            if len(target["boxes"]) == 0:
                continue
            boxes, box_labels = box_class_targets([target], class_index)
            rois = roi_align(net.c4(image[None]), boxes, output_size=2, spatial_scale=1 / STRIDE, aligned=True)
            feats.append(rois.flatten(1))
            labels.append(box_labels)
            sides.append(((boxes[0][:, 2] - boxes[0][:, 0]) * (boxes[0][:, 3] - boxes[0][:, 1])).sqrt())
    return torch.cat(feats), torch.cat(labels), torch.cat(sides)


def probe(weights: str, data_root: str, train_images: int = 2000, val_images: int = 500,
          l2: float = 1e-3) -> dict[str, Any]:
    """Fit the probe on train boxes, score val boxes: accuracies overall and per size bin."""
    torch.manual_seed(0)
    x_train, y_train, _ = box_features(weights, data_root, "train", train_images)
    x_val, y_val, side_val = box_features(weights, data_root, "val", val_images)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], int(max(y_train.max(), y_val.max())) + 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x_train), y_train) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_ok = linear(x_train).argmax(1) == y_train
        val_ok = linear(x_val).argmax(1) == y_val
    result: dict[str, Any] = {"weights": weights, "train_boxes": len(y_train), "val_boxes": len(y_val),
                              "train_accuracy": float(train_ok.float().mean()),
                              "val_accuracy": float(val_ok.float().mean()), "val_by_size": {}}
    for name, lo, hi in SIZE_BINS:
        in_bin = (side_val >= lo) & (side_val < hi)
        result["val_by_size"][name] = {"boxes": int(in_bin.sum()),
                                       "accuracy": float(val_ok[in_bin].float().mean()) if in_bin.any() else None}
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: print the probe's accuracies as JSON."""
    parser = argparse.ArgumentParser(prog="python -m replic.eval.backbone_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a `replic pretrain-backbone` weights file")
    parser.add_argument("--data", required=True, help="COCO-layout root of the mini data")
    parser.add_argument("--train-images", type=int, default=2000, help="train images whose boxes fit the probe")
    parser.add_argument("--val-images", type=int, default=500, help="val images whose boxes score it")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = probe(args.weights, args.data, args.train_images, args.val_images)
    except FileNotFoundError as err:
        print(f"backbone_probe: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
