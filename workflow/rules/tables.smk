# Gather: one table (CSV + Markdown + provenance + figures) from the evaluations of its rows.


rule table:
    """Paper numbers, ours (×100, AP points) and the difference for every row of one table."""
    input:
        evaluations=table_evaluations,
        registry=config["registry"],
        convergence=table_convergence,
    output:
        csv=report(
            "results/table_{table}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "file": "CSV"},
        ),
        markdown="results/table_{table}.md",
        provenance="results/table_{table}.provenance.json",
        bars=report(
            "results/figures/table_{table}_ap.png",
            caption="../report/figure_ap.rst",
            category="Figures",
            labels={"table": "{table}", "figure": "AP, paper vs ours"},
        ),
        curves=report(
            "results/figures/table_{table}_curves.png",
            caption="../report/figure_curves.rst",
            category="Figures",
            labels={"table": "{table}", "figure": "AP vs epoch"},
        ),
    params:
        scale=SCALE,
        runs=RUNS,
    log:
        "results/logs/table_{table}.log",
    conda:
        ENV
    shell:
        "python -m replic.workflow.gather --registry {input.registry} --table {wildcards.table}"
        " --scale {params.scale} --runs-dir {params.runs} --out-dir results > {log} 2>&1"
