"""A composed student (KS-DETR + D³ETR + MasKD) through the real engine: `replic train` stopped by
SIGTERM mid-epoch and resumed ends bit-identical to a run that never stopped — every method's
state (MasKD's align convs and its warm-up counter) included — and records each method in its
provenance."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from engine_testutil import EXPERIMENT, REPO, TINY_SETTINGS, env, make_uniform_coco, metric_lines, run, train_command
from replic.config import to_dict
from replic.engine.config import load_experiment, parse_overrides
from replic.models.build import build_model

pytestmark = pytest.mark.slow

EXTRA = ["train.epochs=2", "train.lr_drop=1", "model.dropout=0.1", "train.eval_at_end=false"]


def _teacher(path: Path, data: Path) -> str:
    cfg = load_experiment(EXPERIMENT, "smoke", parse_overrides([f"data.root={data}", *TINY_SETTINGS]))
    torch.manual_seed(7)
    model = build_model(cfg.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": to_dict(cfg.model), "config": {"name": "teacher"}}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _methods(teacher: Path) -> str:
    return ("method=[{name: ks_detr}, "
            f"{{name: d3etr, teacher: {{checkpoint: '{teacher}'}}}}, "
            f"{{name: maskd, teacher: {{checkpoint: '{teacher}'}}, tokens: {{random: true}}, num_tokens: 2, "
            "position: memory, custom_mask_warmup: 5}]")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("compose")
    data = make_uniform_coco(root / "data", n_train=20, n_val=4)
    teacher = root / "teacher.pt"
    sha = _teacher(teacher, data)
    return data, teacher, sha


def _command(out: Path, data: Path, teacher: Path) -> list[str]:
    return train_command(out, data, [*EXTRA, _methods(teacher)])


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and ln.endswith("}")]
    return max((json.loads(ln)["step"] for ln in lines), default=0)


def test_a_composed_run_resumes_exactly_with_every_methods_state(tmp_path, setup):
    data, teacher, sha = setup
    reference = tmp_path / "reference"
    result = run(_command(reference, data, teacher))
    assert result.returncode == 0, result.stderr[-3000:]
    prov = json.loads((reference / "provenance.json").read_text())["method"]
    assert prov["name"] == "ks_detr+d3etr+maskd" and set(prov["parts"]) == {"ks_detr", "d3etr", "maskd"}
    assert prov["parts"]["d3etr"]["teacher"]["sha256"] == sha == prov["parts"]["maskd"]["teacher"]["sha256"]
    final = torch.load(reference / "checkpoint_final.pt", weights_only=True)
    assert int(final["method"]["parts.maskd.step"]) == 20  # 10 steps per epoch x 2
    logged = set(metric_lines(reference)[-1])  # every method's terms are logged
    assert "loss_maskd" in logged and any("_teacher_" in k for k in logged), sorted(logged)
    assert any(k.startswith("d3_") for k in logged), sorted(logged)

    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out, data, teacher), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _steps_logged(out) < 13:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"training ended early or hung: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 13 <= stopped["position"]["global_step"] < 20
    assert int(stopped["method"]["parts.maskd.step"]) == stopped["position"]["global_step"]

    resumed = run(_command(out, data, teacher) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = torch.load(out / "checkpoint_final.pt", weights_only=True)
    for part in ("model", "method"):
        assert final[part].keys() == again[part].keys()
        for key in final[part]:
            assert torch.equal(final[part][key], again[part][key]), f"{part}: {key} differs after resume"
    assert metric_lines(reference) == metric_lines(out)
