# Data: raw trees (downloaded or synthesized) -> prepared arrays; ImageNet weights.
# Outputs other rules depend on:  {RES}/raw/{dataset}/READY, {RES}/prepared/{dataset}/manifest.json
# and weights_input(arch) (the weight file of `arch` when lossnets.weights is imagenet).
#   snakemake --cores 1 download     # everything the configured benchmarks need (login node)
# config data.source picks which rule makes READY: download_dataset (localrule, the real
# files via workflow/download.py) or synthesize_dataset (small fakes in the same layout).

from workflow.lossnets import ARCHS as _ARCHS, weights_filename, weights_url
from workflow.config import weights_for

DATA = config["data"]
DATASETS = ["bapps", "coco", "sr_test", "roads", "svhn", "stl10"]
BENCH_DATASETS = {
    "similarity": ["bapps"],
    "super_resolution": ["coco", "sr_test"],
    "delineation": ["roads"],
    "autoencoder": ["svhn", "stl10"],
    "adaptation": ["svhn", "stl10", "bapps"],
    "probes": [],
}
NEEDED_DATASETS = sorted({d for b in config["benchmarks"] for d in BENCH_DATASETS.get(b, [])})


def data_options(dataset, purpose):
    """config data.<dataset> as a rule param, only the keys `purpose` depends on: the
    synthetic sizes reach synthesize only, pinned checksums download only (so resizing the
    fakes or pinning a hash never re-prepares real data)."""
    opts = dict(DATA.get(dataset) or {})
    if purpose != "synthesize":
        opts.pop("synthetic", None)
    if purpose != "download":
        opts.pop("checksums", None)
    return as_json(opts)


def dataset_urls(dataset):
    """The upstream URLs of a dataset (for `snakemake -n download` to list)."""
    import importlib

    try:
        files = importlib.import_module(f"workflow.datasets.{dataset}").FILES
    except (ImportError, AttributeError) as e:
        return f"(workflow.datasets.{dataset}.FILES unavailable: {e})"
    return " ".join(f.url for f in files)


def _weight_archs():
    ln = config["lossnets"]
    archs = list(dict.fromkeys([*ln["archs"], *ln.get("lpips_sets", [])]))
    return [a for a in archs if weights_for(config, a) == "imagenet"]


WEIGHT_ARCHS = _weight_archs()
WEIGHT_FILES = [f"{RES}/weights/{weights_filename(a)}" for a in WEIGHT_ARCHS]


def weights_input(arch):
    """Input for a job that builds `arch`: its weight file when the weights are imagenet."""
    return [f"{RES}/weights/{weights_filename(arch)}"] if arch in WEIGHT_ARCHS else []


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
            opts=lambda wc: data_options(wc.dataset, "synthesize"),
            seed=DATA.get("seed", 0),
        log:
            f"{RES}/logs/synthesize_{{dataset}}.log",
        shell:
            "python -m workflow download synthesize {wildcards.dataset} --raw {RES}/raw/{wildcards.dataset}"
            " --seed {params.seed} --options {params.opts:q} > {log:q} 2>&1"

else:

    localrules:
        download_dataset,

    rule download_dataset:
        output:
            f"{RES}/raw/{{dataset}}/READY",
        params:
            opts=lambda wc: data_options(wc.dataset, "download"),
            mirror=lambda wc: DATA.get("mirrors", {}).get(wc.dataset, ""),
            urls=lambda wc: dataset_urls(wc.dataset),
        message:
            "download {wildcards.dataset}: {params.urls}"
        log:
            f"{RES}/logs/download_{{dataset}}.log",
        retries: 1
        shell:
            "python -m workflow download fetch {wildcards.dataset} --raw {RES}/raw/{wildcards.dataset}"
            " --options {params.opts:q} --mirror {params.mirror:q} > {log:q} 2>&1"


rule prepare_dataset:
    input:
        f"{RES}/raw/{{dataset}}/READY",
    output:
        f"{RES}/prepared/{{dataset}}/manifest.json",
    params:
        opts=lambda wc: data_options(wc.dataset, "prepare"),
    log:
        f"{RES}/logs/prepare_{{dataset}}.log",
    threads: 8
    shell:
        "python -m workflow download prepare {wildcards.dataset} --raw {RES}/raw/{wildcards.dataset}"
        " --out {RES}/prepared/{wildcards.dataset} --options {params.opts:q} --workers {threads}"
        " > {log:q} 2>&1"


rule download_weights:
    output:
        WEIGHT_FILES or [f"{RES}/weights/{weights_filename(a)}" for a in _ARCHS],
    params:
        archs=" ".join(WEIGHT_ARCHS or _ARCHS),
        mirror=DATA.get("mirrors", {}).get("weights", ""),
    message:
        "download ImageNet weights: " + " ".join(weights_url(a) for a in (WEIGHT_ARCHS or _ARCHS))
    log:
        f"{RES}/logs/download_weights.log",
    shell:
        "python -m workflow weights --dir {RES}/weights --archs {params.archs}"
        " --mirror {params.mirror:q} > {log:q} 2>&1"


rule download:
    input:
        [f"{RES}/raw/{d}/READY" for d in NEEDED_DATASETS],
        WEIGHT_FILES,
