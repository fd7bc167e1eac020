"""The Snakemake workflow: lint, config validation, paper-scale DAGs from the registry, a smoke run.

Every test works on a copy of the workflow files in tmp_path, so runs/ and results/ of the
checkout are never touched. Snakemake runs as a subprocess with the venv's bin first on PATH
(the rules call `replic` and `python`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from replic.workflow.registry import load_registry

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PATHS = ("Snakefile", "workflow", "config", "configs", "envs", "profiles", "slurm", "assets")
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def copy_workflow(dest: Path) -> Path:
    """The workflow's files (not runs/, results/ or data/) copied into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_PATHS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run snakemake in ``workdir``; killed (SIGKILL 30 s after SIGTERM) past ``timeout``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SNAKEMAKE_PROFILE", None)
    return subprocess.run(
        ["timeout", "-k", "30", str(timeout), SNAKEMAKE, *args],
        cwd=workdir, env=env, capture_output=True, text=True,
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake (dry) run as {rule: count}."""
    block = output.split("Job stats:", 1)[1]
    counts: dict[str, int] = {}
    for line in block.splitlines()[3:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def stub_coco(root: Path) -> Path:
    """An empty COCO 2017 directory layout (enough for the layout check and a dry run)."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        (root / "annotations" / f"instances_{split}.json").write_text("{}")
    return root


def registry():
    return load_registry(REPO / "configs" / "tables.yaml")


def test_lint_is_clean(tmp_path: Path) -> None:
    result = snakemake(copy_workflow(tmp_path / "wf"), "--lint")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("table", ["conditional_detr", "cdetr_ablations", "cnn_baselines"])
def test_paper_scale_dag_of_each_table(tmp_path: Path, table: str) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    coco = stub_coco(tmp_path / "coco")
    result = snakemake(
        workdir, f"results/table_{table}.csv", "-n", "-p", "--cores", "8",
        "--config", "scale=paper", f"coco_root={coco}",  # --config takes every later argument
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = len(registry().experiments([table], "paper"))
    # One check of the COCO layout, one overlay, one train + one eval per distinct run, one gather.
    assert job_counts(result.stdout) == {
        "check_data": 1, "scale_overlay": 1, "train": runs, "evaluate": runs, "table": 1, "total": 2 * runs + 3,
    }
    # Multi-GPU training is one task that starts torchrun with one process per GPU.
    assert result.stdout.count("torchrun --standalone --nnodes=1 --nproc_per_node=8 -m replic") == runs
    assert "synth_tiny_data" not in result.stdout


def test_paper_scale_dag_of_all_tables_shares_runs(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    coco = stub_coco(tmp_path / "coco")
    result = snakemake(workdir, "-n", "--config", "scale=paper", f"coco_root={coco}")
    assert result.returncode == 0, result.stdout + result.stderr
    reg = registry()
    paper_tables = [name for name, t in reg.tables.items() if not t.test_only]
    runs = len(reg.experiments(paper_tables, "paper"))
    counts = job_counts(result.stdout)
    from replic.workflow.methods import token_runs

    # Each run once, however many tables name it; MasKD token runs (stage 1) are trained once too.
    tokens = len(token_runs(reg.experiments(paper_tables, "paper"), REPO / "configs" / "experiments"))
    assert counts["train"] == runs + tokens and runs < sum(len(reg.experiments([t], "paper")) for t in paper_tables)
    assert counts["table"] == len(paper_tables) and counts["all"] == 1


def test_profile_slurm_resolves_from_the_repository_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--profile slurm` exactly as typed: the ./slurm/ profile, partition/account from the environment."""
    workdir = copy_workflow(tmp_path / "wf")
    coco = stub_coco(tmp_path / "coco")
    monkeypatch.setenv("REPLIC_SLURM_PARTITION", "gpuq")
    monkeypatch.setenv("REPLIC_SLURM_ACCOUNT", "proj42")
    result = snakemake(
        workdir, "results/table_smoke_ci.csv", "-n", "--profile", "slurm",
        "--config", "scale=paper", f"coco_root={coco}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    resources = [line for line in result.stdout.splitlines() if "resources:" in line and re.search(r"\bgpu=8\b", line)]
    assert len(resources) == 2  # the two training jobs of the CI table
    assert all("slurm_partition=gpuq" in line and "slurm_account=proj42" in line for line in resources)


def test_smoke_dag_synthesises_data_and_needs_no_gpu(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "-n", "--cores", "2", "results/table_smoke_ci.csv")
    assert result.returncode == 0, result.stdout + result.stderr
    assert job_counts(result.stdout) == {
        "synth_tiny_data": 1, "check_data": 1, "scale_overlay": 1, "train": 2, "evaluate": 2, "table": 1, "total": 8,
    }
    assert "gpu=0" in result.stdout and "gpu=8" not in result.stdout


def test_mini_dag_pretrains_the_backbone_once_with_its_configured_task_and_threads(tmp_path: Path) -> None:
    """Every mini run of the table waits for one pretraining job, which gets the class term and the
    threads of config mini_pretrain (capped by --cores, as Snakemake caps a rule's threads)."""
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "-n", "-p", "--cores", "2", "results/table_cdetr_ablations.csv",
                       "--config", "scale=mini", "mini_backbone=pretrain")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts["synth_mini_data"] == 1 and counts["pretrain_backbone"] == 1 and counts["train"] == 15
    assert "unpack_mini_backbone" not in counts
    command = next(line for line in result.stdout.splitlines() if "replic pretrain-backbone" in line)
    assert "--roi-cls-weight 1.0" in command and "--threads 2" in command and "OMP_NUM_THREADS=2" in command
    # The overlay job checks the backbone against the same options before any run starts.
    overlay = next(line for line in result.stdout.splitlines() if "replic.workflow.prepare overlay" in line)
    assert "--backbone runs/mini/backbone/resnet18_dense.pt" in overlay
    # The CNN family's mini section (MasKD's detectors) is pointed at the same weights.
    assert "--set families.cnn.model.pretrained_backbone=runs/mini/backbone/resnet18_dense.pt" in overlay
    for option in ("steps=1200", "batch_size=16", "seed=0", "roi_cls_weight=1.0"):
        assert f"--backbone-expect {option}" in overlay
    one_core = snakemake(workdir, "-n", "-p", "--cores", "1", "runs/mini/backbone/resnet18_dense.pt",
                         "--config", "scale=mini", "mini_backbone=pretrain")
    assert one_core.returncode == 0, one_core.stdout + one_core.stderr
    command = next(line for line in one_core.stdout.splitlines() if "replic pretrain-backbone" in line)
    assert "--threads 1" in command and "OMP_NUM_THREADS=1" in command


def test_main_jobs_claim_unpacks_the_shipped_backbone_and_trains_only_its_two_runs(tmp_path: Path) -> None:
    """scripts/run-main.sh's targets: the mini data, the shipped backbone (no pretraining), the
    12-epoch pair trained and evaluated once each, the claim and the convergence figure. A misspelt
    claim is refused while the DAG is built, naming the known claims."""
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "-n", "-p", "--cores", "2", "results/claims/mini/cdetr_ahead_at_12_epochs.md",
                       "results/figures/mini/convergence_detr_vs_cdetr_12ep.png", "--config", "scale=mini")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts == {"synth_mini_data": 1, "check_data": 1, "unpack_mini_backbone": 1, "scale_overlay": 1,
                      "train": 2, "evaluate": 2, "claim": 1, "convergence_figure": 1, "total": 10}, counts
    assert "replic backbone-asset unpack --asset assets/mini_backbone" in result.stdout
    for run in ("cdetr_r50_12ep", "detr_r50_12ep"):
        assert f"runs/mini/{run}/eval/detections.json" in result.stdout
    assert "--claim cdetr_ahead_at_12_epochs" in result.stdout
    typo = snakemake(workdir, "-n", "--cores", "1", "results/claims/mini/cdetr_ahead_at_12_epoch.md",
                     "--config", "scale=mini")
    assert typo.returncode != 0
    assert "no claim 'cdetr_ahead_at_12_epoch'" in typo.stdout + typo.stderr
    assert "cdetr_ahead_at_12_epochs" in typo.stdout + typo.stderr


def test_composition_dag_trains_each_teacher_once_before_every_student_that_names_it(tmp_path: Path) -> None:
    """The composition table: 8 evaluated runs; the Conditional DETR-R101 teacher (named by D³ETR and
    MasKD, alone and composed) and the memory token run train once, before the students."""
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "-n", "-p", "--cores", "2", "results/table_composition.csv", "--config", "scale=mini")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts["train"] == 10 and counts["evaluate"] == 8 and counts["table"] == 1, counts
    trains = re.findall(r"train --config configs/experiments/(\w+)\.yaml", result.stdout)
    assert trains.count("cdetr_r101_50ep") == 1 and "maskd_tokens_cdetr_r101_50ep_t6_memory" in trains
    for block in result.stdout.split("rule train:")[1:]:
        if "output: runs/mini/compose_ks_d3etr_maskd_cdetr_r50_12ep/done.json" in block:
            assert "runs/mini/cdetr_r101_50ep/checkpoint_final.pt" in block
            assert "runs/mini/maskd_tokens_cdetr_r101_50ep_t6_memory/checkpoint_final.pt" in block
            break
    else:
        raise AssertionError("no training job for the three-method composition")


def test_smoke_dag_of_attention_figures(tmp_path: Path) -> None:
    """The figures target renders every run of the table, and DETR vs Conditional DETR once."""
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "-n", "-p", "--cores", "2", "results/figures/table_smoke_ci_extremity.csv",
                       "--config", "viz_images=4", "viz_queries=2")
    assert result.returncode == 0, result.stdout + result.stderr
    # The documented overrides pass the schema and reach the commands.
    assert result.stdout.count("--images 4 --queries 2 --layer -1 --band 0.25") == 2
    counts = job_counts(result.stdout)
    assert {rule: counts.get(rule) for rule in ("train", "viz_attention", "viz_extremity", "viz_compare", "table_attention")} == {
        "train": 2, "viz_attention": 2, "viz_extremity": 2, "viz_compare": 1, "table_attention": 1,
    }
    assert "compare/cdetr_r50_50ep_vs_detr_r50_50ep" in result.stdout


def test_default_target_includes_the_figures(tmp_path: Path) -> None:
    result = snakemake(copy_workflow(tmp_path / "wf"), "-n", "--cores", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    from replic.workflow.methods import experiments_of_family, token_runs

    experiments = registry().experiments([n for n, t in registry().tables.items() if not t.test_only], "smoke")
    exp_dir = REPO / "configs" / "experiments"
    # Attention figures for every DETR-family run; training also for the CNN runs and MasKD's token runs.
    assert counts["viz_extremity"] == counts["viz_attention"] == len(experiments_of_family(experiments, exp_dir, "detr"))
    assert counts["train"] == len(experiments) + len(token_runs(experiments, exp_dir))


def test_paper_scale_without_coco_root_says_what_to_type(tmp_path: Path) -> None:
    result = snakemake(copy_workflow(tmp_path / "wf"), "-n", "--config", "scale=paper")
    assert result.returncode != 0
    assert "coco_root=/path/to/coco" in result.stderr + result.stdout


@pytest.mark.parametrize(("override", "message"), [("scale=huge", "huge"), ("tiny_data=3", "tiny_data"), ("viz_band=0.9", "viz_band")])
def test_invalid_config_is_rejected_before_the_dag(tmp_path: Path, override: str, message: str) -> None:
    result = snakemake(copy_workflow(tmp_path / "wf"), "-n", "--config", override)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert message in output and "Building DAG" not in output


def test_missing_experiment_config_is_named(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "configs" / "experiments" / "cdetr_r50_50ep_csq_c.yaml").unlink()
    result = snakemake(workdir, "-n", "--cores", "2", "results/table_cdetr_ablations.csv")
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "experiment 'cdetr_r50_50ep_csq_c' has no config file" in output
    assert "cdetr_ablations/t3_csq_c" in output


def test_coco_layout_check_lists_what_is_missing(tmp_path: Path) -> None:
    coco = stub_coco(tmp_path / "coco")
    shutil.rmtree(coco / "val2017")
    (coco / "annotations" / "instances_train2017.json").unlink()
    stamp = tmp_path / "data.json"
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "replic.workflow.prepare", "check-coco", "--root", str(coco), "--out", str(stamp)],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 1 and not stamp.exists()
    assert "instances_train2017.json" in result.stderr and "val2017/" in result.stderr
    assert "instances_val2017.json" not in result.stderr
    (coco / "val2017").mkdir()
    (coco / "annotations" / "instances_train2017.json").write_text("{}")
    ok = subprocess.run(
        [sys.executable, "-m", "replic.workflow.prepare", "check-coco", "--root", str(coco), "--out", str(stamp)],
        capture_output=True, text=True, env=env,
    )
    assert ok.returncode == 0 and stamp.is_file()


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_smoke_run_of_the_ablation_table(tmp_path: Path) -> None:
    """All ablation experiments at smoke scale on the tiny data, locally, end to end."""
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "--cores", "2", "results/table_cdetr_ablations.csv", timeout=3300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_table(workdir / "results" / "table_cdetr_ablations.csv")
    assert len(rows) == len(registry().table("cdetr_ablations").rows)
    assert all(row["status"] == "ok" and row["AP_ours"] != "" for row in rows)
    assert all(len(row["config_sha256"]) >= 8 and row["run_dir"] for row in rows)
    # Every distinct run trained exactly once.
    runs = sorted(p.name for p in (workdir / "runs" / "smoke").iterdir() if (p / "done.json").is_file())
    assert runs == registry().experiments(["cdetr_ablations"])
    for name in ("table_cdetr_ablations.md", "table_cdetr_ablations.provenance.json",
                 "figures/table_cdetr_ablations_ap.png", "figures/table_cdetr_ablations_curves.png"):
        assert (workdir / "results" / name).is_file(), name
    _smoke_claims_ledger_with_a_seed_replicate(workdir)
    # Up to date afterwards: nothing left to do.
    again = snakemake(workdir, "-n", "--cores", "2", "results/table_cdetr_ablations.csv")
    assert "Nothing to be done" in again.stdout + again.stderr
    # The HTML report embeds the table and its figures.
    report = snakemake(workdir, "--report", "results/report.html", "results/table_cdetr_ablations.csv")
    assert report.returncode == 0, report.stderr[-3000:]
    html = (workdir / "results" / "report.html").read_text()
    assert "table_cdetr_ablations.csv" in html and "table_cdetr_ablations_ap.png" in html
    # Configs compare by content: a comment in the scale file or an experiment reruns nothing ...
    scale_file = workdir / "configs" / "scales" / "smoke.yaml"
    scale_file.write_text(scale_file.read_text() + "\n# a comment\n")
    experiment = workdir / "configs" / "experiments" / f"{runs[0]}.yaml"
    experiment.write_text(experiment.read_text() + "\n# a comment\n")
    touched = snakemake(workdir, "-n", "--cores", "2", "results/table_cdetr_ablations.csv")
    assert "Nothing to be done" in touched.stdout + touched.stderr, touched.stdout[-3000:]
    # ... a changed value in the scale file rebuilds the overlay and retrains every run (never
    # the stale copy) ...
    scale_file.write_text(scale_file.read_text() + "seed: 7\n")
    stale = snakemake(workdir, "-n", "--cores", "2", "results/table_cdetr_ablations.csv")
    counts = job_counts(stale.stdout)
    assert counts["scale_overlay"] == 1 and counts["train"] == len(runs), counts
    # ... and one in a base file an experiment extends (not itself an input) retrains its runs:
    # the four DETR rows extend base/detr.yaml, the Conditional DETR rows do not.
    scale_file.write_text(scale_file.read_text().replace("seed: 7\n", ""))
    base = workdir / "configs" / "experiments" / "base" / "detr.yaml"
    base.write_text(base.read_text() + "\nseed: 8\n")
    stale = snakemake(workdir, "-n", "--cores", "2", "results/table_cdetr_ablations.csv")
    counts = job_counts(stale.stdout)
    assert "scale_overlay" not in counts and counts["train"] == sum(r.startswith("detr_") for r in runs), counts


def _smoke_claims_ledger_with_a_seed_replicate(workdir: Path) -> None:
    """The claims ledger at smoke on the table's runs: two of the real claims, one of them asking
    for 2 seeds, so the DAG trains one seed replicate from the same experiment file."""
    ledger = yaml.safe_load((REPO / "configs" / "claims.yaml").read_text())
    keep = {"cdetr_converges_faster": {"smoke": 2}, "cdetr_table4_components": {}}
    ledger["claims"] = [dict(c, seeds=keep[c["id"]]) for c in ledger["claims"] if c["id"] in keep]
    (workdir / "configs" / "claims_ci.yaml").write_text(yaml.safe_dump(ledger, sort_keys=False))
    result = snakemake(workdir, "--cores", "2", "results/claims_smoke.md", "--config",
                       "claims=configs/claims_ci.yaml", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = job_counts(result.stdout + result.stderr)  # a real run prints its job stats to stderr
    assert counts["train"] == 2 and counts["claims"] == 1, counts  # cdetr/detr_r50_50ep_seed1 only
    rows = read_table(workdir / "results" / "claims_smoke.csv")
    assert [r["claim"] for r in rows] == ["cdetr_converges_faster"] + ["cdetr_table4_components"] * 4
    assert all(r["verdict"] == "not testable at smoke" for r in rows)
    assert rows[0]["seeds"] == "2" and rows[0]["seed_noise"] == "measured" and rows[0]["ci_low"] != ""
    assert "Smoke scale cannot test claims" in (workdir / "results" / "claims_smoke.md").read_text()
    # The replicate is the base experiment with another seed and its own name.
    resolved = yaml.safe_load((workdir / "runs" / "smoke" / "cdetr_r50_50ep_seed1" / "config.yaml").read_text())
    base = yaml.safe_load((workdir / "runs" / "smoke" / "cdetr_r50_50ep" / "config.yaml").read_text())
    assert resolved["seed"] == 1 and base["seed"] != 1 and resolved["name"] == "cdetr_r50_50ep_seed1"
    assert {k: v for k, v in resolved.items() if k not in ("seed", "name")} == \
        {k: v for k, v in base.items() if k not in ("seed", "name")}
    provenance = json.loads((workdir / "results" / "claims_smoke.provenance.json").read_text())
    assert set(provenance["runs"]) == {"cdetr_r50_50ep", "cdetr_r50_50ep_seed1", "detr_r50_50ep",
                                       "detr_r50_50ep_seed1", "detr_r50_50ep_t4_or", "detr_r50_50ep_t4_fl",
                                       "detr_r50_50ep_t4_or_fl"}


def test_claims_dag_trains_seed_replicates_from_one_experiment_file(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "-n", "-p", "--cores", "2", "results/claims_mini.md", "--config", "scale=mini")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if " train --config " in line]
    seed1 = [c for c in commands if "--out runs/mini/cdetr_r50_50ep_seed1 " in c]
    assert len(seed1) == 1
    assert "--config configs/experiments/cdetr_r50_50ep.yaml" in seed1[0]
    assert "--set seed=1 --set name=cdetr_r50_50ep_seed1" in seed1[0]
    base = [c for c in commands if "--out runs/mini/cdetr_r50_50ep " in c]
    assert len(base) == 1 and "--set seed=" not in base[0]
    assert not list((workdir / "configs" / "experiments").glob("*_seed[0-9]*.yaml"))
    assert job_counts(result.stdout)["claims"] == 1


def test_a_misspelt_target_names_the_valid_ones_before_any_job(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    for target, hint in (("results/table_d3etr.cvs", "Did you mean results/table_d3etr.csv"),
                         ("results/table_foo.csv", "results/table_cdetr_ablations.csv")):
        result = snakemake(workdir, "-n", "--cores", "1", target)
        assert result.returncode != 0
        assert f"no rule makes {target}" in result.stderr + result.stdout and hint in result.stderr + result.stdout
        assert "MissingRuleException" not in result.stderr
    assert not (workdir / "data").exists() and not (workdir / "runs").exists()
