# Benchmark 2: super-resolution per loss network (docs/super_resolution.md).
#   prepared COCO -> train_sr per (architecture, scale), scoring each model on Set5/Set14/BSD100
#   (super_resolution.fuse: false: train_sr per (loss network, scale, run) -> eval_sr)
# model.pt holds the weights and their meta (workflow.training.save_model); the checkpoints
# live in <job>/train/ (not rule outputs, so a rerun after preemption resumes from
# train/last.pt; the harness exits with code 75 on SIGTERM/SIGUSR1 after checkpointing: run
# with --retries to resume automatically). Target: `super_resolution`.


SR_DIR = f"{OUT}/super_resolution/{{arch}}/{{layer}}/x{{scale}}/run{{run}}"
# super_resolution.fuse (default): ONE train_sr job per architecture and scale trains all its
# layers and runs together (docs/super_resolution.md, "Fused training") and then, in the same
# process, scores every member with the eval stage's own config and precision: each member's
# folder (SR_DIR) gets model.pt, images.parquet and scores.parquet; SR_FUSED gets models.json
# (the listing) and scores.parquet (every member's rows, what the gather reads). No eval_sr
# and no per-model job: a change of an eval-only key reruns train_sr, whose members find
# their train/final.pt complete (the resume key holds only the train stage's config) and
# train no step. Its checkpoints live in SR_FUSED's folder/train.
SR_FUSED = f"{OUT}/super_resolution/{{arch}}/fused/x{{scale}}"


if plan.config["super_resolution"]["fuse"]:

    rule train_sr:
        input:
            coco=plan.prepared("coco"),
            sr_test=plan.prepared("sr_test"),
            weights=plan.weights_param(),
        output:
            models=f"{SR_FUSED}/models.json",
            scores=f"{SR_FUSED}/scores.parquet",
        params:
            config=plan.config_param("super_resolution", "train"),
            eval=plan.config_param("super_resolution", "eval"),
            settings=plan.settings_param("super_resolution", "train", "eval"),
            nets=plan.fused_nets_param("super_resolution"),
            members=plan.fused_members_param("super_resolution", SR_DIR),
            workdir=f"{SR_FUSED}/train",
        log:
            f"{OUT}/logs/super_resolution/{{arch}}/train_x{{scale}}_fused.log",
        resources:
            gpu=plan.gpus("super_resolution", "train"),
        threads: plan.threads(2)
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow super_resolution train_fused --scale {wildcards.scale}"
            " --members {params.members:q} --config {params.config:q}"
            " --eval-config {params.eval:q} --settings {params.settings:q}"
            " --threads {threads} --prepared {input.coco:q} {input.sr_test:q}"
            " --workdir {params.workdir:q} --out {output.models:q}"
            " --scores {output.scores:q} > {log:q} 2>&1"

else:

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
        threads: plan.threads(2)
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow super_resolution train --net {wildcards.arch}/{wildcards.layer}"
            " --scale {wildcards.scale} --run {wildcards.run} --config {params.config:q}"
            " --settings {params.settings:q} --threads {threads} --prepared {input.coco:q}"
            " --workdir {params.workdir:q} --out {output.model:q} > {log:q} 2>&1"


# One model's scores from its model.pt: the rule of super_resolution.fuse false. With fuse no
# target asks for it (the gather reads the fused jobs' files); asked for one model's
# scores.parquet by name it scores that model.pt again.
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
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow super_resolution eval --net {wildcards.arch}/{wildcards.layer}"
        " --scale {wildcards.scale} --run {wildcards.run} --config {params.config:q}"
        " --settings {params.settings:q}"
        " --threads {threads} --model {input.model:q} --prepared {input.sr_test:q}"
        " --samples {output.samples:q} --scores {output.scores:q} > {log:q} 2>&1"


BENCH_OUTPUTS["super_resolution"] = plan.fused_targets(
    "super_resolution", f"{SR_DIR}/scores.parquet", f"{SR_FUSED}/scores.parquet")


rule super_resolution:
    input:
        BENCH_OUTPUTS["super_resolution"],
