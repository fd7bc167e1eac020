"""Watching a run: TensorBoard event files, the step log line (ETA, smoothed loss, lr) and
``RUN_DIR/train.log``, for a real ``replic train`` that is stopped by SIGTERM and resumed.

The event-file tests need the ``tensorboard`` package (the ``dev`` and ``watch`` extras); without
it they are skipped, and the run must still train, without event files.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_testutil import FAMILY_RUNS, REPO, env, make_uniform_coco, run, train_command
from replic.engine.progress import Progress, StepMeter, format_eta, format_step_line
from replic.engine.tensorboard import TensorBoardLog, scalars

try:
    import tensorboard  # noqa: F401

    HAVE_TENSORBOARD = True
except ImportError:
    HAVE_TENSORBOARD = False

needs_tensorboard = pytest.mark.skipif(
    not HAVE_TENSORBOARD,
    reason="the tensorboard package is not installed (pip install -e '.[dev]'; requirements.lock "
    "must pin it): event files cannot be written or read back")

# 12 images, batch 2: 6 steps per epoch, 18 in all; lr drop after epoch 2 (steps 13-18).
STEPS_PER_EPOCH, EPOCHS = 6, 3
TOTAL = STEPS_PER_EPOCH * EPOCHS
EXTRA = [f"train.epochs={EPOCHS}", "train.lr_drop=2", "train.eval_every=6", "train.eval_every_images=2",
         "train.eval_at_end=false"]
STEP_LINE = re.compile(
    rf"epoch (\d+) \[(\d+)/{STEPS_PER_EPOCH}\]  step (\d+)/{TOTAL}  eta (\S+)  loss (\S+) \((\S+)\)  "
    r"lr (\S+)(?:  (\S+) s/it)?")


# ------------------------------------------------------------------ formatter units
def test_format_eta():
    assert format_eta(581) == "0:09:41"
    assert format_eta(0.4) == "0:00:00"
    assert format_eta(3600 * 25 + 61) == "1 day, 1:01:01"
    assert format_eta(86400 * 3) == "3 days, 0:00:00"
    assert format_eta(None) == "?" and format_eta(float("nan")) == "?"
    assert format_eta(-5) == "0:00:00"


def test_format_step_line_matches_the_documented_layout():
    line = format_step_line(epoch=3, epoch_step=120, epoch_steps=500, step=1200, total=10000,
                            eta_s=581.2, loss=3.21449, smoothed=3.4021, lr=1e-4,
                            sec_per_step=1.3, mem_bytes=int(5.1 * 2**30))
    assert line == ("epoch 3 [120/500]  step 1200/10000  eta 0:09:41  loss 3.214 (3.402)  "
                    "lr 1.0e-04  1.3 s/it  mem 5.1G")
    # CPU (no memory), first logged step (no timing yet).
    line = format_step_line(epoch=0, epoch_step=1, epoch_steps=6, step=1, total=18, eta_s=None,
                            loss=12.5, smoothed=12.5, lr=5e-4, sec_per_step=None)
    assert line == "epoch 0 [1/6]  step 1/18  eta ?  loss 12.5 (12.5)  lr 5.0e-04"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_step_meter_smooths_the_loss_by_the_median_of_the_window():
    clock = FakeClock()
    meter = StepMeter(total_steps=100, start_step=0, window=3, clock=clock)
    out = [meter.update(step, loss)["smoothed"] for step, loss in enumerate([5.0, 1.0, 100.0, 2.0, 3.0], 1)]
    # One spike (100) never moves the median; the window forgets the first values.
    assert out == [5.0, 3.0, 5.0, 2.0, 3.0]
    # A non-finite loss is shown as is but kept out of the smoothing.
    assert meter.update(6, float("nan"))["smoothed"] == 3.0


def test_step_meter_eta_from_the_recent_seconds_per_step():
    clock = FakeClock()
    meter = StepMeter(total_steps=100, start_step=0, window=2, clock=clock)
    clock.now += 20.0
    first = meter.update(10, 1.0)  # 10 steps in 20 s
    assert first["sec_per_step"] == pytest.approx(2.0) and first["eta_s"] == pytest.approx(180.0)
    clock.now += 10.0
    second = meter.update(20, 1.0)  # 10 steps in 10 s: 30 s / 20 steps over the window
    assert second["sec_per_step"] == pytest.approx(1.5) and second["eta_s"] == pytest.approx(120.0)
    clock.now += 10.0
    third = meter.update(30, 1.0)  # the 2-interval window drops the slow first one
    assert third["sec_per_step"] == pytest.approx(1.0) and third["eta_s"] == pytest.approx(70.0)
    clock.now += 1.0
    assert meter.update(100, 1.0)["eta_s"] == 0.0


def test_step_meter_of_a_resumed_run_times_only_its_own_steps():
    clock = FakeClock()
    meter = StepMeter(total_steps=100, start_step=60, clock=clock)
    assert meter.update(60, 1.0)["sec_per_step"] is None  # nothing timed yet
    clock.now += 5.0
    stats = meter.update(65, 1.0)
    assert stats["sec_per_step"] == pytest.approx(1.0) and stats["eta_s"] == pytest.approx(35.0)


def test_scalars_map_each_record_type_to_its_tags():
    step = {"type": "step", "epoch": 0, "step": 7, "lr_main": 1e-4, "lr_backbone": 1e-5,
            "loss": 3.0, "loss_ce": 1.0, "loss_bbox": float("nan"), "time": 12.0}
    assert scalars(step) == {"train/loss": 3.0, "train/loss_ce": 1.0, "lr/main": 1e-4,
                             "lr/backbone": 1e-5}
    epoch = {"type": "epoch", "epoch": 1, "step": 12, "lr_main": 1e-4, "loss": 2.5, "steps": 6,
             "time": 30.0}
    assert scalars(epoch) == {"epoch/loss": 2.5}
    ev = {"type": "eval", "epoch": 2.0, "step": 12, "images": 2, "AP": 0.01, "AP50": 0.03,
          "APl": -1.0, "top_box_std": 0.2, "time": 40.0}
    assert scalars(ev) == {"val/AP": 0.01, "val/AP50": 0.03, "val/APl": -1.0, "val/top_box_std": 0.2}
    assert scalars({"type": "other", "step": 1, "loss": 1.0}) == {}


def test_without_tensorboard_the_writer_is_skipped_with_one_hint(monkeypatch, caplog, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with caplog.at_level(logging.INFO, logger="replic.engine"):
        assert TensorBoardLog.open(tmp_path) is None
    hints = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage().lower()]
    assert len(hints) == 1 and "pip install" in hints[0]
    assert list(tmp_path.iterdir()) == []


def _read_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_tensorboard
def test_resumed_writer_supersedes_the_events_logged_after_the_checkpoint(tmp_path):
    first = TensorBoardLog.open(tmp_path)
    for step in range(1, 7):
        first.write({"type": "step", "step": step, "loss": float(step)})
    first.close()  # as if killed after step 6, its checkpoint at step 4
    second = TensorBoardLog.open(tmp_path, resume_step=4)
    for step in range(5, 9):
        second.write({"type": "step", "step": step, "loss": 10.0 * step})
    second.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert _read_scalars(tmp_path)["train/loss"] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0), (8, 80.0)]


# ------------------------------------------------------------- a real stopped and resumed run
@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> tuple[Path, int]:
    """A tiny run stopped by SIGTERM mid-epoch and finished by ``--resume``: (run dir, stop step)."""
    data = make_uniform_coco(tmp_path_factory.mktemp("data"), n_train=12, n_val=2)
    out = tmp_path_factory.mktemp("watch") / "run"
    cmd = train_command(out, data, EXTRA)
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if sum('"type": "step"' in ln for ln in lines) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, f"not stopped mid-run (rc {proc.returncode}): {err[-3000:]}"
    stopped_at = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["position"]["global_step"]
    assert 3 <= stopped_at < TOTAL
    resumed = run(cmd + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, stopped_at


def _step_records(out: Path) -> list[dict]:
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "step"]


@pytest.mark.slow
def test_train_log_holds_both_processes_step_lines_with_eta_and_smoothed_loss(resumed_run):
    out, stopped_at = resumed_run
    text = (out / "train.log").read_text()
    # Appended on resume, not overwritten: the first process's header and the second's.
    assert text.count("(new run); log:") == 1 and text.count("(continuing); log:") == 1
    assert text.index("(new run)") < text.index("(continuing)")
    matches = [STEP_LINE.search(line) for line in text.splitlines()]
    steps = [int(m.group(3)) for m in matches if m]
    assert steps == list(range(1, TOTAL + 1)), steps  # every logged step once, in order
    by_step = {int(m.group(3)): m for m in matches if m}
    for record in _step_records(out):
        m = by_step[record["step"]]
        # The line shows the logged values: loss and lr as metrics.jsonl has them.
        assert m.group(5) == f"{record['loss']:.4g}" and float(m.group(7)) == pytest.approx(record["lr_main"], rel=0.05)
        assert int(m.group(1)) == record["epoch"] and int(m.group(2)) == (record["step"] - 1) % STEPS_PER_EPOCH + 1
    # Every line has an ETA and a rate (each process times its steps from its loop's start),
    # and the ETA counts down to the last step.
    assert all(m.group(4) != "?" and m.group(8) is not None for m in by_step.values())
    assert by_step[TOTAL].group(4) == "0:00:00"
    # The smoothed loss is the median of the logged losses seen by that process (window 20).
    losses = [r["loss"] for r in _step_records(out) if r["step"] > stopped_at]
    last = by_step[TOTAL]
    assert float(last.group(6)) == pytest.approx(statistics.median(losses[-20:]), rel=1e-3)
    assert "stop signal: checkpointed" in text  # warnings of the run land there too
    # On CPU there is no memory field.
    assert " mem " not in text


@pytest.mark.slow
@needs_tensorboard
def test_event_files_hold_every_logged_loss_lr_and_val_ap_with_continuing_steps(resumed_run):
    out, stopped_at = resumed_run
    files = sorted(out.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    assert len(files) == 2  # one per process: the stopped one and the resumed one
    records = _step_records(out)
    curves = _read_scalars(out)
    steps = list(range(1, TOTAL + 1))
    loss_terms = [k for k in records[0] if k.startswith("loss")]
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou"} <= set(loss_terms)
    for term in loss_terms:
        curve = curves[f"train/{term}"]
        assert [s for s, _ in curve] == steps, term
        assert [v for _, v in curve] == pytest.approx([r[term] for r in records], rel=1e-6)
    # Every param group's lr (the smoke backbone is frozen: "main" is the only group here).
    groups = [k[3:] for k in records[0] if k.startswith("lr_")]
    assert "main" in groups and {t for t in curves if t.startswith("lr/")} == {f"lr/{g}" for g in groups}
    for group in groups:
        curve = curves[f"lr/{group}"]
        assert [s for s, _ in curve] == steps
        assert [v for _, v in curve] == pytest.approx([r[f"lr_{group}"] for r in records], rel=1e-6)
    lr = dict(curves["lr/main"])
    assert lr[13] == pytest.approx(0.1 * lr[12])  # the drop after epoch 2 shows on the curve
    assert [s for s, _ in curves["val/AP"]] == [6, 12, 18] == [s for s, _ in curves["val/AP50"]]
    assert all(0.0 <= v <= 1.0 for _, v in curves["val/AP50"])
    assert [s for s, _ in curves["epoch/loss"]] == [6, 12, 18]
    # Steps continue across the resume: the second file starts after the checkpoint, not at 0.
    first, second = (_read_scalars(f)["train/loss"] for f in files)
    assert [s for s, _ in first] == list(range(1, stopped_at + 1))
    assert [s for s, _ in second] == list(range(stopped_at + 1, TOTAL + 1))


def test_a_fresh_start_removes_the_old_runs_logs(tmp_path):
    from replic.engine.config import load_experiment
    from replic.engine.rundir import RunPaths, prepare

    paths = RunPaths(tmp_path / "run")
    cfg = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper")
    prepare(paths, cfg, force=False, write=True)
    paths.train_log.write_text("old run\n")
    (paths.root / "events.out.tfevents.1.host.1.0").write_bytes(b"old")
    assert prepare(paths, cfg, force=False, write=True) is True  # a continuation keeps them
    assert paths.train_log.is_file() and len(paths.event_files()) == 1
    other = load_experiment(REPO / "configs/experiments/cdetr_r50_50ep.yaml", "paper",
                            {"train": {"lr": 2e-4}})
    assert prepare(paths, other, force=True, write=True) is False
    assert not paths.train_log.exists() and paths.event_files() == []


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_clears_its_line_before_a_log_line_and_logs_no_plain_lines(caplog):
    term = FakeTerminal()
    bar = Progress(6, "epoch 0", stream=term, plain=False)
    bar.update("loss 1.0")
    assert term.getvalue().startswith("\repoch 0 [")
    bar.clear()  # the step line printed now must not be glued to the bar
    assert term.getvalue().endswith("\r") and term.getvalue().rsplit("\r", 2)[-2].strip() == ""
    bar.close()  # nothing drawn since: no empty line after the last log line
    assert term.getvalue().endswith("\r")
    bar.update("loss 0.9")
    bar.close()
    assert term.getvalue().endswith("loss 0.9\n")
    pipe = io.StringIO()  # off a terminal, plain=False: the trainer's step line is the only one
    with caplog.at_level(logging.INFO, logger="replic.engine"):
        quiet = Progress(2, "epoch 0", stream=pipe, plain=False, plain_every=1)
        quiet.update()
        quiet.update()
        quiet.clear()
    assert pipe.getvalue() == "" and not caplog.records


@pytest.mark.slow
def test_an_error_that_ends_the_run_is_recorded_in_train_log_and_the_handler_removed(tmp_path, monkeypatch):
    """In-process (a notebook's way): the file handler leaves the root logger with the run."""
    import replic.engine.train as train_module
    from replic.engine.config import load_experiment, parse_overrides
    from replic.engine.train import NonFiniteLossError, Trainer

    data = make_uniform_coco(tmp_path / "data", n_train=4, n_val=2)
    experiment, settings = FAMILY_RUNS["detr"]
    cfg = load_experiment(experiment, "smoke", parse_overrides(
        [*settings, f"data.root={data}", "train.epochs=1", "train.lr_drop=1", "train.eval_at_end=false"]))
    real_build_loss = train_module.build_loss

    def nan_loss(config):
        criterion = real_build_loss(config)
        forward = criterion.forward
        criterion.forward = lambda outputs, targets: {
            k: v * float("nan") for k, v in forward(outputs, targets).items()}
        return criterion

    monkeypatch.setattr(train_module, "build_loss", nan_loss)
    handlers = list(logging.getLogger().handlers)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with pytest.raises(NonFiniteLossError):
            Trainer(cfg, tmp_path / "run", progress=False).run()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert logging.getLogger().handlers == handlers
    text = (tmp_path / "run" / "train.log").read_text()
    assert "ERROR replic.engine: training ended by NonFiniteLossError: non-finite loss at global step 1" in text
    assert "Traceback" in text
