"""Every figure of ``FIGURES`` with its report caption: which function draws which figure
(the one-figure functions live in ``figures.py`` and ``study_figures.py``), the caption of
each (the finding computed from the data, then its template in ``workflow/report``), and the
``analysis figures`` command."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

# figures before study_figures: figures chooses matplotlib's backend before pyplot is loaded
from workflow.analysis import FIGURES
from workflow.analysis import figures as fg
from workflow.analysis import study_figures as sf
from workflow.analysis.correlations import select_scores
from workflow.files import write_text
from workflow.results import validate_scores

CAPTIONS = Path(__file__).resolve().parents[1] / "report"  # the caption templates


def run_figures(scores: pd.DataFrame, tables: Path, cfg: Mapping[str, Any], outdir: Path
                ) -> list[str]:
    """Every figure of ``FIGURES`` into ``outdir``, each with its caption ``<name>.rst``: the
    finding computed from the data, then the caption template of ``workflow/report``."""
    fig_cfg = cfg.get("figures", {})
    fg._style(fig_cfg)
    colors = fg.arch_colors(fig_cfg.get("palette", "tab20"))
    selected = select_scores(scores, cfg.get("scores", []))
    pareto = pd.read_parquet(tables / "pareto.parquet")
    corr = pd.read_parquet(tables / "attribute_correlations.parquet")
    ranks = pd.read_parquet(tables / "rankings.parquet")
    per_arch = pd.read_parquet(tables / "arch_scores.parquet")
    jobs: dict[str, Callable[[Path], str | tuple[str, str]]] = {
        "scores_by_layer": lambda s: fg.scores_by_layer(selected, cfg, colors, s),
        "flops_pareto": lambda s: fg.pareto_figure(pareto, cfg, colors, s, accuracy=False),
        "imagenet_pareto": lambda s: fg.pareto_figure(pareto, cfg, colors, s, accuracy=True),
        "correlation_heatmap": lambda s: fg.correlation_heatmap(corr, cfg, s),
        "adaptation": lambda s: fg.adaptation_figure(scores, cfg, colors, s),
        "probes": lambda s: fg.probes_figure(scores, cfg, s),
        "rank_heatmap": lambda s: sf.rankings_figure(ranks, per_arch, cfg, s),
        "comparison_methods": lambda s: sf.comparison_methods_figure(scores, cfg, s),
        "super_resolution": lambda s: sf.super_resolution_figure(scores, cfg, colors, s),
        "adaptation_rankings": lambda s: sf.adaptation_rankings_figure(scores, cfg, s),
        "adaptation_change": lambda s: sf.adaptation_change_figure(scores, cfg, s),
    }
    notes = []
    for name in FIGURES:
        got = jobs[name](outdir / name)
        note, finding = got if isinstance(got, tuple) else (got, "")
        if "no data" in note and not finding:
            finding = "none: " + note.split("no data", 1)[1].strip(" ()")
        write_caption(outdir / f"{name}.rst", name, finding)
        notes.append(note)
    return notes


def write_caption(path: Path, name: str, finding: str) -> None:
    """The report caption of figure ``name``: its finding, then the template (still rendered
    by Snakemake's Jinja, so it can show the config)."""
    template = (CAPTIONS / f"{name}.rst").read_text()
    text = finding.replace("*", "\\*").replace("`", "'")
    # raw: the data's text is never read as Jinja (the report renders the caption with it)
    write_text(f"**Finding:** {{% raw %}}{text}{{% endraw %}}\n\n{template}", path)


def write_figures(config: Mapping[str, Any], scores: str | Path, tables: str | Path,
                  out: str | Path) -> list[str]:
    """Every figure of config ``analysis`` (``config``) into the folder ``out``."""
    tables = Path(tables)
    for name in ("pareto", "attribute_correlations", "rankings", "arch_scores"):
        if not (tables / f"{name}.parquet").exists():
            raise FileNotFoundError(f"{tables / name}.parquet is missing: run "
                                    f"`snakemake analysis_tables` first")
    score_table = validate_scores(pd.read_parquet(scores), str(scores))
    notes = run_figures(score_table, tables, config, Path(out))
    print("\n".join(notes))
    return notes
