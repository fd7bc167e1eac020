"""A mini-scale training step on one CPU thread, split into its parts, before vs after the
engine's CPU fast paths — side by side in one run, blocks interleaved (noisy machines).

The step of ``replic train --scale mini`` with the feature cache (Conditional DETR-R50 row:
hidden 128, 2 + 2 layers, 30 queries, batch 8, C4 maps of 8x10): per-sample seeding of the data
RNG, forward + loss + backward, gradient clipping and the AdamW step. Compared:

- seeding: ``torch.manual_seed`` inside ``fork_rng`` (what ``SeededDataset`` did; it also queues
  lazy CUDA/XPU/MTIA seeding) vs seeding the CPU generator only (what it does now);
- optimizer: torch's default CPU AdamW (a per-tensor Python loop) vs ``fused=True`` (what
  ``replic.engine.optim.build_optimizer`` picks on CPU).

Random weights and random maps of the cached shape; nothing is read from disk.

``--compile`` instead compares the forward + loss + backward + clip of the eager detector with
``torch.compile(detector)`` (inductor; compilation timed separately), blocks interleaved.
``--bf16`` instead compares that fp32 step with the same step under CPU bf16 autocast
(``torch.autocast("cpu", torch.bfloat16)`` around forward + loss; the engine autocasts on CUDA only).

Usage:
    python benchmarks/bench_mini_step.py [--steps 60] [--rounds 3] [--threads 1] [--compile | --bf16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


def _build(threads: int):
    from replic.engine.config import load_experiment
    from replic.engine.runtime import build_loss
    from replic.methods import build_method

    torch.set_num_threads(threads)
    cfg = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "mini",
                          {"model": {"pretrained_backbone": "none", "num_classes": 8}})
    torch.manual_seed(0)
    model = build_method(cfg).build_model()
    model.train()
    criterion = build_loss(cfg)
    return cfg, model, criterion


def _batch():
    from replic.models.backbone import BackboneFeatures

    g = torch.Generator().manual_seed(1)
    maps = {"C4": torch.randn(BATCH, 256, 8, 10, generator=g)}
    mask = torch.zeros(BATCH, 128, 160, dtype=torch.bool)
    targets = []
    for _ in range(BATCH):
        n = 3
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, 8, (n,), generator=g),
                        "boxes": torch.cat([cxcy, wh], 1)})
    return BackboneFeatures(maps, (BATCH, 3, 128, 160)), mask, targets


def seed_old(seed: int) -> None:
    py, npst = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.rand(())
    random.setstate(py)
    np.random.set_state(npst)


def seed_new(seed: int) -> None:
    py, npst, st = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.rand(())
    torch.random.set_rng_state(st)
    random.setstate(py)
    np.random.set_state(npst)


def time_block(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="eager vs torch.compile of the detector")
    parser.add_argument("--bf16", action="store_true", help="fp32 vs CPU bf16 autocast of forward + loss")
    args = parser.parse_args()

    cfg, model, criterion = _build(args.threads)
    batch = _batch()
    if args.compile:
        compare_compile(cfg, model, criterion, batch, args)
        return
    if args.bf16:
        compare_bf16(cfg, model, criterion, batch, args)
        return
    params = [p for p in model.parameters() if p.requires_grad]
    opts = {"default": torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4),
            "fused": torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=True)}
    step = _fwd_bwd(cfg, model, criterion, batch)

    def fwd_bwd(_: int) -> None:
        step(model)

    fwd_bwd(0)  # gradients exist for the optimizer steps
    results: dict[str, list[float]] = {k: [] for k in
                                       ("seed x8 old", "seed x8 new", "fwd+loss+bwd+clip",
                                        "AdamW default", "AdamW fused")}
    for _ in range(args.rounds):
        results["seed x8 old"].append(time_block(lambda i: [seed_old(i * 8 + j) for j in range(8)], args.steps))
        results["seed x8 new"].append(time_block(lambda i: [seed_new(i * 8 + j) for j in range(8)], args.steps))
        results["fwd+loss+bwd+clip"].append(time_block(fwd_bwd, args.steps))
        results["AdamW default"].append(time_block(lambda i: opts["default"].step(), args.steps))
        results["AdamW fused"].append(time_block(lambda i: opts["fused"].step(), args.steps))

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"mini training step parts, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps, "
          f"ms (median of rounds; min-max)")
    print("| part | ms | min-max |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {med[k]:.2f} | {min(v):.2f}-{max(v):.2f} |")
    before = med["seed x8 old"] + med["fwd+loss+bwd+clip"] + med["AdamW default"]
    after = med["seed x8 new"] + med["fwd+loss+bwd+clip"] + med["AdamW fused"]
    print(f"| step before (old seeding + default AdamW) | {before:.2f} | |")
    print(f"| step after (CPU-generator seeding + fused AdamW) | {after:.2f} | |")
    print(f"speed-up of a step: {before / after:.2f}x")


def _fwd_bwd(cfg, model, criterion, batch):
    """``step(detector, bf16=False)``: forward + loss + backward + clip of ``detector`` (``model`` or a
    compiled wrapper of it), optionally under CPU bf16 autocast."""
    images, mask, targets = batch
    weights = criterion.weight_dict
    params = [p for p in model.parameters() if p.requires_grad]

    def step(detector, bf16: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = criterion(detector(images, mask), targets)
        total = sum(losses[k].float() * weights[k] for k in losses if k in weights)
        model.zero_grad(set_to_none=False)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_max_norm)

    return step


def _compare(variants: dict, args, column: str, note: str = "") -> None:
    """Time the variants (name -> no-argument step) in interleaved blocks; print a table and the
    speed-up of the second over the first."""
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            results[name].append(time_block(lambda i: fn(), args.steps))
    print(f"mini fwd+loss+bwd+clip, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps, "
          f"ms (median of rounds; min-max){note}")
    print(f"| {column} | ms | min-max |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f}-{max(v):.2f} |")
    base, other = (statistics.median(v) for v in results.values())
    print(f"speed-up of {list(results)[1]}: {base / other:.2f}x")


def compare_compile(cfg, model, criterion, batch, args) -> None:
    """Print eager vs ``torch.compile`` ms for forward + loss + backward + clip (same weights)."""
    step = _fwd_bwd(cfg, model, criterion, batch)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    step(compiled)  # compiles forward and backward
    compile_s = time.perf_counter() - t0
    step(model)
    _compare({"eager": lambda: step(model), "torch.compile": lambda: step(compiled)}, args, "detector",
             f"; first compiled step (compilation) {compile_s:.1f} s")


def compare_bf16(cfg, model, criterion, batch, args) -> None:
    """Print fp32 vs CPU bf16-autocast ms for forward + loss + backward + clip (same weights)."""
    step = _fwd_bwd(cfg, model, criterion, batch)
    step(model)
    step(model, bf16=True)  # warm-up of both paths (oneDNN picks its bf16 kernels on the first call)
    _compare({"fp32": lambda: step(model), "bf16 autocast": lambda: step(model, bf16=True)}, args, "precision")


if __name__ == "__main__":
    main()
