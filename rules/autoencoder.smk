# Benchmark 4: autoencoder + MLP dimensionality reduction per loss network (docs/autoencoder.md).
#   prepared SVHN / STL-10 -> train_autoencoder -> encode -> fit_mlps, per (net, dataset, run)
# {net} is a loss network "arch/layer" (files under autoencoder/{arch}/{layer}/...) or "pixel",
# the pixel-MSE baseline (autoencoder/pixel/..., scores with arch = layer = "").
# Training checkpoints live in <job>/train/ and <job>/mlps/ (not rule outputs, so a rerun after
# preemption resumes; the harness exits with code 75 on SIGTERM/SIGUSR1: use --retries).
# Target: `autoencoder`.

from workflow.benchmarks.autoencoder import stage_config as stage_config_ae

AE_CFG = config.get("autoencoder", {})
AE_NETS = (
    [n.id for n in select_lossnets(config, "autoencoder")] if "autoencoder" in config else []
) + (["pixel"] if AE_CFG.get("pixel_baseline", True) else [])
AE_DIR = f"{OUT}/autoencoder/{{net}}/{{dataset}}/run{{run}}"
AE_LOG = f"{OUT}/logs/autoencoder/{{net}}/{{dataset}}_run{{run}}"
AE_WILDCARDS = {"net": r"pixel|[a-z0-9_]+/(?:[1-4]|lpips)", "dataset": "svhn|stl10"}


rule train_autoencoder:
    input:
        data=f"{RES}/prepared/{{dataset}}/manifest.json",
        weights=lambda w: [] if w.net == "pixel" else weights_input(w.net.split("/")[0]),
    output:
        model=f"{AE_DIR}/autoencoder.pt",
        info=f"{AE_DIR}/train.json",
    wildcard_constraints:
        **AE_WILDCARDS,
    params:
        cfg=as_json(stage_config_ae(AE_CFG, "train")),
        lossnet=lambda w: (
            "{}" if w.net == "pixel" else as_json(lossnet_params(config, w.net.split("/")[0]))
        ),
        common=COMMON,
        prepared=lambda w, input: str(Path(input.data).parent),
        dir=lambda w, output: str(Path(output.model).parent),
    log:
        f"{AE_LOG}_train.log",
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.autoencoder train --dir {params.dir:q} --dataset {wildcards.dataset}"
        " --prepared {params.prepared:q} --net {wildcards.net} --run {wildcards.run}"
        " --config {params.cfg:q} --common {params.common:q} --lossnet {params.lossnet:q} > {log:q} 2>&1"


rule encode:
    input:
        data=f"{RES}/prepared/{{dataset}}/manifest.json",
        model=f"{AE_DIR}/autoencoder.pt",
    output:
        f"{AE_DIR}/codes.npz",
    wildcard_constraints:
        **AE_WILDCARDS,
    params:
        cfg=as_json(stage_config_ae(AE_CFG, "encode")),
        common=COMMON,
        prepared=lambda w, input: str(Path(input.data).parent),
        dir=lambda w, output: str(Path(output[0]).parent),
    log:
        f"{AE_LOG}_encode.log",
    threads: 1
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.autoencoder encode --dir {params.dir:q} --dataset {wildcards.dataset}"
        " --prepared {params.prepared:q} --config {params.cfg:q} --common {params.common:q} > {log:q} 2>&1"


rule fit_mlps:
    input:
        codes=f"{AE_DIR}/codes.npz",
        info=f"{AE_DIR}/train.json",
    output:
        scores=f"{AE_DIR}/scores.parquet",
        mlps=f"{AE_DIR}/mlps.parquet",
    wildcard_constraints:
        **AE_WILDCARDS,
    params:
        cfg=as_json(stage_config_ae(AE_CFG, "mlp")),
        common=COMMON,
        dir=lambda w, output: str(Path(output.scores).parent),
    log:
        f"{AE_LOG}_fit_mlps.log",
    threads: 1
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.autoencoder fit-mlps --dir {params.dir:q} --dataset {wildcards.dataset}"
        " --run {wildcards.run} --config {params.cfg:q} --common {params.common:q} > {log:q} 2>&1"


BENCH_OUTPUTS["autoencoder"] = [
    f"{OUT}/autoencoder/{net}/{dataset}/run{run}/scores.parquet"
    for net in AE_NETS
    for dataset in AE_CFG.get("datasets", ["svhn", "stl10"])
    for run in range(int(AE_CFG.get("runs", 1)))
]


rule autoencoder:
    input:
        BENCH_OUTPUTS["autoencoder"],
