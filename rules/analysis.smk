# Analysis: loss-network attributes -> tables -> figures -> report (docs/analysis.md).
#   snakemake figures                 # tables + figures from the existing scores (no training)
#   snakemake --report report.html    # every figure and table with its caption
# Params are config only: `lossnet_attributes` sees the loss-network grid and the analysis
# input sizes; `analysis_tables` the analysis section without the figure-only keys (and the
# config values the published numbers of workflow/analysis/published.yaml require);
# `analysis_figures` the whole section. So editing `analysis.figures` re-plots only, and
# nothing here ever invalidates a benchmark.

from workflow.analysis.published import PUBLISHED_FILE

ANALYSIS_FILES = plan.analysis_files()
ANALYSIS_OUTPUTS = [f"{OUT}/lossnets.parquet", *ANALYSIS_FILES["tables"],
                    *ANALYSIS_FILES["figures"], *ANALYSIS_FILES["captions"]]


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
        config=plan.analysis_params("attributes"),
    log:
        f"{OUT}/logs/analysis/lossnet_attributes.log",
    threads: 1
    shell:
        "python -m workflow analysis attributes --config {params.config:q} --out {output:q}"
        " > {log:q} 2>&1"


# Table captions resolve relative to this file (rules/); figure captions are absolute paths
# of the files analysis_figures writes. No line may start with `report(`
# (Snakemake would read the global `report:` keyword), hence the conditional expressions.
rule analysis_tables:
    conda:
        "../envs/workflow.yaml"
    input:
        scores=f"{OUT}/scores.parquet",
        lossnets=f"{OUT}/lossnets.parquet",
        # the published numbers (editing them reruns the tables)
        published=str(PUBLISHED_FILE),
    output:
        [
            (report(p, caption=f"../workflow/report/{os.path.basename(p)[:-5]}.rst",
                    category="Tables")
             if p.endswith(".html") else p)
            for p in ANALYSIS_FILES["tables"]
        ],
    params:
        config=plan.analysis_params("tables"),
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{OUT}/logs/analysis/tables.log",
    threads: 1
    shell:
        "python -m workflow analysis tables --config {params.config:q} --scores {input.scores:q}"
        " --lossnets {input.lossnets:q} --out {params.outdir:q} > {log:q} 2>&1"


rule analysis_figures:
    conda:
        "../envs/workflow.yaml"
    input:
        scores=f"{OUT}/scores.parquet",
        pareto=f"{OUT}/analysis/pareto.parquet",
        correlations=f"{OUT}/analysis/attribute_correlations.parquet",
        rankings=f"{OUT}/analysis/rankings.parquet",
        arch_scores=f"{OUT}/analysis/arch_scores.parquet",
    output:
        # a figure's caption is written beside it by this rule (its finding, computed from the
        # data, then workflow/report/<name>.rst); Snakemake reads it when the report is built
        [
            report(p, caption=os.path.abspath(p.rsplit(".", 1)[0] + ".rst"),
                   category="Figures", subcategory=p.rsplit(".", 1)[1].upper())
            for p in ANALYSIS_FILES["figures"]
        ],
        ANALYSIS_FILES["captions"],
    params:
        config=plan.analysis_params("figures"),
        tables=lambda wildcards, input: os.path.dirname(input.pareto),
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{OUT}/logs/analysis/figures.log",
    threads: 1
    shell:
        "python -m workflow analysis figures --config {params.config:q} --scores {input.scores:q}"
        " --tables {params.tables:q} --out {params.outdir:q} > {log:q} 2>&1"


rule figures:
    input:
        ANALYSIS_OUTPUTS,
