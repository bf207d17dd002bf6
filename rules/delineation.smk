# Benchmark 3: road delineation (refinement U-Net trained with BCE + 0.01 x deep perceptual
# loss; docs/delineation.md). train_delineation per architecture (delineation.fuse, below;
# false: per loss network and run). Per loss network and run, under
# {OUT}/delineation/{arch}/{layer}/run{run}/:
#   train/     checkpoints (last.pt, best.pt) and metrics.csv of the training harness
#   model.pt   the kept model (best validation quality) + meta  <- train_delineation
#   tiles.parquet, scores.parquet  per-tile and summary rows     <- train_delineation (after
#              training, in the same process)
# --config: what the stage's numbers depend on (a rerun trigger); --settings: how it runs
# (tile_size, inference_batch, data_on_device, device, threads; never a rerun trigger).
# Target: `delineation`.

DELINEATION_DIR = f"{OUT}/delineation/{{arch}}/{{layer}}/run{{run}}"


# delineation.fuse (default): ONE train_delineation job per loss-network architecture trains
# all its layers and runs together (docs/delineation.md, "Fused training") and then, in the
# same process, scores every member with the eval stage's own config and precision: each
# member's folder (DELINEATION_DIR) gets model.pt, tiles.parquet and scores.parquet (and its
# own train/best.pt and train/final.pt); DELINEATION_FUSED gets models.json (the listing)
# and scores.parquet (every member's rows, what the gather reads). Its checkpoints live in
# DELINEATION_FUSED/train. A change of an eval-only key reruns the job, whose members find
# their train/final.pt complete (exact key) and train no step: they are only scored again.
DELINEATION_FUSED = f"{OUT}/delineation/{{arch}}/fused"


if plan.config["delineation"]["fuse"]:

    rule train_delineation:
        input:
            roads=plan.prepared("roads"),
            weights=plan.weights_param(),
        output:
            models=f"{DELINEATION_FUSED}/models.json",
            scores=f"{DELINEATION_FUSED}/scores.parquet",
        params:
            config=plan.config_param("delineation", "train"),
            eval=plan.config_param("delineation", "eval"),
            settings=plan.settings_param("delineation", "train", "eval"),
            nets=plan.fused_nets_param("delineation"),
            members=plan.fused_members_param("delineation", DELINEATION_DIR),
            workdir=f"{DELINEATION_FUSED}/train",
        log:
            f"{OUT}/logs/delineation/{{arch}}/train_fused.log",
        resources:
            gpu=plan.gpus("delineation", "train"),
        threads: plan.threads(2)
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow delineation train_fused --members {params.members:q}"
            " --config {params.config:q} --eval-config {params.eval:q}"
            " --settings {params.settings:q} --threads {threads} --prepared {input.roads:q}"
            " --workdir {params.workdir:q} --out {output.models:q}"
            " --scores {output.scores:q} > {log:q} 2>&1"

else:

    # One process trains and then scores (the eval stage, its own config and precision). A
    # change of an eval-only key reruns this rule, whose trainer finds its checkpoint
    # complete (train/: the resume key holds only the train stage's config) and trains no
    # step: the U-Net is not retrained, only scored again.
    rule train_delineation:
        input:
            roads=plan.prepared("roads"),
            weights=plan.weights_param(),
        output:
            model=f"{DELINEATION_DIR}/model.pt",
            samples=f"{DELINEATION_DIR}/tiles.parquet",
            scores=f"{DELINEATION_DIR}/scores.parquet",
        params:
            config=plan.config_param("delineation", "train"),
            eval=plan.config_param("delineation", "eval"),
            settings=plan.settings_param("delineation", "train", "eval"),
            workdir=f"{DELINEATION_DIR}/train",
        log:
            f"{OUT}/logs/delineation/{{arch}}/{{layer}}/train_run{{run}}.log",
        resources:
            gpu=plan.gpus("delineation", "train"),
        threads: plan.threads(2)
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow delineation train --net {wildcards.arch}/{wildcards.layer}"
            " --run {wildcards.run} --config {params.config:q} --eval-config {params.eval:q}"
            " --settings {params.settings:q} --threads {threads} --prepared {input.roads:q}"
            " --workdir {params.workdir:q} --out {output.model:q} --samples {output.samples:q}"
            " --scores {output.scores:q} > {log:q} 2>&1"


BENCH_OUTPUTS["delineation"] = plan.fused_targets(
    "delineation", f"{DELINEATION_DIR}/scores.parquet", f"{DELINEATION_FUSED}/scores.parquet")


localrules:
    delineation,


rule delineation:
    input:
        BENCH_OUTPUTS["delineation"],
