# The claims ledger: every claim of configs/claims.yaml testable at a scale, with its verdict.


rule claims:
    """Effect, 95 % interval (val-image bootstrap + seeds) and verdict of every claim at a scale."""
    input:
        unpack(claims_inputs),
        claims=config["claims"],
        gt=val_annotations,
    output:
        csv=report(
            "results/claims_{scale}.csv",
            caption="../report/claims.rst",
            category="Claims",
            labels={"scale": "{scale}", "file": "CSV"},
        ),
        markdown=report(
            "results/claims_{scale}.md",
            caption="../report/claims.rst",
            category="Claims",
            labels={"scale": "{scale}", "file": "Markdown"},
        ),
        provenance="results/claims_{scale}.provenance.json",
    params:
        runs=RUNS,
        experiments=config["experiments_dir"],
    log:
        "results/logs/claims_{scale}.log",
    conda:
        ENV
    shell:
        "python -m replic.workflow.claims --claims {input.claims} --scale {wildcards.scale} --gt {input.gt}"
        " --runs-dir {params.runs} --experiments-dir {params.experiments} --out-dir results > {log} 2>&1"


rule claim:
    """One claim of the ledger at a scale (results/claims/<scale>/<claim>.md): the same measurement
    and verdict as its row in results/claims_<scale>.md, needing only that claim's runs."""
    input:
        unpack(claim_inputs),
        claims=config["claims"],
        gt=val_annotations,
    output:
        csv="results/claims/{scale}/{claim}.csv",
        markdown=report(
            "results/claims/{scale}/{claim}.md",
            caption="../report/claims.rst",
            category="Claims",
            labels={"scale": "{scale}", "file": "{claim}"},
        ),
        provenance="results/claims/{scale}/{claim}.provenance.json",
    wildcard_constraints:
        claim="[a-z0-9_]+",
    params:
        runs=RUNS,
        experiments=config["experiments_dir"],
        out_dir=lambda wildcards: f"results/claims/{wildcards.scale}",
    log:
        "results/logs/claim_{scale}_{claim}.log",
    conda:
        ENV
    shell:
        "python -m replic.workflow.claims --claims {input.claims} --scale {wildcards.scale} --gt {input.gt}"
        " --runs-dir {params.runs} --experiments-dir {params.experiments} --out-dir {params.out_dir}"
        " --claim {wildcards.claim} > {log} 2>&1 || {{ cat {log} >&2; exit 1; }}"
