"""Kills during writes: many real SIGKILLs at seeded random moments of a smoke training, and a full disk.

Half of the kills land at a random time; the other half the moment a temporary file of
``last.pt``, ``metrics.jsonl``'s rewrite or the eval outputs appears, i.e. while it is being
written. After every kill each file the run directory holds must be readable by the next command,
and the re-run that finally completes must end bit-identical (weights, metrics log, eval
outputs) to a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from engine_testutil import REPO, env, make_uniform_coco, metric_lines, run, train_command

pytestmark = pytest.mark.slow

# 4 steps per epoch, a checkpoint after every step: most of the run is spent near a write.
EXTRA = ["train.epochs=4", "train.lr_drop=3", "train.checkpoint_every=1", "model.dropout=0.1",
         "data.hflip_prob=0.5"]
KILLS = 10
SEED = 16


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_uniform_coco(tmp_path_factory.mktemp("data"), n_train=8, n_val=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    result = run(train_command(out, data_root, EXTRA))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, time.monotonic() - t0


def _temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*.tmp") if p.is_file()]


def assert_readable(run_dir: Path) -> None:
    """Every file a later command reads parses; metrics.jsonl may end in one torn line only."""
    for name in ("checkpoints/last.pt", "checkpoint_final.pt"):
        path = run_dir / name
        if path.exists():
            data = torch.load(path, weights_only=True)
            assert "model" in data, path
    for name in ("provenance.json", "done.json", "eval/metrics.json", "eval/detections.json"):
        path = run_dir / name
        if path.exists():
            json.loads(path.read_text())
    config = run_dir / "config.yaml"
    if config.exists():
        import yaml

        assert isinstance(yaml.safe_load(config.read_text()), dict)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        for line in lines[:-1]:
            json.loads(line)  # only the line being appended at the kill may be torn


# What the "during a write" kills aim at, in turn: the temporary file of each writer (the
# end-of-run files last, so the earlier kills land inside the training loop).
TARGETS = (".last.pt.", ".metrics.jsonl.", ".last.pt.", ".checkpoint_final.pt.", ".detections.json.")


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(ln).get("step", 0) for ln in path.read_text().splitlines() if ln.endswith("}")]
    return max(steps, default=0)


def _fresh_temp_file(run_dir: Path, target: str) -> bool:
    """Whether a temporary file ``target…`` exists in one of the folders the writers use.

    A scandir of the three folders, not an rglob of the tree: a small checkpoint is written in
    about a millisecond, and a slow poll let a write slip by (the run then finished unkilled)."""
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "eval"):
        try:
            with os.scandir(folder) as entries:
                if any(e.name.startswith(target) and e.name.endswith(".tmp") for e in entries):
                    return True
        except FileNotFoundError:
            continue
    return False


def _kill_at(proc: subprocess.Popen, run_dir: Path, rng: random.Random, target: str | None) -> str:
    """SIGKILL ``proc`` at a random moment of training (after 1–2 more logged steps plus a random
    fraction of a second, cut short when one more step is logged: wall-clock times would drift with
    the machine's speed), or as soon as a
    temporary file named ``target…`` appears, i.e. while that file is being written."""
    goal = _steps(run_dir) + rng.randint(1, 2)
    extra = rng.uniform(0, 0.3)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if target:
            if _fresh_temp_file(run_dir, target):
                time.sleep(rng.uniform(0, 0.001))  # spread the kills over the write
                proc.kill()
                return f"during write of {target.strip('.')}"
            time.sleep(0.0001)
        elif _steps(run_dir) >= goal or (run_dir / "checkpoint_final.pt").exists():
            # A random moment within the next step, never past it: a fixed extra sleep let a fast
            # machine run several more steps, so the run could finish before the kills aimed at
            # the end-of-run writes (the test then failed on a machine faster than the one tuned on).
            until = time.monotonic() + extra
            while time.monotonic() < until and _steps(run_dir) <= goal and proc.poll() is None:
                time.sleep(0.001)
            proc.kill()
            return "at random time"
        else:
            time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
        return "timed out"
    return f"not killed: finished with {proc.returncode}"


def test_random_sigkills_never_leave_unreadable_files_and_the_rerun_is_bit_identical(
    tmp_path: Path, data_root: Path, reference: tuple[Path, float],
) -> None:
    ref_dir, _ = reference
    out = tmp_path / "run"
    rng = random.Random(SEED)
    log = []
    for i in range(KILLS):
        proc = subprocess.Popen(train_command(out, data_root, EXTRA), env=env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = TARGETS[(i // 2) % len(TARGETS)] if i % 2 else None
        how = _kill_at(proc, out, rng, target)
        _, err = proc.communicate(timeout=120)
        log.append(how)
        assert how.startswith(("during", "at random", "not killed")), (log, err[-3000:])
        assert_readable(out)
        if (out / "done.json").exists():
            break  # finished before this kill: nothing left to interrupt
    # The re-run of the same command continues from whatever the kills left.
    final = run(train_command(out, data_root, EXTRA))
    assert final.returncode == 0, final.stderr[-3000:]
    assert_readable(out)
    assert not _temp_files(out), "temporary files of killed writes were left behind"
    print("kills:", "; ".join(log))
    assert sum(h.startswith("during") for h in log) >= 4, log
    assert "during write of last.pt" in log and "during write of checkpoint_final.pt" in log, log

    state_ref = torch.load(ref_dir / "checkpoint_final.pt", weights_only=True)["model"]
    state = torch.load(out / "checkpoint_final.pt", weights_only=True)["model"]
    assert state.keys() == state_ref.keys()
    for key in state:
        assert torch.equal(state[key], state_ref[key]), f"weights differ at {key}"
    assert metric_lines(out) == metric_lines(ref_dir)
    for name in ("eval/detections.json",):
        assert (out / name).read_bytes() == (ref_dir / name).read_bytes()
    ref_metrics = json.loads((ref_dir / "eval" / "metrics.json").read_text())["metrics"]
    assert json.loads((out / "eval" / "metrics.json").read_text())["metrics"] == ref_metrics


# ------------------------------------------------------------------------------- full disk
def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs (CI runs as root)"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


@pytest.fixture
def small_disk(tmp_path: Path):
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_during_a_checkpoint_write_fails_clearly_and_keeps_the_previous_one(
    small_disk: Path, data_root: Path,
) -> None:
    from replic.engine.checkpoint import atomic_torch_save
    from replic.io import DiskFullError

    last = small_disk / "run" / "checkpoints" / "last.pt"
    first = {"model": {"w": torch.arange(1000, dtype=torch.float32)}, "step": 1}
    atomic_torch_save(first, last)
    ballast = small_disk / "ballast"
    free = shutil.disk_usage(small_disk).free
    ballast.write_bytes(b"\0" * max(0, free - 2 * 1024 * 1024))  # leave 2 MB
    with pytest.raises(DiskFullError) as info:
        atomic_torch_save({"model": {"w": torch.zeros(2_000_000)}, "step": 2}, last)  # 8 MB
    assert str(last) in str(info.value) and "no space" in str(info.value)
    assert torch.equal(torch.load(last, weights_only=True)["model"]["w"], first["model"]["w"])
    assert not _temp_files(small_disk), "the partial temporary file was left behind"


def test_training_on_a_full_disk_exits_with_a_clear_error(small_disk: Path, data_root: Path) -> None:
    """The real command: checkpoints of the tiny model fill the tmpfs; one error line, old last.pt loads."""
    out = small_disk / "run"
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 3 * 1024 * 1024))
    result = run(train_command(out, data_root, EXTRA))
    assert result.returncode != 0
    error_lines = [ln for ln in result.stderr.splitlines() if "no space left" in ln]
    assert error_lines, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert any(str(out) in ln for ln in error_lines), error_lines
    if (out / "checkpoints" / "last.pt").exists():
        torch.load(out / "checkpoints" / "last.pt", weights_only=True)
