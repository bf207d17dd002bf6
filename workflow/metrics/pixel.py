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

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from workflow.archs import PIXEL_METRICS
from workflow.imaging import resize
from workflow.metrics.image import rgb_to_lab, ssim

__all__ = ["METRICS", "distance", "images64"]

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
    return (x.double() - y.double()).abs().flatten(1).mean(1)


def _l2_rgb(x: Tensor, y: Tensor) -> Tensor:
    return ((x.double() - y.double()) ** 2).flatten(1).mean(1)


def _l2_lab(x: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (((rgb_to_lab(x) - rgb_to_lab(y)) / 100) ** 2).flatten(1).mean(1)


def _dssim(x: Tensor, y: Tensor) -> Tensor:
    return (1 - ssim(x, y, **LPIPS_SSIM)) / 2


def _dssim_lab(x: Tensor, y: Tensor) -> Tensor:
    return (1 - ssim(rgb_to_lab(x) / 100, rgb_to_lab(y) / 100, **LPIPS_SSIM)) / 2


METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": _l1, "l2": _l2_lab, "l2_rgb": _l2_rgb, "ssim": _dssim, "ssim_lab": _dssim_lab,
}
assert set(METRICS) == set(PIXEL_METRICS)


def distance(metric: str, x: Tensor, y: Tensor) -> Tensor:
    """``[N]`` float64 distances of the pixel baseline ``metric`` between ``x`` and ``y``."""
    if metric not in METRICS:
        raise ValueError(f"unknown pixel metric {metric!r}; known: {', '.join(METRICS)}")
    _check(x, y)
    with torch.autocast(x.device.type, enabled=False):
        return METRICS[metric](x, y)
