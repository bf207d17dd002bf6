# Benchmark 3: road delineation (refinement U-Net trained with BCE + 0.01 x deep perceptual
# loss; docs/delineation.md). Per loss network and run, under
# {OUT}/delineation/{arch}/{layer}/run{run}/:
#   train/     checkpoints (last.pt, best.pt) and metrics.csv of the training harness
#   model.pt   the kept model (best validation quality) + meta  <- train_delineation
#   tiles.parquet, scores.parquet  per-tile and summary rows     <- train_delineation (after
#              training, in the same process)
# --config: what the stage's numbers depend on (a rerun trigger); --settings: how it runs
# (tile_size, inference_batch, data_on_device, device, threads; never a rerun trigger).
# Target: `delineation`.

DELINEATION_DIR = f"{OUT}/delineation/{{arch}}/{{layer}}/run{{run}}"


# One process trains and then scores (the eval stage, its own config and precision). A
# change of an eval-only key reruns this rule, whose trainer finds its checkpoint complete
# (train/: the resume key holds only the train stage's config) and trains no step: the
# U-Net is not retrained, only scored again.
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


BENCH_OUTPUTS["delineation"] = plan.targets(f"{DELINEATION_DIR}/scores.parquet", "delineation")


localrules:
    delineation,


rule delineation:
    input:
        BENCH_OUTPUTS["delineation"],
