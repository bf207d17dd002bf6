"""The pixel baselines: rule-based distances between images, the loss networks ``pixel/<metric>``.

Inputs are float tensors in [0, 1], shape [N, 3, H, W] (RGB); :func:`distance` returns one
float64 value per pair ([N]), higher = less similar, so the 2AFC, JND and probe rules apply
unchanged. The metrics (names in :data:`workflow.archs.PIXEL_METRICS`; docs/similarity.md):

* ``l2``: the L2 of the LPIPS evaluation (``lpips.L2`` with its documented colour space,
  Lab): ``0.5 * mean(((Lab(x) - Lab(y)) / 100) ** 2)`` over pixels and channels, Lab as
  ``skimage.color.rgb2lab`` (``lpips.l2`` with ``range=100``).
* ``ssim``: the DSSIM of the LPIPS evaluation (``lpips.DSSIM`` in RGB):
  ``(1 - SSIM(x, y)) / 2`` with scikit-image's default SSIM (7x7 uniform window, sample
  covariances, K1 0.01, K2 0.03, the mean over the valid map and over the three channels).
  The data range is that of the images (255 for 8-bit values, 1 here: SSIM is unchanged by
  the scale).
* ``l1``: ``mean |x - y|``, ``l2_rgb``: ``mean (x - y) ** 2`` over pixels and channels, RGB in
  [0, 1]; ``ssim_lab``: the DSSIM above on ``Lab / 100`` (``lpips.DSSIM`` in Lab, range 100).

The LPIPS loader turns each 8-bit patch into [-1, 1] floats and its ``tensor2im`` back into
8 bits by truncation, which lowers 63 of the 256 levels by one before L2 and SSIM; here the
8-bit patches are used as they are (tests/test_pixel_baselines.py shows the two agree
exactly once that round trip is applied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from workflow.archs import PIXEL_METRICS
from workflow.imaging import resize
from workflow.metrics.image import rgb_to_lab, ssim

__all__ = ["METRICS", "distance", "images64", "pair_distances"]

PRECISION = "fp64"  # what the scores' precision column says: every distance is float64
LPIPS_SSIM = {"window": "uniform", "size": 7, "sample_covariance": True}


def images64(batch: np.ndarray, device: torch.device, size: int | None = None) -> Tensor:
    """uint8 NHWC -> float64 NCHW in [0, 1] on ``device`` (8-bit levels / 255 exactly, not
    via float32), resized as :func:`workflow.imaging.to_images` does when ``size`` differs."""
    x = torch.from_numpy(np.array(batch)).to(device).permute(0, 3, 1, 2).double() / 255
    return x if size is None else resize(x, size)


def _check(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"pixel baselines compare two [N, 3, H, W] RGB batches of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def _l1(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).abs().flatten(1).mean(1)


def _mse(x: Tensor, y: Tensor) -> Tensor:
    return ((x - y) ** 2).flatten(1).mean(1)


def _l2_lab(x: Tensor, y: Tensor) -> Tensor:  # x, y in Lab
    return 0.5 * _mse(x / 100, y / 100)


def _dssim(x: Tensor, y: Tensor) -> Tensor:
    return (1 - ssim(x, y, **LPIPS_SSIM)) / 2


def _dssim_lab(x: Tensor, y: Tensor) -> Tensor:  # x, y in Lab
    return _dssim(x / 100, y / 100)


# metric -> (the space it compares in, the distance of two batches in that space)
METRICS: dict[str, tuple[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "l1": ("rgb", _l1), "l2": ("lab", _l2_lab), "l2_rgb": ("rgb", _mse),
    "ssim": ("rgb", _dssim), "ssim_lab": ("lab", _dssim_lab),
}
assert set(METRICS) == set(PIXEL_METRICS)
SPACES: dict[str, Callable[[Tensor], Tensor]] = {"rgb": lambda x: x.double(), "lab": rgb_to_lab}


def _metric(metric: str) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    if metric not in METRICS:
        raise ValueError(f"unknown pixel metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric]


def pair_distances(metrics: Sequence[str], sets: Sequence[Tensor],
                   pairs: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """``{metric: [len(pairs), N]}`` float64 distances between the image batches
    ``sets[i]`` and ``sets[j]`` for every ``(i, j)`` of ``pairs``; each set is converted to
    each colour space once (a 2AFC reference serves p0 and p1)."""
    for x in sets:
        _check(x, sets[0])
    with torch.autocast(sets[0].device.type, enabled=False):
        spaces = {space: [SPACES[space](x) for x in sets]
                  for space in dict.fromkeys(_metric(m)[0] for m in metrics)}
        return {m: torch.stack([_metric(m)[1](spaces[_metric(m)[0]][i], spaces[_metric(m)[0]][j])
                                for i, j in pairs]) for m in metrics}


def distance(metric: str, x: Tensor, y: Tensor) -> Tensor:
    """``[N]`` float64 distances of the pixel baseline ``metric`` between ``x`` and ``y``."""
    _metric(metric)
    _check(x, y)
    return pair_distances([metric], [x, y], [(0, 1)])[metric][0]
