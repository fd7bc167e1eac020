"""Time the synthetic COCO generator (``replic data synth``) and print the figures.

Usage::

    python benchmarks/bench_synth.py [--images 500] [--size 320] [--seed 0] [--repeats 3]

Prints wall-clock seconds per run and images per second for ``--images`` training
images at ``--size`` (no validation split), written to a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from replic.data.synth import DEFAULT_SIZE, generate_synthetic_coco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    times, cpu_times = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            start, cpu_start = time.perf_counter(), time.process_time()
            generate_synthetic_coco(out, n_train=args.images, n_val=0, size=args.size, seed=args.seed)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    best, median = min(times), statistics.median(times)
    print(f"synth: {args.images} images at size {args.size}, seed {args.seed}, {args.repeats} runs")
    print("wall seconds per run: " + ", ".join(f"{t:.2f}" for t in times))
    # CPU time is the steadier figure on a shared machine (the generator is single-threaded).
    print("cpu seconds per run:  " + ", ".join(f"{t:.2f}" for t in cpu_times))
    print(f"best wall {best:.2f} s ({args.images / best:.0f} images/s), median {median:.2f} s")


if __name__ == "__main__":
    main()
