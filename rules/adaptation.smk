# Adaptation to random distortion rankings, and the flaw probes (docs/adaptation.md).
#   rankings (once) -> triplets per dataset (once) -> fused training per (loss network, run)
#   -> evaluation of the baseline (once per loss network) and of every run
#   with adaptation.adapt_net.enabled: one fine-tuned copy of the loss network per
#   (loss network, run, comparison, ranking) -> its scores (variant adapted_net)
#   probe images (generated or hand-made) -> probe counts per loss network
# Targets: `adaptation`, `probes`.

ADAPTATION_DIR = f"{OUT}/adaptation/{{arch}}/{{layer}}"
ADAPTATION_EVAL = {
    "rankings": f"{OUT}/adaptation/rankings.json",
    "triplets": [f"{OUT}/adaptation/triplets/{d}.npz"
                 for d in config["adaptation"]["eval_datasets"]],
    "prepared": [plan.prepared(d) for d in plan.datasets("adaptation")],
}


rule adaptation_rankings:
    output:
        f"{OUT}/adaptation/rankings.json",
    params:
        config=plan.config_param("adaptation", "rankings"),
    log:
        f"{OUT}/logs/adaptation/rankings.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow adaptation rankings --config {params.config:q} --out {output:q}"
        " > {log:q} 2>&1"


rule adaptation_triplets:
    input:
        plan.prepared("{dataset}"),
    output:
        f"{OUT}/adaptation/triplets/{{dataset}}.npz",
    wildcard_constraints:
        dataset="svhn|stl10",
    params:
        config=plan.config_param("adaptation", "triplets"),
    log:
        f"{OUT}/logs/adaptation/triplets_{{dataset}}.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow adaptation triplets --config {params.config:q} --prepared {input:q}"
        " --out {output:q} > {log:q} 2>&1"


rule adaptation_train:
    input:
        rankings=f"{OUT}/adaptation/rankings.json",
        triplets=f"{OUT}/adaptation/triplets/svhn.npz",
        svhn=plan.prepared("svhn"),
        weights=plan.weights_param(),
    output:
        model=f"{ADAPTATION_DIR}/run{{run}}/adapter.pt",
    params:
        config=plan.config_param("adaptation", "train"),
        settings=plan.settings_param("adaptation", "train"),
        workdir=f"{ADAPTATION_DIR}/run{{run}}/train",
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/train_run{{run}}.log",
    resources:
        gpu=plan.gpus("adaptation", "train"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow adaptation train --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run}"
        " --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --rankings {input.rankings:q}"
        " --triplets {input.triplets:q} --prepared {input.svhn:q} --workdir {params.workdir:q}"
        " --out {output.model:q} > {log:q} 2>&1"


rule adaptation_baseline:
    input:
        **ADAPTATION_EVAL,
        weights=plan.weights_param(),
    output:
        f"{ADAPTATION_DIR}/baseline.parquet",
    params:
        config=plan.config_param("adaptation", "evaluate"),
        settings=plan.settings_param("adaptation", "evaluate"),
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/baseline.log",
    resources:
        gpu=plan.gpus("adaptation", "evaluate"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow adaptation evaluate --net {wildcards.arch}/{wildcards.layer}"
        " --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --rankings {input.rankings:q}"
        " --triplets {input.triplets:q} --prepared {input.prepared:q} --scores {output:q}"
        " > {log:q} 2>&1"


rule adaptation_evaluate:
    input:
        **ADAPTATION_EVAL,
        model=f"{ADAPTATION_DIR}/run{{run}}/adapter.pt",
        weights=plan.weights_param(),
    output:
        f"{ADAPTATION_DIR}/run{{run}}/scores.parquet",
    params:
        config=plan.config_param("adaptation", "evaluate"),
        settings=plan.settings_param("adaptation", "evaluate"),
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/evaluate_run{{run}}.log",
    resources:
        gpu=plan.gpus("adaptation", "evaluate"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow adaptation evaluate --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run}"
        " --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --rankings {input.rankings:q}"
        " --triplets {input.triplets:q} --prepared {input.prepared:q} --model {input.model:q}"
        " --scores {output:q} > {log:q} 2>&1"


ADAPT_NET_DIR = f"{ADAPTATION_DIR}/run{{run}}/net/{{comparison}}-{{norm}}/r{{ranking}}"
ADAPT_NET_WILDCARDS = {"comparison": r"spatial|mean|sort|spatial\+mean|spatial\+sort",
                       "norm": "norm|raw", "ranking": r"\d+"}


rule adaptation_train_net:
    input:
        rankings=f"{OUT}/adaptation/rankings.json",
        triplets=f"{OUT}/adaptation/triplets/svhn.npz",
        svhn=plan.prepared("svhn"),
        weights=plan.weights_param(),
    output:
        model=f"{ADAPT_NET_DIR}/adapter.pt",
    wildcard_constraints:
        **ADAPT_NET_WILDCARDS,
    params:
        config=plan.config_param("adaptation", "train_net"),
        settings=plan.settings_param("adaptation", "train_net"),
        workdir=f"{ADAPT_NET_DIR}/train",
        norm=lambda w: "true" if w.norm == "norm" else "false",
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/net_run{{run}}_{{comparison}}-{{norm}}_r{{ranking}}.log",
    resources:
        gpu=plan.gpus("adaptation", "train_net"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow adaptation train_net --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run} --comparison {wildcards.comparison:q}"
        " --channel-norm {params.norm} --ranking {wildcards.ranking}"
        " --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --rankings {input.rankings:q}"
        " --triplets {input.triplets:q} --prepared {input.svhn:q} --workdir {params.workdir:q}"
        " --out {output.model:q} > {log:q} 2>&1"


# the backbone comes from the model file: no weights input
rule adaptation_evaluate_net:
    input:
        **ADAPTATION_EVAL,
        model=f"{ADAPT_NET_DIR}/adapter.pt",
    output:
        f"{ADAPT_NET_DIR}/scores.parquet",
    wildcard_constraints:
        **ADAPT_NET_WILDCARDS,
    params:
        config=plan.config_param("adaptation", "evaluate_net"),
        settings=plan.settings_param("adaptation", "evaluate_net"),
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/net_evaluate_run{{run}}_{{comparison}}-{{norm}}_r{{ranking}}.log",
    resources:
        gpu=plan.gpus("adaptation", "evaluate_net"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow adaptation evaluate_net --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run}"
        " --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --rankings {input.rankings:q}"
        " --triplets {input.triplets:q} --prepared {input.prepared:q} --model {input.model:q}"
        " --scores {output:q} > {log:q} 2>&1"


BENCH_OUTPUTS["adaptation"] = (
    [f"{OUT}/adaptation/{n.arch}/{n.layer}/baseline.parquet" for n in plan.lossnets("adaptation")]
    + plan.targets(f"{ADAPTATION_DIR}/run{{run}}/scores.parquet", "adaptation")
    + [f"{ADAPT_NET_DIR}/scores.parquet".format(**j) for j in plan.adapt_net_jobs()]
)


rule adaptation:
    input:
        BENCH_OUTPUTS["adaptation"],


# ----------------------------------------------------------------------------- flaw probes


# the PNGs are written next to the manifest, which comes last (workflow/datasets/probes.py)
rule probes_images:
    output:
        f"{OUT}/probes/images/manifest.json",
    params:
        config=plan.config_param("probes", "images"),
    log:
        f"{OUT}/logs/probes/images.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow probes images --config {params.config:q} --out {output:q}"
        " > {log:q} 2>&1"


rule probes_score:
    input:
        images=f"{OUT}/probes/images/manifest.json",
        weights=plan.weights_param(),
    output:
        f"{OUT}/probes/{{arch}}/{{layer}}/scores.parquet",
    wildcard_constraints:
        layer=plan.layer_wildcard("probes"),  # pixel/<metric> too (no weights input)
    params:
        config=plan.config_param("probes", "score"),
        settings=plan.settings_param("probes", "score"),
    log:
        f"{OUT}/logs/probes/{{arch}}/{{layer}}.log",
    resources:
        gpu=plan.gpus("probes", "score"),
    threads: 1
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow probes score --net {wildcards.arch}/{wildcards.layer}"
        " --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --images {input.images:q}"
        " --scores {output:q} > {log:q} 2>&1"


BENCH_OUTPUTS["probes"] = plan.targets(f"{OUT}/probes/{{arch}}/{{layer}}/scores.parquet", "probes")


rule probes:
    input:
        BENCH_OUTPUTS["probes"],
