# Benchmark 1, the similarity family (docs/similarity.md): BAPPS 2AFC and JND, the MOS
# datasets (TID2013, KADID-10k, CSIQ: SRCC / KRCC / PLCC) and NIGHTS (2AFC).
#   prepared dataset -> one scoring job per (architecture, dataset) of similarity.datasets
#   (all its loss networks x comparison variants from one forward pass per image) ->
#   per-sample + summary Parquet. The pixel baselines pixel/<metric> are the jobs arch=pixel:
#   no weights input (plan.weights_input).
# Target: `similarity`.

SIMILARITY_DIR = f"{OUT}/similarity/{{arch}}/{{dataset}}"


rule score_similarity:
    input:
        data=lambda wildcards: plan.prepared(wildcards.dataset),
        weights=plan.weights_param(),
    output:
        samples=f"{SIMILARITY_DIR}/samples.parquet",
        scores=f"{SIMILARITY_DIR}/scores.parquet",
    params:
        config=plan.config_param("similarity", "score"),
        settings=plan.settings_param("similarity", "score"),
    log:
        f"{OUT}/logs/similarity/{{arch}}/{{dataset}}.log",
    resources:
        gpu=plan.gpus("similarity", "score"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow similarity score --config {params.config:q}"
        " --settings {params.settings:q} --threads {threads} --prepared {input.data:q}"
        " --samples {output.samples:q} --scores {output.scores:q} > {log:q} 2>&1"


BENCH_OUTPUTS["similarity"] = plan.targets(f"{SIMILARITY_DIR}/scores.parquet", "similarity")


localrules:
    similarity,


rule similarity:
    input:
        BENCH_OUTPUTS["similarity"],
