# LPIPS calibration (docs/calibration.md).
#   prepared BAPPS (2AFC train) -> fused training of every comparison's channel weights per
#   (loss network, run) -> scores on BAPPS val (variant lin); calibration.variants tune /
#   scratch train the backbone too (run{r}/{variant}.pt -> run{r}/{variant}_scores.parquet);
#   with calibration.shipped_weights also the lpips package's own lin weights (variant
#   lin-shipped).
# Target: `calibration`.

CALIBRATION_DIR = f"{OUT}/calibration/{{arch}}/{{layer}}"
SHIPPED_LIN = {j["arch"]: j["file"] for j in plan.shipped_lin()}


rule calibration_train:
    input:
        bapps=plan.prepared("bapps"),
        weights=plan.weights_param(),
    output:
        model=f"{CALIBRATION_DIR}/run{{run}}/lin.pt",
    params:
        config=plan.config_param("calibration", "train"),
        settings=plan.settings_param("calibration", "train"),
        workdir=f"{CALIBRATION_DIR}/run{{run}}/train",
    log:
        f"{OUT}/logs/calibration/{{arch}}/{{layer}}/train_run{{run}}.log",
    resources:
        gpu=plan.gpus("calibration", "train"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow calibration train --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run} --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --prepared {input.bapps:q} --workdir {params.workdir:q}"
        " --out {output.model:q} > {log:q} 2>&1"


rule calibration_evaluate:
    input:
        bapps=plan.prepared("bapps"),
        model=f"{CALIBRATION_DIR}/run{{run}}/lin.pt",
        weights=plan.weights_param(),
    output:
        f"{CALIBRATION_DIR}/run{{run}}/scores.parquet",
    params:
        config=plan.config_param("calibration", "evaluate"),
        settings=plan.settings_param("calibration", "evaluate"),
    log:
        f"{OUT}/logs/calibration/{{arch}}/{{layer}}/evaluate_run{{run}}.log",
    resources:
        gpu=plan.gpus("calibration", "evaluate"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow calibration evaluate --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run} --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --prepared {input.bapps:q} --model {input.model:q}"
        " --scores {output:q} > {log:q} 2>&1"


rule calibration_tune:
    input:
        bapps=plan.prepared("bapps"),
        weights=plan.weights_param(),
    output:
        model=f"{CALIBRATION_DIR}/run{{run}}/tune.pt",
    params:
        config=plan.config_param("calibration", "tune"),
        settings=plan.settings_param("calibration", "tune"),
        workdir=f"{CALIBRATION_DIR}/run{{run}}/tune_train",
    log:
        f"{OUT}/logs/calibration/{{arch}}/{{layer}}/tune_run{{run}}.log",
    resources:
        gpu=plan.gpus("calibration", "tune"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow calibration tune --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run} --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --prepared {input.bapps:q} --workdir {params.workdir:q}"
        " --out {output.model:q} > {log:q} 2>&1"


# a random initialisation: no weights input, no weights in its config
rule calibration_scratch:
    input:
        bapps=plan.prepared("bapps"),
    output:
        model=f"{CALIBRATION_DIR}/run{{run}}/scratch.pt",
    params:
        config=plan.config_param("calibration", "scratch"),
        settings=plan.settings_param("calibration", "scratch"),
        workdir=f"{CALIBRATION_DIR}/run{{run}}/scratch_train",
    log:
        f"{OUT}/logs/calibration/{{arch}}/{{layer}}/scratch_run{{run}}.log",
    resources:
        gpu=plan.gpus("calibration", "scratch"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow calibration scratch --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run} --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --prepared {input.bapps:q} --workdir {params.workdir:q}"
        " --out {output.model:q} > {log:q} 2>&1"


# the backbone comes from the model file: no weights input
rule calibration_evaluate_backbone:
    input:
        bapps=plan.prepared("bapps"),
        model=f"{CALIBRATION_DIR}/run{{run}}/{{variant}}.pt",
    output:
        f"{CALIBRATION_DIR}/run{{run}}/{{variant}}_scores.parquet",
    wildcard_constraints:
        variant="tune|scratch",
    params:
        config=plan.config_param("calibration", "evaluate_backbone"),
        settings=plan.settings_param("calibration", "evaluate_backbone"),
    log:
        f"{OUT}/logs/calibration/{{arch}}/{{layer}}/{{variant}}_evaluate_run{{run}}.log",
    resources:
        gpu=plan.gpus("calibration", "evaluate_backbone"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow calibration evaluate --net {wildcards.arch}/{wildcards.layer}"
        " --run {wildcards.run} --config {params.config:q} --settings {params.settings:q}"
        " --threads {threads} --prepared {input.bapps:q} --model {input.model:q}"
        " --scores {output:q} > {log:q} 2>&1"


rule calibration_shipped:
    input:
        bapps=plan.prepared("bapps"),
        lin=lambda wildcards: SHIPPED_LIN[wildcards.arch],
        weights=plan.weights_param(),
    output:
        f"{OUT}/calibration/{{arch}}/lpips/shipped.parquet",
    wildcard_constraints:
        arch="|".join(SHIPPED_LIN) or "no-shipped-weights",
    params:
        config=plan.config_param("calibration", "shipped"),
        settings=plan.settings_param("calibration", "shipped"),
    log:
        f"{OUT}/logs/calibration/{{arch}}/lpips/shipped.log",
    resources:
        gpu=plan.gpus("calibration", "shipped"),
    threads: plan.threads(2)
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow calibration shipped --net {wildcards.arch}/lpips"
        " --config {params.config:q} --settings {params.settings:q} --threads {threads}"
        " --prepared {input.bapps:q} --model {input.lin:q} --scores {output:q} > {log:q} 2>&1"


BENCH_OUTPUTS["calibration"] = (
    (plan.targets(f"{CALIBRATION_DIR}/run{{run}}/scores.parquet", "calibration")
     if "lin" in plan.config["calibration"]["variants"] else [])
    + [f"{CALIBRATION_DIR}/run{{run}}/{{variant}}_scores.parquet".format(**j)
       for j in plan.calibration_jobs()]
    + [f"{OUT}/calibration/{a}/lpips/shipped.parquet" for a in SHIPPED_LIN]
)


localrules:
    calibration,


rule calibration:
    input:
        BENCH_OUTPUTS["calibration"],
