# Benchmark 2: super-resolution per loss network (docs/super_resolution.md).
#   prepared COCO -> train_sr per (loss network, scale, run) -> eval_sr on Set5/Set14/BSD100
# Checkpoints live in {OUT}/super_resolution/{arch}/{layer}/x{scale}/run{run}/train/ (not rule
# outputs, so a rerun after preemption resumes from train/last.pt; the harness exits with code
# 75 on SIGTERM/SIGUSR1 after checkpointing: run with --retries to resume automatically).
# Target: `super_resolution`.

import os

from workflow.benchmarks.super_resolution import stage_config as stage_config_sr

SR_CFG = config.get("super_resolution", {})
SR_NETS = select_lossnets(config, "super_resolution") if "super_resolution" in config else []
SR_DIR = f"{OUT}/super_resolution/{{arch}}/{{layer}}/x{{scale}}/run{{run}}"


rule train_sr:
    conda:
        "../envs/workflow.yaml"
    input:
        coco=f"{RES}/prepared/coco/manifest.json",
        weights=lambda w: weights_input(w.arch),
    output:
        model=f"{SR_DIR}/model.pt",
        meta=f"{SR_DIR}/model.json",
    wildcard_constraints:
        scale=r"\d+",
    params:
        cfg=as_json(stage_config_sr(SR_CFG, "train")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        coco=lambda w, input: os.path.dirname(input.coco),
        workdir=f"{SR_DIR}/train",
    log:
        f"{OUT}/logs/super_resolution/{{arch}}/{{layer}}/train_x{{scale}}_run{{run}}.log",
    threads: 2
    shell:
        "python -m workflow benchmarks.super_resolution train --config {params.cfg:q}"
        " --common {params.common:q} --lossnet {params.lossnet:q} --arch {wildcards.arch}"
        " --layer {wildcards.layer} --scale {wildcards.scale} --run {wildcards.run}"
        " --coco {params.coco:q} --workdir {params.workdir:q} --model {output.model:q} > {log:q} 2>&1"


rule eval_sr:
    conda:
        "../envs/workflow.yaml"
    input:
        model=f"{SR_DIR}/model.pt",
        sr_test=f"{RES}/prepared/sr_test/manifest.json",
    output:
        per_image=f"{SR_DIR}/images.parquet",
        summary=f"{SR_DIR}/scores.parquet",
    wildcard_constraints:
        scale=r"\d+",
    params:
        cfg=as_json(stage_config_sr(SR_CFG, "eval")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        sr_test=lambda w, input: os.path.dirname(input.sr_test),
    log:
        f"{OUT}/logs/super_resolution/{{arch}}/{{layer}}/eval_x{{scale}}_run{{run}}.log",
    threads: 2
    shell:
        "python -m workflow benchmarks.super_resolution eval --config {params.cfg:q}"
        " --common {params.common:q} --lossnet {params.lossnet:q} --arch {wildcards.arch}"
        " --layer {wildcards.layer} --scale {wildcards.scale} --run {wildcards.run}"
        " --model {input.model:q} --sr-test {params.sr_test:q} --per-image {output.per_image:q}"
        " --summary {output.summary:q} > {log:q} 2>&1"


BENCH_OUTPUTS["super_resolution"] = [
    f"{OUT}/super_resolution/{net.arch}/{net.layer}/x{scale}/run{run}/scores.parquet"
    for net in SR_NETS
    for scale in SR_CFG.get("scales", [4, 8])
    for run in range(int(SR_CFG.get("runs", 1)))
]


rule super_resolution:
    input:
        BENCH_OUTPUTS["super_resolution"],
