"""How close the mini training step runs to this CPU's limit, and where the rest of the step goes.

Prints, for 1 and 2 threads (``--threads``):

1. the CPU's fp32 matmul peak: GFLOP/s of a large square ``torch.mm`` (best of a few repeats);
2. the mini step's useful work: the FLOPs of forward + loss + backward counted by
   ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention);
3. the step's time by part — detector forward (from cached backbone maps, as ``replic train --scale
   mini`` runs), Hungarian matching (all decoder layers), the loss terms, backward, gradient
   clipping, the fused AdamW step — and its achieved GFLOP/s as a share of the peak;
4. with ``--profile``, torch.profiler's top operators of the step by self CPU time (what the forward
   and backward spend outside the matmuls: normalisation, softmax, dropout, element-wise ops, copies).

The step and batch are ``bench_mini_step.py``'s (Conditional DETR-R50 row at mini: hidden 128,
2 + 2 layers, 30 queries, batch 8, C4 maps of 8x10; random weights and maps). Parts are timed in
interleaved rounds; medians are printed. These machines are noisy: rerun on an idle machine before
quoting a figure, and say when another job was running.

Usage:
    python benchmarks/bench_cpu_limit.py [--threads 1 2] [--steps 40] [--rounds 3] [--gemm 2048]
        [--profile] [--rows 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mini_step import _batch, _build  # noqa: E402  (the same step and batch)


def matmul_peak_gflops(n: int, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n fp32 matmul (2 n^3 FLOPs) at the current thread count."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up (allocations, kernel choice)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class TimedMatcher(torch.nn.Module):
    """The criterion's matcher, with the wall time of its calls summed in ``seconds``."""

    def __init__(self, matcher: torch.nn.Module) -> None:
        super().__init__()
        self.inner = matcher
        self.seconds = 0.0

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def step_parts(cfg, model, criterion, batch, optimizer) -> dict[str, float]:
    """One mini training step; seconds per part."""
    images, mask, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    weights = criterion.weight_dict
    criterion.matcher.seconds = 0.0
    t = [time.perf_counter()]
    outputs = model(images, mask)
    t.append(time.perf_counter())
    losses = criterion(outputs, targets)
    total = sum(losses[k] * weights[k] for k in losses if k in weights)
    t.append(time.perf_counter())
    optimizer.zero_grad(set_to_none=False)
    total.backward()
    t.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_max_norm)
    t.append(time.perf_counter())
    optimizer.step()
    t.append(time.perf_counter())
    matching = criterion.matcher.seconds
    return {"forward": t[1] - t[0], "matching": matching, "loss terms": t[2] - t[1] - matching,
            "backward": t[3] - t[2], "clip": t[4] - t[3], "AdamW (fused)": t[5] - t[4]}


def counted_flops(model, criterion, batch) -> int:
    """FLOPs of forward + loss + backward, as torch's flop counter counts them."""
    images, mask, targets = batch
    weights = criterion.weight_dict
    with FlopCounterMode(display=False) as counter:
        losses = criterion(model(images, mask), targets)
        sum(losses[k] * weights[k] for k in losses if k in weights).backward()
    model.zero_grad(set_to_none=False)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gemm", type=int, default=2048, help="size of the square matmul for the peak")
    parser.add_argument("--profile", action="store_true", help="also print the top operators by self CPU time")
    parser.add_argument("--rows", type=int, default=15, help="operators printed with --profile")
    args = parser.parse_args()

    batch = _batch()
    print(f"torch {torch.__version__}; mini step: Conditional DETR-R50 row, batch {len(batch[2])}, "
          f"{args.rounds} rounds x {args.steps} steps per thread count (medians)")
    for threads in args.threads:
        cfg, model, criterion = _build(threads)
        criterion.matcher = TimedMatcher(criterion.matcher)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=True)
        flops = counted_flops(model, criterion, batch)
        for _ in range(3):  # warm-up
            step_parts(cfg, model, criterion, batch, optimizer)
        peaks, rounds = [], []
        for _ in range(args.rounds):
            peaks.append(matmul_peak_gflops(args.gemm))
            parts = [step_parts(cfg, model, criterion, batch, optimizer) for _ in range(args.steps)]
            rounds.append({k: statistics.median(p[k] for p in parts) for k in parts[0]})
        peak = statistics.median(peaks)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        step_s = sum(med.values())
        achieved = flops / step_s / 1e9
        print(f"\n## {threads} thread(s)")
        print(f"fp32 matmul peak ({args.gemm}x{args.gemm}): {peak:.1f} GFLOP/s (rounds: "
              f"{', '.join(f'{p:.1f}' for p in peaks)})")
        print(f"mini step: {flops / 1e9:.3f} GFLOP counted (forward + loss + backward); "
              f"{step_s * 1e3:.1f} ms -> {achieved:.1f} GFLOP/s = {100 * achieved / peak:.1f} % of the peak")
        print(f"time at the peak for the counted FLOPs: {flops / peak / 1e6:.2f} ms")
        print("| part | ms | share of the step |\n|---|---|---|")
        for k, v in med.items():
            print(f"| {k} | {v * 1e3:.2f} | {100 * v / step_s:.1f} % |")
        if args.profile:
            print_profile(cfg, model, criterion, batch, optimizer, args.steps, args.rows)


def print_profile(cfg, model, criterion, batch, optimizer, steps: int, rows: int) -> None:
    """torch.profiler over ``steps`` steps: operators by self CPU time, and the matmul share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step_parts(cfg, model, criterion, batch, optimizer)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events
                 if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution"))
    print(f"profiled {steps} steps: matmul/conv kernels {100 * matmul / total:.1f} % of self CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


if __name__ == "__main__":
    main()
