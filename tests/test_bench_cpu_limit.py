"""benchmarks/bench_cpu_limit.py keeps working: the matmul peak, the counted FLOPs of the mini step and
its parts. Timings are never asserted; the counted FLOPs are checked against a hand count of one
linear layer (the counter is what the benchmark's share of the peak rests on)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_counted_flops_are_two_per_multiply_add_forward_and_backward():
    from bench_cpu_limit import counted_flops

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(16, 8)

        def forward(self, x, mask):
            return {"out": self.linear(x)}

    class Loss:
        weight_dict = {"l": 1.0}

        def __call__(self, outputs, targets):
            return {"l": outputs["out"].square().sum()}

    x = torch.randn(5, 16, requires_grad=False)
    # forward 2·5·16·8; backward: grad wrt the weight only (x needs none) 2·5·16·8.
    assert counted_flops(Net(), Loss(), (x, None, None)) == 2 * (2 * 5 * 16 * 8)


@pytest.mark.slow
def test_the_benchmark_prints_the_share_of_the_peak_and_every_part():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_limit.py"), "--threads", "1",
                           "--steps", "2", "--rounds", "1", "--gemm", "256"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    share = re.search(r"mini step: ([\d.]+) GFLOP counted .* = ([\d.]+) % of the peak", out)
    assert share and float(share.group(1)) > 1.0 and float(share.group(2)) > 0, out
    for part in ("forward", "matching", "loss terms", "backward", "clip", "AdamW (fused)"):
        assert re.search(rf"\| {re.escape(part)} \| [\d.]+ \| [\d.]+ % \|", out), part
