"""Exact resume: a REAL training subprocess is stopped mid-epoch (SIGTERM, and SIGKILL), resumed,
and must end with bit-identical weights, metrics log and eval metrics to a run that never stopped.
Every test runs for both model families (DETR; CNN = torchvision Faster R-CNN with the SGD
warm-up schedule, whose per-iteration state is checkpointed too)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from engine_testutil import REPO, env, make_uniform_coco, metric_lines, run, train_command

pytestmark = pytest.mark.slow

# Dropout on and every augmentation active, so RNG restore and data order both matter.
EXTRAS = {
    "detr": ["train.epochs=3", "train.lr_drop=2", "model.dropout=0.1", "data.hflip_prob=0.5",
             "data.resize_only_prob=0.5"],
    # Warm-up over the first 15 steps: the stops below (steps 12-20) land inside and after it.
    "cnn": ["train.epochs=3", "train.lr_steps=[2]", "train.warmup_iters=15", "data.hflip_prob=0.5"],
}


@pytest.fixture(scope="module", params=sorted(EXTRAS))
def family(request) -> str:
    return request.param


def _command(out: Path, data_root: Path, family: str, extra: list[str] = ()) -> list[str]:
    return train_command(out, data_root, [*EXTRAS[family], *extra], family=family)


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint_final.pt", weights_only=True)["model"]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training ended early (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the training subprocess")


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return max((json.loads(ln)["step"] for ln in lines if ln.endswith("}")), default=0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_uniform_coco(tmp_path_factory.mktemp("data"), n_train=20, n_val=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root, family) -> Path:
    out = tmp_path_factory.mktemp(f"reference_{family}")
    result = run(_command(out, data_root, family))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    state_a, state_b = _final_state(a), _final_state(b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), f"weights differ at {key}"
    assert metric_lines(a) == metric_lines(b)
    metrics_a = json.loads((a / "eval" / "metrics.json").read_text())["metrics"]
    metrics_b = json.loads((b / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics_a == metrics_b
    assert (a / "eval" / "detections.json").read_bytes() == (b / "eval" / "detections.json").read_bytes()


def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path, data_root, reference, family):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out, data_root, family), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # 10 steps per epoch: stop inside epoch 1, away from its boundaries.
    _wait_for(lambda: _steps_logged(out) >= 12, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    stopped_at = ckpt["position"]["global_step"]
    assert 12 <= stopped_at < 20 and ckpt["position"]["step_in_epoch"] != 0
    assert not (out / "done.json").exists()

    resumed = run(_command(out, data_root, family) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["resumed_at"]["global_step"] == stopped_at
    _assert_same_run(reference, out)


def test_sigkill_then_rerun_resumes_from_epoch_checkpoint(tmp_path, data_root, reference, family):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out, data_root, family), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "checkpoints" / "last.pt").is_file() and _steps_logged(out) >= 12, proc)
    proc.kill()  # SIGKILL: no chance to checkpoint
    proc.communicate(timeout=60)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["position"]["step_in_epoch"] == 0 and ckpt["position"]["epoch"] >= 1

    # Re-running the same command (no --resume) continues from the checkpoint.
    again = run(_command(out, data_root, family))
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_run(reference, out)


def test_rerun_with_different_config_is_refused_naming_the_key(tmp_path, data_root, reference, family):
    result = run(_command(reference, data_root, family, ["train.lr=0.00077"]))
    assert result.returncode != 0
    assert "train.lr" in result.stderr and "different config" in result.stderr


def test_rerunning_a_finished_run_is_a_no_op(data_root, reference, family):
    before = {p: p.read_bytes() for p in (reference / "done.json", reference / "checkpoint_final.pt")}
    again = run(_command(reference, data_root, family))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stderr
    assert {p: p.read_bytes() for p in before} == before
