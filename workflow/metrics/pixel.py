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

The classic image-quality metrics (docs/similarity.md "Rule-based baselines"), each turned
into a distance so that higher = less similar, as the ones above:

* ``psnr``: ``-PSNR = 10 log10(MSE)`` in dB, RGB in [0, 1] (peak 1), the MSE over pixels and
  channels (scikit-image's ``peak_signal_noise_ratio`` with ``data_range`` 255 on the 8-bit
  images, negated); an MSE of 0 is clamped to 1e-10 (-100 dB) so that ties stay finite.
* ``ms_ssim``: ``1 - MS-SSIM`` (``piq.multi_scale_ssim``: 11x11 Gaussian window, sigma 1.5,
  K1 0.01, K2 0.03, the product of the per-scale contrast-structure terms and the last
  scale's SSIM per channel, raised to Wang et al.'s weights, averaged over RGB). Five scales
  need 161 px; a smaller image gets the most scales that fit (:func:`ms_ssim_scales`: 3 on
  64 px BAPPS patches), with the first weights renormalised to sum 1.
* ``gmsd``: GMSD itself (``piq.gmsd``; a deviation, already a distance).
* ``vifp``: ``1 - VIFp`` (``piq.vif_p``, the reference second: VIF is not symmetric).
* ``haarpsi``: ``1 - HaarPSI`` (``piq.haarpsi``, 3 scales, subsampled).

The four from piq compute in float32 (:data:`PIQ_METRICS`, :func:`precision`: their rows'
precision column says so); the others in float64.

In every pair the first image is the distorted one and the second the reference (a 2AFC
pair is ``(p0, ref)``), which only the asymmetric VIFp notices.

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

from workflow.archs import PIXEL_METRICS, PIXEL_MIN_SIDE
from workflow.imaging import resize
from workflow.metrics.image import rgb_to_lab, ssim

__all__ = ["METRICS", "MS_SSIM_WEIGHTS", "check_size", "distance", "images64", "ms_ssim_scales",
           "pair_distances"]

PRECISION = "fp64"  # what the scores' precision column says: every distance is float64 ...
# ... but those of piq, computed in float32: its depthwise 11x11 convolutions are 5-10x
# slower in float64 on the CPU, and 8-bit inputs need no more (values agree to a few 1e-6)
PIQ_METRICS = ("ms_ssim", "gmsd", "vifp", "haarpsi")


def precision(metric: str) -> str:
    """The precision column of a pixel baseline's rows."""
    return "fp32" if metric in PIQ_METRICS else PRECISION


def _piq(fn: Callable[..., Tensor], x: Tensor, y: Tensor, **kw) -> Tensor:
    return fn(x.float(), y.float(), data_range=1.0, reduction="none", **kw).double()
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


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, 5 scales
MS_SSIM_WINDOW = 11


def ms_ssim_scales(height: int, width: int) -> int:
    """MS-SSIM's scales on an image: the most (at most 5) whose coarsest one still holds the
    11 px window, ``min(height, width) >= 10 * 2^(s - 1) + 1``; 0 when not even 2 fit."""
    side = min(int(height), int(width))
    s = max((k for k in range(1, 6) if (MS_SSIM_WINDOW - 1) * 2 ** (k - 1) + 1 <= side),
            default=0)
    return s if s >= 2 else 0


def check_size(metrics: Sequence[str], height: int, width: int, where: str) -> None:
    """Refuse images smaller than a metric is defined at, naming ``where`` they come from."""
    small = [f"pixel/{m} needs {PIXEL_MIN_SIDE[m]} px" for m in metrics
             if min(height, width) < PIXEL_MIN_SIDE.get(m, 1)]
    if small:
        raise ValueError(f"{where}: images of {height}x{width} px are too small for "
                         f"{', '.join(small)}; score larger images or drop those metrics from "
                         f"similarity.pixel_baselines")


def _psnr(x: Tensor, y: Tensor) -> Tensor:
    return 10 * torch.log10(_mse(x, y).clamp_min(1e-10))


def _ms_ssim(x: Tensor, y: Tensor) -> Tensor:
    import piq

    scales = ms_ssim_scales(*x.shape[-2:])
    check_size(["ms_ssim"], *x.shape[-2:], where="ms_ssim")
    weights = None if scales == 5 else torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    return 1 - _piq(piq.multi_scale_ssim, x, y, kernel_size=MS_SSIM_WINDOW,
                    scale_weights=weights)


def _gmsd(x: Tensor, y: Tensor) -> Tensor:
    import piq

    return _piq(piq.gmsd, x, y)


def _vifp(x: Tensor, y: Tensor) -> Tensor:  # x distorted, y the reference
    import piq

    return 1 - _piq(piq.vif_p, x, y)


def _haarpsi(x: Tensor, y: Tensor) -> Tensor:
    import piq

    return 1 - _piq(piq.haarpsi, x, y)


# metric -> (the space it compares in, the distance of two batches in that space)
METRICS: dict[str, tuple[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "l1": ("rgb", _l1), "l2": ("lab", _l2_lab), "l2_rgb": ("rgb", _mse),
    "ssim": ("rgb", _dssim), "ssim_lab": ("lab", _dssim_lab),
    "psnr": ("rgb", _psnr), "ms_ssim": ("rgb", _ms_ssim), "gmsd": ("rgb", _gmsd),
    "vifp": ("rgb", _vifp), "haarpsi": ("rgb", _haarpsi),
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
