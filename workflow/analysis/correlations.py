"""Correlation tables: loss-network attributes vs scores, and scores vs scores.

``python -m workflow analysis tables --scores scores.parquet --lossnets lossnets.parquet
--config JSON --out DIR`` writes, each as Parquet + Markdown + LaTeX:

- ``scores_by_lossnet``: the selected scores (config ``analysis.scores``), one row per loss network;
- ``attribute_correlations``: Pearson and Spearman (with p-values and seeded percentile
  bootstrap confidence intervals) of every attribute against every score;
- ``score_correlations``: the same between every pair of scores, over loss networks
  (``level = lossnet``) and over architectures at their best layer (``level = arch_best``);
- ``pareto``: which loss networks lie on the Pareto frontiers of the figures;
- ``published_vs_reproduced``: every published number of ``published.yaml`` beside this run's
  (:mod:`workflow.analysis.reproduced`).

A *score* is chosen by a selector in ``analysis.scores``: column filters on the scores
table (a value or a list); columns left out are wildcards. Where the matching rows differ
in an identifying column (dataset, split, variant, ...), the selector expands into one
score per distinct combination. Repeated runs and rankings are averaged.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from workflow.analysis import (
    TABLES,  # noqa: F401  (re-exported: the declared tables)
    arch_table,
    published,
    summaries,
)
from workflow.analysis.adaptation_stats import adaptation_statistics
from workflow.analysis.pareto import pareto_front
from workflow.analysis.reproduced import display as reproduced_display
from workflow.analysis.reproduced import published_vs_reproduced, summary
from workflow.archs import PIXEL
from workflow.files import write_parquet, write_text
from workflow.results import validate_scores

IDENTITY = ("benchmark", "dataset", "split", "comparison", "channel_norm", "variant", "metric")
SIZE_DEPENDENT = ("features", "flops", "flops_total", "flops_pct", "macs", "macs_total")
DEFAULT_ATTRIBUTES = (
    "layer_index", "depth_pct", "conv_depth_pct", "params_to_tap", "params_pct", "channels",
    "features", "receptive_field", "flops", "flops_pct", "matmul_depth", "skip_connections",
    "branching", "conv1x1", "batch_norm", "imagenet_acc1", *arch_table.JOINED,
)


class AnalysisConfigError(ValueError):
    pass


# ----------------------------------------------------------------------------- scores


def _match(col: pd.Series, want: Any) -> pd.Series:
    values = want if isinstance(want, list) else [want]
    if col.dtype == "boolean":
        return col.isin([bool(v) for v in values]).fillna(False).astype(bool)
    return col.astype("string").isin([str(v) for v in values]).fillna(False).astype(bool)


def select_scores(scores: pd.DataFrame, selectors: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Long table of the selected scores: score, benchmark, dataset, metric, arch, layer, value.

    Loss networks only (rows with an architecture of the registry: the pixel baselines,
    arch ``pixel``, have no attributes, and their comparison ``""`` would split a selector
    that leaves the comparison open into two scores); runs and rankings averaged.
    """
    out = []
    arch = scores["arch"].fillna("").astype(str)
    rows = scores[(arch != "") & (arch != PIXEL)]
    names = [str(sel.get("name", "")) for sel in selectors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AnalysisConfigError(f"config key analysis.scores: names {dup} are used twice; "
                                  f"give every selector its own name")
    for i, sel in enumerate(selectors):
        name = str(sel.get("name", f"score{i + 1}"))
        unknown = set(sel) - set(IDENTITY) - {"name", "arch", "layer", "ranking", "run"}
        if unknown:
            raise AnalysisConfigError(
                f"config key analysis.scores[{i}] ({name}): unknown keys {sorted(unknown)}; "
                f"use name and columns of the scores table: {', '.join(IDENTITY)}")
        m = pd.Series(True, index=rows.index)
        for k, v in sel.items():
            if k != "name":
                m &= _match(rows[k], v)
        hit = rows[m]
        if hit.empty:
            continue
        varying = [c for c in IDENTITY if hit[c].nunique(dropna=False) > 1]
        keys = list(IDENTITY)
        for ident, grp in hit.groupby(keys, dropna=False, sort=True):
            ident = dict(zip(keys, ident, strict=True))
            # "PSNR (set5, x4/standard)": "|" would break the Markdown tables
            label = name + (f" ({', '.join(str(ident[c]) for c in varying)})" if varying else "")
            agg = grp.groupby(["arch", "layer"], as_index=False)["value"].mean()
            agg.insert(0, "score", label)
            for c in ("benchmark", "dataset", "metric"):
                agg[c] = ident[c]
            agg["selector"] = name
            out.append(agg)
    cols = ["score", "selector", "benchmark", "dataset", "metric", "arch", "layer", "value"]
    if not out:
        return pd.DataFrame(columns=cols)
    df = pd.concat(out, ignore_index=True)[cols]
    df["lossnet"] = df["arch"].astype(str) + "/" + df["layer"].astype(str)
    return df


def input_size(cfg: Mapping[str, Any], benchmark: str, dataset: str) -> int | None:
    """The input side of a score: ``analysis.input_sizes`` at ``benchmark/dataset`` or
    ``benchmark``."""
    sizes = cfg.get("input_sizes", {})
    for key in (f"{benchmark}/{dataset}", benchmark):
        if key in sizes:
            return int(sizes[key])
    return None


def attribute_column(attrs: pd.DataFrame, attribute: str, size: int | None) -> pd.Series | None:
    """One attribute as a float column, resolving size-dependent ones at ``size``."""
    col = f"{attribute}_{size}" if attribute in SIZE_DEPENDENT else attribute
    if col not in attrs:
        return None
    return attrs[col].astype("Float64").astype(float)


# ----------------------------------------------------------------------------- statistics


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc**2).sum(axis=1) * (yc**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / den
    r[den <= 1e-300] = np.nan  # a resample with a constant variable has no correlation
    return r


def correlate(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, confidence: float = 0.95,
              seed: int | Sequence[int] = 0) -> dict[str, float]:
    """Pearson and Spearman with scipy p-values and percentile bootstrap intervals.

    Pairs with a NaN are dropped. The bootstrap resamples pairs with replacement
    ``n_boot`` times (numpy Generator seeded with ``seed``); resamples where a
    variable is constant are left out of the percentiles.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    n = len(x)
    res = {"n": n}
    keys = ("pearson_r", "pearson_p", "pearson_lo", "pearson_hi",
            "spearman_rho", "spearman_p", "spearman_lo", "spearman_hi")
    res.update(dict.fromkeys(keys, np.nan))
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return res
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        pr = stats.pearsonr(x, y)
        sr = stats.spearmanr(x, y)
    res.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
               spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        xs, ys = x[idx], y[idx]
        r = _rowwise_pearson(xs, ys)
        rho = _rowwise_pearson(stats.rankdata(xs, axis=1), stats.rankdata(ys, axis=1))
        a = (1.0 - confidence) / 2.0
        for name, v in (("pearson", r), ("spearman", rho)):
            v = v[~np.isnan(v)]
            if len(v):
                lo, hi = np.quantile(v, [a, 1 - a])
                res[f"{name}_lo"], res[f"{name}_hi"] = float(lo), float(hi)
    return res


def _pair_seed(seed: int, *names: str) -> list[int]:
    # a seed per pair, independent of which other pairs are computed
    return [int(seed)] + [zlib.crc32(n.encode()) for n in names]


# ----------------------------------------------------------------------------- tables


def _single_layer(df: pd.DataFrame, include_lpips: bool) -> pd.DataFrame:
    return df if include_lpips else df[df["layer"].astype(str) != "lpips"]


def attribute_correlations(selected: pd.DataFrame, attrs: pd.DataFrame, cfg: Mapping[str, Any]
                           ) -> pd.DataFrame:
    boot = cfg.get("bootstrap", {})
    attributes = cfg.get("attributes", list(DEFAULT_ATTRIBUTES))
    rows = []
    sel = _single_layer(selected, cfg.get("include_lpips", False))
    for score, grp in sel.groupby("score", sort=False):
        first = grp.iloc[0]
        size = input_size(cfg, first["benchmark"], first["dataset"])
        joined = grp.merge(attrs, on=["arch", "layer"], how="inner", suffixes=("", "_attr"))
        for attribute in attributes:
            col = attribute_column(joined, attribute, size)
            if col is None:
                continue
            r = correlate(col.to_numpy(), joined["value"].to_numpy(float), int(boot.get("n", 2000)),
                          float(boot.get("confidence", 0.95)),
                          _pair_seed(boot.get("seed", 0), attribute, score))
            rows.append({"attribute": attribute, "score": score, "benchmark": first["benchmark"],
                         "input_size": size, **r})
    return pd.DataFrame(rows, columns=["attribute", "score", "benchmark", "input_size", "n",
                                       "pearson_r", "pearson_p", "pearson_lo", "pearson_hi",
                                       "spearman_rho", "spearman_p", "spearman_lo", "spearman_hi"])


def scores_wide(selected: pd.DataFrame) -> pd.DataFrame:
    if selected.empty:
        return pd.DataFrame(columns=["lossnet", "arch", "layer"])
    wide = selected.pivot_table(index=["lossnet", "arch", "layer"], columns="score", values="value",
                                sort=False).reset_index()
    wide.columns.name = None
    return wide


def arch_best(selected: pd.DataFrame, lower_is_better: Sequence[str]) -> pd.DataFrame:
    """Per architecture and score, the best value over its single layers."""
    single = selected[selected["layer"].astype(str) != "lpips"]
    if single.empty:
        return single.assign(lossnet=pd.Series(dtype="string"))
    lower = single["metric"].isin(list(lower_is_better))
    signed = single.assign(key=np.where(lower, -single["value"], single["value"]))
    best = signed.loc[signed.groupby(["score", "arch"])["key"].idxmax()].drop(columns="key")
    return best.assign(lossnet=best["arch"])


def arch_mean(selected: pd.DataFrame) -> pd.DataFrame:
    """Per architecture and score, the mean over its single layers (thesis 3.7's averages)."""
    single = selected[selected["layer"].astype(str) != "lpips"]
    mean = single.groupby(["score", "arch"], as_index=False, sort=False)["value"].mean()
    return mean.assign(lossnet=mean["arch"])


def score_correlations(selected: pd.DataFrame, cfg: Mapping[str, Any]) -> pd.DataFrame:
    boot = cfg.get("bootstrap", {})
    rows = []
    levels = {"lossnet": _single_layer(selected, cfg.get("include_lpips", False)),
              "arch_best": arch_best(selected, cfg.get("lower_is_better", [])),
              "arch_mean": arch_mean(selected)}
    for level, df in levels.items():
        if df.empty:
            continue
        wide = df.pivot_table(index="lossnet", columns="score", values="value", sort=False)
        names = list(wide.columns)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                r = correlate(wide[a].to_numpy(float), wide[b].to_numpy(float),
                              int(boot.get("n", 2000)), float(boot.get("confidence", 0.95)),
                              _pair_seed(boot.get("seed", 0), level, a, b))
                rows.append({"level": level, "score_a": a, "score_b": b, **r})
    return pd.DataFrame(rows, columns=["level", "score_a", "score_b", "n", "pearson_r", "pearson_p",
                                       "pearson_lo", "pearson_hi", "spearman_rho", "spearman_p",
                                       "spearman_lo", "spearman_hi"])


def pareto_points(selected: pd.DataFrame, attrs: pd.DataFrame, cfg: Mapping[str, Any]
                  ) -> pd.DataFrame:
    """Points of the Pareto views: (cost or ImageNet accuracy, score) per loss network, with
    the front."""
    p = cfg.get("pareto", {})
    cost = p.get("cost", "macs")
    views = [(s, cost, True) for s in p.get("cost_scores", ["2AFC", "JND"])]
    views += [(s, "imagenet_acc1", False) for s in p.get("accuracy_scores", ["2AFC"])]
    sel = _single_layer(selected, cfg.get("include_lpips", False))
    out = []
    for selector, x_attr, minimize in views:
        for score, grp in sel[sel["selector"] == selector].groupby("score", sort=False):
            first = grp.iloc[0]
            size = input_size(cfg, first["benchmark"], first["dataset"])
            joined = grp.merge(attrs, on=["arch", "layer"], how="inner", suffixes=("", "_attr"))
            col = attribute_column(joined, x_attr, size)
            if col is None or joined.empty:
                continue
            x = col.to_numpy(float)
            out.append(pd.DataFrame({
                "view": f"{x_attr} vs {selector}", "score": score, "metric": first["metric"],
                "x_attribute": x_attr,
                "input_size": size, "minimize_x": minimize, "lossnet": joined["lossnet"],
                "arch": joined["arch"], "layer": joined["layer"], "x": x,
                "value": joined["value"].to_numpy(float),
                "on_front": pareto_front(x, joined["value"].to_numpy(float), minimize),
            }))
    cols = ["view", "score", "metric", "x_attribute", "input_size", "minimize_x", "lossnet",
            "arch", "layer", "x", "value", "on_front"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


# ----------------------------------------------------------------------------- writing


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return ""
        return f"{v:.3g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.3f}"
    return "" if v is None or v is pd.NA else str(v)


def _display(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype(object).map(_fmt) if not df.empty else df


def write_table(df: pd.DataFrame, stem: Path, title: str, note: str = "",
                shown: pd.DataFrame | None = None) -> None:
    """``stem``.parquet (the data); .md, .tex and .html (formatted for reading: ``shown``, by
    default every cell of ``df`` formatted; the report shows the html)."""
    write_parquet(df, stem.with_suffix(".parquet"))
    custom = shown is not None
    shown = _display(df) if shown is None else shown
    md = f"# {title}\n\n"
    if note:
        md += f"{note}\n\n"
    # cells formatted by the caller stay as written (tabulate would re-parse "62.0" as 62)
    md += (shown.to_markdown(index=False, disable_numparse=custom) if not df.empty
           else "_no data: the scores this table needs are not in the scores table yet_") + "\n"
    write_text(md, stem.with_suffix(".md"))
    if df.empty:
        tex = f"% {title}: no data\n"
    else:
        shown = shown.rename(columns=lambda c: str(c))
        tex = shown.style.hide(axis="index").format_index(escape="latex", axis=1).format(
            escape="latex").to_latex(hrules=True, caption=title)
    write_text(tex, stem.with_suffix(".tex"))
    body = shown.to_html(index=False, border=0, na_rep="") if not df.empty else "<p>no data</p>"
    write_text(f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>"
               f"<h3>{title}</h3><p>{note}</p>{body}</body></html>\n", stem.with_suffix(".html"))


def run_tables(scores: pd.DataFrame, attrs: pd.DataFrame, cfg: Mapping[str, Any], outdir: Path
               ) -> dict:
    selected = select_scores(scores, cfg.get("scores", []))
    archs = arch_table.load()
    attrs = arch_table.join(attrs, archs)
    boot = cfg.get("bootstrap", {})
    how = (f"{int(boot.get('n', 2000))} seeded bootstrap resamples (seed {boot.get('seed', 0)}), "
           f"{100 * float(boot.get('confidence', 0.95)):g}% percentile intervals; p-values "
           f"from scipy.")
    wide = scores_wide(selected)
    attr_corr = attribute_correlations(selected, attrs, cfg)
    score_corr = score_correlations(selected, cfg)
    pareto = pareto_points(selected, attrs, cfg)
    write_table(wide, outdir / "scores_by_lossnet", "Selected scores per loss network",
                "Scores chosen by config analysis.scores; runs and rankings averaged.")
    write_table(attr_corr, outdir / "attribute_correlations",
                "Loss-network attributes vs scores", how)
    write_table(score_corr, outdir / "score_correlations",
                "Correlations between scores (per loss network; per architecture at its best "
                "layer and averaged over its layers)", how)
    write_table(archs[archs["arch"].isin(list(attrs["arch"].astype(str)))].reset_index(drop=True),
                outdir / "architectures", "Architecture attributes (thesis Table 2.2)",
                "Per architecture, worked from its definition (workflow/analysis/"
                "architectures.yaml; docs/analysis.md defines each column). Joined into the "
                "attribute correlations as arch_<column>.",
                shown=arch_table.shown(archs, list(attrs["arch"].astype(str))))
    lower = cfg.get("lower_is_better", [])
    per_arch = summaries.arch_scores(selected, lower)
    write_table(per_arch, outdir / "arch_scores",
                "Scores per architecture: mean and best over its extraction layers",
                "Single-layer loss networks; best = highest (lowest for analysis."
                "lower_is_better). Their correlations between benchmarks: score_correlations, "
                "levels arch_mean and arch_best.",
                shown=_display(summaries.arch_scores_wide(per_arch)))
    ranks = summaries.rankings(selected, lower)
    write_table(ranks, outdir / "rankings",
                "Rankings per score: architectures by their best layer, layers by their mean "
                "over the architectures",
                "Rank 1 is the best; ties share the lower rank. best_for: architectures whose "
                "best layer it is.")
    write_table(pareto, outdir / "pareto", "Pareto frontiers",
                "on_front: no other loss network has a better score at a lower cost (or higher "
                "accuracy).")
    adapt = adaptation_statistics(scores, cfg)
    write_table(adapt, outdir / "adaptation_statistics", "Adaptation statistics",
                "Per evaluation set: cases (loss network, method, normalisation, ranking) the "
                "adapted metric improved; Spearman / Pearson over the per-ranking means (the "
                "paper's aggregation) and Spearman over all cases; mean change.")
    pub = cfg.get("published", {})
    versus = published_vs_reproduced(
        scores, published.load(pub.get("file", published.PUBLISHED_FILE)), pub.get("config"),
        {"scores_by_lossnet": wide, "attribute_correlations": attr_corr,
         "score_correlations": score_corr, "pareto": pareto, "adaptation_statistics": adapt})
    write_table(versus, outdir / "published_vs_reproduced", "Published vs reproduced",
                "Reproduced: the mean over the matching rows (runs, rankings), in the paper's "
                "unit. within tolerance: yes / no where this run has the paper's conditions.",
                shown=reproduced_display(versus))
    return {"scores": selected["score"].nunique() if not selected.empty else 0,
            "attribute_pairs": len(attr_corr), "score_pairs": len(score_corr),
            "best_architecture": summaries.top_items(ranks, "architecture"),
            "published": summary(versus)}


def read_inputs(scores_path: str | Path, lossnets_path: str | Path
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    for p, fix in ((scores_path, "run `snakemake scores` first"),
                   (lossnets_path, "run `snakemake lossnet_attributes` first")):
        if not Path(p).exists():
            raise FileNotFoundError(f"{p} is missing: {fix}")
    scores = validate_scores(pd.read_parquet(scores_path), str(scores_path))
    attrs = pd.read_parquet(lossnets_path)
    missing = {"arch", "layer", "lossnet"} - set(attrs.columns)
    if missing:
        raise ValueError(f"{lossnets_path}: not a loss-network attribute table "
                         f"(no {sorted(missing)}); "
                         f"rebuild it with `snakemake lossnet_attributes`")
    attrs = attrs.astype({"arch": "string", "layer": "string"})
    return scores, attrs


def write_tables(config: Mapping[str, Any], scores: str | Path, lossnets: str | Path,
                 out: str | Path) -> dict:
    """The tables of config ``analysis`` (``config``) from the scores and attribute tables,
    written into the folder ``out``."""
    score_table, attrs = read_inputs(scores, lossnets)
    info = run_tables(score_table, attrs, config, Path(out))
    print(f"{out}: {info}")
    return info
