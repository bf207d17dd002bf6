"""PSNR and SSIM, batched on any device, matching scikit-image's definitions.

Inputs are float tensors in [0, 1], shape [N, C, H, W]; every function returns one
value per image ([N], float64 for accuracy). Conventions:

* ``psnr``: 10 log10(1 / MSE) over all pixels and channels (data range 1),
  as ``skimage.metrics.peak_signal_noise_ratio(data_range=1)``.
* ``ssim``: Wang et al. 2004 with an 11x11 Gaussian window of sigma 1.5, K1 0.01,
  K2 0.03, population covariances, the mean of the SSIM map over the *valid* region
  (the 5-pixel rim dropped) and, for several channels, the mean over channels. This
  is ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)`` exactly.
  ``ssim(..., window="uniform", size=7, sample_covariance=True)`` is skimage's default
  instead (a 7x7 box, covariances over 49 with 48 degrees of freedom): the SSIM of the LPIPS
  evaluation (``lpips.dssim`` calls skimage's ``compare_ssim`` with its defaults).
* ``rgb_to_lab``: CIE L*a*b* of sRGB, D65 white, as ``skimage.color.rgb2lab`` computes it.
* ``rgb_to_y``: the luma of ITU-R BT.601 YCbCr as MATLAB's ``rgb2ycbcr`` and
  ``skimage.color.rgb2ycbcr`` compute it (16..235 for 8-bit), divided by 255, so
  the data range stays 1. This is the "Y channel" of the standard SR protocol.
* ``shave``: drop a border of ``b`` pixels (the standard protocol shaves ``scale``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two [N, C, H, W] tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB for data range 1 (inf for identical images)."""
    _check(x, y)
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gauss_1d(size: int, sigma: float, device: torch.device) -> Tensor:
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: Tensor, g: Tensor) -> Tensor:
    # separable valid-mode Gaussian, one channel at a time (depthwise)
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim(x: Tensor, y: Tensor, window: str = "gaussian", size: int = SSIM_WINDOW,
         sample_covariance: bool = False) -> Tensor:
    """Per-image SSIM (mean over the valid SSIM map and over channels), data range 1.

    ``window``: ``gaussian`` (sigma 1.5) or ``uniform`` (a box), ``size`` x ``size``;
    ``sample_covariance``: variances and covariance scaled by n / (n - 1), n = size^2.
    """
    _check(x, y)
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, "
                         f"got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    if window == "gaussian":
        g = _gauss_1d(size, SSIM_SIGMA, x.device)
    elif window != "uniform":
        raise ValueError(f"unknown SSIM window {window!r}; use gaussian or uniform")
    cov = size * size / (size * size - 1) if sample_covariance else 1.0
    # a box window is a mean pool (several times faster than the depthwise convolutions)
    filt = ((lambda t: F.avg_pool2d(t, size, stride=1)) if window == "uniform"
            else (lambda t: _filter(t, g)))
    mx, my = filt(x), filt(y)
    vx = cov * (filt(x * x) - mx * mx)
    vy = cov * (filt(y * y) - my * my)
    cxy = cov * (filt(x * y) - mx * my)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(2).mean(2).mean(1)


# skimage.color: sRGB (linear) -> XYZ, and the D65 white point of the 2-degree observer
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(x: Tensor) -> Tensor:
    """[N, 3, H, W] sRGB in [0, 1] -> [N, 3, H, W] CIE L*a*b* (float64; L in [0, 100])."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W] RGB, got {tuple(x.shape)}")
    x = x.double()
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64, device=x.device)
    white = torch.tensor(_D65, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,njhw->nihw", m, lin) / white
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def rgb_to_y(x: Tensor) -> Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> [N, 1, H, W] BT.601 luma (16..235)/255."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W] RGB, got {tuple(x.shape)}")
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * w).sum(1, keepdim=True) + 16.0) / 255.0


def shave(x: Tensor, border: int) -> Tensor:
    """Drop ``border`` pixels on every side."""
    if border <= 0:
        return x
    if min(x.shape[-2:]) <= 2 * border:
        raise ValueError(f"cannot shave {border} px from a {tuple(x.shape[-2:])} image")
    return x[..., border:-border, border:-border]


def quantize(x: Tensor) -> Tensor:
    """Round to 8-bit levels (as if saved as PNG), staying in [0, 1]."""
    return (x.clamp(0, 1) * 255).round() / 255
