# Adaptation to random distortion rankings, and the flaw probes (docs/adaptation.md).
#   rankings (once) -> triplets per dataset (once) -> fused training per (loss network, run)
#   -> evaluation of the baseline (once per loss network) and of every run
#   probe images (generated or hand-made) -> probe counts per loss network
# Targets: `adaptation`, `probes`. Helpers live in workflow/benchmarks/adaptation.py.

from workflow.benchmarks.adaptation import rule_eval_args as adaptation_eval_args
from workflow.benchmarks.adaptation import rule_eval_inputs as adaptation_eval_inputs
from workflow.benchmarks.adaptation import select_nets as adaptation_select_nets
from workflow.benchmarks.adaptation import stage_config as adaptation_stage

ADAPTATION_NETS = adaptation_select_nets(config, "adaptation") if "adaptation" in config else []
PROBE_NETS = adaptation_select_nets(config, "probes") if "probes" in config else []
ADAPTATION_CFG = config.get("adaptation", {})


rule adaptation_rankings:
    output:
        f"{OUT}/adaptation/rankings.json",
    params:
        cfg=as_json(adaptation_stage(ADAPTATION_CFG, "rankings")),
    log:
        f"{OUT}/logs/adaptation/rankings.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.adaptation rankings --config {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule adaptation_triplets:
    input:
        f"{RES}/prepared/{{dataset}}/manifest.json",
    output:
        f"{OUT}/adaptation/triplets/{{dataset}}.npz",
    wildcard_constraints:
        dataset="svhn|stl10",
    params:
        cfg=as_json(adaptation_stage(ADAPTATION_CFG, "triplets")),
        prepared=lambda w, input: str(Path(input[0]).parent),
    log:
        f"{OUT}/logs/adaptation/triplets_{{dataset}}.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.adaptation triplets --config {params.cfg:q} --dataset {wildcards.dataset}"
        " --prepared {params.prepared:q} --out {output:q} > {log:q} 2>&1"


rule adaptation_train:
    input:
        rankings=f"{OUT}/adaptation/rankings.json",
        triplets=f"{OUT}/adaptation/triplets/svhn.npz",
        prepared=f"{RES}/prepared/svhn/manifest.json",
        weights=lambda w: weights_input(w.arch),
    output:
        f"{OUT}/adaptation/{{arch}}/{{layer}}/run{{run}}/adapter.pt",
    params:
        cfg=as_json(adaptation_stage(ADAPTATION_CFG, "train")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        workdir=lambda w: f"{OUT}/adaptation/{w.arch}/{w.layer}/run{w.run}/train",
        prepared=lambda w, input: str(Path(input.prepared).parent),
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/train_run{{run}}.log",
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.adaptation train --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --common {params.common:q} --net {wildcards.arch}/{wildcards.layer} --run {wildcards.run}"
        " --rankings {input.rankings:q} --triplets {input.triplets:q} --prepared {params.prepared:q}"
        " --workdir {params.workdir:q} --out {output:q} > {log:q} 2>&1"


rule adaptation_baseline:
    input:
        unpack(lambda w: adaptation_eval_inputs(config, RES, OUT)),
        rankings=f"{OUT}/adaptation/rankings.json",
        weights=lambda w: weights_input(w.arch),
    output:
        f"{OUT}/adaptation/{{arch}}/{{layer}}/baseline.parquet",
    params:
        cfg=as_json(adaptation_stage(ADAPTATION_CFG, "evaluate")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        args=lambda w, input: adaptation_eval_args(config, RES, input),
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/baseline.log",
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.adaptation evaluate --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --common {params.common:q} --net {wildcards.arch}/{wildcards.layer} --rankings {input.rankings:q}"
        " {params.args} --out {output:q} > {log:q} 2>&1"


rule adaptation_evaluate:
    input:
        unpack(lambda w: adaptation_eval_inputs(config, RES, OUT)),
        rankings=f"{OUT}/adaptation/rankings.json",
        adapter=f"{OUT}/adaptation/{{arch}}/{{layer}}/run{{run}}/adapter.pt",
        weights=lambda w: weights_input(w.arch),
    output:
        f"{OUT}/adaptation/{{arch}}/{{layer}}/run{{run}}/scores.parquet",
    params:
        cfg=as_json(adaptation_stage(ADAPTATION_CFG, "evaluate")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        args=lambda w, input: adaptation_eval_args(config, RES, input),
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/evaluate_run{{run}}.log",
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.adaptation evaluate --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --common {params.common:q} --net {wildcards.arch}/{wildcards.layer} --run {wildcards.run}"
        " --rankings {input.rankings:q} --adapter {input.adapter:q} {params.args} --out {output:q} > {log:q} 2>&1"


BENCH_OUTPUTS["adaptation"] = [
    f"{OUT}/adaptation/{net.arch}/{net.layer}/baseline.parquet" for net in ADAPTATION_NETS
] + [
    f"{OUT}/adaptation/{net.arch}/{net.layer}/run{run}/scores.parquet"
    for net in ADAPTATION_NETS
    for run in range(int(ADAPTATION_CFG.get("runs", 4)))
]


rule adaptation:
    input:
        BENCH_OUTPUTS["adaptation"],


# ----------------------------------------------------------------------------- flaw probes


rule probes_images:
    output:
        f"{OUT}/probes/images/manifest.json",
    params:
        cfg=lambda w: as_json({k: config["probes"].get(k) for k in ("images", "seed", "image_size")}),
        out=lambda w, output: str(Path(output[0]).parent),
    log:
        f"{OUT}/logs/probes/images.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.probes images --config {params.cfg:q} --out {params.out:q}"
        " > {log:q} 2>&1"


rule probes_score:
    input:
        images=f"{OUT}/probes/images/manifest.json",
        weights=lambda w: weights_input(w.arch),
    output:
        f"{OUT}/probes/{{arch}}/{{layer}}/scores.parquet",
    params:
        cfg=lambda w: as_json({k: v for k, v in config["probes"].items() if k != "lossnets"}),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        images=lambda w, input: str(Path(input.images).parent),
    log:
        f"{OUT}/logs/probes/{{arch}}/{{layer}}.log",
    threads: 1
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow benchmarks.probes score --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --common {params.common:q} --net {wildcards.arch}/{wildcards.layer} --images {params.images:q}"
        " --out {output:q} > {log:q} 2>&1"


BENCH_OUTPUTS["probes"] = [f"{OUT}/probes/{net.arch}/{net.layer}/scores.parquet" for net in PROBE_NETS]


rule probes:
    input:
        BENCH_OUTPUTS["probes"],
