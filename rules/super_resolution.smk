# Benchmark 2: super-resolution per loss network (docs/super_resolution.md).
#   prepared COCO -> train_sr per (loss network, scale, run) -> eval_sr on Set5/Set14/BSD100
# model.pt holds the weights and their meta (workflow.training.save_model); the checkpoints
# live in <job>/train/ (not rule outputs, so a rerun after preemption resumes from
# train/last.pt; the harness exits with code 75 on SIGTERM/SIGUSR1 after checkpointing: run
# with --retries to resume automatically). Target: `super_resolution`.

SR_DIR = f"{OUT}/super_resolution/{{arch}}/{{layer}}/x{{scale}}/run{{run}}"


rule train_sr:
    input:
        coco=plan.prepared("coco"),
        weights=plan.weights_param(),
    output:
        model=f"{SR_DIR}/model.pt",
    params:
        config=plan.config_param("super_resolution", "train"),
        settings=plan.settings_param("super_resolution", "train"),
        workdir=f"{SR_DIR}/train",
    log:
        f"{OUT}/logs/super_resolution/{{arch}}/{{layer}}/train_x{{scale}}_run{{run}}.log",
    resources:
        gpu=plan.gpus("super_resolution", "train"),
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow super_resolution train --net {wildcards.arch}/{wildcards.layer}"
        " --scale {wildcards.scale} --run {wildcards.run} --config {params.config:q}"
        " --settings {params.settings:q} --threads {threads} --prepared {input.coco:q}"
        " --workdir {params.workdir:q} --out {output.model:q} > {log:q} 2>&1"


rule eval_sr:
    input:
        model=f"{SR_DIR}/model.pt",
        sr_test=plan.prepared("sr_test"),
    output:
        samples=f"{SR_DIR}/images.parquet",
        scores=f"{SR_DIR}/scores.parquet",
    params:
        config=plan.config_param("super_resolution", "eval"),
        settings=plan.settings_param("super_resolution", "eval"),
    log:
        f"{OUT}/logs/super_resolution/{{arch}}/{{layer}}/eval_x{{scale}}_run{{run}}.log",
    resources:
        gpu=plan.gpus("super_resolution", "eval"),
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow super_resolution eval --net {wildcards.arch}/{wildcards.layer}"
        " --scale {wildcards.scale} --run {wildcards.run} --config {params.config:q}"
        " --settings {params.settings:q}"
        " --threads {threads} --model {input.model:q} --prepared {input.sr_test:q}"
        " --samples {output.samples:q} --scores {output.scores:q} > {log:q} 2>&1"


BENCH_OUTPUTS["super_resolution"] = plan.targets(f"{SR_DIR}/scores.parquet", "super_resolution")


rule super_resolution:
    input:
        BENCH_OUTPUTS["super_resolution"],
