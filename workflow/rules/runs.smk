# One training run and one evaluation per (scale, experiment), shared by every table row naming it.


rule train:
    """Train one experiment. Several GPUs: one task, torchrun starts one process per GPU.

    `replic train` continues a run directory holding the same resolved config from its
    checkpoints/last.pt, so a run cut by the runtime cap (or a crash) resumes when Snakemake
    resubmits it (profile `retries`) or is run again. A changed config, or the same config with
    input files of other content (run_dir/inputs.json: a re-pretrained backbone, a retrained
    teacher), is refused (the old run is kept) unless config force_retrain is true, which starts
    the run afresh.
    """
    input:
        # The experiment by content (params.resolved): touching or re-commenting it reruns nothing.
        config=ancient(experiment_config),
        overlay=f"{RUNS}/{{scale}}/scale.yaml",
        data=f"{RUNS}/{{scale}}/data.json",
        # Distillation: the teacher's run (read by the method from the sibling run directory).
        teacher=teacher_checkpoint,
        # MasKD: the stage-1 token run (its own train rule, a maskd_tokens experiment).
        tokens=tokens_checkpoint,
    output:
        done=f"{RUNS}/{{scale}}/{{experiment}}/done.json",
        checkpoint=f"{RUNS}/{{scale}}/{{experiment}}/checkpoint_final.pt",
    params:
        out=run_dir,
        resolved=run_fingerprint,
        seed=seed_args,
        fail=fail_guard,
        force="--force" if config.get("force_retrain") else "",
    log:
        f"{RUNS}/{{scale}}/{{experiment}}/logs/train.log",
    benchmark:
        f"{RUNS}/{{scale}}/{{experiment}}/logs/train.benchmark.tsv"
    threads: job_resource("train", "threads")
    resources:
        gpu=job_resource("train", "gpu"),
        cpus_per_gpu=cpus_per_gpu("train"),
        cpus_per_task=cpus_per_task("train"),
        slurm_extra=stop_signal("train"),
        mem_mb=job_resource("train", "mem_mb"),
        runtime=job_resource("train", "runtime"),
    conda:
        ENV
    shell:
        "{params.fail}"
        # One torchrun process per GPU: each gets its share of the CPUs.
        "export OMP_NUM_THREADS={threads}; "
        # In a Slurm job, the CPUs the registry asked for (threads may be capped by --cores).
        "if [ -n \"${{SLURM_JOB_ID:-}}\" ] && [ {resources.cpus_per_task} -gt 0 ]; then"
        " export OMP_NUM_THREADS={resources.cpus_per_task}; fi; "
        "if [ {resources.gpu} -gt 0 ] && [ {resources.cpus_per_gpu} -gt 0 ]; then"
        " export OMP_NUM_THREADS={resources.cpus_per_gpu}; fi; "
        "if [ {resources.gpu} -gt 1 ]; then"
        " launch='torchrun --standalone --nnodes=1 --nproc_per_node={resources.gpu} -m replic';"
        " else launch='replic'; fi; "
        "$launch train --config {input.config} --scale {input.overlay} {params.seed} --out {params.out} {params.force}"
        " > {log} 2>&1"


rule evaluate:
    """COCO evaluation of the final checkpoint on the val split (one GPU at paper scale)."""
    input:
        config=ancient(experiment_config),
        overlay=f"{RUNS}/{{scale}}/scale.yaml",
        checkpoint=f"{RUNS}/{{scale}}/{{experiment}}/checkpoint_final.pt",
    output:
        metrics=f"{RUNS}/{{scale}}/{{experiment}}/eval/metrics.json",
        detections=f"{RUNS}/{{scale}}/{{experiment}}/eval/detections.json",
    params:
        out=lambda wildcards: f"{run_dir(wildcards)}/eval",
        resolved=run_fingerprint,
        seed=seed_args,
    log:
        f"{RUNS}/{{scale}}/{{experiment}}/logs/eval.log",
    benchmark:
        f"{RUNS}/{{scale}}/{{experiment}}/logs/eval.benchmark.tsv"
    threads: job_resource("eval", "threads")
    resources:
        gpu=job_resource("eval", "gpu"),
        cpus_per_gpu=cpus_per_gpu("eval"),
        cpus_per_task=cpus_per_task("eval"),
        mem_mb=job_resource("eval", "mem_mb"),
        runtime=job_resource("eval", "runtime"),
    conda:
        ENV
    shell:
        "export OMP_NUM_THREADS={threads}; "
        "if [ -n \"${{SLURM_JOB_ID:-}}\" ] && [ {resources.cpus_per_task} -gt 0 ]; then"
        " export OMP_NUM_THREADS={resources.cpus_per_task}; fi; "
        "replic eval --config {input.config} --scale {input.overlay} {params.seed} --checkpoint {input.checkpoint}"
        " --out {params.out} > {log} 2>&1"
