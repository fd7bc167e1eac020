"""KS-DETR cost vs its baseline, side by side: KS layer parameters and FLOPs, training step, eval step.

Both models are Conditional DETR-R50 of the paper shape (6+6 layers, d 256, 8 heads, 300
queries, 91 classes, random weights: nothing is downloaded); the KS model has its last encoder
layer replaced by the triple-attention layer (``method: ks_detr``, triple, sMLP at X).

* Parameters: the KS layer vs the plain encoder layer, and both whole models.
* FLOPs (``torch.utils.flop_counter``: matmuls, convolutions, attention; elementwise ops not
  counted) of one encoder layer on B×N tokens, and of one whole forward, in training (teachers
  computed and decoded) and at evaluation (student only).
* Time: training step (forward + loss + backward + clip 0.1 + AdamW) and eval forward (no grad,
  model.eval(); per step the minimum of ``--eval-repeats`` forwards), baseline and KS steps
  interleaved on the same batch so machine load hits both; medians over the timed steps.

Usage:
    python benchmarks/bench_ks_detr.py [--device cpu|cuda] [--size 512] [--warmup 2] [--steps 5] [--threads N]
        [--eval-repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replic.methods import build_method  # noqa: E402
from replic.models.build import build_criterion  # noqa: E402
from replic.models.config import ModelConfig  # noqa: E402

BOXES = [
    [(1, 0.30, 0.40, 0.20, 0.30), (18, 0.70, 0.60, 0.35, 0.25), (44, 0.50, 0.20, 0.10, 0.10)],
    [(3, 0.45, 0.55, 0.50, 0.40), (62, 0.15, 0.80, 0.12, 0.20)],
]


def _batch(size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=g).to(device)
    mask = torch.zeros(2, size, size, dtype=torch.bool, device=device)
    targets = [{"labels": torch.tensor([b[0] for b in boxes], device=device),
                "boxes": torch.tensor([b[1:] for b in boxes], dtype=torch.float32, device=device),
                "size": torch.tensor([size, size], device=device)} for boxes in BOXES]
    return images, mask, targets


def _setup(method_section: dict, device: torch.device):
    model_cfg = ModelConfig(pretrained_backbone="none")
    cfg = types.SimpleNamespace(model=model_cfg, method=method_section)
    method = build_method(cfg)
    torch.manual_seed(0)
    model = method.build_model().to(device)
    criterion = build_criterion(model_cfg).to(device)
    method.setup(model, criterion, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    return method, model, criterion, optimizer


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # forward only (no backward is run); FlopCounterMode's module tracker needs grad mode
        fn()
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-repeats", type=int, default=3, help="eval forwards per step (the minimum is kept)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, mask, targets = _batch(args.size, device)
    runs = {"baseline": _setup({"name": "none"}, device),
            "KS (triple, sMLP at X)": _setup({"name": "ks_detr"}, device)}

    # ---- parameters and FLOPs of one encoder layer on the token grid of this image size
    base_layer = runs["baseline"][1].transformer.encoder.layers[-1]
    ks_method, ks_model = runs["KS (triple, sMLP at X)"][:2]
    ks_layer = ks_model.transformer.encoder.layers[-1]
    with torch.no_grad():
        grid = ks_model.backbone(images, mask)[0]["C5"][0].shape[-2:]
    n = grid[0] * grid[1]
    src = torch.randn(2, n, 256, device=device)
    pos = torch.randn(2, n, 256, device=device)
    canvas = ks_method.encoder_inputs(images, targets)["ks_fg_mask"]
    inputs = {"ks_fg_mask": canvas, "feature_size": tuple(grid)}
    ks_layer_train = copy.deepcopy(ks_layer).train()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"device {device.type}, batch 2 x {args.size}x{args.size} -> {grid[0]}x{grid[1]} = {n} tokens, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print()
    print("| encoder layer | params | GFLOPs, 2 images |")
    print("|---|---|---|")
    # Same mode on both sides: SDPA with dropout (training) is counted through another kernel.
    base_train, base_eval = copy.deepcopy(base_layer).train(), copy.deepcopy(base_layer).eval()
    print(f"| plain, training | {count(base_layer):,} | {_flops(lambda: base_train(src, pos, None)) / 1e9:.3f} |")
    print(f"| KS, training (student + 2 teachers) | {count(ks_layer):,} "
          f"(in_proj {tuple(ks_layer.self_attn.in_proj_weight.shape)}, sMLP {count(ks_layer.smlp):,}) | "
          f"{_flops(lambda: ks_layer_train(src, pos, None, layer_inputs=inputs)) / 1e9:.3f} |")
    print(f"| plain, evaluation | same as above | {_flops(lambda: base_eval(src, pos, None)) / 1e9:.3f} |")
    print(f"| KS, evaluation (student only) | same as above | {_flops(lambda: ks_layer.eval()(src, pos, None)) / 1e9:.3f} |")
    print()

    # ---- whole-model FLOPs and time
    rows = {}
    for name, (method, model, criterion, optimizer) in runs.items():
        model.eval()
        eval_flops = _flops(lambda: model(images, mask))
        model.train()
        train_flops = _flops(lambda: method.forward_train(model, images, mask, targets))
        rows[name] = {"params": count(model), "train_gflops": train_flops / 1e9, "eval_gflops": eval_flops / 1e9,
                      "train": [], "eval": []}
    for step in range(args.warmup + args.steps):
        for name, (method, model, criterion, optimizer) in runs.items():
            model.train()
            _sync(device)
            start = time.perf_counter()
            outputs = method.forward_train(model, images, mask, targets)
            losses = criterion(outputs, targets)
            loss = criterion.total(losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            _sync(device)
            train_s = time.perf_counter() - start
            model.eval()
            with torch.no_grad():
                repeats = []
                for _ in range(args.eval_repeats):  # min of a few: eval forwards are short and load is noisy
                    start = time.perf_counter()
                    model(images, mask)
                    _sync(device)
                    repeats.append(time.perf_counter() - start)
                eval_s = min(repeats)
            if step >= args.warmup:
                rows[name]["train"].append(train_s)
                rows[name]["eval"].append(eval_s)
    print(f"warm-up {args.warmup}, timed {args.steps} (baseline and KS steps interleaved)")
    print("| model | params (M) | train fwd GFLOPs | eval fwd GFLOPs | train step median (s) | eval step median (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params'] / 1e6:.2f} | {r['train_gflops']:.1f} | {r['eval_gflops']:.1f} | "
              f"{statistics.median(r['train']):.3f} | {statistics.median(r['eval']):.3f} |")
    base, ks = rows["baseline"], rows["KS (triple, sMLP at X)"]
    print(f"KS / baseline: train step {statistics.median(ks['train']) / statistics.median(base['train']):.2f}x, "
          f"eval step {statistics.median(ks['eval']) / statistics.median(base['eval']):.2f}x, "
          f"eval GFLOPs {ks['eval_gflops'] / base['eval_gflops']:.4f}x")


if __name__ == "__main__":
    main()
