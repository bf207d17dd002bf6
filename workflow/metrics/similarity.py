"""Similarity metrics of Benchmark 1 (BAPPS): 2AFC agreement and JND average precision.

Both take distances from any metric (smaller = more similar) and the human
judgements stored in BAPPS. They accept NumPy arrays or torch tensors (2AFC is
also used on-device as a training signal by the adaptation study).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class TwoAFC(NamedTuple):
    """Per-triplet agreement with the human judgement, and its mean."""

    per_triplet: np.ndarray | torch.Tensor
    mean: float


def score_2afc(d0, d1, judge) -> TwoAFC:
    """2AFC agreement: ``(d0<d1)(1-j) + (d1<d0) j + 0.5 (d0==d1)`` per triplet.

    ``judge`` is the fraction of humans who chose p1 as closer to the reference,
    so a metric that prefers p0 (``d0 < d1``) agrees with the ``1 - j`` who
    chose p0. Ties earn half, as in the reference code. Shapes are flattened.
    Torch input gives a torch ``per_triplet`` on the same device.
    """
    if isinstance(d0, torch.Tensor):
        d0, d1 = d0.reshape(-1), d1.reshape(-1)
        j = torch.as_tensor(judge, device=d0.device).reshape(-1).to(torch.float32)
        _check_sizes(d0.numel(), d1.numel(), j.numel())
        s = (d0 < d1).float() * (1 - j) + (d1 < d0).float() * j + 0.5 * (d0 == d1).float()
        return TwoAFC(s, float(s.mean()) if s.numel() else float("nan"))
    d0 = np.asarray(d0, dtype=np.float64).reshape(-1)
    d1 = np.asarray(d1, dtype=np.float64).reshape(-1)
    j = np.asarray(judge, dtype=np.float64).reshape(-1)
    _check_sizes(d0.size, d1.size, j.size)
    s = (d0 < d1) * (1 - j) + (d1 < d0) * j + 0.5 * (d0 == d1)
    return TwoAFC(s, float(s.mean()) if s.size else float("nan"))


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
    d = (d.detach().float().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)).reshape(-1)
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
