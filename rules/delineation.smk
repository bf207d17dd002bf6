# Benchmark 3: road delineation (refinement U-Net trained with BCE + 0.01 x deep perceptual loss).
# Per loss network and run, under {OUT}/delineation/{arch}/{layer}/run{run}/:
#   train/     checkpoints (last.pt, best.pt) and metrics.csv of the training harness
#   model.pt   the kept model (best validation quality)       <- train_delineation
#   tiles.parquet, scores.parquet  per-tile and summary rows   <- eval_delineation
# Target: `delineation` (every configured loss network x run).

from workflow.benchmarks.delineation import stage_config as delineation_stage

DELINEATION_NETS = select_lossnets(config, "delineation") if "delineation" in config else []


rule train_delineation:
    input:
        roads=f"{RES}/prepared/roads/manifest.json",
        # the loss network's weights file when one is read (fetched by `download_weights`)
        weights=lambda w: weights_input(w.arch),
    output:
        f"{OUT}/delineation/{{arch}}/{{layer}}/run{{run}}/model.pt",
    params:
        cfg=as_json(delineation_stage(config.get("delineation", {}), "train")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        data=lambda w, input: str(Path(input.roads).parent),
        workdir=lambda w: f"{OUT}/delineation/{w.arch}/{w.layer}/run{w.run}/train",
    log:
        f"{OUT}/logs/delineation/{{arch}}/{{layer}}/train_run{{run}}.log",
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.delineation train --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --layer {wildcards.layer} --common {params.common:q} --data {params.data:q} --run {wildcards.run}"
        " --threads {threads} --workdir {params.workdir:q} --out {output:q} > {log:q} 2>&1"


rule eval_delineation:
    input:
        roads=f"{RES}/prepared/roads/manifest.json",
        model=f"{OUT}/delineation/{{arch}}/{{layer}}/run{{run}}/model.pt",
    output:
        tiles=f"{OUT}/delineation/{{arch}}/{{layer}}/run{{run}}/tiles.parquet",
        scores=f"{OUT}/delineation/{{arch}}/{{layer}}/run{{run}}/scores.parquet",
    params:
        cfg=as_json(delineation_stage(config.get("delineation", {}), "eval")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        data=lambda w, input: str(Path(input.roads).parent),
    log:
        f"{OUT}/logs/delineation/{{arch}}/{{layer}}/eval_run{{run}}.log",
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.delineation eval --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --layer {wildcards.layer} --common {params.common:q} --data {params.data:q} --run {wildcards.run}"
        " --threads {threads} --model {input.model:q} --tiles {output.tiles:q}"
        " --scores {output.scores:q} > {log:q} 2>&1"


BENCH_OUTPUTS["delineation"] = [
    f"{OUT}/delineation/{net.arch}/{net.layer}/run{run}/scores.parquet"
    for net in DELINEATION_NETS
    for run in range(int(config.get("delineation", {}).get("runs", 1)))
]


rule delineation:
    input:
        BENCH_OUTPUTS["delineation"],
