"""Train-step time and peak memory of the CNN family: replic's engine step vs torchvision's reference loop.

Same detector (torchvision Faster R-CNN / RetinaNet / FCOS, ResNet-FPN, built by replic with the same
seed), same batch, same SGD:

- ``replic``: the engine's step — replic batch (resized + normalised by replic's transforms, padded
  by its collate) -> ``TrainingMethod.forward_train`` -> ``DetectorLosses`` -> weighted total ->
  backward -> SGD step (as ``replic.engine.train.Trainer._train_step``, fp32, no clipping);
- ``torchvision``: the loop of torchvision's ``references/detection/engine.py``
  (``train_one_epoch``): a list of [0, 1] images and absolute-xyxy targets into the model with its
  own ``GeneralizedRCNNTransform`` (normalise; ``min_size`` = the image's short side, so it does not
  change the size), ``sum(loss_dict.values())``, backward, SGD step.

Step times come from one process that alternates the two modes step by step (same weights,
same batch), so a shared machine's load hits both alike; peak memory from one process per mode
(its own: peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). Results:
benchmarks/results_cpu.md.

    python benchmarks/bench_cnn_step.py --archs faster_rcnn retinanet fcos --size 512 --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _batch(size: int, device: str):
    """Two images (short side ``size``) with two boxes each: replic Batch and torchvision inputs."""
    import torch

    from replic.data.collate import collate_fn
    from replic.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    gen = torch.Generator().manual_seed(0)
    items, tv_images, tv_targets = [], [], []
    for h, w in ((size, int(size * 4 / 3)), (size, size)):
        pixels = torch.rand(3, h, w, generator=gen)
        boxes_abs = torch.tensor([[0.1 * w, 0.2 * h, 0.5 * w, 0.7 * h], [0.4 * w, 0.1 * h, 0.9 * w, 0.5 * h]])
        labels = torch.tensor([1, 3])
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        cxcywh = torch.stack([(boxes_abs[:, 0] + boxes_abs[:, 2]) / 2 / w, (boxes_abs[:, 1] + boxes_abs[:, 3]) / 2 / h,
                              (boxes_abs[:, 2] - boxes_abs[:, 0]) / w, (boxes_abs[:, 3] - boxes_abs[:, 1]) / h], 1)
        items.append(((pixels - mean) / std, {"boxes": cxcywh, "labels": labels, "size": torch.tensor([h, w])}))
        tv_images.append(pixels.to(device))
        tv_targets.append({"boxes": boxes_abs.to(device), "labels": labels.to(device)})
    return collate_fn(items).to(device), tv_images, tv_targets


def _step_fn(arch: str, mode: str, size: int, backbone: str, device: str):
    """(step function, description) of one mode on a fresh detector (seed 0: same weights for both)."""
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from replic.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from replic.engine.train import weighted_total
    from replic.models.cnn.build import build_criterion, build_model
    from replic.models.cnn.config import CnnModelConfig

    torch.manual_seed(0)
    cfg = CnnModelConfig(arch=arch, backbone=backbone, num_classes=91)
    detector = build_model(cfg).to(device).train()
    batch, tv_images, tv_targets = _batch(size, device)
    if mode == "replic":
        from replic.methods.base import NoOptions, TrainingMethod

        method = TrainingMethod(None, NoOptions())
        criterion = build_criterion(cfg)
        params = [p for p in detector.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)

        def step() -> float:
            outputs = method.forward_train(detector, batch.images, batch.mask, batch.targets)
            loss = weighted_total(criterion(outputs, batch.targets), criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss)

        return step
    model = detector.model  # the same torchvision detector, with torchvision's own transform back
    model.transform = GeneralizedRCNNTransform(min_size=size, max_size=100 * size, image_mean=list(IMAGENET_MEAN),
                                               image_std=list(IMAGENET_STD))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)

    def step() -> float:
        loss_dict = model(tv_images, tv_targets)
        loss = sum(loss for loss in loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    return step


def _timed(step, device: str) -> float:
    import torch

    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _worker(arch: str, mode: str, size: int, steps: int, warmup: int, backbone: str, device: str) -> dict:
    """``mode`` replic | torchvision: peak memory of that mode alone; ``both``: step times with the
    two modes alternating step by step in one process (a shared CPU's load hits both alike)."""
    import torch

    modes = ("replic", "torchvision") if mode == "both" else (mode,)
    steps_of = {m: _step_fn(arch, m, size, backbone, device) for m in modes}
    for _ in range(warmup):
        for m in modes:
            steps_of[m]()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(steps):
        for m in modes:
            times[m].append(_timed(steps_of[m], device))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"arch": arch, "mode": mode, "median_s": {m: statistics.median(t) for m, t in times.items()},
            "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["faster_rcnn", "retinanet", "fcos"])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=512, help="short side of the two images")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_worker(*args.worker, args.size, args.steps, args.warmup, args.backbone, args.device)))
        return 0
    mem = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"{args.backbone}, 2 images, short side {args.size}, {args.steps} timed steps after {args.warmup}, "
          f"{args.threads} threads, {args.device}")
    print(f"| detector | replic step (s) | torchvision loop (s) | ratio | replic {mem} | torchvision {mem} |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs:
        rows = {}
        for mode in ("both", "replic", "torchvision"):
            cmd = [sys.executable, __file__, "--worker", arch, mode, "--size", str(args.size), "--steps",
                   str(args.steps if mode == "both" else 1), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--backbone", args.backbone, "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[mode] = json.loads(out.strip().splitlines()[-1])
        r, t = rows["both"]["median_s"]["replic"], rows["both"]["median_s"]["torchvision"]
        print(f"| {arch} | {r:.3f} | {t:.3f} | {r / t:.2f} | {rows['replic']['peak_mib']:.0f} | "
              f"{rows['torchvision']['peak_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
