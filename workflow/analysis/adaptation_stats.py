"""The adaptation study's statistics, aggregated as the paper aggregates them.

A *case* is one (loss network, comparison method, channel normalisation, ranking): the
adapted metric's score is the mean over its runs, the baseline's is the unadapted metric's
score on the same ranking's triplets (for BAPPS, where the labels do not depend on a
ranking, the one baseline of the method). Per evaluation dataset and metric:

* ``cases``, ``improved``: how many cases there are and in how many the adapted score is
  higher than the baseline's (the paper: 298 of 300);
* ``rankings``; ``spearman_ranking_means`` and ``pearson_ranking_means``: the correlation
  between baseline and adapted performance over the per-ranking means (each ranking's
  cases averaged: one point per ranking), which is how the paper's 0.66 (SVHN) and 0.72
  (STL-10) are computed;
* ``spearman_cases``: the same correlation over all cases (what the adaptation figure
  shows), kept beside it because the two aggregations differ;
* ``mean_change``: the mean of adapted minus baseline over the cases (the paper: BAPPS
  2AFC and JND drop by about 0.01 after adaptation).

The adapted nets (variant ``adapted_net``: the loss network itself fine-tuned, the paper's
Table 3; config ``adaptation.adapt_net``) are no part of these statistics, whose meaning
stays the channel-weight adaptation's. They appear in :func:`ranking_means`: per ranking, the
mean adapted-net score over the ranking's cases that have one (``adapted_net``,
``net_cases``), beside the baseline and adapted means of all its cases.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

NET_VARIANT = "adapted_net"  # workflow.benchmarks.adaptation_net
COLUMNS = ["dataset", "split", "metric", "cases", "improved", "rankings",
           "spearman_ranking_means", "pearson_ranking_means", "spearman_cases", "mean_change"]
METHOD = ["arch", "layer", "comparison", "channel_norm"]


def _corr(fn, x: pd.Series, y: pd.Series) -> float:
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return float("nan")
    return float(fn(x, y).statistic)


def _cases(g: pd.DataFrame, base_v: str, adapt_v: str) -> pd.DataFrame:
    """The cases of one (dataset, split, metric): METHOD + ranking, baseline, adapted."""
    adapted = (g[(g["variant"] == adapt_v) & g["ranking"].notna()]
               .groupby([*METHOD, "ranking"], dropna=False)["value"].mean()
               .rename("adapted").reset_index())
    base = g[g["variant"] == base_v]
    if adapted.empty or base.empty:
        return pd.DataFrame(columns=[*METHOD, "ranking", "adapted", "baseline"])
    if base["ranking"].notna().any():  # labels per ranking: a baseline per ranking
        base = (base.groupby([*METHOD, "ranking"], dropna=False)["value"].mean()
                .rename("baseline").reset_index())
        return adapted.merge(base, on=[*METHOD, "ranking"], how="inner")
    base = base.groupby(METHOD, dropna=False)["value"].mean().rename("baseline").reset_index()
    return adapted.merge(base, on=METHOD, how="inner")


def _variants(cfg: Mapping[str, Any] | None) -> tuple[str, str]:
    a = (cfg or {}).get("adaptation", {})
    return a.get("baseline_variant", "baseline"), a.get("adapted_variant", "adapted")


def _case_groups(scores: pd.DataFrame, cfg: Mapping[str, Any] | None
                 ) -> Iterator[tuple[tuple[Any, Any, Any], pd.DataFrame]]:
    """((dataset, split, metric), its non-empty cases) for each group of the adaptation rows,
    in sorted order."""
    base_v, adapt_v = _variants(cfg)
    rows = scores[scores["benchmark"] == "adaptation"]
    for key, g in rows.groupby(["dataset", "split", "metric"], sort=True, dropna=False):
        cases = _cases(g, base_v, adapt_v)
        if not cases.empty:
            yield key, cases


def all_cases(scores: pd.DataFrame, cfg: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Every case of every (dataset, split, metric): those columns, METHOD, ranking, baseline,
    adapted (the adapted score averaged over runs)."""
    out = [cases.assign(dataset=d, split=sp, metric=m)
           for (d, sp, m), cases in _case_groups(scores, cfg)]
    cols = ["dataset", "split", "metric", *METHOD, "ranking", "baseline", "adapted"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def _net_means(scores: pd.DataFrame, key: tuple[Any, Any, Any], cases: pd.DataFrame
               ) -> pd.DataFrame:
    """Per ranking: the mean adapted-net score (each case's mean over runs) over the cases of
    ``cases`` that have one, and how many (``ranking``, ``adapted_net``, ``net_cases``)."""
    d, sp, m = key
    rows = scores[(scores["benchmark"] == "adaptation") & (scores["variant"] == NET_VARIANT)
                  & (scores["dataset"] == d) & (scores["split"] == sp)
                  & (scores["metric"] == m) & scores["ranking"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=["ranking", "adapted_net", "net_cases"])
    net = (rows.groupby([*METHOD, "ranking"], dropna=False)["value"].mean()
           .rename("adapted_net").reset_index()
           .merge(cases[[*METHOD, "ranking"]], on=[*METHOD, "ranking"], how="inner"))
    return (net.groupby("ranking")["adapted_net"].agg(["mean", "size"])
            .rename(columns={"mean": "adapted_net", "size": "net_cases"}).reset_index())


def ranking_means(scores: pd.DataFrame, cfg: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per (dataset, split, metric, ranking): the mean baseline and adapted score over
    the ranking's cases (the points the paper's correlations are computed over), and the mean
    adapted-net score over those of its cases that have one (``adapted_net``, NaN where none;
    ``net_cases``)."""
    out = []
    for key, cases in _case_groups(scores, cfg):
        m = cases.groupby("ranking")[["baseline", "adapted"]].mean().reset_index()
        m["cases"] = cases.groupby("ranking").size().to_numpy()
        m = m.merge(_net_means(scores, key, cases), on="ranking", how="left")
        m["net_cases"] = m["net_cases"].fillna(0).astype(int)
        m["adapted_net"] = m["adapted_net"].astype(float)
        out.append(m.assign(dataset=key[0], split=key[1], metric=key[2]))
    cols = ["dataset", "split", "metric", "ranking", "cases", "baseline", "adapted",
            "adapted_net", "net_cases"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def adaptation_statistics(scores: pd.DataFrame, cfg: Mapping[str, Any] | None = None
                          ) -> pd.DataFrame:
    """One row per (dataset, split, metric) of the adaptation rows; see the module docstring.
    ``cfg``: config ``analysis`` (its ``adaptation.baseline_variant`` / ``adapted_variant``)."""
    out = []
    for (dataset, split, metric), cases in _case_groups(scores, cfg):
        per_ranking = cases.groupby("ranking")[["baseline", "adapted"]].mean()
        out.append({
            "dataset": dataset, "split": split, "metric": metric, "cases": len(cases),
            "improved": int((cases["adapted"] > cases["baseline"]).sum()),
            "rankings": len(per_ranking),
            "spearman_ranking_means": _corr(stats.spearmanr, per_ranking["baseline"],
                                            per_ranking["adapted"]),
            "pearson_ranking_means": _corr(stats.pearsonr, per_ranking["baseline"],
                                           per_ranking["adapted"]),
            "spearman_cases": _corr(stats.spearmanr, cases["baseline"], cases["adapted"]),
            "mean_change": float(np.mean(cases["adapted"] - cases["baseline"])),
        })
    return pd.DataFrame(out, columns=COLUMNS)
