"""The workflow through a real Slurm (the CI's single-node cluster, `.ci/slurm/start.sh`).

Skipped unless a Slurm controller answers (`sinfo`); with REPLIC_TEST_SLURM=1 (set by .ci/run
after starting Slurm) a missing cluster is a failure instead of a skip.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import subprocess
import time
from pathlib import Path

import pytest

from test_workflow import copy_workflow, job_counts, snakemake

pytestmark = pytest.mark.slurm


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="module")
def slurm_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _slurm_up():
        if os.environ.get("REPLIC_TEST_SLURM") == "1":
            pytest.fail("REPLIC_TEST_SLURM=1 but no Slurm controller answers sinfo (run .ci/slurm/start.sh)")
        pytest.skip("no Slurm controller (start one with .ci/slurm/start.sh, as root)")
    return copy_workflow(tmp_path_factory.mktemp("slurm") / "wf")


def _unlock_after(result: subprocess.CompletedProcess[str], workdir: Path) -> None:
    # A run killed by `timeout` leaves the working directory locked (notes §7).
    if result.returncode in (124, 137):
        snakemake(workdir, "--unlock")


@pytest.mark.timeout(1200)
def test_smoke_table_through_slurm(slurm_workdir: Path) -> None:
    """The README's cluster command as typed, `snakemake --cores all --profile slurm <target>`, with
    the production profile and REPLIC_SLURM_PARTITION / REPLIC_SLURM_ACCOUNT unset: the cluster's
    defaults (no -A; -p only as the plugin's pick of the default partition), and the jobs get
    the CPUs their rules ask for. (Set variables: the preemption test below.)"""
    env = _profile_env(slurm_workdir, slurm_workdir.parent, {})
    result = subprocess.run(
        ["timeout", "-k", "30", "1000", str(Path(sys.executable).with_name("snakemake")),
         "--cores", "all", "--profile", "slurm", "--verbose", "results/table_smoke_ci.csv"],
        cwd=slurm_workdir, env=env, capture_output=True, text=True,
    )
    _unlock_after(result, slurm_workdir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    calls = _sbatch_calls(output)
    assert len(calls) == 5, output[-4000:]
    for call in calls:
        assert "$REPLIC" not in call and " -A " not in call, call
        assert " -p " not in call or f" -p {_default_partition()} " in call, call
        assert "--cpus-per-task=1" in call, call  # the smoke registry's threads
    # The heavy jobs really went through sbatch; the bookkeeping ones ran locally.
    assert output.count("has been submitted with SLURM jobid") == 5  # synth + 2 train + 2 eval
    with (slurm_workdir / "results" / "table_smoke_ci.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["row_id"] for r in rows] == ["detr_r50_50ep", "cdetr_r50_50ep"]
    assert all(r["status"] == "ok" and r["AP_ours"] != "" and r["config_sha256"] for r in rows)
    for run in ("detr_r50_50ep", "cdetr_r50_50ep"):
        provenance = (slurm_workdir / "runs" / "smoke" / run / "provenance.json").read_text()
        assert "SLURM_JOB_ID" in provenance  # trained inside a Slurm allocation


@pytest.mark.timeout(600)
def test_failing_job_makes_snakemake_exit_nonzero(slurm_workdir: Path) -> None:
    target = "runs_fail/smoke/detr_r50_50ep/done.json"
    dry = snakemake(slurm_workdir, target, "-n", "--config", "runs_dir=runs_fail", "fail_experiments=[detr_r50_50ep]")
    assert dry.returncode == 0 and job_counts(dry.stdout)["train"] == 1, dry.stdout[-2000:]
    result = snakemake(
        slurm_workdir, target, "--profile", "profiles/slurm-ci",
        "--config", "runs_dir=runs_fail", "fail_experiments=[detr_r50_50ep]", timeout=400,
    )
    _unlock_after(result, slurm_workdir)
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 124, 137), output[-4000:]
    assert "has been submitted with SLURM jobid" in output
    assert "FAILED" in output or "Error in rule train" in output
    assert not (slurm_workdir / target).exists()


def _fake_gpus() -> int:
    result = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30)
    counts = [int(part.rsplit(":", 1)[1].split("(")[0]) for part in result.stdout.split()
              if part.startswith("gpu:")]
    return max(counts, default=0)


@pytest.mark.timeout(1200)
def test_multi_gpu_training_is_one_task_running_torchrun(slurm_workdir: Path) -> None:
    """gpu=2 → sbatch --gpus=2, one Slurm task, torchrun starts 2 processes (gloo on CPU here)."""
    if _fake_gpus() < 2:
        pytest.skip("the Slurm node advertises < 2 GPUs (start Slurm with REPLIC_SLURM_FAKE_GPUS=2)")
    target = "runs_ddp/smoke/cdetr_r50_50ep/done.json"
    result = snakemake(
        slurm_workdir, target, "--profile", "profiles/slurm-ci", "--set-resources", "train:gpu=2",
        "--config", "runs_dir=runs_ddp", timeout=1000,
    )
    _unlock_after(result, slurm_workdir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "torchrun --standalone --nnodes=1 --nproc_per_node=2 -m replic" in output
    provenance = json.loads((slurm_workdir / "runs_ddp" / "smoke" / "cdetr_r50_50ep" / "provenance.json").read_text())
    assert provenance["world_size"] == 2
    assert "SLURM_JOB_ID" in provenance["launcher"] and "TORCHELASTIC_RUN_ID" in provenance["launcher"]


@pytest.mark.timeout(900)
def test_attention_figures_through_slurm(slurm_workdir: Path) -> None:
    """The figure rules of the trained smoke table, submitted through sbatch as well."""
    if not (slurm_workdir / "results" / "table_smoke_ci.csv").is_file():
        pytest.fail("needs the runs of test_smoke_table_through_slurm (run the module, not this test alone)")
    target = "results/figures/table_smoke_ci_extremity.csv"
    result = snakemake(slurm_workdir, target, "--profile", "profiles/slurm-ci", timeout=700)
    _unlock_after(result, slurm_workdir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("has been submitted with SLURM jobid") == 5  # 2 attention, 2 extremity, 1 compare
    with (slurm_workdir / target).open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["run"] for r in rows} == {"detr_r50_50ep", "cdetr_r50_50ep"}
    figures = slurm_workdir / "results" / "figures" / "smoke"
    for folder in ("attention/detr_r50_50ep", "attention/cdetr_r50_50ep", "compare/cdetr_r50_50ep_vs_detr_r50_50ep"):
        pngs = list((figures / folder).glob("*.png"))
        assert pngs and all(p.stat().st_size > 0 for p in pngs), folder


# ------------------------------------------------------------------ the production profile as typed
# The README's command, run with the production profile `slurm/`. The one CI-specific setting:
# job status from squeue (this cluster has no accounting database, so sacct cannot answer).
CI_STATUS = "\nslurm-status-command: squeue\nslurm-init-seconds-before-status-checks: 2\n"


def _default_partition() -> str:
    result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    return next(p.rstrip("*") for p in result.stdout.split() if p.endswith("*"))


def _sbatch_calls(output: str) -> list[str]:
    return [line for line in output.splitlines() if "sbatch call:" in line]


def _profile_env(workdir: Path, tmp_path: Path, variables: dict[str, str]) -> dict[str, str]:
    """Environment of the README's command; adds the CI status setting to the copy's profile."""
    with (workdir / "slurm" / "config.yaml").open("a") as handle:
        handle.write(CI_STATUS)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SNAKEMAKE_PROFILE", "REPLIC_SLURM_PARTITION", "REPLIC_SLURM_ACCOUNT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(variables)
    if "REPLIC_SLURM_ACCOUNT" in variables:
        # No accounting database here: the plugin's account check (sacctmgr) gets a stand-in that
        # lists the account, as a real cluster's sacctmgr lists the user's accounts.
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "sacctmgr").write_text(f"#!/bin/sh\necho {variables['REPLIC_SLURM_ACCOUNT']}\n")
        (shim / "sacctmgr").chmod(0o755)
        env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
    return env


def test_cores_all_does_not_shrink_what_a_paper_job_asks_sbatch_for(tmp_path: Path) -> None:
    """Dry run of the README's paper command on this (small) host: threads are capped by
    --cores all, but the CPUs given to sbatch (cpus_per_gpu / cpus_per_task) are the registry's."""
    workdir = copy_workflow(tmp_path / "wf")
    coco = tmp_path / "coco"
    for sub in ("annotations", "train2017", "val2017"):
        (coco / sub).mkdir(parents=True)
    result = snakemake(workdir, "runs/paper/cdetr_r50_50ep/eval/metrics.json", "-n", "--cores", "all",
                       "--profile", "slurm", "--config", "scale=paper", f"coco_root={coco}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "cpus_per_gpu=4" in output and "gpu=8" in output  # train: 32 threads over 8 GPUs
    assert "cpus_per_gpu=8" in output  # eval: 8 threads, 1 GPU
    assert "slurm_partition=," in output or "slurm_partition=\n" in output  # unset: no -p


# ------------------------------------------------------------------------------- preemption
PREEMPT_RUN = "runs_pre/smoke/detr_r50_50ep"
# A shorter smoke run (the copy's overlay only): ~40 steps, a metrics line per step.
SHORT_SMOKE = {"train": {"max_steps": 40, "log_every": 1, "epochs": 4}}


def _shrink(workdir: Path) -> None:
    import yaml

    cfg_path = workdir / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["tiny_data"].update(train=24, val=4, size=160)
    cfg_path.write_text(yaml.safe_dump(cfg))
    scale_path = workdir / "configs" / "scales" / "smoke.yaml"
    scale = yaml.safe_load(scale_path.read_text())
    for section, values in SHORT_SMOKE.items():
        scale.setdefault(section, {}).update(values)
    scale_path.write_text(yaml.safe_dump(scale))


PREEMPT_STEPS = 60


def _one_long_epoch(workdir: Path) -> None:
    """The whole preempted run inside one epoch (2 x PREEMPT_STEPS images, batch 2), so the
    signal's checkpoint is mid-epoch however fast the machine is: with 12-step epochs an idle
    CI machine reached the epoch-end checkpoint before the requeue's SIGTERM arrived."""
    import yaml

    cfg_path = workdir / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["tiny_data"]["train"] = 2 * PREEMPT_STEPS
    cfg_path.write_text(yaml.safe_dump(cfg))
    scale_path = workdir / "configs" / "scales" / "smoke.yaml"
    scale = yaml.safe_load(scale_path.read_text())
    scale["train"]["max_steps"] = PREEMPT_STEPS
    scale_path.write_text(yaml.safe_dump(scale))


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(ln).get("step", 0) for ln in path.read_text().splitlines() if ln.endswith("}")]
    return max(steps, default=0)


def _running_train_job() -> str | None:
    result = subprocess.run(["squeue", "-h", "-o", "%i %T %k"], capture_output=True, text=True, timeout=30)
    for line in result.stdout.splitlines():
        job_id, state, comment = (line.split(None, 2) + ["", ""])[:3]
        if state == "RUNNING" and comment.startswith("rule_train"):
            return job_id
    return None


@pytest.mark.timeout(900)
def test_requeued_training_checkpoints_resumes_and_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """`scontrol requeue` of a running training job (what preemption does): Slurm sends SIGTERM,
    replic checkpoints and exits 75, Slurm runs the job again under the same id, it resumes from
    last.pt and the final weights equal those of a run that was never stopped. Submitted with the
    production profile and both site variables set."""
    import torch

    if not _slurm_up():
        pytest.skip("no Slurm controller")
    workdir = copy_workflow(tmp_path / "wf")
    _shrink(workdir)
    _one_long_epoch(workdir)
    env = _profile_env(workdir, tmp_path, {"REPLIC_SLURM_PARTITION": "debug", "REPLIC_SLURM_ACCOUNT": "ci_account"})
    # The tiny data first, here (the training job is the one under test; saves a submission).
    data = snakemake(workdir, "--cores", "1", "data/tiny/annotations/instances_val2017.json", timeout=200)
    assert data.returncode == 0, (data.stdout + data.stderr)[-3000:]
    target = f"{PREEMPT_RUN}/checkpoint_final.pt"
    t_start = time.monotonic()
    proc = subprocess.Popen(
        ["timeout", "-k", "30", "600", str(Path(sys.executable).with_name("snakemake")), "--cores", "all",
         "--profile", "slurm", "--verbose", "--config", "runs_dir=runs_pre", "--", target],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    run_dir = workdir / PREEMPT_RUN
    job_id = None
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        job_id = _running_train_job()
        if job_id and _steps(run_dir) >= 3:
            break
        time.sleep(0.5)
    assert job_id and proc.poll() is None, "the training job never ran"
    t_requeue = time.monotonic()
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    # Slurm holds a requeued job for 120 s (BeginTime); release it once it is back in the
    # queue, as an admin may.
    for _ in range(120):
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True,
                               text=True, timeout=30).stdout.split()
        if state == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
            break
        time.sleep(0.5)
    output, _ = proc.communicate(timeout=700)
    t_done = time.monotonic()
    if proc.returncode in (124, 137):
        snakemake(workdir, "--unlock")
    assert proc.returncode == 0, output[-4000:]
    calls = _sbatch_calls(output)
    train_calls = [c for c in calls if "rule_train" in c]
    assert train_calls and all("--requeue" in c and "--signal=TERM@180" in c and " -p debug" in c
                               and " -A ci_account" in c for c in train_calls), calls
    # Stopped by the signal (a mid-epoch checkpoint is only taken on one) and resumed from it,
    # under the same job id.
    provenance = json.loads((run_dir / "provenance.json").read_text())
    at = provenance["resumed_at"]
    assert provenance["resumed_from"] and 3 <= at["global_step"] < PREEMPT_STEPS and at["step_in_epoch"] != 0, provenance
    assert provenance["launcher"].get("SLURM_JOB_ID") == job_id
    # (The stopped attempt's exit code, 75, is not visible here: Slurm truncates the job's log
    # and Snakemake the rule's log when the job restarts. tests/test_engine_resume.py checks it.)
    assert output.count("has been submitted with SLURM jobid") == 1  # requeued, not resubmitted

    # The same run, never stopped, on this machine (no Slurm): identical weights.
    reference = snakemake(workdir, "--cores", "1", "--config", "runs_dir=runs_ref", "--",
                          "runs_ref/smoke/detr_r50_50ep/checkpoint_final.pt", timeout=400)
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-4000:]
    print(f"preemption test: requeue after {t_requeue - t_start:.0f} s, snakemake done "
          f"{t_done - t_requeue:.0f} s later, reference {time.monotonic() - t_done:.0f} s")
    mine = torch.load(workdir / target, weights_only=True)["model"]
    ref = torch.load(workdir / "runs_ref/smoke/detr_r50_50ep/checkpoint_final.pt", weights_only=True)["model"]
    assert mine.keys() == ref.keys()
    for key in mine:
        assert torch.equal(mine[key], ref[key]), key
