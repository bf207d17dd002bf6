# Benchmarks loss networks for deep perceptual loss and similarity.
#   uv run snakemake --cores all                                # the full study
#   uv run snakemake --cores all --configfile config/demo.yaml  # the offline demo
# Targets: all, download, similarity, super_resolution, delineation, autoencoder,
# adaptation, probes, scores, figures. Every input, param and target comes from the
# planning module (workflow/plan.py, torch-free); each rule shells out to
# `python -m workflow GROUP COMMAND` with --config (what its result depends on: a rerun
# trigger) and --settings (how it runs: never a rerun trigger).

import os
import shlex

from snakemake.utils import min_version

from workflow import recovery
from workflow.plan import Plan

min_version("9.0")

# Interrupted runs (docs/reruns.md): the main process removes locks of dead runs, and every
# job learns the pid of the Snakemake that started it (a trainer stops when it is gone).
# The workflow profile (profiles/default) adds --rerun-incomplete and the rerun triggers.
if workflow.is_main_process:
    recovery.claim(".snakemake")
# Jobs import the `workflow` package from this checkout in any environment (uv's, a conda
# env of --sdm conda, which drops PYTHONPATH before the job: the prefix runs after it).
_pythonpath = ":".join(dict.fromkeys(
    [workflow.basedir, *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]))
_prefix = (f"export LOSSNET_OWNER_PID={os.getpid()}; "
           f"export PYTHONPATH={shlex.quote(_pythonpath)}; ")
shell.prefix(_prefix.replace("{", "{{").replace("}", "}}"))


report: "workflow/report/workflow.rst"


configfile: "config.yaml"


# validates the config against workflow/schemas/ and fills in every default, once
plan = Plan(config)
RES, OUT = plan.res, plan.out

# GPU rules take one unit of the `gpu` resource (plan.gpus: device auto, cuda or mps). A local
# run puts at most `--resources gpu=N` of them on the machine's GPUs at once; N defaults to 1
# here. A cluster run (`--jobs`, as in the slurm profile) leaves placement to the cluster and
# gets no default (a global limit of 1 would run one GPU job at a time on the whole cluster).
if "gpu" not in workflow.global_resources and workflow.global_resources["_nodes"].value is None:
    workflow.global_resources["gpu"] = 1

# Ops that Apple's MPS backend lacks run on the CPU instead of stopping the job (torch reads
# this once, at import, so it must be in the jobs' environment: they inherit Snakemake's).
if plan.config["device"] in ("auto", "mps"):
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

# Each rules file lists the per-job summary Parquet files (scores schema) of its benchmark
# here; `gather_scores` concatenates those of the enabled benchmarks.
BENCH_OUTPUTS: dict[str, list[str]] = {}


wildcard_constraints:
    arch="[a-z0-9_]+",
    layer="[1-4]|lpips",
    run=r"\d+",
    scale=r"\d+",


include: "rules/data.smk"
include: "rules/similarity.smk"
include: "rules/super_resolution.smk"
include: "rules/delineation.smk"
include: "rules/autoencoder.smk"
include: "rules/adaptation.smk"
include: "rules/calibration.smk"
include: "rules/analysis.smk"


localrules:
    all,
    scores,
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
        [p for b in plan.enabled() for p in BENCH_OUTPUTS[b]],
    output:
        f"{OUT}/scores.parquet",
    params:
        # the input set as a param (relative to results_dir): dropping a loss network
        # reruns this job although no file changed (the "input" trigger is off)
        parts=sorted(os.path.relpath(p, OUT) for b in plan.enabled() for p in BENCH_OUTPUTS[b]),
    log:
        f"{OUT}/logs/gather_scores.log",
    shell:
        "python -m workflow results gather --out {output:q} {input:q} > {log:q} 2>&1"


rule scores:
    input:
        f"{OUT}/scores.parquet",


onstart:
    recovery.sweep([RES, OUT], shallow=[f"{RES}/raw"])
