"""COCO evaluation of a detector: detections.json (raw category ids) + metrics.json.

Each process runs its contiguous shard of the val set at ``eval.batch_size`` images
per process; detections are gathered to rank 0, which scores them with
``replic.eval.score``. The eval batch size is recorded with the metrics because
padding makes AP depend on it (DC5 models evaluate at 1 image per GPU).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from replic.config import config_hash, to_dict
from replic.data.io import atomic_write_bytes, atomic_write_json
from replic.engine import distributed, provenance
from replic.engine.checkpoint import load_checkpoint, load_model_weights, model_state_from_checkpoint
from replic.engine.config import ExperimentConfig
from replic.engine.distributed import DistInfo
from replic.engine.progress import Progress
from replic.engine.rundir import config_differences
from replic.engine.runtime import (
    autocast_context,
    build_dataset,
    build_detector,
    build_postprocessor,
    select_device,
    set_determinism,
    split_paths,
    to_float32,
)
from replic.engine.sampling import SeededDataset, eval_batches
from replic.eval.coco_eval import format_ap_points
from replic.models.families import family_of

log = logging.getLogger("replic.engine")


def _to_coco_results(image_id: int, result: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    boxes = result["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = result["scores"].detach().float().cpu().tolist()
    labels = result["labels"].detach().cpu().tolist()
    return [
        {"image_id": image_id, "category_id": int(label), "bbox": [float(v) for v in box],
         "score": float(score)}
        for box, score, label in zip(xywh, scores, labels)
    ]


def _ground_truth(cfg: ExperimentConfig, image_ids: list[int]) -> dict[str, Any]:
    """The val annotation file, restricted to the evaluated images (``eval.max_images``)."""
    _, ann_file = split_paths(cfg, "val")
    data = json.loads(Path(ann_file).read_text())
    keep = set(image_ids)
    data["images"] = [img for img in data["images"] if img["id"] in keep]
    data["annotations"] = [a for a in data.get("annotations", []) if a["image_id"] in keep]
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    return data


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    dist_info: DistInfo | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Run the val split through ``model``; rank 0 writes detections.json and metrics.json."""
    dist_info = dist_info or DistInfo()
    out_dir = Path(out_dir)
    dataset = build_dataset(cfg, "val")
    n = len(dataset) if cfg.eval.max_images is None else min(len(dataset), cfg.eval.max_images)
    batches = eval_batches(n, cfg.eval.batch_size, dist_info.rank, dist_info.world_size)
    from replic.data.collate import collate_fn

    loader = DataLoader(SeededDataset(dataset, cfg.seed), batch_sampler=batches,
                        collate_fn=collate_fn, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda")
    postprocess = build_postprocessor(cfg).to(device)
    family = family_of(cfg.model)
    # The box-spread diagnostics read per-query DETR outputs; CNN detectors return detections.
    per_query = family.name == "detr"
    spread = BoxSpread()
    top_boxes = TopBoxSpread(focal=bool(cfg.model.resolved().focal_loss) if per_query else True)
    was_training = model.training
    model.eval()
    detections: list[dict[str, Any]] = []
    bar = Progress(len(batches), "eval", enabled=dist_info.is_main and progress, plain_every=50)
    for batch in loader:
        batch = batch.to(device)
        with autocast_context(cfg.train.amp, device):
            outputs = model(batch.images, batch.mask)
        orig_sizes = torch.stack([t["orig_size"] for t in batch.targets]).to(device)
        if per_query:
            spread.update(outputs["pred_boxes"])
            top_boxes.update(outputs["pred_logits"], outputs["pred_boxes"])
        results = postprocess(to_float32(outputs), orig_sizes)
        for target, result in zip(batch.targets, results):
            detections.extend(_to_coco_results(int(target["image_id"]), result))
        bar.update()
    bar.close()
    model.train(was_training)

    gathered = distributed.all_gather_objects(detections)
    spread_parts = distributed.all_gather_objects(spread.state())
    top_parts = distributed.all_gather_objects(top_boxes.rows)
    metrics: dict[str, float] = {}
    if dist_info.is_main:
        from replic.eval import score

        image_ids = [int(dataset.ids[i]) for i in range(n)]
        gt = _ground_truth(cfg, image_ids)
        # Logits exist for every id < num_classes, but only the dataset's categories are scored:
        # COCOeval evaluates each GT category separately and never looks at other ids, so
        # dropping them changes no metric (and keeps the file valid for strict scorers).
        valid = {int(c["id"]) for c in gt.get("categories", [])}
        raw = [d for part in gathered for d in part]
        all_dets = [d for d in raw if d["category_id"] in valid]
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "detections.json", json.dumps(all_dets).encode())
        metrics = score(gt, all_dets, backend=cfg.eval.backend)
        record = {
            "metrics": metrics,
            "eval": {"batch_size_per_process": cfg.eval.batch_size,
                     "world_size": dist_info.world_size, "images": n,
                     **family.eval_settings(cfg.model), "backend": cfg.eval.backend,
                     "split": cfg.data.val_split, "detections": len(all_dets),
                     "dropped_non_category_detections": len(raw) - len(all_dets)},
            "diagnostics": {"box_std_across_images": BoxSpread.merged_std(spread_parts),
                            "top_box_std": TopBoxSpread.merged_std(top_parts),
                            "gt_box_std": gt_box_std(gt)},
            "experiment": cfg.name, "scale": cfg.scale, "config_hash": config_hash(cfg),
            "checkpoint": checkpoint,
            "provenance": provenance.collect(world_size=dist_info.world_size),
        }
        atomic_write_json(out_dir / "metrics.json", _nan_to_none(record))
        # AP points (x100, as the papers' tables); metrics.json keeps pycocotools' fractions.
        log.info("eval %s (%d images, batch %d/process) -> %s", format_ap_points(metrics), n,
                 cfg.eval.batch_size, out_dir / "metrics.json")
        diag = record["diagnostics"]
        if diag["box_std_across_images"] is not None and diag["gt_box_std"]:
            log.info("predicted boxes move across images by std %.4f (ground truth %.4f); near 0 = "
                     "one fixed box per query, the dataset's prior", diag["box_std_across_images"],
                     diag["gt_box_std"])
        if diag["top_box_std"] is not None and diag["gt_box_std"]:
            log.info("each image's top-scoring box moves across images by std %.4f (%.2f x the "
                     "ground truth's)", diag["top_box_std"], diag["top_box_std"] / diag["gt_box_std"])
    distributed.barrier()
    return metrics


class BoxSpread:
    """How much each query's predicted box moves from image to image.

    Running sums per (query, coordinate) of the normalised (cx, cy, w, h) boxes of the final
    decoder layer. Their std across images, averaged over queries and coordinates, separates a
    detector from a model that learned only the dataset's box prior (one fixed box per query,
    std ~0): compare it with :func:`gt_box_std`. Float64 sums, so E[x²] − E[x]² is exact enough.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None

    def update(self, pred_boxes: torch.Tensor) -> None:
        """pred_boxes (B, Q, 4) of one batch."""
        boxes = pred_boxes.detach().to("cpu", torch.float64)
        if self.total is None:
            self.total = torch.zeros(boxes.shape[1:], dtype=torch.float64)
            self.total_sq = torch.zeros(boxes.shape[1:], dtype=torch.float64)
        assert self.total_sq is not None
        self.total += boxes.sum(0)
        self.total_sq += boxes.square().sum(0)
        self.count += boxes.shape[0]

    def state(self) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        return self.count, self.total, self.total_sq

    @staticmethod
    def merged_std(parts: list[tuple[int, torch.Tensor | None, torch.Tensor | None]]) -> float | None:
        """Mean over queries and coordinates of the std across all images of every process."""
        parts = [p for p in parts if p[0] > 0]
        count = sum(p[0] for p in parts)
        if count < 2:
            return None
        total = sum(p[1] for p in parts)
        total_sq = sum(p[2] for p in parts)
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0) * count / (count - 1)
        return float(var.sqrt().mean())


class TopBoxSpread:
    """How much each image's top-scoring box moves from image to image.

    :class:`BoxSpread` averages over all queries, and a Conditional DETR's queries sit at fixed
    reference points, so it stays low even for a model that detects (issue 12: 0.059 vs 0.25 for
    the ground truth). The box of each image's highest-scoring (query, class) pair is what a
    detector moves to the object: its std across images (normalised cx, cy, w, h; mean over the
    coordinates) is ~0 for a model at the box prior and near :func:`gt_box_std` for a detector.
    Scores as the post-processing ranks them: sigmoid (focal models) or softmax without the
    no-object class (DETR).
    """

    def __init__(self, focal: bool) -> None:
        self.focal = focal
        self.rows: list[list[float]] = []

    def update(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor) -> None:
        """pred_logits (B, Q, C), pred_boxes (B, Q, 4) of one batch."""
        logits = pred_logits.detach().float()
        prob = logits.sigmoid() if self.focal else logits.softmax(-1)[..., :-1]
        best_query = prob.amax(-1).argmax(-1)  # (B,)
        images = torch.arange(pred_boxes.shape[0], device=pred_boxes.device)
        boxes = pred_boxes.detach().float()[images, best_query]
        self.rows.extend(boxes.to("cpu", torch.float64).tolist())

    @staticmethod
    def merged_std(parts: list[list[list[float]]]) -> float | None:
        """Std across all images of every process, mean over the four coordinates."""
        rows = [row for part in parts for row in part]
        if len(rows) < 2:
            return None
        return float(torch.tensor(rows, dtype=torch.float64).std(0).mean())


def gt_box_std(gt: dict[str, Any]) -> float | None:
    """Std of the ground-truth boxes (normalised cx, cy, w, h; crowds excluded), mean over coordinates."""
    sizes = {int(im["id"]): (float(im["width"]), float(im["height"])) for im in gt.get("images", [])}
    rows = []
    for ann in gt.get("annotations", []):
        if ann.get("iscrowd", 0) or int(ann["image_id"]) not in sizes:
            continue
        w_img, h_img = sizes[int(ann["image_id"])]
        x, y, w, h = (float(v) for v in ann["bbox"])
        rows.append([(x + w / 2) / w_img, (y + h / 2) / h_img, w / w_img, h / h_img])
    if len(rows) < 2:
        return None
    return float(torch.tensor(rows, dtype=torch.float64).std(0).mean())


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: an undefined COCO bucket is written as null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path, out_dir: str | Path,
                        *, progress: bool = True) -> dict[str, float]:
    """Load a replic (or converted official) checkpoint into the experiment's model and evaluate.

    A checkpoint's ``model_config`` that differs from the experiment's is reported;
    the weights are then loaded strictly, so a real architecture mismatch is an error.
    """
    info = distributed.detect()
    device = select_device(cfg.train.device, info.local_rank)
    dist_info = distributed.init(device.type)
    try:
        set_determinism(cfg.train.deterministic, device)
        data = load_checkpoint(checkpoint, map_location="cpu")
        stored = data.get("model_config")
        diffs: list[str] = []
        if isinstance(stored, dict):
            diffs = config_differences(stored, to_dict(cfg.model))
        model = build_detector(cfg)
        # Weights of another architecture: one error listing the differing config keys (exit 2).
        load_model_weights(model, model_state_from_checkpoint(data, checkpoint), checkpoint,
                           target=f"the model of {cfg.name}", config_differences=diffs)
        if diffs:  # the weights fit: an execution-only or harmless difference, e.g. channels_last
            log.warning("%s: model_config differs from the experiment's: %s", checkpoint,
                        "; ".join(diffs))
        model.to(device)
        return evaluate_model(model, cfg, out_dir, device=device, dist_info=dist_info,
                              checkpoint=str(checkpoint), progress=progress)
    finally:
        distributed.shutdown()
