# Data: raw trees (downloaded or synthesized) -> prepared arrays; ImageNet weights.
# Outputs other rules depend on:  {RES}/raw/{dataset}/READY, {RES}/prepared/{dataset}/manifest.json
# and weights_input(arch) (the file `arch`'s weights are read from: imagenet or a state_dict path).
#   snakemake --cores 1 download     # everything the configured benchmarks need (login node)
# config data.source picks which rule makes READY: download_dataset (localrule, the real
# files via workflow/download.py) or synthesize_dataset (small fakes in the same layout).
# Helpers live in workflow/download.py; docs/data.md describes sources and layouts.

import functools
import os

from workflow import download as _dl
from workflow.lossnets import ARCHS as _ARCHS, weights_url

DATA = config["data"]
DATASETS = ["bapps", "coco", "sr_test", "roads", "svhn", "stl10"]
NEEDED_DATASETS = _dl.needed_datasets(config)
WEIGHT_ARCHS = _dl.imagenet_weight_archs(config)
WEIGHT_FILES = _dl.weight_files(config)
# weights_input(arch) -> [weight file] or []: for the benchmark rules' inputs
weights_input = functools.partial(_dl.weights_input, config)


wildcard_constraints:
    dataset="|".join(DATASETS),


localrules:
    download,
    download_weights,


if DATA["source"] == "synthetic":

    localrules:
        synthesize_dataset,

    rule synthesize_dataset:
        output:
            f"{RES}/raw/{{dataset}}/READY",
        params:
            opts=lambda wc: _dl.rule_options(config, wc.dataset, "synthesize"),
            seed=DATA.get("seed", 0),
            raw=lambda wc: f"{RES}/raw/{wc.dataset}",
        log:
            f"{RES}/logs/synthesize_{{dataset}}.log",
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow download synthesize {wildcards.dataset} --raw {params.raw:q}"
            " --seed {params.seed} --options {params.opts:q} > {log:q} 2>&1"

else:

    localrules:
        download_dataset,

    rule download_dataset:
        output:
            f"{RES}/raw/{{dataset}}/READY",
        params:
            opts=lambda wc: _dl.rule_options(config, wc.dataset, "download"),
            mirror=lambda wc: DATA.get("mirrors", {}).get(wc.dataset, ""),
            urls=lambda wc: _dl.dataset_urls(wc.dataset),
            raw=lambda wc: f"{RES}/raw/{wc.dataset}",
        message:
            "download {wildcards.dataset}: {params.urls}"
        log:
            f"{RES}/logs/download_{{dataset}}.log",
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow download fetch {wildcards.dataset} --raw {params.raw:q}"
            " --options {params.opts:q} --mirror {params.mirror:q} > {log:q} 2>&1"


rule prepare_dataset:
    input:
        f"{RES}/raw/{{dataset}}/READY",
    output:
        f"{RES}/prepared/{{dataset}}/manifest.json",
    params:
        opts=lambda wc: _dl.rule_options(config, wc.dataset, "prepare"),
        raw=lambda wc: f"{RES}/raw/{wc.dataset}",
        out=lambda wc: f"{RES}/prepared/{wc.dataset}",
    log:
        f"{RES}/logs/prepare_{{dataset}}.log",
    threads: 8
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow download prepare {wildcards.dataset} --raw {params.raw:q}"
        " --out {params.out:q} --options {params.opts:q} --workers {threads} > {log:q} 2>&1"


rule download_weights:
    # the configured imagenet archs; all 14 when none is (`snakemake download_weights`)
    output:
        WEIGHT_FILES or _dl.weight_files(config, _ARCHS),
    params:
        archs=" ".join(WEIGHT_ARCHS or _ARCHS),
        mirror=DATA.get("mirrors", {}).get("weights", ""),
        folder=lambda wc, output: os.path.dirname(output[0]),
    message:
        "download ImageNet weights: " + " ".join(weights_url(a) for a in (WEIGHT_ARCHS or _ARCHS))
    log:
        f"{RES}/logs/download_weights.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow weights --dir {params.folder:q} --archs {params.archs}"
        " --mirror {params.mirror:q} > {log:q} 2>&1"


rule download:
    input:
        [f"{RES}/raw/{d}/READY" for d in NEEDED_DATASETS],
        WEIGHT_FILES,
