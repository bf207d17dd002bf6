# Data: raw trees (downloaded or synthesized) -> prepared arrays.
# Outputs other rules depend on:  {RES}/raw/{dataset}/READY  and  {RES}/prepared/{dataset}/manifest.json


rule synthesize_dataset:
    output:
        f"{RES}/raw/{{dataset}}/READY",
    log:
        f"{RES}/logs/synthesize_{{dataset}}.log",
    shell:
        "python -m workflow datasets.{wildcards.dataset} synthesize --raw {RES}/raw/{wildcards.dataset} > {log:q} 2>&1"


rule prepare_dataset:
    input:
        f"{RES}/raw/{{dataset}}/READY",
    output:
        f"{RES}/prepared/{{dataset}}/manifest.json",
    log:
        f"{RES}/logs/prepare_{{dataset}}.log",
    threads: 2
    shell:
        "python -m workflow datasets.{wildcards.dataset} prepare --raw {RES}/raw/{wildcards.dataset}"
        " --out {RES}/prepared/{wildcards.dataset} > {log:q} 2>&1"
