"""One-shot GPU check: Conditional DETR-R50 training throughput, memory and MFU, and the step cost
of KS-DETR, D³ETR and MasKD over their plain students, written to one JSON.

Made for a short loan of one GPU (an H100 for ~15 minutes in all): ``bash benchmarks/gpu.sh``
runs everything below in one command, stopped after 8 minutes at most (gpu.sh's time limit; 6 replic
runs of 25 steps + one FLOP-counted step each and the official model's 2 x 25 steps at paper size —
it has not run on a GPU yet), and writes the JSON after every section so a cut run keeps what it
measured.

Every step is the engine's own: :meth:`replic.engine.train.Trainer._train_step` (method forward
hooks, fp32 loss, NaN guard, backward through the GradScaler, clipping, optimizer and per-iteration
scheduler step, the loss read-back), on a Trainer holding what ``Trainer._setup`` builds for it
(method, detector, loss, :class:`~replic.methods.MethodStep`, optimizer, scheduler, scaler) — so no
forward/loss/backward is re-implemented here. Only the data loading is replaced: one fixed batch of
synthetic images and boxes at the paper's size, kept in pinned host memory and moved to the device
inside the step (as the engine's pinned DataLoader batches are). No COCO, no ImageNet weights, no
checkpoint: every detector and teacher is randomly initialised, MasKD's tokens are random.

Sections (keys of the JSON):

* ``fp32`` / ``bf16``: ``cdetr_r50_50ep`` (the paper recipe: batch 2 per GPU, images 800 x 1333)
  with ``train.amp`` none / bf16 — images/s (batch / median step time of ``--steps`` timed steps
  after ``--warmup``, CUDA-synchronised), peak ``torch.cuda.max_memory_allocated`` over the timed
  steps, FLOPs of one training step (``torch.utils.flop_counter.FlopCounterMode`` around one whole
  step: forward and backward; matmuls, convolutions and attention only) and the model FLOPs
  utilisation = FLOPs / median step time / the device's nominal dense peak.
* ``ratios``: median step time of each method over its plain student, both at the method
  experiment's own ``train.amp`` (bf16 at paper scale): KS-DETR (``ks_cdetr_r50_50ep`` /
  ``ks_cdetr_r50_50ep_base``), D³ETR (``d3etr_cdetr_r50_50ep`` / ``cdetr_r50_50ep``, its teacher a
  randomly initialised Conditional DETR-R101 of ``cdetr_r101_50ep``'s config), MasKD on its DETR
  student (``maskd_cdetr_r50_50ep`` / ``cdetr_r50_50ep``, random R101 teacher, random tokens,
  customised masks on from step 0).
* ``official``: with ``--official`` / ``REPLIC_OFFICIAL_CONDDETR`` (a checkout of
  Atten4Vis/ConditionalDETR), the authors' model and criterion (``models.conditional_detr.build``,
  in a subprocess, torch-2 import workaround of tests/test_models_official_parity.py, no download)
  trained on the same batch with the step of their ``engine.train_one_epoch``, beside replic's.

``--reduced`` runs the same sections at the smoke scale's sizes (configs/scales/smoke.yaml: ResNet-18
frozen, hidden 64, 2 + 2 layers, 10 queries; images 128 x 160, batch 2, 2 + 2 steps) so the CPU
test (tests/test_bench_gpu.py) keeps this script working. On CPU the bf16 section is skipped (the
engine autocasts on CUDA only), memory is not measured and MFU needs ``--peak-tflops``.

Usage:
    python benchmarks/bench_gpu.py [--out FILE] [--reduced] [--device cuda|cpu] [--warmup 5] [--steps 20]
        [--batch N] [--height H] [--width W] [--peak-tflops T] [--threads N] [--official DIR]
        [--sections fp32,bf16,ratios,official]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: replic is importable without an install
    sys.path.append(str(REPO))
EXP = REPO / "configs" / "experiments"
SECTIONS = ("fp32", "bf16", "ratios", "official")
STUDENT = "cdetr_r50_50ep"

# The method experiments and their plain students (item 4 of the GPU check).
METHODS = {
    "ks_detr": ("ks_cdetr_r50_50ep", "ks_cdetr_r50_50ep_base"),
    "d3etr": ("d3etr_cdetr_r50_50ep", STUDENT),
    "maskd": ("maskd_cdetr_r50_50ep", STUDENT),
}
# Random init everywhere (nothing downloaded), COCO's class count (no annotations to count them).
COMMON_SETS = ["model.pretrained_backbone=none", "model.num_classes=91", "train.feature_cache=false"]
METHOD_SETS = {  # by experiment, applied by load_cfg
    # Random tokens instead of a stage-1 run; customised masks from step 0, so the timed steps are
    # the steady-state MasKD step (the warm-up only delays that branch).
    "maskd_cdetr_r50_50ep": ["method.tokens.experiment=null", "method.tokens.random=true",
                             "method.custom_mask_warmup=0"],
}

# Nominal dense peaks in TFLOP/s (NVIDIA data sheets; sparsity figures halved). H200 has the
# H100 SXM's compute. The first key whose words (but "SXM") are all in torch.cuda.get_device_name() applies.
PEAKS_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.0, "fp32": 60.0},
    "H100 SXM": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},  # "NVIDIA H100 80GB HBM3" (the name has no "SXM")
    "H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
}
BOXES_PER_IMAGE = 7  # COCO train2017 averages ~7.3 annotated objects per image


# --------------------------------------------------------------------------- the batch
def synthetic_batch(batch: int, height: int, width: int, seed: int = 0) -> Any:
    """A :class:`replic.data.collate.Batch` of random normalised images (no padding) and random
    boxes with the data contract's target keys (docs/architecture.md)."""
    import torch

    from replic.data.collate import collate_fn

    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(batch):
        n = BOXES_PER_IMAGE
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.35 + 0.05
        boxes = torch.cat([cxcy, wh], 1)
        target = {"boxes": boxes, "labels": torch.randint(1, 91, (n,), generator=g),
                  "image_id": torch.tensor(i), "orig_size": torch.tensor([height, width]),
                  "size": torch.tensor([height, width]), "iscrowd": torch.zeros(n, dtype=torch.int64),
                  "area": wh.prod(1) * height * width}
        items.append((torch.randn(3, height, width, generator=g), target))
    return collate_fn(items)


def pin(batch: Any) -> Any:
    """The batch in pinned host memory, as the engine's DataLoader (``pin_memory`` on CUDA) hands it."""
    from replic.data.collate import Batch

    return Batch(images=batch.images.pin_memory(), mask=batch.mask.pin_memory(),
                 targets=[{k: v.pin_memory() for k, v in t.items()} for t in batch.targets])


# --------------------------------------------------------------------------- configs and teachers
def load_cfg(name: str, scale: str, device: str, sets: list[str]) -> Any:
    """An experiment at ``scale`` with the benchmark's overrides (``--set`` syntax): the common ones,
    the experiment's own (:data:`METHOD_SETS`), then ``sets``."""
    from replic.engine.config import load_experiment, parse_overrides

    return load_experiment(EXP / f"{name}.yaml", scale, parse_overrides(
        [*COMMON_SETS, f"train.device={device}", *METHOD_SETS.get(name, []), *sets]))


def write_random_teacher(cfg: Any, run_dir: Path, scale: str) -> dict[str, Any] | None:
    """For a method whose teacher is a DAG experiment: write that experiment's detector, randomly
    initialised, where the method looks for it (``<runs>/<teacher>/checkpoint_final.pt`` beside
    ``run_dir``). Returns what was written (None: the method has no teacher)."""
    import torch

    from replic.config import to_dict
    from replic.models.families import family_of

    teacher = (cfg.method.get("teacher") or {}).get("experiment") if isinstance(cfg.method, dict) else None
    if not teacher:
        return None
    tcfg = load_cfg(teacher, scale, "cpu", [])
    path = run_dir.parent / teacher / "checkpoint_final.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(tcfg.seed + 1)
        model = family_of(tcfg.model).build_model(tcfg.model)
        torch.save({"model": model.state_dict(), "model_config": to_dict(tcfg.model),
                    "config": {"name": teacher}}, path)
        del model
    return {"experiment": teacher, "backbone": tcfg.model.backbone,
            "weights": "random initialisation (no checkpoint needed)"}


# --------------------------------------------------------------------------- the engine's step
def engine_trainer(cfg: Any, run_dir: Path, device: Any) -> Any:
    """A :class:`replic.engine.train.Trainer` holding what ``Trainer._setup`` builds for a training
    step, built in the same order, without the dataset, the run directory's files or the logs."""
    import torch

    from replic.engine import distributed
    from replic.engine.optim import build_optimizer, build_scheduler
    from replic.engine.runtime import build_loss, seed_everything
    from replic.engine.train import Trainer
    from replic.methods import MethodStep, build_method

    trainer = Trainer(cfg, run_dir, progress=False)
    trainer.device = device
    trainer.dist = distributed.DistInfo()  # one process: all-reduces are no-ops, as in a 1-GPU run
    seed_everything(cfg.seed)
    trainer.method = build_method(cfg, run_dir=run_dir)
    trainer.method.check_inputs()
    detector = trainer.method.build_model().to(device)
    trainer.criterion = build_loss(cfg).to(device)
    trainer.method.to(device)
    trainer.method.setup(detector, trainer.criterion, device)
    trainer.weights = dict(trainer.criterion.weight_dict)
    trainer.model = MethodStep(detector, trainer.method)
    trainer.optimizer = build_optimizer(trainer.model, cfg.train)
    trainer.scheduler = build_scheduler(trainer.optimizer, cfg.train)
    trainer.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.train.amp == "fp16")
    trainer.epoch, trainer.step_in_epoch, trainer.global_step = 0, 0, 0
    trainer.model.train()
    return trainer


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def time_steps(step: Any, device: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Run ``step()`` warmup + steps times; per-step wall times (synchronised) of the timed ones
    and the peak CUDA memory allocated over them."""
    import torch

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"times": times, "peak_mib": peak}


def measure(cfg: Any, run_dir: Path, batch: Any, device: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``Trainer._train_step`` of one experiment on the fixed batch; FLOPs of one more step."""
    import torch

    from replic.engine.runtime import autocast_context

    trainer = engine_trainer(cfg, run_dir, device)
    try:
        params = sum(p.numel() for p in trainer.model.parameters())
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        timed = time_steps(lambda: trainer._train_step(batch), device, args.warmup, args.steps)
        # FLOPs: one whole step (forward, loss, backward, optimizer: the latter counts nothing), and
        # the training forward alone as a check that the backward was counted (~2x the forward).
        step_flops = _count_flops(lambda: trainer._train_step(batch))
        on_device = batch.to(device)

        def forward() -> None:
            with autocast_context(cfg.train.amp, device):
                trainer.model(on_device.images, on_device.mask, on_device.targets)

        forward_flops = _count_flops(forward)
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    times = timed["times"]
    median = statistics.median(times)
    return {
        "experiment": cfg.name, "backbone": cfg.model.backbone, "amp": cfg.train.amp,
        "precision": effective_precision(cfg.train.amp, device),
        "params": params, "trainable_params": trainable,
        "step_s": {"median": median, "mean": statistics.fmean(times), "min": min(times), "max": max(times),
                   "all": times},
        "images_per_s": len(batch) / median,
        "peak_mem_mib": timed["peak_mib"],
        "flops_per_step": step_flops, "forward_flops": forward_flops,
    }


def effective_precision(amp: str, device: Any) -> str:
    """What the engine computes in: ``autocast_context`` autocasts on CUDA only."""
    return amp if device.type == "cuda" and amp != "none" else "fp32"


# --------------------------------------------------------------------------- MFU
def peak_for(precision: str, device: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The nominal peak a run's MFU is divided by: ``--peak-tflops``, else the device's data-sheet
    figure for the precision (fp32 on CUDA: TF32 tensor cores when torch allows TF32 convolutions or
    matmuls, else plain FP32), else none."""
    import torch

    if args.peak_tflops:
        return {"name": "given (--peak-tflops)", "tflops": args.peak_tflops, "alternatives": {}}
    if device.type != "cuda":
        return {"name": None, "tflops": None, "alternatives": {},
                "reason": "no nominal peak known for a CPU: pass --peak-tflops"}
    name = torch.cuda.get_device_name(device)
    sheet = next((k for k in PEAKS_TFLOPS if all(w in name for w in k.split() if w != "SXM")), None)
    if sheet is None:
        return {"name": None, "tflops": None, "alternatives": {},
                "reason": f"no nominal peak known for {name!r}: pass --peak-tflops"}
    if precision in ("bf16", "fp16"):  # the same dense tensor-core rate on Hopper
        key, alternatives = "bf16", {}
    else:
        # fp32 on CUDA: convolutions (and matmuls, if allowed) run on TF32 tensor cores by torch's defaults.
        tf32 = any(_tf32_flags().values())
        key = "tf32" if tf32 else "fp32"
        other = "fp32" if tf32 else "tf32"
        alternatives = {other: PEAKS_TFLOPS[sheet][other]}
    return {"name": f"{sheet} dense {key}", "tflops": PEAKS_TFLOPS[sheet][key], "alternatives": alternatives,
            "nominal": True}


def _tf32_flags() -> dict[str, bool]:
    """Whether torch lets fp32 convolutions / matmuls run on TF32 tensor cores (by default: the
    convolutions only)."""
    import torch

    return {"cudnn conv": bool(torch.backends.cudnn.allow_tf32),
            "cuda matmul": bool(torch.backends.cuda.matmul.allow_tf32)}


def add_mfu(row: dict[str, Any], device: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Model FLOPs utilisation of a measured run against its nominal peak(s)."""
    peak = peak_for(row["precision"], device, args)
    achieved = row["flops_per_step"] / row["step_s"]["median"] / 1e12
    row["achieved_tflops"] = achieved
    row["mfu_peak"] = peak
    row["mfu"] = achieved / peak["tflops"] if peak["tflops"] else None
    row["mfu_against"] = {k: achieved / v for k, v in peak["alternatives"].items()}
    return row


# --------------------------------------------------------------------------- the official model
OFFICIAL_STEP_DOC = "their engine.train_one_epoch step: loss.item() + isfinite, zero_grad, backward, clip, AdamW"


def official_worker(spec_path: str) -> None:
    """In a fresh process (the authors' top-level ``models``/``util`` would shadow other packages):
    build their model and criterion, time their training step on the saved batch, print one JSON line."""
    import contextlib

    spec = json.loads(Path(spec_path).read_text())
    import torch
    import torchvision

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    sys.path.insert(0, spec["repo"])
    real_torch, real_tv = torch.__version__, torchvision.__version__
    torch.__version__ = "1.9.0"  # their models/attention.py: a version check broken on torch >= 2
    torchvision.__version__ = "0.99"  # their util/misc.py parses float(version[:3])
    import util.misc  # noqa: F401
    import models.attention  # noqa: F401

    torch.__version__, torchvision.__version__ = real_torch, real_tv
    import models.backbone as official_backbone

    from replic.engine.runtime import to_float32  # replic's own cast, as its train step applies it

    official_backbone.is_main_process = lambda: False  # no ImageNet download
    from models.conditional_detr import build
    from util.misc import NestedTensor

    device = torch.device(spec["device"])
    m = spec["model"]
    args = argparse.Namespace(
        lr_backbone=m["lr_backbone"], masks=False, backbone=m["backbone"], dilation=m["dilation"],
        position_embedding="sine", hidden_dim=m["hidden_dim"], dropout=m["dropout"], nheads=m["nheads"],
        num_queries=m["num_queries"], dim_feedforward=m["dim_feedforward"], enc_layers=m["enc_layers"],
        dec_layers=m["dec_layers"], pre_norm=False, dataset_file="coco", device=spec["device"],
        aux_loss=m["aux_loss"], set_cost_class=2, set_cost_bbox=5, set_cost_giou=2, cls_loss_coef=2,
        bbox_loss_coef=5, giou_loss_coef=2, focal_alpha=0.25, eos_coef=0.1, frozen_weights=None,
        mask_loss_coef=1, dice_loss_coef=1)
    data = torch.load(spec["batch"], weights_only=True)
    pinned = device.type == "cuda"
    images = data["images"].pin_memory() if pinned else data["images"]
    mask = data["mask"].pin_memory() if pinned else data["mask"]
    targets = [{k: (v.pin_memory() if pinned else v) for k, v in t.items()} for t in data["targets"]]
    rows = {}
    for precision in spec["precisions"]:
        torch.manual_seed(0)
        model, criterion, _ = build(args)
        model.to(device).train()
        criterion.train()
        param_dicts = [  # their main.py
            {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
            {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
             "lr": m["lr_backbone"]}]
        optimizer = torch.optim.AdamW(param_dicts, lr=spec["lr"], weight_decay=spec["weight_decay"])
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" \
            else contextlib.nullcontext

        def step() -> None:
            samples = NestedTensor(images.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            tgts = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with autocast():  # their code has no AMP; bf16 autocasts the forward as replic's engine does
                outputs = model(samples)
            if precision == "bf16":
                outputs = to_float32(outputs)
            loss_dict = criterion(outputs, tgts)
            weight_dict = criterion.weight_dict
            losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
            loss_value = losses.item()
            if not math.isfinite(loss_value):
                raise RuntimeError(f"official model: loss is {loss_value}")
            optimizer.zero_grad()
            losses.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
            optimizer.step()

        try:
            timed = time_steps(step, device, spec["warmup"], spec["steps"])
        except Exception as err:  # e.g. their code under bf16 autocast: the other precision still counts
            rows[precision] = {"error": f"{type(err).__name__}: {err}"}
        else:
            times = timed["times"]
            median = statistics.median(times)
            rows[precision] = {"step_s": {"median": median, "mean": statistics.fmean(times), "min": min(times),
                                          "max": max(times), "all": times},
                               "images_per_s": len(images) / median, "peak_mem_mib": timed["peak_mib"],
                               "params": sum(p.numel() for p in model.parameters())}
        del model, criterion, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(rows))


def official_section(repo: str, cfg: Any, batch: Any, device: Any, args: argparse.Namespace,
                     replic_row: Any, tmp: Path) -> dict[str, Any]:
    """The authors' Conditional DETR on the same batch and shape as replic's ``cfg``, beside replic's
    rows (``replic_row(precision)``: replic's measurement of ``cfg`` at that precision)."""
    import torch

    model = cfg.model.resolved()
    batch_file = tmp / "official_batch.pt"
    torch.save({"images": batch.images, "mask": batch.mask,
                "targets": [{"boxes": t["boxes"], "labels": t["labels"]} for t in batch.targets]}, batch_file)
    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" else [])
    spec = {
        "repo": str(Path(repo).resolve()), "batch": str(batch_file), "device": str(device),
        "threads": args.threads, "warmup": args.warmup, "steps": args.steps, "precisions": precisions,
        "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "clip": cfg.train.clip_max_norm,
        "model": {"backbone": model.backbone, "dilation": model.dilation, "hidden_dim": model.hidden_dim,
                  "nheads": model.nheads, "num_queries": model.num_queries,
                  "dim_feedforward": model.dim_feedforward, "enc_layers": model.enc_layers,
                  "dec_layers": model.dec_layers, "dropout": model.dropout, "aux_loss": model.aux_loss,
                  # their rule: the backbone trains iff lr_backbone > 0
                  "lr_backbone": cfg.train.lr_backbone if model.train_backbone else 0.0},
    }
    spec_file = tmp / "official_spec.json"
    spec_file.write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--official-worker", str(spec_file)],
                         capture_output=True, text=True, cwd=tmp,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise RuntimeError(f"official worker failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    mine = {precision: replic_row(precision) for precision, row in rows.items() if "error" not in row}
    section: dict[str, Any] = {"repo": spec["repo"], "commit": _git_commit(Path(repo))[0], "step": OFFICIAL_STEP_DOC,
                               "model": spec["model"], "weights": "random initialisation (no download)"}
    for precision, row in rows.items():
        section[precision] = row
        if "error" in row:
            continue
        row["replic_images_per_s"] = mine[precision]["images_per_s"]
        row["replic_over_official_images_per_s"] = mine[precision]["images_per_s"] / row["images_per_s"]
    section["replic"] = mine
    if "bf16" not in rows:
        section["bf16"] = {"skipped": "bf16 runs on CUDA only (replic's engine autocasts on CUDA only)"}
    return section


# --------------------------------------------------------------------------- provenance
def _git_commit(path: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, working tree has uncommitted changes to tracked files) or (None, None)."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return head, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def environment(device: Any) -> dict[str, Any]:
    """Device, library versions and the precision switches that change what fp32 means on CUDA."""
    import torch

    env: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
        else None, "threads": torch.get_num_threads(), "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"device_name": props.name, "device_memory_gib": props.total_memory / 2**30,
                    "multiprocessors": props.multi_processor_count,
                    "capability": f"{props.major}.{props.minor}",
                    "fp32_on_tf32": _tf32_flags(),
                    "cudnn.benchmark": torch.backends.cudnn.benchmark})
    else:
        model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                      if line.startswith("model name")), platform.processor())
        env.update({"device_name": model, "cpu_count": os.cpu_count()})
    return env


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# --------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


LABELS = {"cdetr_r50_50ep": "Conditional DETR-{b}", "ks_cdetr_r50_50ep_base": "Conditional DETR-{b} (KS protocol)",
          "ks_cdetr_r50_50ep": "KS-DETR-{b} (triple attention)", "d3etr_cdetr_r50_50ep": "D³ETR-{b}",
          "maskd_cdetr_r50_50ep": "MasKD-{b} (random tokens)"}
_BACKBONE = {"resnet18": "R18", "resnet34": "R34", "resnet50": "R50", "resnet101": "R101"}


def _label(row: dict[str, Any]) -> str:
    """``Conditional DETR-R50``, ``D³ETR-R50 <- R101 teacher``: the backbones actually built."""
    label = LABELS.get(row["experiment"], row["experiment"] + " {b}").format(
        b=_BACKBONE.get(row["backbone"], row["backbone"]))
    if row.get("extra_overrides"):
        label += f" [{', '.join(row['extra_overrides'])}]"
    if row.get("teacher"):
        label += f" <- {_BACKBONE.get(row['teacher']['backbone'], row['teacher']['backbone'])} teacher (random)"
    return label


def _why(section: dict[str, Any]) -> str:
    return section.get("skipped") or f"error: {section.get('error', '?')[:100]}"


def print_table(result: dict[str, Any]) -> None:
    """The figures as a markdown table (one row per measured run) and the ratio lines."""
    s, e = result["settings"], result["environment"]
    print(f"\n{e['device_name']} ({e['device']}), torch {e['torch']} (CUDA build {e['cuda']}), "
          f"{'reduced' if s['reduced'] else 'paper'} size: batch {s['batch']} x {s['height']}x{s['width']}, "
          f"warm-up {s['warmup']}, timed {s['steps']}")
    print("| run | precision | images/s | step median (s) | peak mem (MiB) | GFLOP/step | TFLOP/s | MFU | "
          "peak divided by (TFLOP/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    seen: set[tuple[str, str]] = set()

    def row_line(label: str, r: dict[str, Any]) -> None:
        peak = r.get("mfu_peak") or {}
        flops = r.get("flops_per_step")
        print(f"| {label} | {r['precision']} | {r['images_per_s']:.2f} | {r['step_s']['median']:.4f} | "
              f"{_fmt(r.get('peak_mem_mib'), '.0f')} | {_fmt(flops / 1e9 if flops else None, '.1f')} | "
              f"{_fmt(r.get('achieved_tflops'), '.3g')} | {_fmt(r.get('mfu'), '.1%')} | "
              f"{peak.get('name') or peak.get('reason', '-')} {_fmt(peak.get('tflops'), 'g', '')} |")

    def run_line(r: dict[str, Any]) -> None:
        key = (r["experiment"], r["precision"], *r.get("extra_overrides", []))
        if key not in seen:
            seen.add(key)
            row_line(_label(r), r)

    for key in ("fp32", "bf16"):
        section = result.get(key, {})
        if "images_per_s" in section:
            run_line(section)
        else:
            print(f"| Conditional DETR | {key} | {_why(section)} | | | | | | |")
    ratios = result.get("ratios", {})
    per_method = {} if "skipped" in ratios or "error" in ratios else ratios
    for name, ratio in per_method.items():
        if "step_time_ratio" in ratio:
            run_line(ratio["student"])
            run_line(ratio["method"])
        else:
            print(f"| {name} | | {_why(ratio)} | | | | | | |")
    official = result.get("official", {})
    for key in ("fp32", "bf16"):
        if "images_per_s" in official.get(key, {}):
            run_line(official["replic"][key])
            b = official["model"]["backbone"]
            row_line(f"official Conditional DETR-{_BACKBONE.get(b, b)} (Atten4Vis code)",
                     {**official[key], "precision": key})
    if not per_method:
        print(f"ratios: {_why(ratios)}")
    for name, ratio in per_method.items():
        if "step_time_ratio" in ratio:
            mem = ratio["memory_ratio"]
            print(f"{name}: {ratio['method']['experiment']} / {ratio['student']['experiment']}: step time "
                  f"{ratio['step_time_ratio']:.2f}x, FLOPs {ratio['flops_ratio']:.2f}x"
                  f"{f', peak memory {mem:.2f}x' if mem else ''} ({ratio['method']['precision']})")
    for key in ("fp32", "bf16"):
        row = official.get(key, {})
        if row.get("replic_over_official_images_per_s"):
            print(f"official, {key}: replic {row['replic_images_per_s']:.2f} vs the authors' "
                  f"{row['images_per_s']:.2f} images/s: replic {row['replic_over_official_images_per_s']:.2f}x")
        elif "skipped" in row or "error" in row:
            print(f"official, {key}: {_why(row)}")
    if "skipped" in official or "error" in official:
        print(f"official: {_why(official)}")
    print("MFU is nominal: FLOPs counted by torch.utils.flop_counter (matmuls, convolutions, attention; forward "
          "and backward of one step) / median step time / the data-sheet dense peak in the last column.")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results_gpu_<UTC date>.json)")
    parser.add_argument("--reduced", action="store_true",
                        help="smoke-scale model (configs/scales/smoke.yaml), 128x160 images, 2 + 2 steps: the CPU test")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 5; reduced 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20; reduced 2)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default: the recipe's train.batch_size)")
    parser.add_argument("--height", type=int, default=None, help="default: the largest train scale (800; reduced 128)")
    parser.add_argument("--width", type=int, default=None, help="default: data.max_size (1333; reduced 160)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s to divide by for MFU (default: the device's data-sheet figure, CUDA only)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--official", default=os.environ.get("REPLIC_OFFICIAL_CONDDETR"),
                        help="checkout of Atten4Vis/ConditionalDETR (default: $REPLIC_OFFICIAL_CONDDETR)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--official-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.warmup is None:
        args.warmup = 2 if args.reduced else 5
    if args.steps is None:
        args.steps = 2 if args.reduced else 20
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def run(args: argparse.Namespace) -> int:
    """Measure every requested section, rewriting the JSON after each; 1 if any section failed."""
    import torch

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    # cuda:0, as replic.engine.runtime.select_device gives a single-process run
    device = torch.device("cuda", 0) if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" \
        else torch.device("cpu")
    scale = "smoke" if args.reduced else "paper"
    out = args.out or REPO / "benchmarks" / f"results_gpu_{dt.datetime.now(dt.UTC):%Y-%m-%d}.json"
    base = load_cfg(STUDENT, scale, device.type, [])
    batch_size = args.batch or base.train.batch_size
    height = args.height or max(base.data.train_scales)
    width = args.width or base.data.max_size
    commit, dirty = _git_commit(REPO)
    result: dict[str, Any] = {
        "what": "replic one-shot GPU check (benchmarks/bench_gpu.py)",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "wrapper_command": os.environ.get("REPLIC_BENCH_WRAPPER"),
        "git": {"commit": commit or os.environ.get("REPLIC_GIT_COMMIT"), "dirty": dirty},
        "environment": environment(device),
        "settings": {"reduced": args.reduced, "scale": scale, "batch": batch_size, "height": height, "width": width,
                     "warmup": args.warmup, "steps": args.steps, "overrides": COMMON_SETS,
                     "method_overrides": METHOD_SETS, "boxes_per_image": BOXES_PER_IMAGE,
                     "data": "synthetic: N(0,1) images (no padding), random boxes and COCO ids, one fixed batch",
                     "step": "replic.engine.train.Trainer._train_step (the `replic train` step)",
                     "timing": "median of the timed steps, each ended by torch.cuda.synchronize on CUDA",
                     "memory": "torch.cuda.max_memory_allocated over the timed steps" if device.type == "cuda"
                     else "not measured on CPU (n/a)"},
        "errors": [], "complete": False,
    }
    batch = synthetic_batch(batch_size, height, width)
    if device.type == "cuda":
        batch = pin(batch)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    measured: dict[tuple[Any, ...], dict[str, Any]] = {}  # (experiment, precision, other sets) -> row

    def run_one(name: str, runs: Path, sets: list[str]) -> dict[str, Any]:
        cfg = load_cfg(name, scale, device.type, sets)
        extra = [s for s in sets if not s.startswith("train.amp=")]
        key = (name, effective_precision(cfg.train.amp, device), *extra)
        if key not in measured:
            run_dir = runs / name
            teacher = write_random_teacher(cfg, run_dir, scale)
            t0 = time.perf_counter()
            row = add_mfu(measure(cfg, run_dir, batch, device, args), device, args)
            row["teacher"] = teacher
            row["extra_overrides"] = extra
            row["wall_s"] = time.perf_counter() - t0
            measured[key] = row
            print(f"  {name} [{', '.join(key[1:])}]: {row['images_per_s']:.2f} images/s, median step "
                  f"{row['step_s']['median']:.4f} s ({row['wall_s']:.0f} s incl. build)", flush=True)
        return measured[key]

    def section(key: str, fn: Any) -> None:
        if key not in args.sections:
            result[key] = {"skipped": "not in --sections"}
            return
        print(f"[{key}]", flush=True)
        try:
            result[key] = fn()
            # a part that failed inside a section (one method, one precision of the official model)
            result["errors"] += [f"{key}.{part}" for part, value in result[key].items()
                                 if isinstance(value, dict) and "error" in value]
        except Exception as err:  # keep the other sections: a lent GPU is not lent twice
            traceback.print_exc()
            result[key] = {"error": f"{type(err).__name__}: {err}"}
            result["errors"].append(key)
        save()

    with tempfile.TemporaryDirectory(prefix="replic_bench_gpu_") as tmp:
        runs = Path(tmp) / "runs"
        section("fp32", lambda: run_one(STUDENT, runs, ["train.amp=none"]))
        if device.type == "cuda":
            section("bf16", lambda: run_one(STUDENT, runs, ["train.amp=bf16"]))
        else:
            result["bf16"] = {"skipped": "CPU: replic's engine autocasts on CUDA only "
                                         "(replic.engine.runtime.autocast_context), a bf16 run would repeat fp32"}

        def ratios() -> dict[str, Any]:
            found: dict[str, Any] = {}
            for name, (method_exp, student_exp) in METHODS.items():
                try:
                    method = run_one(method_exp, runs, [])
                    student = run_one(student_exp, runs, [f"train.amp={method['amp']}"])
                    found[name] = {
                        "method": method, "student": student,
                        "step_time_ratio": method["step_s"]["median"] / student["step_s"]["median"],
                        "flops_ratio": method["flops_per_step"] / student["flops_per_step"],
                        "memory_ratio": (method["peak_mem_mib"] / student["peak_mem_mib"]
                                         if method["peak_mem_mib"] and student["peak_mem_mib"] else None),
                    }
                except Exception as err:  # one method failing leaves the others
                    traceback.print_exc()
                    found[name] = {"error": f"{type(err).__name__}: {err}"}
            return found

        section("ratios", ratios)
        if "official" in args.sections and not args.official:
            result["official"] = {"skipped": "REPLIC_OFFICIAL_CONDDETR is not set (nor --official): "
                                             "no checkout of Atten4Vis/ConditionalDETR to compare with"}
        else:
            # Their sine embedding of the reference points is written for d = 256
            # (gen_sineembed_for_position): a narrower replic model (--reduced) is compared at d = 256.
            sets = [] if base.model.hidden_dim == 256 else ["model.hidden_dim=256"]
            official_cfg = load_cfg(STUDENT, scale, device.type, sets)

            def replic_row(precision: str) -> dict[str, Any]:
                return run_one(STUDENT, runs, [f"train.amp={'none' if precision == 'fp32' else precision}", *sets])

            section("official", lambda: official_section(args.official, official_cfg, batch, device, args,
                                                         replic_row, Path(tmp)))
    result["complete"] = True
    result["wall_s"] = time.perf_counter() - started
    save()
    print_table(result)
    print(f"\nwrote {out}")
    return 1 if result["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.official_worker:
        official_worker(args.official_worker)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
