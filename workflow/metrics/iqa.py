"""Agreement of a distance with subjective scores: SRCC, KRCC, PLCC after a logistic fit,
with bootstrap confidence intervals over reference images (docs/similarity.md).

Orientation: a distance ``d`` is higher for less similar images; a subjective score is
turned into a *quality* ``q`` (the MOS as published when higher means better, minus the
DMOS when higher means more distorted). Every coefficient is computed between the
similarity ``-d`` and ``q``, so a metric that agrees with the observers scores near +1.

* SRCC: Spearman's rho, KRCC: Kendall's tau-b (``scipy.stats``; tau-b handles ties).
* PLCC: Pearson's r between ``q`` and the 5-parameter logistic of VQEG (2000) as used by
  Sheikh et al. (2006), ``f(s) = b1 (1/2 - 1 / (1 + exp(b2 (s - b3)))) + b4 s + b5``, fitted
  by least squares (``scipy.optimize.curve_fit``) to ``(s, q)``. ``s`` is standardised
  first (its scale differs by orders of magnitude between metrics); the initial guess is
  ``b1 = range(q)``, ``b2 = 1`` with the sign of the linear correlation, ``b3 = 0``,
  ``b4 = 0``, ``b5 = mean(q)``. Where the fit does not converge (or gives non-finite or
  constant values), or where a group has at most five images, PLCC falls back to Pearson's
  r of ``s`` and ``q`` themselves (the linear fit), and :func:`plcc` says so.
* Bootstrap: a resample draws ``R`` of the group's ``R`` reference images with replacement
  and takes *every* distorted image of each drawn reference (as often as it was drawn): the
  images of one reference are not independent. The same resamples serve every metric of a
  dataset (seeded per dataset and group, not per metric), so intervals of two metrics are
  paired. Percentile intervals; PLCC's resamples reuse the logistic of the full sample
  (refitting it a thousand times per metric would cost more than the scoring).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import optimize, stats

__all__ = ["Fit", "bootstrap_indices", "correlations", "krcc", "logistic5", "mos_rows", "plcc",
           "quality", "srcc", "twoafc_rows"]

CORRELATIONS = ("srcc", "krcc", "plcc")


def quality(mos: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Subjective scores oriented so that higher = better quality (a DMOS is negated)."""
    q = np.asarray(mos, np.float64)
    return q if higher_is_better else -q


def _nan_if_constant(fn, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(fn(x, y)[0])


def srcc(similarity: Sequence[float], q: Sequence[float]) -> float:
    """Spearman's rho (NaN where either side is constant)."""
    return _nan_if_constant(stats.spearmanr, np.asarray(similarity, float), np.asarray(q, float))


def krcc(similarity: Sequence[float], q: Sequence[float]) -> float:
    """Kendall's tau-b (NaN where either side is constant)."""
    return _nan_if_constant(stats.kendalltau, np.asarray(similarity, float), np.asarray(q, float))


def logistic5(s: np.ndarray, b1: float, b2: float, b3: float, b4: float, b5: float
              ) -> np.ndarray:
    """The 5-parameter logistic of VQEG / Sheikh et al. 2006."""
    with np.errstate(over="ignore"):
        return b1 * (0.5 - 1.0 / (1.0 + np.exp(b2 * (s - b3)))) + b4 * s + b5


class Fit(NamedTuple):
    """PLCC and how it was obtained: ``logistic`` (the fit converged) or ``linear``."""

    plcc: float
    kind: str
    predict: Any  # raw similarity -> predicted quality (the fitted function)


def plcc(similarity: Sequence[float], q: Sequence[float]) -> Fit:
    """Pearson's r between ``q`` and the logistic fitted to ``(similarity, q)``."""
    s, q = np.asarray(similarity, np.float64), np.asarray(q, np.float64)
    if len(s) < 2 or np.ptp(s) == 0 or np.ptp(q) == 0:
        return Fit(float("nan"), "linear", lambda x: np.asarray(x, np.float64))
    if len(s) <= 5:  # five parameters need more than five points
        return Fit(float(np.corrcoef(s, q)[0, 1]), "linear", lambda x: np.asarray(x, np.float64))
    mu, sd = float(s.mean()), float(s.std())
    z = (s - mu) / sd
    sign = 1.0 if np.corrcoef(z, q)[0, 1] >= 0 else -1.0
    p0 = [float(np.ptp(q)), sign, 0.0, 0.0, float(q.mean())]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", optimize.OptimizeWarning)
            beta, _ = optimize.curve_fit(logistic5, z, q, p0=p0, maxfev=20000)
        fitted = logistic5(z, *beta)
        if not np.all(np.isfinite(fitted)) or np.ptp(fitted) == 0:
            raise RuntimeError("degenerate fit")
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return Fit(float(np.corrcoef(s, q)[0, 1]), "linear", lambda x: np.asarray(x, np.float64))
    return Fit(float(np.corrcoef(fitted, q)[0, 1]), "logistic",
               lambda x: logistic5((np.asarray(x, np.float64) - mu) / sd, *beta))


def bootstrap_indices(ref_index: Sequence[int], resamples: int, seed: int) -> list[np.ndarray]:
    """``resamples`` index arrays into the images, each drawing the group's references with
    replacement and taking all images of every drawn reference (once per draw)."""
    ref_index = np.asarray(ref_index, np.int64)
    refs, inverse = np.unique(ref_index, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(refs))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(resamples)):
        drawn = rng.integers(0, len(refs), size=len(refs))
        out.append(np.concatenate([members[k] for k in drawn]))
    return out


def _interval(values: Sequence[float], level: float) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def correlations(similarity: np.ndarray, q: np.ndarray, boot: Sequence[np.ndarray],
                 level: float) -> dict[str, dict[str, Any]]:
    """SRCC, KRCC and PLCC of one group, each with its bootstrap interval over ``boot``."""
    fit = plcc(similarity, q)
    predicted = fit.predict(similarity)
    point = {"srcc": srcc(similarity, q), "krcc": krcc(similarity, q), "plcc": fit.plcc}
    draws: dict[str, list[float]] = {m: [] for m in CORRELATIONS}
    for idx in boot:
        s, y = similarity[idx], q[idx]
        rs, ry = stats.rankdata(s), stats.rankdata(y)
        draws["srcc"].append(_pearson(rs, ry))
        draws["krcc"].append(krcc(s, y))
        draws["plcc"].append(_pearson(predicted[idx], y))
    return {m: {"value": point[m], **dict(zip(("ci_low", "ci_high"),
                                              _interval(draws[m], level), strict=True)),
                **({"fit": fit.kind} if m == "plcc" else {})}
            for m in CORRELATIONS}


def group_seed(seed: int, *names: str) -> int:
    """A resample seed per (config seed, dataset, group): independent of the metric."""
    return (int(seed) * 1_000_003 + zlib.crc32("/".join(names).encode())) % (2 ** 32)


def mos_groups(dist_type: Sequence[str]) -> dict[str, np.ndarray]:
    """Split name -> image indices: ``all`` and ``dist/<type>`` per distortion type."""
    types = np.asarray(dist_type).astype(str)
    groups = {"all": np.arange(len(types))}
    groups |= {f"dist/{t}": np.flatnonzero(types == t) for t in dict.fromkeys(types)}
    return groups


def mos_rows(dataset: str, distances: Mapping[Any, np.ndarray], data: Mapping[str, np.ndarray],
             higher_is_better: bool, resamples: int, seed: int, level: float
             ) -> dict[Any, list[dict[str, Any]]]:
    """Scores-table rows of every metric (``distances``: key -> [N]) on one MOS dataset:
    srcc / krcc / plcc on ``all`` images and per distortion type, with intervals."""
    q = quality(data["mos"], higher_is_better)
    groups = mos_groups(data["dist_type"])
    ref = np.asarray(data["ref_index"], np.int64)
    boots = {g: bootstrap_indices(ref[idx], resamples, group_seed(seed, dataset, g))
             for g, idx in groups.items()}
    out: dict[Any, list[dict[str, Any]]] = {}
    for key, d in distances.items():
        sim = -np.asarray(d, np.float64)
        rows = out.setdefault(key, [])
        for g, idx in groups.items():
            for metric, r in correlations(sim[idx], q[idx], boots[g], level).items():
                rows.append({"dataset": dataset, "split": g, "metric": metric,
                             "value": r["value"], "ci_low": r["ci_low"],
                             "ci_high": r["ci_high"], "n": len(idx),
                             **({"fit": r["fit"]} if "fit" in r else {})})
    return out


def twoafc_rows(dataset: str, split: str, agreement: np.ndarray, subsets: Sequence[str],
                resamples: int, seed: int, level: float) -> list[dict[str, Any]]:
    """2AFC rows of per-triplet ``agreement``: ``split`` over all triplets and
    ``<split>/<subset>`` per subset (where there is more than one), with intervals over
    triplets (each has its own reference)."""
    agreement = np.asarray(agreement, np.float64)
    subsets = np.asarray(subsets).astype(str)
    groups = {split: np.arange(len(agreement))}
    if len(set(subsets)) > 1 or (len(subsets) and subsets[0] != "all"):
        groups |= {f"{split}/{s}": np.flatnonzero(subsets == s) for s in dict.fromkeys(subsets)}
    rows = []
    for g, idx in groups.items():
        a = agreement[idx]
        boot = bootstrap_indices(np.arange(len(a)), resamples, group_seed(seed, dataset, g))
        lo, hi = _interval([a[i].mean() for i in boot], level)
        rows.append({"dataset": dataset, "split": g, "metric": "2afc",
                     "value": float(a.mean()) if a.size else float("nan"),
                     "ci_low": lo, "ci_high": hi, "n": len(a)})
    return rows
