"""Figures of the analysis (seaborn; PNG + SVG), built from whatever results exist, and the
drawing helpers ``study_figures.py`` shares. ``all_figures.py`` draws every one of ``FIGURES``
(``python -m workflow analysis figures``); those of this module:

- ``scores_by_layer``: each selected score (config ``analysis.scores``) against the extraction
  layer 1..4, one line per architecture, one panel per score;
- ``flops_pareto``: score vs log10 multiply-adds (config ``analysis.pareto.cost``) of the
  forward pass to the tap, one panel per score of ``analysis.pareto.cost_scores`` (2AFC,
  JND), the Pareto frontier drawn and circled;
- ``imagenet_pareto``: score vs ImageNet top-1 accuracy with its frontier;
- ``correlation_heatmap``: Pearson r of every attribute with every score (* p < 0.05);
- ``adaptation``: adapted vs baseline score per (loss network, comparison, ranking), one panel
  per dataset, with the count of rankings the adaptation improved and their Spearman rho;
- ``probes``: correct pairs per probe set, loss network, comparison and channel normalisation.

Every architecture has one colour in every figure (its position in the registry indexes the
palette). A figure whose data is absent is still written, as a panel saying "no data" and why,
so the declared outputs always exist and a partial study still gets a report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on compute nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from scipy import stats  # noqa: E402

from workflow.analysis import FIGURE_FORMATS as FORMATS  # noqa: E402
from workflow.archs import ARCHS  # noqa: E402
from workflow.files import atomic_path  # noqa: E402

REPORT_WIDTH_PX = 1000  # about how wide the report shows a figure
TEXT_PX: dict[str, float] = {}  # figure -> its smallest text, in px at REPORT_WIDTH_PX
LAYER_MARKERS = {"1": "o", "2": "s", "3": "^", "4": "D", "lpips": "*"}
METRIC_LABELS = {
    "2afc": "2AFC score (fraction agreeing with humans)",
    "jnd_ap": "JND average precision",
    "srcc": "SRCC with the subjective scores",
    "krcc": "KRCC with the subjective scores",
    "plcc": "PLCC (logistic fit) with the subjective scores",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "quality": "quality TP/(TP+FP+FN)",
    "completeness": "completeness TP/(TP+FN)",
    "correctness": "correctness TP/(TP+FP)",
    "accuracy": "test accuracy (fraction)",
    "correct": "correct pairs",
}
COST_LABELS = {
    "flops": "log10 FLOPs to the tap (per {s}x{s} image)",
    "macs": "log10 multiply-adds to the tap (per {s}x{s} image; the thesis's MFLOPS)",
    "params_to_tap": "log10 parameters up to the tap",
    "features": "log10 features C·H·W at the tap ({s}x{s} input)",
    "channels": "log10 channels at the tap",
}


class _Colors(dict):
    """Architecture -> colour; a name outside the table (a custom loss network) takes the
    next colour of the cycle."""

    def __init__(self, names: list[str], palette: list) -> None:
        super().__init__({a: palette[i % len(palette)] for i, a in enumerate(names)})
        self.palette = palette

    def __missing__(self, arch: str) -> Any:
        self[arch] = self.palette[len(self) % len(self.palette)]
        return self[arch]


def arch_colors(palette: str = "tab20") -> dict[str, Any]:
    """One fixed colour per architecture, by registry position (not by what a run contains):
    the study's 14, then the node-name presets (a short palette cycles rather than fails)."""
    from workflow.archs import PRESETS

    names = [*ARCHS, *PRESETS]
    return _Colors(names, list(sns.color_palette(palette, max(len(names), 1))))


def _style(fig_cfg: Mapping[str, Any]) -> None:
    sns.set_theme(style=fig_cfg.get("style", "whitegrid"), context=fig_cfg.get("context", "paper"),
                  font_scale=float(fig_cfg.get("font_scale", 1.0)))


def text_px(fig: plt.Figure, width_px: float = REPORT_WIDTH_PX) -> float:
    """The smallest visible text of ``fig`` in pixels when the saved (tight) figure is shown
    ``width_px`` wide."""
    renderer = fig.canvas.get_renderer()
    width_in = fig.get_tightbbox(renderer).width
    sizes = [t.get_fontsize() for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip()
             and (t.axes is None or t.axes.get_visible())]
    return min(sizes) / 72.0 * width_px / width_in if sizes else float("inf")


def save(fig: plt.Figure, stem: Path, dpi: int) -> None:
    """PNG and SVG, each written atomically (and the smallest text size noted in TEXT_PX)."""
    TEXT_PX[stem.name] = text_px(fig)
    for fmt in FORMATS:
        with atomic_path(stem.with_suffix(f".{fmt}")) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def no_data(stem: Path, title: str, why: str, dpi: int) -> str:
    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, f"no data\n{why}", ha="center", va="center", wrap=True,
            transform=ax.transAxes)
    save(fig, stem, dpi)
    return f"{stem.name}: no data ({why})"


def _grid(n: int, fig_cfg: Mapping[str, Any]) -> tuple[plt.Figure, np.ndarray]:
    cols = min(n, int(fig_cfg.get("max_columns", 3)))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(float(fig_cfg.get("panel_width", 4.0)) * cols,
                                      float(fig_cfg.get("panel_height", 3.2)) * rows))
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def _arch_legend(fig: plt.Figure, archs, colors) -> None:
    handles = [plt.Line2D([], [], color=colors[a], marker="o", lw=1.5, label=a) for a in archs]
    fig.legend(handles=handles, title="architecture", loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False)


def _layer_legend(ax: plt.Axes, layers) -> None:
    handles = [plt.Line2D([], [], ls="", color="0.3", marker=LAYER_MARKERS.get(str(x), "o"),
                          label=f"layer {x}") for x in layers]
    ax.legend(handles=handles, loc="lower right", fontsize="small", frameon=True)


def _ordered_archs(values) -> list[str]:
    present = set(map(str, values))
    return [a for a in ARCHS if a in present] + sorted(present - set(ARCHS))


# ----------------------------------------------------------------------------- figures


def scores_by_layer(selected: pd.DataFrame, cfg: Mapping[str, Any], colors, stem: Path) -> str:
    fig_cfg = cfg.get("figures", {})
    dpi = int(fig_cfg.get("dpi", 150))
    single = selected[selected["layer"].astype(str).isin(["1", "2", "3", "4"])]
    if single.empty:
        return no_data(stem, "Scores by extraction layer",
                       "no selected score (config analysis.scores) has single-layer loss "
                       "networks", dpi)
    names = list(dict.fromkeys(single["score"]))
    fig, axes = _grid(len(names), fig_cfg)
    archs = _ordered_archs(single["arch"])
    for ax, name in zip(axes.flat, names, strict=False):
        d = single[single["score"] == name].assign(layer_i=lambda x: x["layer"].astype(int))
        for arch, g in d.groupby("arch", sort=False):
            g = g.sort_values("layer_i")
            ax.plot(g["layer_i"], g["value"], marker="o", color=colors.get(arch, "0.5"), label=arch)
        ax.set_xticks([1, 2, 3, 4], ["1\nearly", "2", "3", "4\nlate"])
        ax.set_xlabel("extraction layer")
        ax.set_ylabel(METRIC_LABELS.get(d["metric"].iloc[0], d["metric"].iloc[0]))
        ax.set_title(name, fontsize="medium")
    _arch_legend(fig, archs, colors)
    fig.suptitle("Scores by extraction layer")
    save(fig, stem, dpi)
    by_layer = single.groupby(["score", "layer"], sort=False)["value"].mean()
    finding = "; ".join(
        f"{name} is highest at layer {by_layer[name].idxmax()} on average over "
        f"{single[single['score'] == name]['arch'].nunique()} architectures" for name in names[:3])
    more = f" (and {len(names) - 3} more panels)" if len(names) > 3 else ""
    return f"{stem.name}: {len(names)} panels", finding + more + "."


def _pareto_panel(ax: plt.Axes, d: pd.DataFrame, colors, log_x: bool) -> None:
    x = np.log10(d["x"].to_numpy(float)) if log_x else d["x"].to_numpy(float)
    for (arch, layer), g in d.assign(px=x).groupby(["arch", "layer"], sort=False):
        ax.scatter(g["px"], g["value"], color=colors.get(arch, "0.5"),
                   marker=LAYER_MARKERS.get(str(layer), "o"), s=36, zorder=3)
    front = d.assign(px=x)[d["on_front"].astype(bool)].sort_values("px")
    if not front.empty:
        minimize = bool(d["minimize_x"].iloc[0])
        # staircase: lower cost -> lower score (steps-post);
        # higher accuracy -> lower score (steps-pre)
        ax.plot(front["px"], front["value"], color="black", lw=1, zorder=2,
                drawstyle="steps-post" if minimize else "steps-pre", label="Pareto frontier")
        ax.scatter(front["px"], front["value"], s=110, facecolors="none", edgecolors="black",
                   lw=1, zorder=4)


def pareto_figure(pareto: pd.DataFrame, cfg: Mapping[str, Any], colors, stem: Path,
                  accuracy: bool) -> str:
    fig_cfg = cfg.get("figures", {})
    dpi = int(fig_cfg.get("dpi", 150))
    title = "ImageNet accuracy vs score" if accuracy else "Cost vs score"
    if not pareto.empty:
        pareto = pareto[(pareto["x_attribute"] == "imagenet_acc1") == accuracy]
    d = pareto
    if d.empty:
        key = "accuracy_scores" if accuracy else "cost_scores"
        return no_data(stem, title, f"none of the scores of config analysis.pareto.{key} is in "
                                    f"the results", dpi)
    names = list(dict.fromkeys(d["score"]))
    fig, axes = _grid(len(names), fig_cfg)
    for ax, name in zip(axes.flat, names, strict=False):
        p = d[d["score"] == name]
        _pareto_panel(ax, p, colors, log_x=not accuracy)
        attr, size = p["x_attribute"].iloc[0], p["input_size"].iloc[0]
        if accuracy:
            ax.set_xlabel("ImageNet top-1 accuracy (%) of the IMAGENET1K_V1 weights")
        else:
            ax.set_xlabel(COST_LABELS.get(attr, f"log10 {attr}").format(s=size))
        metric = str(p["metric"].iloc[0])
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(name, fontsize="medium")
        _layer_legend(ax, sorted(set(p["layer"].astype(str)), key=str))
    _arch_legend(fig, _ordered_archs(d["arch"]), colors)
    fig.suptitle(title + " (circled: Pareto frontier)")
    save(fig, stem, dpi)
    p = d[d["score"] == names[0]]
    if accuracy:
        ok = p.dropna(subset=["x", "value"])
        r = (stats.pearsonr(ok["x"], ok["value"]).statistic
             if len(ok) > 2 and ok["x"].nunique() > 1 and ok["value"].nunique() > 1
             else float("nan"))
        finding = (f"Pearson r of ImageNet top-1 accuracy with {names[0]} over {len(ok)} loss "
                   f"networks: {r:.2f} (the study: -0.485 for 2AFC).")
    else:
        front = p[p["on_front"].astype(bool)].sort_values("x")
        finding = (f"{len(front)} of {len(p)} loss networks lie on the {names[0]} frontier, "
                   f"from {front['lossnet'].iloc[0]} (cheapest) to {front['lossnet'].iloc[-1]} "
                   f"(best score).") if not front.empty else f"no frontier for {names[0]}."
    return f"{stem.name}: {len(names)} panels", finding


def correlation_heatmap(corr: pd.DataFrame, cfg: Mapping[str, Any], stem: Path) -> str:
    fig_cfg = cfg.get("figures", {})
    dpi = int(fig_cfg.get("dpi", 150))
    d = corr.dropna(subset=["pearson_r"]) if not corr.empty else corr
    if d.empty:
        return no_data(stem, "Attribute correlations",
                       "no attribute/score pair with 3+ loss networks", dpi)
    r = d.pivot_table(index="attribute", columns="score", values="pearson_r", sort=False)
    p = d.pivot_table(index="attribute", columns="score", values="pearson_p", sort=False)
    annot = r.map(lambda v: f"{v:.2f}") + p.reindex_like(r).map(lambda v: "*" if v < 0.05 else "")
    fig, ax = plt.subplots(layout="constrained",
                           figsize=(2.0 + 0.9 * r.shape[1], 1.0 + 0.38 * r.shape[0]))
    sns.heatmap(r, annot=annot.to_numpy(), fmt="", cmap="vlag", vmin=-1, vmax=1, center=0, ax=ax,
                cbar_kws={"label": "Pearson r"}, linewidths=0.5)
    ax.set_xlabel("score")
    ax.set_ylabel("loss-network attribute")
    ax.set_title("Pearson correlation of attributes with scores (* p < 0.05)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    save(fig, stem, dpi)
    top = d.loc[d["pearson_r"].abs().idxmax()]
    finding = (f"The strongest correlation is {top['attribute']} with {top['score']}: "
               f"r = {top['pearson_r']:.2f} (p = {top['pearson_p']:.2g}, n = {int(top['n'])}).")
    return f"{stem.name}: {r.shape[0]} x {r.shape[1]}", finding


def adaptation_figure(scores: pd.DataFrame, cfg: Mapping[str, Any], colors, stem: Path) -> str:
    fig_cfg = cfg.get("figures", {})
    dpi = int(fig_cfg.get("dpi", 150))
    a = cfg.get("adaptation", {})
    base_v, adapt_v = a.get("baseline_variant", "baseline"), a.get("adapted_variant", "adapted")
    rows = scores[(scores["benchmark"] == "adaptation")
                  & (scores["metric"] == a.get("metric", "2afc"))
                  & (scores["split"] == a.get("split", "test")) & scores["ranking"].notna()]
    if a.get("datasets"):
        rows = rows[rows["dataset"].isin(list(a["datasets"]))]
    keys = ["dataset", "arch", "layer", "comparison", "channel_norm", "ranking"]
    base = rows[rows["variant"] == base_v].groupby(keys, dropna=False)["value"].mean()
    adapted = rows[rows["variant"] == adapt_v].groupby(keys, dropna=False)["value"].mean()
    d = pd.concat({"baseline": base, "adapted": adapted}, axis=1).dropna().reset_index()
    if d.empty:
        return no_data(stem, "Adaptation to distortion rankings",
                       f"no adaptation rows with variants {base_v!r} and {adapt_v!r} per ranking "
                       f"(config analysis.adaptation)", dpi)
    names = list(dict.fromkeys(d["dataset"]))
    fig, axes = _grid(len(names), fig_cfg)
    found = []
    for ax, name in zip(axes.flat, names, strict=False):
        g = d[d["dataset"] == name]
        for arch, ga in g.groupby("arch", sort=False):
            ax.scatter(ga["baseline"], ga["adapted"], s=18, color=colors.get(arch, "0.5"),
                       alpha=0.8)
        lo = float(min(g["baseline"].min(), g["adapted"].min()))
        hi = float(max(g["baseline"].max(), g["adapted"].max()))
        ax.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=1)
        better = int((g["adapted"] > g["baseline"]).sum())
        rho = stats.spearmanr(g["baseline"], g["adapted"]).statistic if len(g) > 2 else float("nan")
        ax.set_title(f"{name}: adapted better in {better}/{len(g)}, Spearman ρ = {rho:.2f}",
                     fontsize="medium")
        found.append(f"{better} of {len(g)} cases on {name}")
        ax.set_xlabel("baseline 2AFC on the ranking's test triplets")
        ax.set_ylabel("adapted 2AFC (mean over runs)")
    _arch_legend(fig, _ordered_archs(d["arch"]), colors)
    fig.suptitle("Adaptation: one point per (loss network, comparison, normalisation, ranking)")
    save(fig, stem, dpi)
    finding = ("The adapted metric beats its baseline in " + ", ".join(found)
               + " (published: 298 of 300).")
    return f"{stem.name}: {len(d)} points", finding


def _heatmap(ax: plt.Axes, frac: np.ndarray, annot: np.ndarray, xlabels, ylabels, cmap: str):
    """A heatmap with 8 pt cell text, drawn directly (seaborn's redraws the whole figure per
    call, which makes a many-panel figure slow)."""
    mesh = ax.pcolormesh(np.ma.masked_invalid(frac), cmap=cmap, vmin=0, vmax=1,
                         edgecolors="white", linewidth=0.5)
    norm = plt.Normalize(0, 1)
    for (i, j), text in np.ndenumerate(annot):
        if text:
            dark = not np.isnan(frac[i, j]) and norm(frac[i, j]) > 0.6
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xlim(0, frac.shape[1])
    ax.set_ylim(frac.shape[0], 0)
    ax.set_xticks(np.arange(len(xlabels)) + 0.5, xlabels, rotation=30, ha="right")
    ax.set_yticks(np.arange(len(ylabels)) + 0.5, ylabels)
    if not len(ylabels):
        ax.set_yticks([])
    ax.grid(False)
    return mesh


def probes_figure(scores: pd.DataFrame, cfg: Mapping[str, Any], stem: Path) -> tuple[str, str]:
    """One heatmap per probe set (rows: loss network and normalisation; columns: comparison
    method; cell: correct pairs, colour: the fraction), at most two panels a row so the cell
    text stays readable at report size."""
    fig_cfg = cfg.get("figures", {})
    dpi = int(fig_cfg.get("dpi", 150))
    metric = cfg.get("probes", {}).get("metric", "correct")
    rows = scores[(scores["benchmark"] == "probes") & (scores["metric"] == metric)]
    if rows.empty:
        why = f"no probes rows with metric {metric!r}"
        return no_data(stem, "Flaw probes", why, dpi), f"none: {why}"
    # the probes benchmark writes dataset "probes" and the probe set as split
    set_name = rows["split"].astype(str) if rows["dataset"].nunique() == 1 else (
        rows["dataset"].astype(str) + "/" + rows["split"].astype(str))
    rows = rows.assign(
        lossnet=rows["arch"].fillna("").astype(str) + "/" + rows["layer"].fillna("").astype(str),
        norm=rows["channel_norm"].map({True: "norm", False: "no norm"}).fillna("n/a").astype(str),
        set_name=set_name, comp=rows["comparison"].fillna("").replace("", "pixel").astype(str),
    )
    rows = rows.assign(line=rows["lossnet"] + " (" + rows["norm"] + ")")
    sets = list(dict.fromkeys(rows["set_name"]))
    comps = list(dict.fromkeys(rows["comp"]))
    lines = list(dict.fromkeys(rows.sort_values("line", kind="stable")["line"]))
    cols = min(2, len(sets))
    nrows = -(-len(sets) // cols)
    fig, axes = plt.subplots(nrows, cols, squeeze=False, layout="constrained",
                             figsize=(cols * (2.6 + 0.55 * len(comps)),
                                      nrows * (0.9 + 0.24 * len(lines))))
    for ax in axes.flat[len(sets):]:
        ax.set_visible(False)
    for k, (ax, name) in enumerate(zip(axes.flat, sets, strict=False)):
        g = rows[rows["set_name"] == name]
        val = g.pivot_table(index="line", columns="comp", values="value", aggfunc="mean",
                            sort=False).reindex(index=lines, columns=comps)
        n = int(g["n"].max())
        mesh = _heatmap(ax, (val / n).astype(float).to_numpy(),
                        val.map(lambda v: "" if np.isnan(v) else f"{v:g}").to_numpy(),
                        comps, lines if k % cols == 0 else [], "Greens")
        ax.set_title(f"{name} ({n} pairs)", fontsize="medium")
        ax.set_xlabel("comparison method")
        ax.set_ylabel("loss network (normalisation)" if k % cols == 0 else "")
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label="fraction of pairs correct", shrink=0.6)
    fig.suptitle("Flaw probes: correct pairs per probe set")
    save(fig, stem, dpi)
    frac = rows.assign(f=rows["value"] / rows["n"]).groupby(["line", "comp"])["f"].mean()
    (bl, bc), (wl, wc) = frac.idxmax(), frac.idxmin()
    finding = (f"{bl} with {bc} orders the most probe pairs correctly ({100 * frac.max():.0f}% "
               f"averaged over {len(sets)} sets), {wl} with {wc} the fewest "
               f"({100 * frac.min():.0f}%).")
    return f"{stem.name}: {len(lines)} x {len(comps)} x {len(sets)} sets", finding
