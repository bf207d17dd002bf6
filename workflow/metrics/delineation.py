"""Completeness, correctness and quality of a road delineation (Wiedemann et al. 1998).

A prediction (road probability) is binarised at ``threshold`` (a pixel is road when its
probability is >= threshold; 0.3 in the study) and compared with a binary reference map.

Pixel-exact (``tolerance=0``), with TP / FP / FN the usual pixel counts:
    completeness = TP / (TP + FN)     (recall: share of the reference that was found)
    correctness  = TP / (TP + FP)     (precision: share of the prediction that is road)
    quality      = TP / (TP + FP + FN)

Relaxed (``tolerance=t`` px): the *buffer* of a mask is every pixel within Euclidean distance
<= t of one of its pixels (a dilation by a disk of radius t, the usual buffer of the road
extraction literature; a square would stretch it by sqrt(2) along diagonals). Then
    completeness = |reference inside the buffer of the prediction| / |reference|
    correctness  = |prediction inside the buffer of the reference| / |prediction|
    quality      = compl * corr / (compl + corr - compl * corr)
The quality formula is the one that equals TP / (TP + FP + FN) in the exact case (divide the
three counts by TP) and needs no single "TP" count, which the relaxed case lacks (matched
predicted and matched reference pixels differ in number). Per-image counts are returned, so
another convention can be computed from them.

Undefined ratios (an empty reference or an empty prediction) are NaN, never 0 or 1. Sums of
counts over images (``pool_counts``) give the dataset-level scores the benchmark reports.
Everything runs batched on the tensors' device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.nn import functional as F

COUNT_KEYS = ("n_pred", "n_ref", "matched_pred", "matched_ref")
METRICS = ("completeness", "correctness", "quality")


def disk(radius: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean (2r+1) x (2r+1) disk: offsets (dy, dx) with dy^2 + dx^2 <= r^2."""
    r = int(radius)
    if r < 0:
        raise ValueError(f"tolerance must be >= 0 px, got {radius}")
    d = torch.arange(-r, r + 1, device=device)
    return d[:, None] ** 2 + d[None, :] ** 2 <= r * r


def buffer(mask: Tensor, radius: int) -> Tensor:
    """Pixels within Euclidean distance ``radius`` of a True pixel of ``mask`` [N, H, W] (bool).

    A convolution with the disk counts the mask pixels under the disk; the counts are small
    integers, exact in float32, so ``> 0.5`` is an exact test.
    """
    if radius == 0:
        return mask.bool()
    k = disk(radius, mask.device).to(torch.float32)[None, None]
    counts = F.conv2d(mask[:, None].to(torch.float32), k, padding=int(radius))
    return counts[:, 0] > 0.5


def binarize(prediction: Tensor, threshold: float) -> Tensor:
    """Road where probability >= ``threshold``."""
    return prediction >= threshold


def match_counts(prediction: Tensor, reference: Tensor, threshold: float = 0.3,
                 tolerance: int = 0) -> dict[str, Tensor]:
    """Per-image counts for probability maps ``prediction`` and binary maps ``reference``.

    Shapes [N, H, W] or [N, 1, H, W]. Returns int64 [N] tensors ``n_pred``, ``n_ref``,
    ``matched_pred`` (predicted road pixels within ``tolerance`` of reference road) and
    ``matched_ref`` (reference road pixels within ``tolerance`` of predicted road). With
    ``tolerance=0`` both matched counts are the TP count.
    """
    if prediction.ndim == 4:
        prediction = prediction[:, 0]
    if reference.ndim == 4:
        reference = reference[:, 0]
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} must "
            f"both be [N, H, W] of the same size"
        )
    pred = binarize(prediction, threshold)
    ref = reference.bool() if reference.dtype == torch.bool else reference > 0.5
    dims = (-2, -1)
    return {
        "n_pred": pred.sum(dims, dtype=torch.int64),
        "n_ref": ref.sum(dims, dtype=torch.int64),
        "matched_pred": (pred & buffer(ref, tolerance)).sum(dims, dtype=torch.int64),
        "matched_ref": (ref & buffer(pred, tolerance)).sum(dims, dtype=torch.int64),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def scores_from_counts(counts: Mapping[str, float | int]) -> dict[str, float]:
    """Completeness, correctness and quality of one set of (scalar) counts."""
    compl = _ratio(float(counts["matched_ref"]), float(counts["n_ref"]))
    corr = _ratio(float(counts["matched_pred"]), float(counts["n_pred"]))
    den = compl + corr - compl * corr
    if math.isnan(den):
        qual = math.nan
    else:
        qual = compl * corr / den if den > 0 else 0.0  # den == 0 only when both are 0
    return {"completeness": compl, "correctness": corr, "quality": qual}


def pool_counts(counts: Mapping[str, Tensor]) -> dict[str, int]:
    """Sum per-image counts over images (dataset-level scores weigh every pixel alike)."""
    return {k: int(counts[k].sum()) for k in COUNT_KEYS}


def delineation_scores(prediction: Tensor, reference: Tensor, threshold: float = 0.3,
                       tolerance: int = 0) -> dict[str, float]:
    """Pooled completeness / correctness / quality over a batch of images."""
    counts = match_counts(prediction, reference, threshold, tolerance)
    return scores_from_counts(pool_counts(counts))
