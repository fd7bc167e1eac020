# Attention figures and head-extremity tables for a table's runs (replic viz).
#
#   snakemake --cores all results/figures/table_smoke_ci_extremity.csv
#
# Per run: per-head cross-attention figures of the top-scoring queries on the first val
# images (results/figures/<scale>/attention/<experiment>/) and the per-head extremity
# summary (results/figures/<scale>/extremity/<experiment>.csv). Per table: every run's
# summary in one CSV, plus DETR vs Conditional DETR side by side for each Conditional
# DETR run whose DETR twin (same name with detr_ for cdetr_) is in the same table.
# Settings (config/config.yaml, validated by the schema) can be overridden, e.g.
# --config viz_images=4 viz_queries=3 viz_layer=-1 viz_band=0.25.

rule viz_attention:
    """Per-head cross-attention (and spatial-only) figures of one run on the first val images."""
    input:
        checkpoint=f"{RUNS}/{{scale}}/{{experiment}}/checkpoint_final.pt",
    output:
        directory("results/figures/{scale}/attention/{experiment}"),
    params:
        images=" ".join(f"--image @{i}" for i in range(VIZ_FIGURE_IMAGES)),
    log:
        "results/logs/viz_attention_{scale}_{experiment}.log",
    threads: 1
    conda:
        ENV
    shell:
        "export OMP_NUM_THREADS={threads}; "
        "replic viz attention --checkpoint {input.checkpoint} {params.images} --out {output}"
        f" --layer {VIZ_LAYER} --queries {VIZ_QUERIES} > {{log}} 2>&1"


rule viz_compare:
    """DETR vs Conditional DETR cross-attention, same images, matched queries."""
    input:
        checkpoint=f"{RUNS}/{{scale}}/{{experiment}}/checkpoint_final.pt",
        baseline=f"{RUNS}/{{scale}}/{{baseline}}/checkpoint_final.pt",
    output:
        directory("results/figures/{scale}/compare/{experiment}_vs_{baseline}"),
    params:
        images=" ".join(f"--image @{i}" for i in range(VIZ_FIGURE_IMAGES)),
    log:
        "results/logs/viz_compare_{scale}_{experiment}_vs_{baseline}.log",
    threads: 1
    conda:
        ENV
    shell:
        "export OMP_NUM_THREADS={threads}; "
        "replic viz attention --checkpoint {input.checkpoint} --baseline-checkpoint {input.baseline}"
        " {params.images} --out {output}"
        f" --layer {VIZ_LAYER} --queries {VIZ_QUERIES} > {{log}} 2>&1"


rule viz_extremity:
    """Per-head fraction of attention on each box edge for one run."""
    input:
        checkpoint=f"{RUNS}/{{scale}}/{{experiment}}/checkpoint_final.pt",
    output:
        summary="results/figures/{scale}/extremity/{experiment}.csv",
        per_query="results/figures/{scale}/extremity/{experiment}.per_query.csv",
    log:
        "results/logs/viz_extremity_{scale}_{experiment}.log",
    threads: 1
    conda:
        ENV
    shell:
        "export OMP_NUM_THREADS={threads}; "
        "replic viz extremity --checkpoint {input.checkpoint} --out {output.summary}"
        " --per-query {output.per_query}"
        f" --images {VIZ_IMAGES} --queries {VIZ_QUERIES} --layer {VIZ_LAYER} --band {VIZ_BAND}"
        " > {log} 2>&1"


rule table_attention:
    """Every run of a table: extremity summaries in one CSV; attention figures rendered alongside."""
    input:
        unpack(table_viz_inputs),
    output:
        "results/figures/table_{table}_extremity.csv",
    params:
        runs=lambda wildcards: experiments_of_family(REGISTRY.experiments([wildcards.table], SCALE),
                                                     config["experiments_dir"], "detr"),
    log:
        "results/logs/table_attention_{table}.log",
    localrule: True
    run:
        from replic.viz.extremity import merge_summaries

        merge_summaries(list(input.summaries), list(params.runs), output[0])


rule convergence_figure:
    """DETR vs Conditional DETR: val AP against training steps from periodic evaluation (the
    analogue of the paper's Figure 1; mini scale, where train.eval_every is set). One figure per
    pair of CONVERGENCE_PAIRS: 50 epochs (detr_vs_cdetr) and 12 epochs (detr_vs_cdetr_12ep)."""
    input:
        runs=lambda wildcards: [f"{RUNS}/{wildcards.scale}/{name}/done.json"
                                for name in CONVERGENCE_PAIRS[wildcards.pair].values()],
    output:
        figure=report(
            "results/figures/{scale}/convergence_{pair}.png",
            caption="../report/figure_curves.rst",
            category="Figures",
            labels={"table": "convergence", "figure": "val AP vs step ({pair})"},
        ),
        csv="results/figures/{scale}/convergence_{pair}.csv",
    wildcard_constraints:
        pair="|".join(CONVERGENCE_PAIRS),
    params:
        runs=lambda wildcards: " ".join(f"--run '{label}={RUNS}/{wildcards.scale}/{name}'"
                                        for label, name in CONVERGENCE_PAIRS[wildcards.pair].items()),
        schedule=lambda wildcards: "12 epochs" if wildcards.pair.endswith("_12ep") else "50 epochs",
    log:
        "results/logs/convergence_{scale}_{pair}.log",
    localrule: True
    conda:
        ENV
    shell:
        "python -m replic.viz.convergence {params.runs} --out {output.figure}"
        " --title 'DETR vs Conditional DETR, {params.schedule}, {wildcards.scale} scale' > {log} 2>&1"


rule convergence_seeds_figure:
    """The convergence figure over seeds (config convergence_seeds): each seed thin, the mean
    bold, the mean gap per step (and in how many seed pairs Conditional DETR leads) in the .txt."""
    input:
        runs=[f"{RUNS}/{{scale}}/{name}/done.json" for names in CONVERGENCE_REPLICATES.values() for name in names],
    output:
        figure=report(
            "results/figures/{scale}/convergence_detr_vs_cdetr_seeds.png",
            caption="../report/figure_curves.rst",
            category="Figures",
            labels={"table": "convergence", "figure": "val AP vs step, seeds"},
        ),
        csv="results/figures/{scale}/convergence_detr_vs_cdetr_seeds.csv",
        gap="results/figures/{scale}/convergence_detr_vs_cdetr_seeds.txt",
    params:
        runs=lambda wildcards: " ".join(f"--run '{label}={RUNS}/{wildcards.scale}/{name}'"
                                        for label, names in CONVERGENCE_REPLICATES.items() for name in names),
        seeds=len(config.get("convergence_seeds", [])) + 1,
    log:
        "results/logs/convergence_seeds_{scale}.log",
    localrule: True
    conda:
        ENV
    shell:
        "python -m replic.viz.convergence {params.runs} --out {output.figure}"
        " --title 'DETR vs Conditional DETR, {wildcards.scale} scale, {params.seeds} seeds'"
        " > {output.gap} 2> {log}"
