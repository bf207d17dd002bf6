# Data: raw trees (downloaded or synthesized) -> prepared arrays; the ImageNet weights.
# Outputs other rules depend on: {RES}/raw/{dataset}/READY, {RES}/prepared/{dataset}/manifest.json
# and {RES}/weights/<torchvision file> (plan.weights_input; with lossnets.weights_dir, the
# user's file and its verification record {RES}/weights/verified/<file>.json). The
# self-supervised presets' files (timm's Hugging Face model.safetensors) are fetched by the
# same rule as {RES}/weights/<repo>.safetensors, their sha256 recorded in checksums.json
# there (verified against archs.SSL_PRESETS' weights_sha256 where one is set).
#   snakemake --cores 1 download     # everything the configured benchmarks need (login node)
# Config data.source picks which rule makes READY: download_dataset (a localrule, the real
# files) or synthesize_dataset (small fakes in the same layout); a dataset in data.paths gets
# it from link_dataset instead (the user's own folder, verified, only read). docs/data.md has
# the sources and the folder layouts.

import os

from workflow.plan import DATASETS

DATA = config["data"]
LINKED = plan.linked_datasets()
# the datasets the download or synthesize rule makes (the others come from data.paths)
FETCHED = "|".join(d for d in DATASETS if d not in LINKED) or "(?!)"


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
        wildcard_constraints:
            dataset=FETCHED,
        params:
            options=lambda w: plan.data_options(w.dataset, "synthesize"),
            seed=DATA["seed"],
            raw=lambda w, output: os.path.dirname(output[0]),
        log:
            f"{RES}/logs/synthesize_{{dataset}}.log",
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow data synthesize {wildcards.dataset} --raw {params.raw:q}"
            " --seed {params.seed} --options {params.options:q} > {log:q} 2>&1"

else:

    localrules:
        download_dataset,

    rule download_dataset:
        output:
            f"{RES}/raw/{{dataset}}/READY",
        wildcard_constraints:
            dataset=FETCHED,
        params:
            options=lambda w: plan.data_options(w.dataset, "download"),
            mirror=plan.mirror_param(),
            settings=plan.data_settings_param(),
            urls=lambda w: " ".join(plan.dataset_urls(w.dataset)),
            raw=lambda w, output: os.path.dirname(output[0]),
        message:
            "download {wildcards.dataset}: {params.urls}"
        log:
            f"{RES}/logs/download_{{dataset}}.log",
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow data fetch {wildcards.dataset} --raw {params.raw:q}"
            " --options {params.options:q} --mirror {params.mirror:q}"
            " --settings {params.settings:q} > {log:q} 2>&1"


if LINKED:

    localrules:
        link_dataset,

    rule link_dataset:
        # config data.paths.<dataset>: the user's folder, verified like a download (layout,
        # counts, published checksums) and linked from the raw folder; never written to.
        # fingerprint (names, sizes, mtimes of the files prepare reads) reruns it on a change.
        output:
            f"{RES}/raw/{{dataset}}/READY",
        wildcard_constraints:
            dataset="|".join(LINKED),
        params:
            options=lambda w: plan.data_options(w.dataset, "link"),
            fingerprint=plan.fingerprint_param(),
            raw=lambda w, output: os.path.dirname(output[0]),
        message:
            "link {wildcards.dataset}: data.paths.{wildcards.dataset}"
        log:
            f"{RES}/logs/link_{{dataset}}.log",
        threads: plan.threads(4)
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow data fetch {wildcards.dataset} --raw {params.raw:q}"
            " --options {params.options:q} --settings '{{\"threads\": {threads}}}'"
            " > {log:q} 2>&1"


rule prepare_dataset:
    input:
        f"{RES}/raw/{{dataset}}/READY",
    output:
        f"{RES}/prepared/{{dataset}}/manifest.json",
    params:
        options=lambda w: plan.data_options(w.dataset, "prepare"),
        raw=lambda w, input: os.path.dirname(input[0]),
        out=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{RES}/logs/prepare_{{dataset}}.log",
    threads: plan.threads(8)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow data prepare {wildcards.dataset} --raw {params.raw:q}"
        " --out {params.out:q} --options {params.options:q} --threads {threads}"
        " > {log:q} 2>&1"


if plan.own_weights_dir():

    rule download_weights:
        # config lossnets.weights_dir (e.g. a torch hub cache): the user's files are only
        # verified (torchvision's sha256 prefix check); the records go to {RES}/weights/verified
        input:
            plan.weight_files(),
        output:
            plan.weight_targets(),
        params:
            archs=" ".join(plan.weight_archs()),
            custom=plan.custom_param(),
            source=plan.weights_dir(),
            folder=lambda w, output: os.path.dirname(output[0]),
        message:
            f"verify ImageNet weights in lossnets.weights_dir: {plan.weights_dir()}"
        log:
            f"{RES}/logs/download_weights.log",
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow data weights --out {params.folder:q} --archs {params.archs}"
            " --mirror {params.source:q} --custom {params.custom:q} > {log:q} 2>&1"

else:

    rule download_weights:
        # the configured imagenet archs; all 14 when none is (`snakemake download_weights`);
        # the self-supervised presets' Hugging Face files among them
        output:
            plan.weight_files(),
        params:
            archs=" ".join(plan.weight_archs()),
            custom=plan.custom_param(),
            mirror=plan.mirror_param("weights"),
            folder=lambda w, output: os.path.dirname(output[0]),
        message:
            f"download pretrained weights: {' '.join(plan.weight_urls())}"
        log:
            f"{RES}/logs/download_weights.log",
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow data weights --out {params.folder:q} --archs {params.archs}"
            " --mirror {params.mirror:q} --custom {params.custom:q} > {log:q} 2>&1"


rule download:
    input:
        [plan.raw_ready(d) for d in plan.needed_datasets()],
        plan.weight_targets(plan.imagenet_archs()),
