# Benchmark 1: BAPPS 2AFC and JND (docs/similarity.md).
#   prepared BAPPS -> one scoring job per architecture (all its loss networks x comparison
#   variants from one forward pass per batch) -> per-sample + summary Parquet.
# Target: `similarity`.

SIMILARITY_NETS = select_lossnets(config, "similarity") if "similarity" in config else []
SIMILARITY_ARCHS = list(dict.fromkeys(n.arch for n in SIMILARITY_NETS))


def _similarity_lossnet(wildcards):
    # the arch's extractor settings plus exactly the loss networks scored for it
    return as_json({
        **lossnet_params(config, wildcards.arch),
        "lossnets": [n.id for n in SIMILARITY_NETS if n.arch == wildcards.arch],
    })


def _similarity_weights(wildcards):
    lp = lossnet_params(config, wildcards.arch)
    if lp["weights"] not in ("imagenet", "random"):
        return [lp["weights"]]
    return weights_input(wildcards.arch)


rule score_similarity:
    input:
        manifest=f"{RES}/prepared/bapps/manifest.json",
        weights=_similarity_weights,
    output:
        samples=f"{OUT}/similarity/{{arch}}/samples.parquet",
        summary=f"{OUT}/similarity/{{arch}}/summary.parquet",
    params:
        cfg=as_json(config.get("similarity", {})),
        lossnet=_similarity_lossnet,
        common=COMMON,
        prepared=f"{RES}/prepared/bapps",
    log:
        f"{OUT}/logs/similarity/{{arch}}.log",
    threads: 2
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
