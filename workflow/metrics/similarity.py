"""Similarity metrics: 2AFC agreement, JND average precision, and the BAPPS summary.

Both take distances from any metric (smaller = more similar) and human (or ranking)
judgements. They accept NumPy arrays or torch tensors (2AFC is also used on-device as a
training signal by the adaptation study). :func:`bapps_rows` is the one summary of a
metric on BAPPS that every benchmark reports: 2AFC per val subset and their plain mean,
JND AP per subset and pooled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch


class TwoAFC(NamedTuple):
    """Per-triplet agreement with the human judgement, and its mean."""

    per_triplet: np.ndarray | torch.Tensor
    mean: float


def agreement(d0, d1, judge):
    """The 2AFC formula, elementwise with broadcasting: ``(d0<d1)(1-j) + (d1<d0) j + 0.5 (d0==d1)``.

    ``judge`` is the fraction of humans (or the label of a ranking: 0 or 1) who chose p1 as
    closer to the reference, so a metric that prefers p0 (``d0 < d1``) agrees with the
    ``1 - j`` who chose p0. Ties earn half, as in the reference code.
    """
    if isinstance(d0, torch.Tensor):
        return (d0 < d1).float() * (1 - judge) + (d1 < d0).float() * judge \
            + 0.5 * (d0 == d1).float()
    return (d0 < d1) * (1 - judge) + (d1 < d0) * judge + 0.5 * (d0 == d1)


def score_2afc(d0, d1, judge) -> TwoAFC:
    """2AFC agreement per triplet (:func:`agreement`) and its mean; shapes are flattened.
    Torch input gives a torch ``per_triplet`` on the same device."""
    if isinstance(d0, torch.Tensor):
        d0, d1 = d0.reshape(-1), d1.reshape(-1)
        j = torch.as_tensor(judge, device=d0.device).reshape(-1).to(torch.float32)
        _check_sizes(d0.numel(), d1.numel(), j.numel())
        s = agreement(d0, d1, j)
        return TwoAFC(s, float(s.mean()) if s.numel() else float("nan"))
    d0 = np.asarray(d0, dtype=np.float64).reshape(-1)
    d1 = np.asarray(d1, dtype=np.float64).reshape(-1)
    j = np.asarray(judge, dtype=np.float64).reshape(-1)
    _check_sizes(d0.size, d1.size, j.size)
    s = agreement(d0, d1, j)
    return TwoAFC(s, float(s.mean()) if s.size else float("nan"))


def twoafc_rate(d0: torch.Tensor, d1: torch.Tensor, labels: torch.Tensor, dim: int = 0
                ) -> torch.Tensor:
    """Mean :func:`agreement` along ``dim`` of broadcasting tensors: e.g. distances
    ``[N, V, R]`` of V comparison methods under R rankings against labels ``[N, 1, R]``."""
    return agreement(d0, d1, labels.float()).mean(dim)


def _check_sizes(*sizes: int) -> None:
    if len(set(sizes)) != 1:
        raise ValueError(f"d0, d1 and judge must have the same number of elements, got {sizes}")


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """PASCAL VOC all-point average precision (precision made monotone from the right)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    # envelope: precision at recall r is the best precision at any recall >= r
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def jnd_average_precision(d, same) -> float:
    """JND average precision: how well small distances find pairs humans called the same.

    Pairs are sorted by distance ascending (stable sort); ``same`` (the fraction
    of humans who called the pair identical) counts as soft true positives:
    ``TP = cumsum(same)``, ``FP = cumsum(1 - same)``; recall = TP / sum(same),
    precision = TP / (TP + FP); VOC all-point AP. Distances are flattened first:
    the reference LPIPS code argsorted an [N, 1, 1, 1] array along its last axis,
    which leaves the order unsorted (its bug; fixed here). NaN when no pair
    was judged the same (recall undefined).
    """
    d = d.detach().float().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)
    d = d.reshape(-1)
    s = (same.detach().float().cpu().numpy() if isinstance(same, torch.Tensor)
         else np.asarray(same)).astype(np.float64).reshape(-1)
    _check_sizes(d.size, s.size)
    if s.sum() <= 0:  # recall is undefined: no pair was judged the same
        return float("nan")
    order = np.argsort(d, kind="stable")
    s = s[order]
    tp = np.cumsum(s)
    fp = np.cumsum(1.0 - s)
    recall = tp / s.sum()
    precision = tp / (tp + fp)
    return voc_ap(recall, precision)


def _concat(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return np.concatenate(parts)


def bapps_rows(twoafc: Mapping[str, tuple[Any, Any, Any]],
               jnd: Mapping[str, tuple[Any, Any]]) -> list[dict[str, Any]]:
    """The BAPPS summary of one metric, as scores-table rows.

    ``twoafc``: val subset -> ``(d0, d1, judge)``; ``jnd``: subset -> ``(d, same)``. Rows
    (``dataset``, ``split``, ``metric``, ``value``, ``n``): 2AFC per subset, then ``mean``, the
    study's 2AFC (the plain, unweighted mean of the subsets; ``n`` is the number of triplets
    it covers); JND AP per subset, then ``pooled`` (AP of all pairs together, as the
    loss-network study reports it).
    """
    rows: list[dict[str, Any]] = []
    scores, total = [], 0
    for subset, (d0, d1, judge) in twoafc.items():
        value = score_2afc(d0, d1, judge).mean
        rows.append({"dataset": "bapps-2afc", "split": subset, "metric": "2afc", "value": value,
                     "n": len(d0)})
        scores.append(value)
        total += len(d0)
    if scores:
        rows.append({"dataset": "bapps-2afc", "split": "mean", "metric": "2afc",
                     "value": float(np.mean(scores)), "n": total})
    for subset, (d, same) in jnd.items():
        rows.append({"dataset": "bapps-jnd", "split": subset, "metric": "jnd_ap",
                     "value": jnd_average_precision(d, same), "n": len(d)})
    if jnd:
        ds, sames = [d for d, _ in jnd.values()], [s for _, s in jnd.values()]
        rows.append({"dataset": "bapps-jnd", "split": "pooled", "metric": "jnd_ap",
                     "value": jnd_average_precision(_concat(ds), _concat(sames)),
                     "n": sum(len(d) for d in ds)})
    return rows
