# Adaptation to random distortion rankings, and the flaw probes (docs/adaptation.md).
#   rankings (once) -> triplets per dataset (once) -> fused training per (loss network, run)
#   -> evaluation of the baseline (once per loss network) and of every run
#   probe images (generated or hand-made) -> probe counts per loss network
# Targets: `adaptation`, `probes`.

from workflow.benchmarks.adaptation import select_nets, stage_config
from workflow.lossnets import weights_filename

ADAPTATION_NETS = select_nets(config, "adaptation") if "adaptation" in config else []
PROBE_NETS = select_nets(config, "probes") if "probes" in config else []


def _adaptation_weights(wildcards):
    # the ImageNet weights file when the job reads one (fetched by `download_weights`)
    lp = lossnet_params(config, wildcards.arch)
    if lp["weights"] == "imagenet":
        return [f"{RES}/weights/{weights_filename(wildcards.arch)}"]
    if lp["weights"] != "random":
        return [lp["weights"]]
    return []


def _adaptation_eval_inputs(wildcards):
    ada = config["adaptation"]
    files = {f"triplets_{d}": f"{OUT}/adaptation/triplets/{d}.npz" for d in ada["eval_datasets"]}
    files |= {f"prepared_{d}": f"{RES}/prepared/{d}/manifest.json" for d in ada["eval_datasets"]}
    if ada.get("bapps", True):
        files["bapps"] = f"{RES}/prepared/bapps/manifest.json"
    return files


def _adaptation_eval_args(wildcards, input):
    ada = config["adaptation"]
    trip = " ".join(f"{d}={input[f'triplets_{d}']}" for d in ada["eval_datasets"])
    prep = " ".join(f"{d}={RES}/prepared/{d}" for d in ada["eval_datasets"])
    args = (f"--triplets {trip} " if trip else "") + (f"--prepared {prep} " if prep else "")
    if ada.get("bapps", True):
        args += f"--bapps {RES}/prepared/bapps"
    return args


rule adaptation_rankings:
    output:
        f"{OUT}/adaptation/rankings.json",
    params:
        cfg=as_json(stage_config(config.get("adaptation", {}), "rankings")),
    log:
        f"{OUT}/logs/adaptation/rankings.log",
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
        cfg=as_json(stage_config(config.get("adaptation", {}), "triplets")),
        prepared=lambda w: f"{RES}/prepared/{w.dataset}",
    log:
        f"{OUT}/logs/adaptation/triplets_{{dataset}}.log",
    shell:
        "python -m workflow benchmarks.adaptation triplets --config {params.cfg:q} --dataset {wildcards.dataset}"
        " --prepared {params.prepared:q} --out {output:q} > {log:q} 2>&1"


rule adaptation_train:
    input:
        rankings=f"{OUT}/adaptation/rankings.json",
        triplets=f"{OUT}/adaptation/triplets/svhn.npz",
        prepared=f"{RES}/prepared/svhn/manifest.json",
        weights=_adaptation_weights,
    output:
        f"{OUT}/adaptation/{{arch}}/{{layer}}/run{{run}}/adapter.pt",
    params:
        cfg=as_json(stage_config(config.get("adaptation", {}), "train")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        workdir=lambda w: f"{OUT}/adaptation/{w.arch}/{w.layer}/run{w.run}/train",
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/train_run{{run}}.log",
    threads: 2
    shell:
        "python -m workflow benchmarks.adaptation train --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --common {params.common:q} --net {wildcards.arch}/{wildcards.layer} --run {wildcards.run}"
        " --rankings {input.rankings:q} --triplets {input.triplets:q} --prepared {RES}/prepared/svhn"
        " --workdir {params.workdir:q} --out {output:q} > {log:q} 2>&1"


rule adaptation_baseline:
    input:
        unpack(_adaptation_eval_inputs),
        rankings=f"{OUT}/adaptation/rankings.json",
        weights=_adaptation_weights,
    output:
        f"{OUT}/adaptation/{{arch}}/{{layer}}/baseline.parquet",
    params:
        cfg=as_json(stage_config(config.get("adaptation", {}), "evaluate")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        args=_adaptation_eval_args,
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/baseline.log",
    threads: 2
    shell:
        "python -m workflow benchmarks.adaptation evaluate --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --common {params.common:q} --net {wildcards.arch}/{wildcards.layer} --rankings {input.rankings:q}"
        " {params.args} --out {output:q} > {log:q} 2>&1"


rule adaptation_evaluate:
    input:
        unpack(_adaptation_eval_inputs),
        rankings=f"{OUT}/adaptation/rankings.json",
        adapter=f"{OUT}/adaptation/{{arch}}/{{layer}}/run{{run}}/adapter.pt",
        weights=_adaptation_weights,
    output:
        f"{OUT}/adaptation/{{arch}}/{{layer}}/run{{run}}/scores.parquet",
    params:
        cfg=as_json(stage_config(config.get("adaptation", {}), "evaluate")),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
        args=_adaptation_eval_args,
    log:
        f"{OUT}/logs/adaptation/{{arch}}/{{layer}}/evaluate_run{{run}}.log",
    threads: 2
    shell:
        "python -m workflow benchmarks.adaptation evaluate --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --common {params.common:q} --net {wildcards.arch}/{wildcards.layer} --run {wildcards.run}"
        " --rankings {input.rankings:q} --adapter {input.adapter:q} {params.args} --out {output:q} > {log:q} 2>&1"


BENCH_OUTPUTS["adaptation"] = [
    f"{OUT}/adaptation/{net.arch}/{net.layer}/baseline.parquet" for net in ADAPTATION_NETS
] + [
    f"{OUT}/adaptation/{net.arch}/{net.layer}/run{run}/scores.parquet"
    for net in ADAPTATION_NETS
    for run in range(int(config.get("adaptation", {}).get("runs", 4)))
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
    log:
        f"{OUT}/logs/probes/images.log",
    shell:
        "python -m workflow benchmarks.probes images --config {params.cfg:q} --out {OUT}/probes/images"
        " > {log:q} 2>&1"


rule probes_score:
    input:
        images=f"{OUT}/probes/images/manifest.json",
        weights=_adaptation_weights,
    output:
        f"{OUT}/probes/{{arch}}/{{layer}}/scores.parquet",
    params:
        cfg=lambda w: as_json({k: v for k, v in config["probes"].items() if k != "lossnets"}),
        lossnet=lambda w: as_json(lossnet_params(config, w.arch)),
        common=COMMON,
    log:
        f"{OUT}/logs/probes/{{arch}}/{{layer}}.log",
    threads: 1
    shell:
        "python -m workflow benchmarks.probes score --config {params.cfg:q} --lossnet {params.lossnet:q}"
        " --common {params.common:q} --net {wildcards.arch}/{wildcards.layer} --images {OUT}/probes/images"
        " --out {output:q} > {log:q} 2>&1"


BENCH_OUTPUTS["probes"] = [f"{OUT}/probes/{net.arch}/{net.layer}/scores.parquet" for net in PROBE_NETS]


rule probes:
    input:
        BENCH_OUTPUTS["probes"],
