# Data for a scale: smoke synthesises the tiny COCO-format set; paper checks the COCO 2017 layout.


rule synth_tiny_data:
    """Built-in tiny synthetic COCO-format data (deterministic for a seed)."""
    output:
        train=TINY_TRAIN_ANN,
        val=TINY_VAL_ANN,
    params:
        out=lambda wildcards, output: str(Path(output.train).parent.parent),
        n_train=config["tiny_data"]["train"],
        n_val=config["tiny_data"]["val"],
        size=config["tiny_data"]["size"],
        seed=config["tiny_data"]["seed"],
    log:
        f"{TINY}.synth.log",
    conda:
        ENV
    shell:
        "replic data synth --out {params.out} --train {params.n_train} --val {params.n_val}"
        " --size {params.size} --seed {params.seed} > {log} 2>&1"


rule check_data:
    """Check the COCO directory layout of the scale's data root; fail with the list of what is missing."""
    input:
        data_inputs,
    output:
        f"{RUNS}/{{scale}}/data.json",
    params:
        root=lambda wildcards: data_root(wildcards.scale),
    log:
        f"{RUNS}/{{scale}}/logs/check_data.log",
    conda:
        ENV
    shell:
        "python -m replic.workflow.prepare check-coco --root {params.root} --out {output} 2> {log}"
        " || {{ cat {log} >&2; exit 1; }}"


rule scale_overlay:
    """The --scale overlay of every run at this scale: configs/scales/<scale>.yaml + data root."""
    input:
        data=f"{RUNS}/{{scale}}/data.json",
    output:
        f"{RUNS}/{{scale}}/scale.yaml",
    params:
        root=lambda wildcards: data_root(wildcards.scale),
        scales_dir=config["scales_dir"],
    log:
        f"{RUNS}/{{scale}}/logs/scale_overlay.log",
    conda:
        ENV
    shell:
        "python -m replic.workflow.prepare overlay --scale {wildcards.scale} --data-root {params.root}"
        " --scales-dir {params.scales_dir} --out {output} > {log} 2>&1"
