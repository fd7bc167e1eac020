"""``replic pretrain-backbone``: train a small ResNet on the dense task, save it for ``pretrained_backbone``.

The mini scale's stand-in for ImageNet initialisation (see :mod:`replic.models.dense_pretrain`).
Deterministic for a seed: the data order and each sample's augmentation come from
:mod:`replic.engine.sampling`, as in detector training. After the last step the BatchNorm
running statistics are re-estimated (cumulative average, no gradient) on train images at the
deterministic evaluation resize, because those statistics are what the detector's frozen BN
will use. Writes ``OUT`` (``{"model": torchvision-named state dict, "provenance": …}``, loadable
with ``weights_only=True``) and ``OUT.provenance.json``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replic.io import file_sha256

log = logging.getLogger("replic.pretrain")


@dataclass
class PretrainOptions:
    """Everything that shapes the pretrained weights (recorded in their provenance)."""

    data_root: str
    backbone: str = "resnet18"
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    seed: int = 0
    train_scales: list[int] = field(default_factory=lambda: [112, 128, 144])
    max_size: int = 192
    # Deterministic resize of the BN re-estimation and the val losses (the mini detector's resize).
    eval_size: int = 128
    eval_max_size: int = 160
    calib_batches: int = 32
    val_batches: int = 8
    # Weight of the per-box classification term (0: off; see replic.models.dense_pretrain).
    roi_cls_weight: float = 0.0

    def validate(self) -> None:
        """Reject impossible settings before any data is read (ValueError naming the option)."""
        for name in ("steps", "batch_size", "eval_size", "eval_max_size", "max_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr: must be positive, got {self.lr}")
        if self.roi_cls_weight < 0:
            raise ValueError(f"--roi-cls-weight: must be >= 0, got {self.roi_cls_weight}")
        if self.backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"--backbone: unknown ResNet {self.backbone!r}")
        for split in ("train", "val"):
            ann = Path(self.data_root) / "annotations" / f"instances_{split}2017.json"
            if not ann.is_file():
                raise FileNotFoundError(f"--data {self.data_root}: annotation file not found: {ann}")


def _data_config(opts: PretrainOptions, train: bool) -> Any:
    from replic.data.config import DataConfig

    if train:
        return DataConfig(root=opts.data_root, train_scales=list(opts.train_scales), max_size=opts.max_size,
                          crop_scales=list(opts.train_scales), crop_size=(min(opts.train_scales) - 16,
                                                                          max(opts.train_scales)),
                          num_workers=0)
    # Deterministic: one size, no flip, no crop branch.
    return DataConfig(root=opts.data_root, train_scales=[opts.eval_size], max_size=opts.eval_max_size,
                      val_size=opts.eval_size, val_max_size=opts.eval_max_size, hflip_prob=0.0,
                      resize_only_prob=1.0, num_workers=0)


def _batches(dataset: Any, batch_size: int, seed: int, epoch: int) -> Any:
    """Seeded, shuffled batches of one epoch (as the detector's training loader)."""
    from replic.data.collate import collate_fn
    from replic.engine.sampling import EpochBatchSampler, SeededDataset

    wrapped = SeededDataset(dataset, seed)
    for keys in EpochBatchSampler(len(dataset), batch_size, seed=seed, epoch=epoch):
        yield collate_fn([wrapped[k] for k in keys])


def pretrain_backbone(opts: PretrainOptions, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train, re-estimate BN statistics, measure val losses, write ``out`` and its provenance."""
    import torch

    from replic.data import build_dataset
    from replic.engine import provenance
    from replic.engine.checkpoint import atomic_torch_save
    from replic.engine.runtime import seed_everything, set_determinism
    from replic.io import atomic_write_json
    from replic.models.dense_pretrain import DensePretrainNet, box_class_targets, dense_loss, dense_targets

    opts.validate()
    out = Path(out)
    t_start = time.time()
    set_determinism(True, torch.device("cpu"))
    seed_everything(opts.seed)
    train_set = build_dataset(_data_config(opts, True), "train")
    class_ids = sorted(train_set.categories)
    class_index = {cid: i for i, cid in enumerate(class_ids)}
    net = DensePretrainNet(opts.backbone, len(class_ids), roi_cls=opts.roi_cls_weight > 0)
    trainable = [p for n, p in net.named_parameters() if not n.startswith(("resnet.layer4", "resnet.fc"))]
    optimizer = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=opts.weight_decay)

    def lr_at(step: int) -> float:
        if step < opts.warmup:
            return opts.lr * (step + 1) / opts.warmup
        frac = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
        return opts.lr * 0.5 * (1 + math.cos(math.pi * frac))

    def losses(batch: Any) -> dict[str, torch.Tensor]:
        outputs = net(batch.images)
        targets = dense_targets(batch.targets, tuple(outputs["heatmap"].shape[-2:]), class_index, len(class_ids))
        valid = torch.nn.functional.interpolate((~batch.mask)[:, None].float(),
                                                size=outputs["heatmap"].shape[-2:]) > 0
        targets["valid"] &= valid
        targets["inside"] &= valid
        terms = dense_loss(outputs, targets)
        if opts.roi_cls_weight > 0:
            boxes, labels = box_class_targets(batch.targets, class_index)
            if len(labels):
                logits = net.classify_boxes(outputs["c4"], boxes)
                terms["loss_roi_cls"] = opts.roi_cls_weight * torch.nn.functional.cross_entropy(logits, labels)
            else:
                terms["loss_roi_cls"] = outputs["c4"].sum() * 0.0
        return terms

    net.train()
    step, epoch, sums, t0 = 0, 0, {}, time.time()
    while step < opts.steps:
        for batch in _batches(train_set, opts.batch_size, opts.seed, epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            terms = losses(batch)
            total = sum(terms.values())
            if not torch.isfinite(total):
                raise RuntimeError(f"pretrain-backbone: non-finite loss at step {step + 1}: "
                                   + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 10.0)
            optimizer.step()
            step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if progress and (step % 100 == 0 or step == opts.steps):
                n = 100 if step % 100 == 0 else step % 100
                log.info("step %d/%d (%.0f s): %s", step, opts.steps, time.time() - t0,
                         ", ".join(f"{k} {v / n:.4f}" for k, v in sums.items()))
                sums = {}
            if step >= opts.steps:
                break
        epoch += 1
    train_seconds = time.time() - t0

    # BN statistics for the frozen backbone: cumulative average over train images at the eval resize.
    calib_set = build_dataset(_data_config(opts, False), "train")
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    with torch.no_grad():
        for i, batch in enumerate(_batches(calib_set, opts.batch_size, opts.seed, 0)):
            if i >= opts.calib_batches:
                break
            net.c4(batch.images)
    for bn in bns:
        bn.momentum = 0.1
    # Val losses with the frozen statistics: a record of what the backbone learned.
    net.eval()
    val_set = build_dataset(_data_config(opts, False), "val")
    val_sums: dict[str, float] = {}
    n_val = 0
    with torch.no_grad():
        for i, batch in enumerate(_batches(val_set, opts.batch_size, opts.seed, 0)):
            if i >= opts.val_batches:
                break
            for k, v in losses(batch).items():
                val_sums[k] = val_sums.get(k, 0.0) + float(v)
            n_val += 1
    val_losses = {k: v / max(1, n_val) for k, v in val_sums.items()}

    state = net.backbone_state_dict()
    ann = Path(opts.data_root) / "annotations" / "instances_train2017.json"
    record = provenance.collect(seeds={"base": opts.seed}, extra={
        "what": "dense-pretrained backbone (replic pretrain-backbone)",
        "options": asdict(opts),
        "trained_stages": ["conv1", "bn1", "layer1", "layer2", "layer3"],
        "untrained_stages": ["layer4"],
        "train_annotations_sha256": file_sha256(ann),
        "classes": class_ids,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "val_losses": val_losses,
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"model": state, "provenance": record}, out)
    record["sha256"] = file_sha256(out)
    atomic_write_json(provenance_path(out), record)
    log.info("wrote %s (%d steps in %.0f s; val losses %s)", out, step, train_seconds,
             ", ".join(f"{k} {v:.4f}" for k, v in val_losses.items()))
    return record


def provenance_path(out: str | Path) -> Path:
    """``OUT.provenance.json`` beside the weights file."""
    out = Path(out)
    return out.with_name(out.name + ".provenance.json")


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = PretrainOptions(data_root=args.data, backbone=args.backbone, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           roi_cls_weight=args.roi_cls_weight)
    pretrain_backbone(opts, args.out, progress=not args.no_progress)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain-backbone`` to the ``replic`` command."""
    p = subparsers.add_parser(
        "pretrain-backbone", help="dense-pretrain a small ResNet on a COCO-format set (mini scale)",
        description="Train a ResNet's conv1..layer3 on per-cell centre heatmaps, occupancy, box "
        "distances and centreness on its stride-16 map (CenterNet/FCOS-style), re-estimate the "
        "BatchNorm statistics, and write a torchvision-named state dict for "
        "model.pretrained_backbone, with OUT.provenance.json.",
    )
    p.add_argument("--data", required=True, help="COCO-layout root (annotations/instances_{train,val}2017.json)")
    p.add_argument("--out", required=True, help="weights file to write (.pt)")
    p.add_argument("--backbone", default="resnet18", help="torchvision ResNet (default resnet18)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate, cosine decay (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation and init")
    p.add_argument("--roi-cls-weight", type=float, default=0.0,
                   help="weight of the per-box classification term on ROI-aligned C4 features (default 0: off)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=_run)
