# Registry loading and the helpers every rule file uses.

from pathlib import Path

from snakemake.exceptions import WorkflowError

from replic.config import ConfigError
from replic.workflow.methods import experiments_of_family
from replic.workflow.registry import experiment_teachers, load_registry, seed_replicate

SCALE = config["scale"]
RUNS = config["runs_dir"]
TINY = config["tiny_data"]["dir"]
TINY_TRAIN_ANN = f"{TINY}/annotations/instances_train2017.json"
TINY_VAL_ANN = f"{TINY}/annotations/instances_val2017.json"
MINI = config["mini_data"]["dir"]
MINI_TRAIN_ANN = f"{MINI}/annotations/instances_train2017.json"
MINI_VAL_ANN = f"{MINI}/annotations/instances_val2017.json"
# The mini scale's dense-pretrained frozen backbone (job pretrain_backbone) and the shared
# frozen-feature cache directory of its runs (train.feature_cache).
MINI_BACKBONE = f"{RUNS}/mini/backbone/resnet18_dense.pt"
MINI_FEATURE_CACHE = f"{RUNS}/mini/feature_cache"
ENV = "../../envs/replic.yaml"


def mini_backbone_asset_sha256():
    """The sha256 of the weights file the shipped mini backbone unpacks to (its manifest)."""
    import json

    manifest = Path(config["mini_backbone_asset"]) / "manifest.json"
    try:
        return json.loads(manifest.read_text())["sha256"]
    except (OSError, ValueError, KeyError) as err:
        raise WorkflowError(f"{manifest}: unreadable ({err}); run with --config mini_backbone=pretrain "
                            "to train the mini backbone instead") from None

try:
    # Strict: unknown keys, bad metric names, duplicate rows fail here, before the DAG is built.
    REGISTRY = load_registry(config["registry"])
except (ConfigError, FileNotFoundError) as err:
    raise WorkflowError(f"table registry: {err}") from None

PAPER_TABLES = [name for name, table in REGISTRY.tables.items() if not table.test_only]
FAIL_EXPERIMENTS = set(config.get("fail_experiments", []))


wildcard_constraints:
    scale="smoke|mini|paper",
    experiment="[a-z0-9][a-z0-9_]*",
    table="|".join(REGISTRY.tables),


def data_root(scale):
    """Where the COCO-layout data of a scale lives."""
    if scale == "smoke":
        return TINY
    if scale == "mini":
        return MINI
    return config["coco_root"]


def experiment_config(wildcards):
    """The experiment's config file (a seed replicate <name>_seed<n>: <name>.yaml); a clear error
    (naming the rows that need it) if it is missing."""
    base, _ = seed_replicate(wildcards.experiment, config["experiments_dir"])
    path = Path(config["experiments_dir"]) / f"{base}.yaml"
    if not path.is_file():
        users = [
            f"{name}/{row.id}"
            for name, table in REGISTRY.tables.items()
            for row in table.rows
            if row.experiment == wildcards.experiment
        ]
        raise WorkflowError(
            f"experiment '{wildcards.experiment}' has no config file {path} "
            f"(needed by registry rows: {', '.join(users) or 'none'})"
        )
    return str(path)


def teacher_checkpoint(wildcards):
    """A distillation student's teacher (method.teacher of its config): the final checkpoint of the
    teacher's run at the same scale (so the teacher trains first, once, shared by every student),
    or the named checkpoint file; nothing for other experiments."""
    return [f"{RUNS}/{wildcards.scale}/{value}/checkpoint_final.pt" if kind == "experiment" else value
            for kind, value in experiment_teachers(experiment_config(wildcards))]


def tokens_checkpoint(wildcards):
    """A MasKD student's receptive tokens (method.tokens): the final checkpoint of its token run
    (stage 1, trained once per (teacher, T, variant) and shared), the named file, or nothing."""
    return [f"{RUNS}/{wildcards.scale}/{value}/checkpoint_final.pt" if kind == "experiment" else value
            for kind, value in experiment_teachers(experiment_config(wildcards), key="tokens")]


def run_dir(wildcards):
    return f"{RUNS}/{wildcards.scale}/{wildcards.experiment}"


def seed_overrides(experiment):
    """What a seed replicate <name>_seed<n> sets after the overlay: its seed and its own name."""
    _, seed = seed_replicate(experiment, config["experiments_dir"])
    return {} if seed is None else {"seed": seed, "name": experiment}


def seed_args(wildcards):
    """--set arguments of a seed replicate's train and eval commands (empty for other runs)."""
    return " ".join(f"--set {key}={value}" for key, value in seed_overrides(wildcards.experiment).items())


def job_resource(job, key):
    """A resource of the train/eval job of one experiment, from the registry's compute section."""

    def get(wildcards):
        return REGISTRY.resources(wildcards.experiment, wildcards.scale, job)[key]

    return get


def cpus_per_task(job):
    """cpus_per_task for Slurm: the registry's threads for CPU jobs (0 for GPU jobs: cpus_per_gpu).

    Set explicitly, not left to `threads`: `--cores all` caps a rule's threads to the submitting
    host's CPUs (and passes that cap into the job), but leaves resources alone, so sbatch and the
    job step get what the registry asks for whatever --cores says.
    """

    def get(wildcards):
        res = REGISTRY.resources(wildcards.experiment, wildcards.scale, job)
        return 0 if res["gpu"] else res["threads"]

    return get


def stop_signal(job):
    """sbatch --signal for a training job: SIGTERM a tenth of its runtime (at most 5 min) before
    the limit, so `replic train` checkpoints and exits 75 in time and Snakemake resubmits it.

    TERM, not USR1, and not to the batch shell only (no ``B:``): every process of the job step
    gets it, and the Snakemake process that runs the rule inside the job stops gracefully on
    TERM (USR1 would kill it before replic has written its checkpoint).
    """

    def get(wildcards):
        runtime_min = REGISTRY.resources(wildcards.experiment, wildcards.scale, job)["runtime"]
        return f"--signal=TERM@{max(30, min(300, int(runtime_min) * 6))}"

    return get


def cpus_per_gpu(job):
    """cpus_per_gpu for Slurm (0 = not set: CPU jobs ask --cpus-per-task=threads)."""

    def get(wildcards):
        res = REGISTRY.resources(wildcards.experiment, wildcards.scale, job)
        return res["threads"] // res["gpu"] if res["gpu"] else 0

    return get


def table_outputs(name):
    """The files the gather job writes for table ``name``."""
    return [
        f"results/table_{name}.csv",
        f"results/table_{name}.md",
        f"results/table_{name}.provenance.json",
        f"results/figures/table_{name}_ap.png",
        f"results/figures/table_{name}_curves.png",
    ]


def data_inputs(wildcards):
    # Smoke data is produced by the workflow; COCO is the user's and is only checked.
    if wildcards.scale == "smoke":
        return [TINY_TRAIN_ANN, TINY_VAL_ANN]
    if wildcards.scale == "mini":
        return [MINI_TRAIN_ANN, MINI_VAL_ANN]
    return []


def overlay_inputs(wildcards):
    """What a scale's overlay depends on: the data stamp, and at mini the pretrained backbone."""
    # The scale file itself, by content (params.content of scale_overlay): a changed value must
    # rebuild the overlay (and so retrain its runs), never leave them on the stale copy.
    inputs = {"data": f"{RUNS}/{wildcards.scale}/data.json",
              "scale": ancient(f"{config['scales_dir']}/{wildcards.scale}.yaml")}
    if wildcards.scale == "mini":
        inputs["backbone"] = MINI_BACKBONE
    return inputs


def overlay_settings(scale):
    """Paths the mini overlay points its runs at (they follow runs_dir), as dotted keys."""
    if scale == "mini":
        # The CNN family's mini section (families.cnn) reads the same frozen backbone.
        return {"model.pretrained_backbone": MINI_BACKBONE,
                "families.cnn.model.pretrained_backbone": MINI_BACKBONE,
                "train.feature_cache_dir": MINI_FEATURE_CACHE}
    return {}


# The pretraining options a mini backbone must have been made with: the overlay job refuses a
# stale one (made by hand, or before a config change Snakemake has no record of), before any run.
BACKBONE_CHECKED_OPTIONS = ("steps", "batch_size", "seed", "roi_cls_weight")


def overlay_extra_args(wildcards):
    args = [f"--set {key}={value}" for key, value in overlay_settings(wildcards.scale).items()]
    if wildcards.scale == "mini":
        args.append(f"--backbone {MINI_BACKBONE}")
        args += [f"--backbone-expect {key}={config['mini_pretrain'][key]}" for key in BACKBONE_CHECKED_OPTIONS]
    return " ".join(args)


def _overlay_args(wildcards):
    from replic.workflow.prepare import dotted_settings

    settings = dotted_settings([f"{k}={v}" for k, v in overlay_settings(wildcards.scale).items()])
    return wildcards.scale, data_root(wildcards.scale), config["scales_dir"], settings


def overlay_fingerprint(wildcards):
    """The scale overlay by content (a param of scale_overlay, whose scale file is an ancient()
    input): a comment in configs/scales/<scale>.yaml rebuilds nothing, a changed value rebuilds
    the overlay and so reruns every run of the scale (their overlay input is by time)."""
    from replic.workflow.prepare import overlay_fingerprint as fingerprint

    return fingerprint(*_overlay_args(wildcards))


def run_fingerprint(wildcards):
    """The run's resolved config by content (replic.workflow.prepare.run_fingerprint).

    A param of train and evaluate, whose experiment file is an ancient() input: Snakemake reruns a
    run when what it resolves to changes — its experiment, a base file it extends (not an input
    at all) — and not when a file is only touched or its comments edited. (Snakemake skips the
    params check of jobs downstream of a job that reruns, so the overlay stays a by-time input:
    a rebuilt overlay reruns its runs through it.)
    """
    from replic.workflow.prepare import run_fingerprint as fingerprint

    try:
        return fingerprint(experiment_config(wildcards), *_overlay_args(wildcards),
                           overrides=seed_overrides(wildcards.experiment))
    except (ConfigError, FileNotFoundError) as err:
        raise WorkflowError(f"experiment '{wildcards.experiment}' at scale {wildcards.scale}: {err}") from None


def fail_guard(wildcards):
    # Test-only switch (config fail_experiments): make this experiment's training fail.
    if wildcards.experiment in FAIL_EXPERIMENTS:
        return "echo 'failing on purpose: experiment listed in config fail_experiments' >&2; exit 3; "
    return ""


def table_evaluations(wildcards):
    return [
        f"{RUNS}/{SCALE}/{experiment}/eval/metrics.json"
        for experiment in REGISTRY.experiments([wildcards.table], SCALE)
    ]


# The convergence figures (job convergence_figure): each pair's periodic evaluations, as
# results/figures/<scale>/convergence_<pair>.png. The 12-epoch pair is the main job's.
CONVERGENCE_PAIRS = {
    "detr_vs_cdetr": {"DETR": "detr_r50_50ep", "Conditional DETR": "cdetr_r50_50ep"},
    "detr_vs_cdetr_12ep": {"DETR": "detr_r50_12ep", "Conditional DETR": "cdetr_r50_12ep"},
}
CONVERGENCE_RUNS = CONVERGENCE_PAIRS["detr_vs_cdetr"]
# Their seed replicates (job convergence_seeds_figure): the base run plus <name>_seed<n>.
CONVERGENCE_REPLICATES = {
    label: [name] + [f"{name}_seed{int(n)}" for n in config.get("convergence_seeds", [])]
    for label, name in CONVERGENCE_RUNS.items()
}


def table_convergence(wildcards):
    """At mini scale (periodic evaluation on), a table with both convergence runs also makes
    the DETR-vs-Conditional-DETR convergence figure."""
    if SCALE != "mini" or not set(CONVERGENCE_RUNS.values()) <= set(REGISTRY.experiments([wildcards.table], SCALE)):
        return []
    return [f"results/figures/{SCALE}/convergence_detr_vs_cdetr.png"]


# Attention figures (workflow/rules/figures.smk); defaults in config/config.yaml.
VIZ_IMAGES = config["viz_images"]
VIZ_FIGURE_IMAGES = config["viz_figure_images"]
VIZ_QUERIES = config["viz_queries"]
VIZ_LAYER = config["viz_layer"]
VIZ_BAND = config["viz_band"]


def viz_baseline(experiment, experiments):
    """The DETR run to compare a Conditional DETR run with, if the table has one."""
    if experiment.startswith("cdetr_"):
        twin = f"detr_{experiment.removeprefix('cdetr_')}"
        if twin in experiments:
            return twin
    return None


def table_viz_inputs(wildcards):
    # Attention figures exist for DETR-family runs only (CNN detectors have no decoder attention).
    experiments = experiments_of_family(REGISTRY.experiments([wildcards.table], SCALE), config["experiments_dir"], "detr")
    figures = [f"results/figures/{SCALE}/attention/{e}" for e in experiments]
    pairs = [(e, viz_baseline(e, experiments)) for e in experiments]
    figures += [f"results/figures/{SCALE}/compare/{e}_vs_{b}" for e, b in pairs if b]
    return {
        "summaries": [f"results/figures/{SCALE}/extremity/{e}.csv" for e in experiments],
        "figures": figures,
    }


# The claims ledger (workflow/rules/claims.smk): the runs every claim at a scale reads.
def claims_ledger():
    from replic.workflow.claims import load_ledger

    try:
        return load_ledger(config["claims"], config["experiments_dir"])
    except (ConfigError, FileNotFoundError) as err:
        raise WorkflowError(f"claims ledger: {err}") from None


def claims_inputs(wildcards):
    """The evaluations of every run (seed replicates included) the ledger reads at a scale."""
    runs = claims_ledger().runs(wildcards.scale)
    return {
        "detections": [f"{RUNS}/{wildcards.scale}/{run}/eval/detections.json" for run in runs],
        "metrics": [f"{RUNS}/{wildcards.scale}/{run}/eval/metrics.json" for run in runs],
    }


def claim_inputs(wildcards):
    """The evaluations one claim reads at a scale; an unknown claim or scale is refused."""
    try:
        ledger = claims_ledger().only([wildcards.claim])
    except ConfigError as err:
        raise WorkflowError(str(err)) from None
    if not ledger.at_scale(wildcards.scale):
        raise WorkflowError(f"claim {wildcards.claim} cannot be tested at {wildcards.scale} scale "
                            f"(its scales: {', '.join(ledger.claims[0].scales)})")
    runs = ledger.runs(wildcards.scale)
    return {
        "detections": [f"{RUNS}/{wildcards.scale}/{run}/eval/detections.json" for run in runs],
        "metrics": [f"{RUNS}/{wildcards.scale}/{run}/eval/metrics.json" for run in runs],
    }


def val_annotations(wildcards):
    return f"{data_root(wildcards.scale)}/annotations/instances_val2017.json"


def unknown_result_target(wildcards):
    """The input function of the unknown_result rule, which refuses every target no other rule
    makes. Snakemake also asks it about valid tables and ledgers (which the table and claims rules
    win by ruleorder): for those it says nothing, so no refusal is printed beside a valid target."""
    from replic.workflow.tables_cli import known_result, suggest_target

    if known_result(f"results/{wildcards.unknown}", REGISTRY):
        # Never chosen (an input no rule makes), so a table whose own inputs fail (a missing
        # experiment config) still fails with that error, and nothing is printed otherwise.
        return [f"results/.made-by-the-table-or-claims-rule/{wildcards.unknown}"]
    raise WorkflowError(suggest_target(f"results/{wildcards.unknown}", REGISTRY))
