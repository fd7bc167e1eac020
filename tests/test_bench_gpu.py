"""The one-shot GPU check (benchmarks/gpu.sh -> benchmarks/bench_gpu.py) keeps working on a CPU.

No GPU is needed: ``--reduced`` runs every section at the smoke scale's sizes (ResNet-18, hidden 64,
128 x 160 images, 2 + 2 steps) in a subprocess, as the lent GPU would run it at paper size, and
the JSON is checked for shape and sanity. Timings are never asserted, only that each figure
exists and each ratio is a positive finite number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = os.environ.get("REPLIC_OFFICIAL_CONDDETR")
METHODS = {"ks_detr": ("ks_cdetr_r50_50ep", "ks_cdetr_r50_50ep_base"),
           "d3etr": ("d3etr_cdetr_r50_50ep", "cdetr_r50_50ep"),
           "maskd": ("maskd_cdetr_r50_50ep", "cdetr_r50_50ep")}

# ~20-30 s on the shared 2-core machine (six small models, a few steps each): slow.
pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *extra: str, official: str | None = None) -> tuple[dict, str]:
    """Run ``benchmarks/gpu.sh --reduced`` on the CPU (one thread); the JSON and the printed output."""
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "REPLIC_OFFICIAL_CONDDETR"}
    env["REPLIC_PYTHON"] = sys.executable
    if official:
        env["REPLIC_OFFICIAL_CONDDETR"] = official
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--reduced", "--device", "cpu",
                           "--threads", "1", "--peak-tflops", "1", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_row(row: dict) -> None:
    """One measured run: throughput, step time, FLOPs (backward counted too), MFU against the given peak."""
    assert _positive(row["images_per_s"]) and _positive(row["step_s"]["median"])
    assert len(row["step_s"]["all"]) == 2
    assert row["peak_mem_mib"] is None  # CPU: memory is not measured
    assert _positive(row["flops_per_step"]) and row["flops_per_step"] >= row["forward_flops"] > 0
    assert _positive(row["mfu"]) and row["mfu_peak"]["tflops"] == 1.0
    assert row["precision"] == "fp32"


def test_reduced_gpu_check_writes_every_section(tmp_path: Path) -> None:
    result, stdout = _run(tmp_path)
    assert result["complete"] and result["errors"] == []
    assert result["settings"] == {**result["settings"], "reduced": True, "scale": "smoke", "batch": 2,
                                  "height": 128, "width": 160, "warmup": 2, "steps": 2}
    assert result["environment"]["device"] == "cpu" and result["environment"]["torch"]
    assert result["wrapper_command"].startswith("bash benchmarks/gpu.sh --reduced")
    assert "bench_gpu.py" in result["command"]
    assert "commit" in result["git"]
    _check_row(result["fp32"])
    assert result["fp32"]["experiment"] == "cdetr_r50_50ep" and result["fp32"]["backbone"] == "resnet18"
    assert "autocasts on CUDA only" in result["bf16"]["skipped"]
    assert set(result["ratios"]) == set(METHODS)
    for name, (method, student) in METHODS.items():
        ratio = result["ratios"][name]
        assert ratio["method"]["experiment"] == method and ratio["student"]["experiment"] == student
        for side in ("method", "student"):
            _check_row(ratio[side])
        for key in ("step_time_ratio", "flops_ratio"):
            assert _positive(ratio[key]), (name, key, ratio[key])
        assert ratio["memory_ratio"] is None
    # The teachers are randomly initialised (no checkpoint needed); KS-DETR has none.
    for name in ("d3etr", "maskd"):
        teacher = result["ratios"][name]["method"]["teacher"]
        assert teacher["experiment"] == "cdetr_r101_50ep" and "random" in teacher["weights"]
    assert result["ratios"]["ks_detr"]["method"]["teacher"] is None
    # A distilling step computes more than its student's.
    assert result["ratios"]["d3etr"]["flops_ratio"] > 1 and result["ratios"]["maskd"]["flops_ratio"] > 1
    assert "REPLIC_OFFICIAL_CONDDETR is not set" in result["official"]["skipped"]
    assert "| Conditional DETR-R18 | fp32 |" in stdout and "d3etr: d3etr_cdetr_r50_50ep / cdetr_r50_50ep" in stdout


@pytest.mark.skipif(not OFFICIAL, reason="set REPLIC_OFFICIAL_CONDDETR to an official checkout")
def test_reduced_official_comparison(tmp_path: Path) -> None:
    result, stdout = _run(tmp_path, "--sections", "fp32,official", official=OFFICIAL)
    assert result["errors"] == []
    official = result["official"]
    assert official["repo"] == str(Path(OFFICIAL).resolve())
    # Their reference-point embedding is fixed at d = 256: replic is compared at that width.
    assert official["model"]["hidden_dim"] == 256 and official["model"]["backbone"] == "resnet18"
    row = official["fp32"]
    assert _positive(row["images_per_s"]) and _positive(row["replic_images_per_s"])
    assert _positive(row["replic_over_official_images_per_s"])
    mine = official["replic"]["fp32"]
    assert mine["extra_overrides"] == ["model.hidden_dim=256"] and mine["images_per_s"] == row["replic_images_per_s"]
    assert "CUDA only" in official["bf16"]["skipped"]
    assert "official Conditional DETR-R18 (Atten4Vis code) | fp32 |" in stdout
