# MasKD figures (replic/viz/receptive_tokens.py): for every token run (stage 1) a table's students
# use, the receptive-token masks of a few val images per level with each token's weight p_t, the
# pairwise Dice between tokens and a summary JSON; per table, one index of those runs; for the
# token-count table, AP against the number of tokens.
#
#   snakemake --cores all results/figures/table_maskd_receptive_tokens.json
#   snakemake --cores all results/figures/table_maskd_tokens_ap_vs_tokens.png

from replic.workflow.methods import token_runs


rule maskd_token_figures:
    """Masks, weights and pairwise Dice of one token run (every level)."""
    input:
        checkpoint=f"{RUNS}/{{scale}}/{{experiment}}/checkpoint_final.pt",
    output:
        summary="results/figures/{scale}/receptive_tokens/{experiment}/summary.json",
    params:
        out=lambda wildcards: f"results/figures/{wildcards.scale}/receptive_tokens/{wildcards.experiment}",
    log:
        "results/logs/receptive_tokens_{scale}_{experiment}.log",
    threads: 1
    conda:
        ENV
    shell:
        "export OMP_NUM_THREADS={threads}; "
        "python -m replic.viz.receptive_tokens --checkpoint {input.checkpoint} --out {params.out} > {log} 2>&1"


rule maskd_token_figures_table:
    """Every token run of a table's MasKD students: their figures, indexed in one JSON."""
    input:
        lambda wildcards: [
            f"results/figures/{SCALE}/receptive_tokens/{e}/summary.json"
            for e in token_runs(REGISTRY.experiments([wildcards.table], SCALE), config["experiments_dir"])
        ],
    output:
        "results/figures/table_{table}_receptive_tokens.json",
    log:
        "results/logs/receptive_tokens_table_{table}.log",
    conda:
        ENV
    shell:
        "python -m replic.viz.receptive_tokens collect {output} {input} > {log} 2>&1"


rule maskd_ap_vs_tokens:
    """AP of a table's MasKD rows against their number of receptive tokens."""
    input:
        table="results/table_{table}.csv",
    output:
        "results/figures/table_{table}_ap_vs_tokens.png",
    params:
        experiments=config["experiments_dir"],
        scale=SCALE,
    log:
        "results/logs/ap_vs_tokens_{table}.log",
    conda:
        ENV
    shell:
        "python -m replic.viz.receptive_tokens ap-vs-tokens {input.table} {output} {params.experiments}"
        " {params.scale} > {log} 2>&1"
