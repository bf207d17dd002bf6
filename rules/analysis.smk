# Analysis: loss-network attributes -> tables -> figures -> report.
#   snakemake figures                 # tables + figures from the existing scores (no training)
#   snakemake --report report.html    # every figure and table with its caption
# Params are config only: `lossnet_attributes` sees the loss-network grid and the analysis
# input sizes; `analysis_tables` the analysis section without `figures`; `analysis_figures`
# the analysis section. So editing `analysis.figures` re-plots only, and nothing here ever
# invalidates a benchmark.

from workflow.analysis import FIGURE_FORMATS, FIGURES, TABLE_FORMATS, TABLES

ANALYSIS = config["analysis"]
ANALYSIS_SIZES = sorted({int(v) for v in ANALYSIS["input_sizes"].values()})
ANALYSIS_TABLES_DIR = f"{OUT}/analysis"
ANALYSIS_FIGURES_DIR = f"{OUT}/figures"


def _caption(name):
    # captions are resolved relative to this file (rules/)
    return f"../workflow/report/{name}.rst"


def _table_outputs():
    # (a line may not start with `report(`: Snakemake would read the `report:` keyword)
    outs = []
    for t in TABLES:
        for fmt in TABLE_FORMATS:
            path = f"{ANALYSIS_TABLES_DIR}/{t}.{fmt}"
            outs.append(report(path, caption=_caption(t), category="Tables") if fmt == "html" else path)
    return outs


def _figure_outputs():
    outs = []
    for f in FIGURES:
        for fmt in FIGURE_FORMATS:
            path = f"{ANALYSIS_FIGURES_DIR}/{f}.{fmt}"
            outs.append(report(path, caption=_caption(f), category="Figures", subcategory=fmt.upper()))
    return outs


# plain paths (rule `all` and `figures` take these as inputs; report() marks only outputs)
ANALYSIS_OUTPUTS: list[str] = [
    f"{OUT}/lossnets.parquet",
    *[f"{ANALYSIS_TABLES_DIR}/{t}.{fmt}" for t in TABLES for fmt in TABLE_FORMATS],
    *[f"{ANALYSIS_FIGURES_DIR}/{f}.{fmt}" for f in FIGURES for fmt in FIGURE_FORMATS],
]


localrules:
    lossnet_attributes,
    analysis_tables,
    analysis_figures,
    figures,


rule lossnet_attributes:
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
    input:
        scores=f"{OUT}/scores.parquet",
        lossnets=f"{OUT}/lossnets.parquet",
    output:
        _table_outputs(),
    params:
        cfg=as_json({k: v for k, v in ANALYSIS.items() if k != "figures"}),
        outdir=ANALYSIS_TABLES_DIR,
    log:
        f"{OUT}/logs/analysis/tables.log",
    threads: 1
    shell:
        "python -m workflow analysis.correlations --scores {input.scores:q} --lossnets {input.lossnets:q}"
        " --config {params.cfg:q} --outdir {params.outdir:q} > {log:q} 2>&1"


rule analysis_figures:
    input:
        scores=f"{OUT}/scores.parquet",
        pareto=f"{ANALYSIS_TABLES_DIR}/pareto.parquet",
        correlations=f"{ANALYSIS_TABLES_DIR}/attribute_correlations.parquet",
    output:
        _figure_outputs(),
    params:
        cfg=as_json(ANALYSIS),
        tables=ANALYSIS_TABLES_DIR,
        outdir=ANALYSIS_FIGURES_DIR,
    log:
        f"{OUT}/logs/analysis/figures.log",
    threads: 1
    shell:
        "python -m workflow analysis.figures --scores {input.scores:q} --tables {params.tables:q}"
        " --config {params.cfg:q} --outdir {params.outdir:q} > {log:q} 2>&1"


rule figures:
    input:
        ANALYSIS_OUTPUTS,
