# Analysis: loss-network attributes -> tables -> figures -> report.
#   snakemake figures                 # tables + figures from the existing scores (no training)
#   snakemake --report report.html    # every figure and table with its caption
# Params are config only: `lossnet_attributes` sees the loss-network grid and the analysis
# input sizes; `analysis_tables` the analysis section without the figure-only keys; `analysis_figures`
# the analysis section. So editing `analysis.figures` re-plots only, and nothing here ever
# invalidates a benchmark.

import os

from workflow.analysis import FIGURE_FORMATS, FIGURES, TABLE_FORMATS, TABLES

ANALYSIS = config["analysis"]
ANALYSIS_SIZES = sorted({int(v) for v in ANALYSIS["input_sizes"].values()})
ANALYSIS_TABLES_DIR = f"{OUT}/analysis"
ANALYSIS_FIGURES_DIR = f"{OUT}/figures"
# config keys only the figures read: the tables do not rerun when they change
ANALYSIS_FIGURE_ONLY = ("figures", "adaptation", "probes")


# Captions resolve relative to this file (rules/). No line may start with `report(`
# (Snakemake would read the global `report:` keyword), hence the conditional expressions.
ANALYSIS_TABLE_FILES = [f"{ANALYSIS_TABLES_DIR}/{t}.{fmt}" for t in TABLES for fmt in TABLE_FORMATS]
ANALYSIS_FIGURE_FILES = [f"{ANALYSIS_FIGURES_DIR}/{f}.{fmt}" for f in FIGURES for fmt in FIGURE_FORMATS]
ANALYSIS_OUTPUTS: list[str] = [f"{OUT}/lossnets.parquet", *ANALYSIS_TABLE_FILES, *ANALYSIS_FIGURE_FILES]


localrules:
    lossnet_attributes,
    analysis_tables,
    analysis_figures,
    figures,


rule lossnet_attributes:
    conda:
        "../envs/workflow.yaml"
    output:
        f"{OUT}/lossnets.parquet",
    params:
        lossnets=as_json({k: config["lossnets"][k] for k in ("archs", "layers", "lpips_sets")}),
        sizes=" ".join(map(str, ANALYSIS_SIZES)),
    log:
        f"{OUT}/logs/analysis/lossnet_attributes.log",
    threads: 1
    shell:
        "python -m workflow analysis.attributes --lossnets {params.lossnets:q}"
        " --sizes {params.sizes} --out {output:q} > {log:q} 2>&1"


rule analysis_tables:
    conda:
        "../envs/workflow.yaml"
    input:
        scores=f"{OUT}/scores.parquet",
        lossnets=f"{OUT}/lossnets.parquet",
    output:
        [
            (report(p, caption=f"../workflow/report/{os.path.basename(p)[:-5]}.rst", category="Tables")
             if p.endswith(".html") else p)
            for p in ANALYSIS_TABLE_FILES
        ],
    params:
        cfg=as_json({k: v for k, v in ANALYSIS.items() if k not in ANALYSIS_FIGURE_ONLY}),
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{OUT}/logs/analysis/tables.log",
    threads: 1
    shell:
        "python -m workflow analysis.correlations --scores {input.scores:q} --lossnets {input.lossnets:q}"
        " --config {params.cfg:q} --outdir {params.outdir:q} > {log:q} 2>&1"


rule analysis_figures:
    conda:
        "../envs/workflow.yaml"
    input:
        scores=f"{OUT}/scores.parquet",
        pareto=f"{ANALYSIS_TABLES_DIR}/pareto.parquet",
        correlations=f"{ANALYSIS_TABLES_DIR}/attribute_correlations.parquet",
    output:
        [
            report(p, caption=f"../workflow/report/{os.path.basename(p).rsplit('.', 1)[0]}.rst",
                   category="Figures", subcategory=p.rsplit(".", 1)[1].upper())
            for p in ANALYSIS_FIGURE_FILES
        ],
    params:
        cfg=as_json(ANALYSIS),
        tables=lambda wildcards, input: os.path.dirname(input.pareto),
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{OUT}/logs/analysis/figures.log",
    threads: 1
    shell:
        "python -m workflow analysis.figures --scores {input.scores:q} --tables {params.tables:q}"
        " --config {params.cfg:q} --outdir {params.outdir:q} > {log:q} 2>&1"


rule figures:
    input:
        ANALYSIS_OUTPUTS,
