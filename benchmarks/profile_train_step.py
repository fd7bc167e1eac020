"""Where replic's training step spends its time: torch.profiler over one step, top ops printed.

The same step and batch as ``bench_train_step.py`` (Conditional DETR-R50, 2 images, forward +
loss + backward + clipping + AdamW), after warm-up. Use it to pick what to speed up; use
``bench_train_step.py`` to measure the result side by side.

Usage:
    python benchmarks/profile_train_step.py [--device cpu|cuda] [--size 512] [--threads 2]
        [--nchw] [--rows 20]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--nchw", action="store_true", help="profile the NCHW backbone instead of channels-last")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train_step import _replic_step_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    _, step = _replic_step_fn(device, args.size, channels_last=not args.nchw)
    for _ in range(args.warmup):
        step(contextlib.nullcontext)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(contextlib.nullcontext)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
