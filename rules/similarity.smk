# Benchmark 1: BAPPS 2AFC and JND (docs/similarity.md).
#   prepared BAPPS -> one scoring job per architecture (all its loss networks x comparison
#   variants from one forward pass per batch) -> per-sample + summary Parquet. The pixel
#   baselines pixel/<metric> are the job arch=pixel: no weights input (plan.weights_input).
# Target: `similarity`.

SIMILARITY_DIR = f"{OUT}/similarity/{{arch}}"


rule score_similarity:
    input:
        bapps=plan.prepared("bapps"),
        weights=plan.weights_param(),
    output:
        samples=f"{SIMILARITY_DIR}/samples.parquet",
        scores=f"{SIMILARITY_DIR}/scores.parquet",
    params:
        config=plan.config_param("similarity", "score"),
        settings=plan.settings_param("similarity", "score"),
    log:
        f"{OUT}/logs/similarity/{{arch}}.log",
    resources:
        gpu=plan.gpus("similarity", "score"),
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow similarity score --config {params.config:q}"
        " --settings {params.settings:q} --threads {threads} --prepared {input.bapps:q}"
        " --samples {output.samples:q} --scores {output.scores:q} > {log:q} 2>&1"


BENCH_OUTPUTS["similarity"] = plan.targets(f"{SIMILARITY_DIR}/scores.parquet", "similarity")


localrules:
    similarity,


rule similarity:
    input:
        BENCH_OUTPUTS["similarity"],
