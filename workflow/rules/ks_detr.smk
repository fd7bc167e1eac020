# KS-DETR attention figures (replic/viz/ks_attention.py): for every KS run of a table, one
# val image with its GT mask on the token grid and the student's vs each teacher's encoder
# attention for a few foreground and background tokens, plus a CSV of the attention mass that
# falls on foreground tokens, per run and map.
#
#   snakemake --cores all results/figures/table_ks_detr_ks_attention.csv

from replic.workflow.methods import experiments_with_method


rule ks_attention_figure:
    """GT mask on the grid and student vs teacher attention of one KS run."""
    input:
        checkpoint=f"{RUNS}/{{scale}}/{{experiment}}/checkpoint_final.pt",
    output:
        figure="results/figures/{scale}/ks_attention/{experiment}.png",
        summary="results/figures/{scale}/ks_attention/{experiment}.json",
    log:
        "results/logs/ks_attention_{scale}_{experiment}.log",
    threads: 1
    conda:
        ENV
    shell:
        "export OMP_NUM_THREADS={threads}; "
        "python -m replic.viz.ks_attention --checkpoint {input.checkpoint} --out {output.figure} > {log} 2>&1"


rule ks_attention_table:
    """Every KS run of a table: the figures, and their attention-mass summaries in one CSV."""
    input:
        lambda wildcards: [
            f"results/figures/{SCALE}/ks_attention/{e}.json"
            for e in experiments_with_method(REGISTRY.experiments([wildcards.table], SCALE), config["experiments_dir"], "ks_detr")
        ],
    output:
        "results/figures/table_{table}_ks_attention.csv",
    log:
        "results/logs/ks_attention_table_{table}.log",
    conda:
        ENV
    shell:
        "python -m replic.viz.ks_attention collect --out {output} {input} > {log} 2>&1"
