"""Loss-network attributes, correlations, Pareto fronts, figures.

The names of the declared outputs live here (imported by rules/analysis.smk without
pulling in matplotlib or scipy while Snakemake builds the DAG).
"""

TABLES = ("scores_by_lossnet", "attribute_correlations", "score_correlations", "pareto",
          "adaptation_statistics", "published_vs_reproduced", "architectures", "arch_scores",
          "rankings")
TABLE_FORMATS = ("parquet", "md", "tex", "html")
FIGURES = ("scores_by_layer", "flops_pareto", "imagenet_pareto", "correlation_heatmap",
           "adaptation", "probes", "rank_heatmap", "comparison_methods", "super_resolution",
           "adaptation_rankings", "adaptation_change")
FIGURE_FORMATS = ("png", "svg")
