# Benchmark 4: autoencoder + MLP dimensionality reduction per loss network (docs/autoencoder.md).
#   prepared SVHN / STL-10 -> train_autoencoder per (architecture, dataset) -> fit_mlps
#   (encode + MLPs) per (net, dataset, run)
#   (autoencoder.fuse: false: train_autoencoder per (net, dataset, run))
# {net} is a loss network "arch/layer" (files under autoencoder/{arch}/{layer}/...) or "pixel",
# the pixel-MSE baseline (autoencoder/pixel/..., scores with arch = layer = "").
# Checkpoints live in <job>/train/ and <job>/mlps/ (not rule outputs, so a rerun after
# preemption resumes; the harness exits with code 75 on SIGTERM/SIGUSR1: use --retries).
# Target: `autoencoder`.

AE_DIR = f"{OUT}/autoencoder/{{net}}/{{dataset}}/run{{run}}"
AE_LOG = f"{OUT}/logs/autoencoder/{{net}}/{{dataset}}_run{{run}}"
AE_WILDCARDS = {"net": r"pixel|[a-z0-9_]+/(?:[1-4]|lpips)", "dataset": "svhn|stl10"}
# autoencoder.fuse (default): ONE train_autoencoder job per architecture and dataset trains
# all its layers and runs together (the pixel baseline's runs: arch "pixel"; docs/
# autoencoder.md, "Fused training"). Each member's folder (AE_DIR) gets autoencoder.pt, the
# file of the per-model job; AE_FUSED gets models.json (the listing, written last: what
# fit_mlps waits for) and the group's checkpoints in train/. A member whose autoencoder.pt
# was trained under its exact resume key is not trained again.
AE_FUSED = f"{OUT}/autoencoder/{{arch}}/fused/{{dataset}}"


if plan.config["autoencoder"]["fuse"]:

    rule train_autoencoder:
        input:
            data=plan.prepared("{dataset}"),
            weights=plan.weights_param(),
        output:
            models=f"{AE_FUSED}/models.json",
        wildcard_constraints:
            arch=r"pixel|[a-z0-9_]+",
            dataset=AE_WILDCARDS["dataset"],
        params:
            config=plan.config_param("autoencoder", "train"),
            settings=plan.settings_param("autoencoder", "train"),
            nets=plan.fused_nets_param("autoencoder"),
            members=plan.fused_members_param("autoencoder", AE_DIR),
            workdir=f"{AE_FUSED}/train",
        log:
            f"{OUT}/logs/autoencoder/{{arch}}/{{dataset}}_train_fused.log",
        resources:
            gpu=plan.gpus("autoencoder", "train"),
        threads: plan.threads(2)
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow autoencoder train_fused --dataset {wildcards.dataset}"
            " --members {params.members:q} --config {params.config:q}"
            " --settings {params.settings:q} --threads {threads} --prepared {input.data:q}"
            " --workdir {params.workdir:q} --out {output.models:q} > {log:q} 2>&1"

else:

    rule train_autoencoder:
        input:
            data=plan.prepared("{dataset}"),
            weights=plan.weights_param(),
        output:
            model=f"{AE_DIR}/autoencoder.pt",
        wildcard_constraints:
            **AE_WILDCARDS,
        params:
            config=plan.config_param("autoencoder", "train"),
            settings=plan.settings_param("autoencoder", "train"),
            workdir=f"{AE_DIR}/train",
        log:
            f"{AE_LOG}_train.log",
        resources:
            gpu=plan.gpus("autoencoder", "train"),
        threads: plan.threads(2)
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow autoencoder train --net {wildcards.net}"
            " --dataset {wildcards.dataset} --run {wildcards.run} --config {params.config:q}"
            " --settings {params.settings:q} --threads {threads} --prepared {input.data:q}"
            " --workdir {params.workdir:q} --out {output.model:q} > {log:q} 2>&1"


# fit_mlps encodes the labelled splits (the encode stage, its own config and precision) and
# fits the MLP grid in one process; codes.npz stays for the next fit and is encoded again
# only when the model, the data or the encode config changed (the key it holds). Changing
# an MLP key reruns this rule alone: the autoencoder is another rule's output.
rule fit_mlps:
    input:
        data=plan.prepared("{dataset}"),
        # the model file, or with autoencoder.fuse the listing its fused job writes last
        trained=plan.ae_model_input(f"{AE_DIR}/autoencoder.pt", f"{AE_FUSED}/models.json"),
    output:
        samples=f"{AE_DIR}/mlps.parquet",
        scores=f"{AE_DIR}/scores.parquet",
    wildcard_constraints:
        **AE_WILDCARDS,
    params:
        config=plan.config_param("autoencoder", "mlp"),
        encode=plan.config_param("autoencoder", "encode"),
        settings=plan.settings_param("autoencoder", "mlp", "encode"),
        model=f"{AE_DIR}/autoencoder.pt",
        codes=f"{AE_DIR}/codes.npz",
        workdir=f"{AE_DIR}/mlps",
    log:
        f"{AE_LOG}_fit_mlps.log",
    resources:
        gpu=plan.gpus("autoencoder", "mlp"),
    threads: 1
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow autoencoder mlp --net {wildcards.net}"
        " --dataset {wildcards.dataset} --run {wildcards.run} --config {params.config:q}"
        " --encode-config {params.encode:q} --settings {params.settings:q}"
        " --threads {threads} --model {params.model:q} --prepared {input.data:q}"
        " --codes {params.codes:q} --workdir {params.workdir:q}"
        " --samples {output.samples:q} --scores {output.scores:q} > {log:q} 2>&1"


BENCH_OUTPUTS["autoencoder"] = plan.targets(f"{AE_DIR}/scores.parquet", "autoencoder")


localrules:
    autoencoder,


rule autoencoder:
    input:
        BENCH_OUTPUTS["autoencoder"],
