# replic: every reproduced paper table from one command.
#
#   snakemake --cores all results/table_cdetr_ablations.csv        # smoke scale, tiny data, CPU
#   snakemake --profile slurm results/table_conditional_detr.csv --config scale=paper coco_root=/data/coco
#   snakemake --cores all results/figures/table_cdetr_ablations_extremity.csv   # attention figures
#   snakemake --cores all results/claims_mini.md --config scale=mini   # each claim's verdict
#   snakemake --report results/report.html                         # tables + figures as HTML
#
# The DAG is derived from the table registry (configs/tables.yaml): each table's rows
# name experiments; each (scale, experiment) is trained once and evaluated once, and a
# gather job turns the evaluations into results/table_<name>.{csv,md,provenance.json}
# plus figures. See workflow/README.md.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


if config.get("scale") == "paper" and not config.get("coco_root"):
    # Say what to type rather than a schema dump.
    raise ValueError(
        "scale=paper needs the COCO 2017 root: --config scale=paper coco_root=/path/to/coco "
        "(with annotations/instances_{train,val}2017.json, train2017/, val2017/)"
    )


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/runs.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/ks_detr.smk"
include: "workflow/rules/maskd.smk"
include: "workflow/rules/claims.smk"
include: "workflow/rules/targets.smk"


# Cheap bookkeeping runs on the submitting host, not as cluster jobs.
localrules:
    all,
    check_data,
    scale_overlay,
    table,
    claims,
    ks_attention_table,
    maskd_token_figures_table,


rule all:
    """Every paper table with its attention figures (test-only tables such as smoke_ci only on request)."""
    input:
        [table_outputs(name) for name in PAPER_TABLES],
        # Attention figures of the tables with DETR-family runs (CNN detectors have no decoder attention).
        [
            f"results/figures/table_{name}_extremity.csv"
            for name in PAPER_TABLES
            if experiments_of_family(REGISTRY.experiments([name]), config["experiments_dir"], "detr")
        ],
        [
            f"results/figures/table_{name}_ks_attention.csv"
            for name in PAPER_TABLES
            if experiments_with_method(REGISTRY.experiments([name]), config["experiments_dir"], "ks_detr")
        ],
        # MasKD: receptive-token figures of every token run a table uses; AP against T.
        [
            f"results/figures/table_{name}_receptive_tokens.json"
            for name in PAPER_TABLES
            if token_runs(REGISTRY.experiments([name]), config["experiments_dir"])
        ],
        [f"results/figures/table_{name}_ap_vs_tokens.png" for name in PAPER_TABLES if name == "maskd_tokens"],
    default_target: True

