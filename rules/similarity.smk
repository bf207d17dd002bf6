# Benchmark 1: BAPPS 2AFC and JND (docs/similarity.md).
#   prepared BAPPS -> one scoring job per architecture (all its loss networks x comparison
#   variants from one forward pass per batch) -> per-sample + summary Parquet.
# Target: `similarity`.

SIMILARITY_NETS = select_lossnets(config, "similarity") if "similarity" in config else []
SIMILARITY_ARCHS = list(dict.fromkeys(n.arch for n in SIMILARITY_NETS))


rule score_similarity:
    input:
        manifest=f"{RES}/prepared/bapps/manifest.json",
        # the state_dict file, or the ImageNet weights file (fetched by download_weights)
        weights=lambda wc: (
            [lossnet_params(config, wc.arch)["weights"]]
            if lossnet_params(config, wc.arch)["weights"] not in ("imagenet", "random")
            else weights_input(wc.arch)
        ),
    output:
        samples=f"{OUT}/similarity/{{arch}}/samples.parquet",
        summary=f"{OUT}/similarity/{{arch}}/summary.parquet",
    params:
        cfg=as_json(config.get("similarity", {})),
        # the arch's extractor settings plus exactly the loss networks scored for it
        lossnet=lambda wc: as_json(
            {
                **lossnet_params(config, wc.arch),
                "lossnets": [n.id for n in SIMILARITY_NETS if n.arch == wc.arch],
            }
        ),
        common=COMMON,
        prepared=lambda wc, input: str(Path(input.manifest).parent),
    log:
        f"{OUT}/logs/similarity/{{arch}}.log",
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.similarity score --arch {wildcards.arch}"
        " --config {params.cfg:q} --lossnet {params.lossnet:q} --common {params.common:q}"
        " --prepared {params.prepared:q} --out-samples {output.samples:q}"
        " --out-summary {output.summary:q} --threads {threads} > {log:q} 2>&1"


BENCH_OUTPUTS["similarity"] = [f"{OUT}/similarity/{a}/summary.parquet" for a in SIMILARITY_ARCHS]


localrules:
    similarity,


rule similarity:
    input:
        BENCH_OUTPUTS["similarity"],
