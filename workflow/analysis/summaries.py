"""Per-architecture summaries and rankings of the selected scores (thesis 3.7 and 3.7.1).

From the long table of :func:`workflow.analysis.correlations.select_scores` (one value per
score and single-layer loss network):

- :func:`arch_scores`: per score and architecture the mean over its extraction layers, the
  maximum (the best layer's value; the minimum where the metric is lower-is-better) and
  which layer that is;
- :func:`rankings`: per score, the architectures ranked by their best layer's value
  (``kind = architecture``) and the extraction layers 1..4 ranked by their mean over the
  architectures, with how many architectures have their best value at that layer
  (``kind = layer``). Rank 1 is the best; ties share the lower rank ("min" ranking).

Only single-layer loss networks enter (an LPIPS set is not a layer of the architecture).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = ["score", "benchmark", "metric", "arch", "layers", "mean", "best",
                   "best_layer"]
RANK_COLUMNS = ["score", "benchmark", "metric", "kind", "rank", "item", "value", "best_for"]


def _single(selected: pd.DataFrame) -> pd.DataFrame:
    return selected[selected["layer"].astype(str).isin(["1", "2", "3", "4"])]


def _sign(metric: pd.Series, lower_is_better: Sequence[str]) -> np.ndarray:
    return np.where(metric.isin(list(lower_is_better)), -1.0, 1.0)


def arch_scores(selected: pd.DataFrame, lower_is_better: Sequence[str] = ()) -> pd.DataFrame:
    """Mean and best value per (score, architecture) over the single-layer loss networks."""
    d = _single(selected)
    if d.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    d = d.assign(key=_sign(d["metric"], lower_is_better) * d["value"].to_numpy(float))
    rows = []
    for (score, arch), g in d.groupby(["score", "arch"], sort=False):
        best = g.loc[g["key"].idxmax()]
        rows.append({"score": score, "benchmark": best["benchmark"], "metric": best["metric"],
                     "arch": arch, "layers": len(g), "mean": float(g["value"].mean()),
                     "best": float(best["value"]), "best_layer": str(best["layer"])})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _ranked(values: pd.Series, sign: float) -> pd.Series:
    return (-sign * values).rank(method="min").astype(int)


def rankings(selected: pd.DataFrame, lower_is_better: Sequence[str] = ()) -> pd.DataFrame:
    """Architectures (by best layer) and layers (by mean over architectures) per score."""
    summary = arch_scores(selected, lower_is_better)
    d = _single(selected)
    out = []
    for score, s in summary.groupby("score", sort=False):
        sign = -1.0 if s["metric"].iloc[0] in set(lower_is_better) else 1.0
        info = {"score": score, "benchmark": s["benchmark"].iloc[0], "metric": s["metric"].iloc[0]}
        a = s.assign(rank=_ranked(s["best"], sign)).sort_values(["rank", "arch"], kind="stable")
        out += [{**info, "kind": "architecture", "rank": int(r["rank"]), "item": r["arch"],
                 "value": r["best"], "best_for": pd.NA} for _, r in a.iterrows()]
        layers = d[d["score"] == score].groupby(d["layer"].astype(str))["value"].mean()
        best_for = s["best_layer"].value_counts()
        ranks = _ranked(layers, sign)
        for layer in sorted(layers.index, key=lambda x: (ranks[x], x)):
            out.append({**info, "kind": "layer", "rank": int(ranks[layer]), "item": layer,
                        "value": float(layers[layer]), "best_for": int(best_for.get(layer, 0))})
    df = pd.DataFrame(out, columns=RANK_COLUMNS)
    return df.astype({"best_for": "Int64"}) if not df.empty else df


def arch_scores_wide(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as printed: one row per architecture, ``<score> mean`` / ``<score> max``
    (and the best layer) per score."""
    if summary.empty:
        return pd.DataFrame(columns=["arch"])
    parts = []
    for score, g in summary.groupby("score", sort=False):
        g = g.set_index("arch")
        parts.append(pd.DataFrame({f"{score} mean": g["mean"], f"{score} max": g["best"],
                                   f"{score} best layer": g["best_layer"]}))
    wide = pd.concat(parts, axis=1)
    wide.index.name = "arch"
    return wide.reset_index()


def top_items(ranks: pd.DataFrame, kind: str) -> dict[str, str]:
    """score -> the first-ranked item(s) of ``kind`` ("a = b" where tied)."""
    r = ranks[(ranks["kind"] == kind) & (ranks["rank"] == 1)] if not ranks.empty else ranks
    return {s: " = ".join(map(str, g["item"])) for s, g in r.groupby("score", sort=False)}
