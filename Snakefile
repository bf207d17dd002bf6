# Benchmarks loss networks for deep perceptual loss and similarity.
#   uv run snakemake --cores all                              # the full study
#   uv run snakemake --cores all --configfile config/demo.yaml  # the offline demo
# Targets: all, download, similarity, super_resolution, delineation, autoencoder,
# adaptation, probes, scores, figures. Rules are thin: each shells out to
# `python -m workflow ...` with only its own config subsection as params.

from pathlib import Path

from snakemake.utils import min_version, validate

from workflow.config import as_json, common, lossnet_params, select_lossnets

min_version("9.0")


report: "workflow/report/workflow.rst"


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")

RES = config["resources_dir"]
OUT = config["results_dir"]
COMMON = as_json(common(config))

# Each rules file appends the per-job summary Parquet files (scores schema) of its
# benchmark here; `gather_scores` concatenates those of the enabled benchmarks.
BENCH_OUTPUTS: dict[str, list[str]] = {}


wildcard_constraints:
    arch="[a-z0-9_]+",
    layer="[1-4]|lpips",
    run=r"\d+",


include: "rules/data.smk"
include: "rules/similarity.smk"
include: "rules/super_resolution.smk"
include: "rules/delineation.smk"
include: "rules/autoencoder.smk"
include: "rules/adaptation.smk"
include: "rules/analysis.smk"


localrules:
    all,
    gather_scores,


rule all:
    default_target: True
    input:
        f"{OUT}/scores.parquet",
        ANALYSIS_OUTPUTS,


rule gather_scores:
    conda:
        "envs/workflow.yaml"
    input:
        [p for b in config["benchmarks"] for p in BENCH_OUTPUTS.get(b, [])],
    output:
        f"{OUT}/scores.parquet",
    log:
        f"{OUT}/logs/gather_scores.log",
    shell:
        "python -m workflow results gather --out {output:q} {input:q} > {log:q} 2>&1"
