"""The study's summary figures (thesis 3.7.1 and Table 4.4, both SR protocols, the adaptation
paper's per-ranking view), drawn by :func:`workflow.analysis.all_figures.run_figures`.

Each function draws one figure into ``stem`` (PNG + SVG) and returns ``(note, finding)``:
the note for the log, the finding (one sentence computed from the data) for the caption.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy import stats

from workflow.analysis import summaries
from workflow.analysis.adaptation_stats import all_cases, ranking_means
from workflow.analysis.figures import (
    METRIC_LABELS,
    _arch_legend,
    _grid,
    _ordered_archs,
    no_data,
    save,
)
from workflow.archs import PIXEL
from workflow.compare import METHODS

BAPPS_SUBSETS = ("traditional", "cnn", "superres", "deblur", "color", "frameinterp")
NORMS = {True: "channel-normalised", False: "not normalised"}


def _dpi(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("figures", {}).get("dpi", 150))


def rankings_figure(ranks: pd.DataFrame, per_arch: pd.DataFrame, cfg: Mapping[str, Any],
                    stem: Path) -> tuple[str, str]:
    """Rank of every architecture (by its best layer) per score, the best layer in the cell."""
    title = "Architecture rankings per score"
    a = ranks[ranks["kind"] == "architecture"] if not ranks.empty else ranks
    if a.empty:
        why = "no selected score (config analysis.scores) has single-layer loss networks"
        return no_data(stem, title, why, _dpi(cfg)), f"none: {why}"
    scores = list(dict.fromkeys(a["score"]))
    archs = _ordered_archs(a["item"])
    rank = a.pivot_table(index="item", columns="score", values="rank", sort=False)
    rank = rank.reindex(index=archs, columns=scores)
    layer = per_arch.pivot_table(index="arch", columns="score", values="best_layer",
                                 aggfunc="first", sort=False).reindex(index=archs, columns=scores)
    annot = [[("" if np.isnan(rank.iat[i, j]) else
               f"{int(rank.iat[i, j])} (L{layer.iat[i, j]})") for j in range(len(scores))]
             for i in range(len(archs))]
    fig, ax = plt.subplots(layout="constrained",
                           figsize=(2.2 + 0.85 * len(scores), 1.0 + 0.34 * len(archs)))
    sns.heatmap(rank.astype(float), annot=np.array(annot, dtype=object), fmt="",
                cmap="viridis_r", ax=ax, linewidths=0.5, annot_kws={"fontsize": 8},
                cbar_kws={"label": "rank (1 = best)"})
    ax.set_xlabel("score")
    ax.set_ylabel("architecture")
    ax.set_title("Rank by the best extraction layer (L: that layer)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    save(fig, stem, _dpi(cfg))
    top = summaries.top_items(ranks, "architecture")
    layers = summaries.top_items(ranks, "layer")
    finding = "; ".join(f"{top[s]} ranks first on {s} (layer {layers.get(s, '?')} is best on "
                        f"average)" for s in scores[:3])
    more = f" (and {len(scores) - 3} more scores in the rankings table)" if len(scores) > 3 else ""
    return f"{stem.name}: {len(archs)} x {len(scores)}", finding + more + "."


def _bapps_methods(scores: pd.DataFrame) -> pd.DataFrame:
    arch = scores["arch"].fillna("").astype(str)
    two_afc = (scores["dataset"] == "bapps-2afc") & (scores["metric"] == "2afc")
    jnd = ((scores["dataset"] == "bapps-jnd") & (scores["metric"] == "jnd_ap")
           & (scores["split"] == "pooled"))
    d = scores[(scores["benchmark"] == "similarity") & (two_afc | jnd)
               & (arch != "") & (arch != PIXEL)
               & scores["channel_norm"].notna() & (scores["variant"].fillna("") == "")]
    # the panel: a 2AFC subset (or "mean"), or "JND pooled"
    panel = d["split"].astype(str).where(d["dataset"] == "bapps-2afc", "JND pooled")
    return d.assign(panel=panel, comparison=d["comparison"].astype(str),
                    norm=d["channel_norm"].astype(bool).map(NORMS),
                    lossnet=d["arch"].astype(str) + "/" + d["layer"].astype(str))


def comparison_methods_figure(scores: pd.DataFrame, cfg: Mapping[str, Any], stem: Path
                              ) -> tuple[str, str]:
    """Thesis Table 4.4 as a figure: 2AFC per comparison method and channel normalisation, one
    panel per BAPPS val subset, their mean, and JND (pooled); bars = mean over the loss
    networks scored, dots = each loss network."""
    title = "Comparison methods on BAPPS"
    d = _bapps_methods(scores)
    if d.empty:
        why = "no BAPPS 2AFC or JND rows of loss networks (benchmark similarity)"
        return no_data(stem, title, why, _dpi(cfg)), f"none: {why}"
    present = list(dict.fromkeys(d["panel"]))
    splits = [s for s in (*BAPPS_SUBSETS, "mean", "JND pooled") if s in present]
    splits += [s for s in present if s not in splits]
    methods = [m for m in METHODS if m in set(d["comparison"])]
    methods += sorted(set(d["comparison"]) - set(methods))
    norms = [n for n in NORMS.values() if n in set(d["norm"])]
    fig, axes = _grid(len(splits), {**cfg.get("figures", {}), "max_columns": 3,
                                    "panel_width": 3.4, "panel_height": 2.8})
    palette = dict(zip(NORMS.values(), sns.color_palette("Set2", 2), strict=True))
    for ax, split in zip(axes.flat, splits, strict=False):
        g = d[d["panel"] == split]
        sns.barplot(g, x="comparison", y="value", hue="norm", order=methods, hue_order=norms,
                    palette=palette, errorbar=None, ax=ax, legend=False, alpha=0.85)
        sns.stripplot(g, x="comparison", y="value", hue="norm", order=methods, hue_order=norms,
                      palette=["0.2"] * len(norms), dodge=True, size=2.5, ax=ax, legend=False)
        lo = float(g["value"].min())
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, float(g["value"].max()) + 0.03))
        ax.set_title({"mean": "2AFC, mean of the subsets"}.get(split, split), fontsize="medium")
        ax.set_xlabel("")
        ax.set_ylabel("JND average precision" if split == "JND pooled" else "2AFC")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[n], label=n) for n in norms]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(norms), frameon=False)
    fig.suptitle(title + f" (bars: mean over {d['lossnet'].nunique()} loss networks; "
                         "dots: each)")
    save(fig, stem, _dpi(cfg))
    ref = "mean" if "mean" in splits else splits[0]
    m = (d[d["panel"] == ref].groupby(["comparison", "norm"])["value"].mean()
         .sort_values(ascending=False))
    (bm, bn), (wm, wn) = m.index[0], m.index[-1]
    what = "" if ref == "JND pooled" else "2AFC "
    finding = (f"On BAPPS {what}({ref}), {bm} ({bn}) scores highest on average over the loss "
               f"networks ({m.iloc[0]:.3f}) and {wm} ({wn}) lowest ({m.iloc[-1]:.3f}).")
    return f"{stem.name}: {len(splits)} panels", finding


def _sr_rows(scores: pd.DataFrame) -> pd.DataFrame:
    arch = scores["arch"].fillna("").astype(str)
    d = scores[(scores["benchmark"] == "super_resolution") & scores["metric"].isin(["psnr", "ssim"])
               & (arch != "") & (arch != PIXEL) & scores["variant"].notna()
               & scores["layer"].astype(str).isin(["1", "2", "3", "4"])]
    parts = d["variant"].astype(str).str.split("/", n=1, expand=True)
    if d.empty or parts.shape[1] < 2:
        return d.iloc[:0].assign(scale="", protocol="")
    return d.assign(scale=parts[0], protocol=parts[1].fillna(""))


def super_resolution_figure(scores: pd.DataFrame, cfg: Mapping[str, Any], colors, stem: Path
                            ) -> tuple[str, str]:
    """PSNR and SSIM per extraction layer under BOTH evaluation protocols (standard and
    reference: docs/super_resolution.md), one panel per (metric, scale, protocol), values
    averaged over the test sets and runs."""
    title = "Super-resolution by extraction layer, both protocols"
    d = _sr_rows(scores)
    if d.empty:
        why = "no super_resolution PSNR / SSIM rows of single-layer loss networks"
        return no_data(stem, title, why, _dpi(cfg)), f"none: {why}"
    m = (d.groupby(["metric", "scale", "protocol", "arch", "layer"], sort=False)["value"].mean()
         .reset_index())
    protocols = [p for p in ("standard", "reference") if p in set(m["protocol"])]
    protocols += sorted(set(m["protocol"]) - set(protocols))
    panels = [(mt, sc, p) for mt in ("psnr", "ssim") for sc in sorted(set(m["scale"]))
              for p in protocols if not m[(m["metric"] == mt) & (m["scale"] == sc)
                                           & (m["protocol"] == p)].empty]
    fig, axes = _grid(len(panels), {**cfg.get("figures", {}), "max_columns": len(protocols),
                                    "panel_width": 3.4, "panel_height": 2.6})
    for ax, (mt, sc, p) in zip(axes.flat, panels, strict=False):
        g = m[(m["metric"] == mt) & (m["scale"] == sc) & (m["protocol"] == p)]
        for arch, ga in g.assign(li=g["layer"].astype(int)).groupby("arch", sort=False):
            ga = ga.sort_values("li")
            ax.plot(ga["li"], ga["value"], marker="o", ms=3, color=colors.get(arch, "0.5"))
        ax.set_xticks([1, 2, 3, 4])
        ax.set_xlabel("extraction layer")
        ax.set_ylabel(METRIC_LABELS.get(mt, mt))
        ax.set_title(f"{mt.upper()} {sc}, {p} protocol", fontsize="medium")
    _arch_legend(fig, _ordered_archs(m["arch"]), colors)
    fig.suptitle(title + " (mean over test sets)")
    save(fig, stem, _dpi(cfg))
    first = m[(m["metric"] == panels[0][0]) & (m["scale"] == panels[0][1])]
    best = {p: first[first["protocol"] == p].sort_values("value").iloc[-1] for p in protocols}
    finding = f"{panels[0][0].upper()} {panels[0][1]}: " + ", ".join(
        f"best {b['arch']}/{b['layer']} under the {p} protocol ({b['value']:.2f})"
        for p, b in best.items())
    if len(protocols) >= 2:
        w = first.pivot_table(index=["arch", "layer"], columns="protocol", values="value").dropna()
        if len(w) > 2:
            rho = stats.spearmanr(w[protocols[0]], w[protocols[1]]).statistic
            finding += (f"; the two protocols rank the {len(w)} loss networks with Spearman "
                        f"rho = {rho:.2f}")
    return f"{stem.name}: {len(panels)} panels", finding + "."


def adaptation_rankings_figure(scores: pd.DataFrame, cfg: Mapping[str, Any], stem: Path
                               ) -> tuple[str, str]:
    """The adaptation paper's aggregation: one point per ranking (its cases' mean baseline and
    adapted 2AFC), one panel per evaluation set, with the correlations over those points."""
    title = "Adaptation: per-ranking means"
    a = cfg.get("adaptation", {})
    means = ranking_means(scores, cfg)
    if not means.empty:
        means = means[(means["metric"] == a.get("metric", "2afc"))
                      & (means["split"] == a.get("split", "test"))]
        if a.get("datasets"):
            means = means[means["dataset"].isin(list(a["datasets"]))]
    if means.empty:
        why = "no adaptation rows with baseline and adapted scores per ranking"
        return no_data(stem, title, why, _dpi(cfg)), f"none: {why}"
    names = list(dict.fromkeys(means["dataset"]))
    fig, axes = _grid(len(names), {**cfg.get("figures", {}), "max_columns": 2,
                                   "panel_width": 3.6, "panel_height": 3.2})
    found = []
    for ax, name in zip(axes.flat, names, strict=False):
        g = means[means["dataset"] == name]
        ax.scatter(g["baseline"], g["adapted"], s=22, color="tab:blue", zorder=3)
        lo = float(min(g["baseline"].min(), g["adapted"].min()))
        hi = float(max(g["baseline"].max(), g["adapted"].max()))
        ax.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=1)
        ok = len(g) > 2 and g["baseline"].nunique() > 1 and g["adapted"].nunique() > 1
        rho = stats.spearmanr(g["baseline"], g["adapted"]).statistic if ok else float("nan")
        r = stats.pearsonr(g["baseline"], g["adapted"]).statistic if ok else float("nan")
        ax.set_title(f"{name}: {len(g)} rankings, ρ = {rho:.2f}, r = {r:.2f}", fontsize="medium")
        ax.set_xlabel("baseline 2AFC (mean over the ranking's cases)")
        ax.set_ylabel("adapted 2AFC")
        found.append(f"{name} Spearman {rho:.2f} over {len(g)} rankings (published: "
                     f"{ {'svhn': '0.66', 'stl10': '0.72'}.get(str(name), 'n/a') })")
    fig.suptitle(title + " (the paper's aggregation; dashed: no change)")
    save(fig, stem, _dpi(cfg))
    better = int((means["adapted"] > means["baseline"]).sum())
    finding = (f"Adaptation raised the mean 2AFC in {better} of {len(means)} rankings; "
               + "; ".join(found) + ".")
    return f"{stem.name}: {len(means)} points", finding


def adaptation_change_figure(scores: pd.DataFrame, cfg: Mapping[str, Any], stem: Path
                             ) -> tuple[str, str]:
    """Mean change (adapted minus baseline) per comparison method and normalisation on every
    evaluation set: the ranking sets' test triplets and BAPPS (2AFC mean, JND pooled), where
    the paper finds a small drop (about 0.01)."""
    title = "Adaptation: mean change per comparison method"
    c = all_cases(scores, cfg)
    if not c.empty:
        c = c[c["split"].astype(str).isin(["test", "mean", "pooled"])]
    if c.empty:
        why = "no adaptation cases (baseline and adapted rows) on test, mean or pooled splits"
        return no_data(stem, title, why, _dpi(cfg)), f"none: {why}"
    c = c.assign(change=c["adapted"] - c["baseline"],
                 method=c["comparison"].astype(str) + np.where(
                     c["channel_norm"].fillna(False).astype(bool), " (norm)", ""),
                 evaluation=c["dataset"].astype(str) + " " + c["split"].astype(str) + " "
                 + c["metric"].astype(str))
    sets = list(dict.fromkeys(c["evaluation"]))
    methods = list(dict.fromkeys(c.sort_values("method")["method"]))
    fig, ax = plt.subplots(layout="constrained",
                           figsize=(min(9.0, 2.5 + 1.1 * len(sets)), 3.6))
    sns.barplot(c, x="evaluation", y="change", hue="method", order=sets, hue_order=methods,
                errorbar=None, ax=ax, palette="tab10")
    ax.axhline(0, color="0.3", lw=1)
    ax.set_xlabel("evaluation set")
    ax.set_ylabel("adapted - baseline (mean over cases)")
    ax.legend(title="comparison", fontsize="small", title_fontsize="small",
              loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    ax.set_title(title)
    save(fig, stem, _dpi(cfg))
    mean = c.groupby("evaluation", sort=False)["change"].mean()
    finding = "Mean change after adaptation: " + ", ".join(
        f"{v:+.3f} on {k}" for k, v in mean.items()) + " (published: about -0.01 on BAPPS)."
    return f"{stem.name}: {len(sets)} sets x {len(methods)} methods", finding
