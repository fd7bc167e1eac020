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


rule synth_mini_data:
    """Synthetic COCO-format data of the mini scale (sizes in config mini_data)."""
    output:
        train=MINI_TRAIN_ANN,
        val=MINI_VAL_ANN,
    params:
        out=lambda wildcards, output: str(Path(output.train).parent.parent),
        n_train=config["mini_data"]["train"],
        n_val=config["mini_data"]["val"],
        size=config["mini_data"]["size"],
        seed=config["mini_data"]["seed"],
    log:
        f"{MINI}.synth.log",
    conda:
        ENV
    shell:
        "replic data synth --out {params.out} --train {params.n_train} --val {params.n_val}"
        " --size {params.size} --seed {params.seed} > {log} 2>&1"


rule unpack_mini_backbone:
    """The mini scale's frozen ResNet-18 from the committed asset (config mini_backbone: shipped):
    the file rule pretrain_backbone wrote, rebuilt byte for byte (sha256 checked), in seconds.
    Refused when the mini train annotations are not the ones it was pretrained on."""
    input:
        train=MINI_TRAIN_ANN,
    output:
        weights=MINI_BACKBONE,
        provenance=f"{MINI_BACKBONE}.provenance.json",
    params:
        root=lambda wildcards, input: str(Path(input.train).parent.parent),
        # The asset by content, not by file time: a checkout's new mtime reruns nothing, another
        # shipped backbone (another sha256) is unpacked again (and its runs are then refused by
        # their inputs.json check until retrained).
        asset=config["mini_backbone_asset"],
        sha256=mini_backbone_asset_sha256(),
    log:
        f"{RUNS}/mini/logs/unpack_mini_backbone.log",
    localrule: True
    conda:
        ENV
    shell:
        "replic backbone-asset unpack --asset {params.asset} --out {output.weights} --data {params.root}"
        " > {log} 2>&1 || {{ cat {log} >&2; exit 1; }}"


rule pretrain_backbone:
    """The mini scale's frozen ResNet-18: dense (CenterNet/FCOS-style) pretraining on the mini
    train split, once (config mini_backbone: pretrain); writes the weights and
    <weights>.provenance.json. Deterministic for a thread count (recorded in the provenance).
    Every mini run waits for it, so it may take all the cores (mini_pretrain.threads, at most --cores)."""
    input:
        train=MINI_TRAIN_ANN,
        val=MINI_VAL_ANN,
    output:
        weights=MINI_BACKBONE,
        provenance=f"{MINI_BACKBONE}.provenance.json",
    params:
        root=lambda wildcards, input: str(Path(input.train).parent.parent),
        steps=config["mini_pretrain"]["steps"],
        batch_size=config["mini_pretrain"]["batch_size"],
        seed=config["mini_pretrain"]["seed"],
        roi_cls_weight=config["mini_pretrain"]["roi_cls_weight"],
    log:
        f"{RUNS}/mini/logs/pretrain_backbone.log",
    benchmark:
        f"{RUNS}/mini/logs/pretrain_backbone.benchmark.tsv"
    threads: config["mini_pretrain"]["threads"]
    resources:
        mem_mb=6000,
        runtime=90,
    conda:
        ENV
    shell:
        "export OMP_NUM_THREADS={threads}; "
        "replic pretrain-backbone --data {params.root} --out {output.weights} --steps {params.steps}"
        " --batch-size {params.batch_size} --seed {params.seed} --roi-cls-weight {params.roi_cls_weight}"
        " --threads {threads} > {log} 2>&1"


# Both rules make the mini backbone; config mini_backbone picks which one does.
if config.get("mini_backbone", "shipped") == "pretrain":

    ruleorder: pretrain_backbone > unpack_mini_backbone

else:

    ruleorder: unpack_mini_backbone > pretrain_backbone


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
        unpack(overlay_inputs),
    output:
        f"{RUNS}/{{scale}}/scale.yaml",
    params:
        root=lambda wildcards: data_root(wildcards.scale),
        scales_dir=config["scales_dir"],
        extra=overlay_extra_args,
        content=overlay_fingerprint,
    log:
        f"{RUNS}/{{scale}}/logs/scale_overlay.log",
    conda:
        ENV
    shell:
        "python -m replic.workflow.prepare overlay --scale {wildcards.scale} --data-root {params.root}"
        " --scales-dir {params.scales_dir} {params.extra} --out {output} > {log} 2>&1"
