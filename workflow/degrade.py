"""Image degradation and geometry for super-resolution, batched on the device.

The study's low-resolution input (after Johnson et al. 2016): Gaussian blur with
sigma 1 (PIL's ``GaussianBlur(radius=1)``, whose radius *is* the standard deviation),
then a bicubic downscale by the scale factor with antialiasing (PIL's ``resize``
with ``BICUBIC``, which torch reproduces with ``antialias=True``), then 8-bit
quantisation (the reference produced PIL images). Targets: resize the short side to
288 (bilinear, antialiased) and center crop 288.

All functions take float images in [0, 1] as [N, 3, H, W] tensors on any device;
``to_float`` converts uint8 NHWC batches (the prepared arrays) on the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from workflow.metrics.image import quantize

BLUR_SIGMA = 1.0


def to_float(images: Tensor) -> Tensor:
    """uint8 [N, H, W, 3] (or [H, W, 3]) -> float [N, 3, H, W] in [0, 1], on the same device."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def gaussian_kernel(sigma: float, device: torch.device | None = None) -> Tensor:
    """Normalised 1-D Gaussian truncated at 3 sigma (what PIL's box-blur passes cover)."""
    radius = max(1, math.ceil(3 * sigma))
    r = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_blur(x: Tensor, sigma: float = BLUR_SIGMA) -> Tensor:
    """Separable Gaussian blur; edges replicated (as PIL extends the border pixels)."""
    if sigma <= 0:
        return x
    g = gaussian_kernel(sigma, x.device).to(x.dtype)
    c, r = x.shape[1], (g.numel() - 1) // 2
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def downscale(x: Tensor, scale: int) -> Tensor:
    """Bicubic, antialiased downscale by an integer factor (sizes must divide)."""
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not a multiple of scale {scale}; crop first "
                         f"(crop_to_multiple)")
    return F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", antialias=True,
                         align_corners=False)


def degrade(hr: Tensor, scale: int, sigma: float = BLUR_SIGMA, quantize_8bit: bool = True) -> Tensor:
    """High-resolution batch -> the network's low-resolution input (blur, bicubic /scale)."""
    lr = downscale(gaussian_blur(hr, sigma), scale)
    return quantize(lr) if quantize_8bit else lr.clamp(0, 1)


def resize_short_side(x: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased) resize so that the shorter side is ``size``."""
    h, w = x.shape[-2:]
    if h <= w:
        nh, nw = size, max(size, round(w * size / h))
    else:
        nh, nw = max(size, round(h * size / w)), size
    if (nh, nw) == (h, w):
        return x
    return F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)


def center_crop(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    if th > h or tw > w:
        raise ValueError(f"cannot center-crop {th}x{tw} from {h}x{w}")
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top:top + th, left:left + tw]


def crop_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Crop bottom/right so both sides are multiples of ``multiple`` (the standard SR protocol)."""
    h, w = x.shape[-2:]
    return x[..., : h - h % multiple, : w - w % multiple]


def reference_target(x: Tensor, size: int = 288) -> Tensor:
    """The study's target geometry: short side -> ``size`` (bilinear), center crop ``size``."""
    return quantize(center_crop(resize_short_side(x, size), size))
