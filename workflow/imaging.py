"""Image operations on batches, on any device: dtype conversion, resizing, crops, the Gaussian
kernel and blur, and the super-resolution degradation.

Images are float tensors ``[N, C, H, W]`` in [0, 1]; the prepared arrays are uint8 NHWC and
enter through :func:`to_float` (a tensor already on the device) or :func:`to_images` (a NumPy
batch, moved, converted and resized). Resizing is bilinear with antialiasing, as PIL's and
torchvision's ``Resize`` do.

The super-resolution input (after Johnson et al. 2016, as the loss-network study made it):
Gaussian blur with sigma 1 (PIL's ``GaussianBlur(radius=1)``: its radius *is* the standard
deviation), a bicubic, antialiased downscale by the scale factor (PIL's ``BICUBIC`` resize,
which torch reproduces with ``antialias=True``), then 8-bit quantisation (the reference made
PIL images). Targets: short side resized to 288 (bilinear) and centre-cropped to 288.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["center_crop", "crop_to_multiple", "degrade", "downscale", "gaussian_blur",
           "gaussian_kernel1d", "masks_to_float", "quantize", "reference_target", "resize",
           "resize_short_side", "to_float", "to_images"]


# ----------------------------------------------------------------------------- dtype


def to_float(images: Tensor) -> Tensor:
    """uint8 ``[N, H, W, C]`` (or ``[H, W, C]``) -> float ``[N, C, H, W]`` in [0, 1], on the
    same device."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def masks_to_float(masks: Tensor) -> Tensor:
    """uint8 {0, 1} masks ``[N, H, W]`` -> float ``[N, 1, H, W]``."""
    return masks[:, None].float()


def to_images(batch: np.ndarray | Tensor, device: torch.device, size: int | None = None,
              channels_last: bool = False) -> Tensor:
    """A uint8 NHWC batch (NumPy, memory-mapped or not, or a tensor) -> float NCHW in [0, 1]
    on ``device``, resized to ``size`` x ``size`` there when it differs.

    The result keeps the NHWC strides of its source (a permuted view, as ``to_float`` makes
    it) unless ``channels_last`` asks for that layout explicitly; call ``.contiguous()`` where
    a contiguous NCHW batch is wanted (convolutions on the CPU pick their kernel by layout,
    so the two give results that differ in the last bits).
    """
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.array(batch))  # a private copy: a memory map is read-only
    x = to_float(batch.to(device, non_blocking=True))
    if size is not None:
        x = resize(x, size)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def quantize(x: Tensor) -> Tensor:
    """Round to 8-bit levels (as if saved as PNG), staying in [0, 1]."""
    return (x.clamp(0, 1) * 255).round() / 255


# ----------------------------------------------------------------------------- geometry


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of float images to ``size`` (clamped to [0, 1])."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False,
                         antialias=True).clamp(0.0, 1.0)


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


# ----------------------------------------------------------------------------- blur


def gaussian_kernel1d(size: int, sigma: float | Tensor, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """Normalised Gaussian taps ``exp(-x^2 / (2 sigma^2))`` at ``size`` integer offsets
    centred on 0 (torchvision's ``_get_gaussian_kernel1d``): ``[size]`` for one sigma,
    ``[N, size]`` for a tensor of N sigmas."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=dtype, device=device)
    if isinstance(sigma, Tensor):
        pdf = torch.exp(-0.5 * (x.view(1, -1) / sigma.to(device=x.device, dtype=dtype)
                                .view(-1, 1)) ** 2)
        return pdf / pdf.sum(dim=1, keepdim=True)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(x: Tensor, sigma: float | Tensor, kernel: tuple[int, int] | None = None,
                  padding: str = "replicate") -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` images.

    ``sigma`` is one value for the whole batch (the kernel then spans 3 sigma each side, as
    far as PIL's box passes reach) or a tensor ``[N]`` with one value per image. ``kernel``:
    ``(width, height)`` in taps. ``padding``: ``replicate`` (PIL extends the border pixels) or
    ``reflect`` (torchvision's ``GaussianBlur``).
    """
    if isinstance(sigma, Tensor):
        return _blur_per_image(x, sigma, kernel or (3, 3), padding)
    if sigma <= 0:
        return x
    if kernel is None:
        r = max(1, math.ceil(3 * sigma))
        kernel = (2 * r + 1, 2 * r + 1)
    kw, kh = kernel
    gx = gaussian_kernel1d(kw, sigma, device=x.device).to(x.dtype)
    gy = gx if kh == kw else gaussian_kernel1d(kh, sigma, device=x.device).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode=padding)
    x = F.conv2d(x, gx.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, gy.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _blur_per_image(images: Tensor, sigma: Tensor, kernel: tuple[int, int], padding: str
                    ) -> Tensor:
    n, c, h, w = images.shape
    kw, kh = kernel
    if kh // 2 >= h or kw // 2 >= w:
        raise ValueError(f"blur kernel {kernel} needs images larger than {kw // 2}x{kh // 2} "
                         f"(got {w}x{h})")
    x = F.pad(images.float(), [kw // 2, kw // 2, kh // 2, kh // 2], mode=padding)
    x = x.reshape(1, n * c, h + 2 * (kh // 2), w + 2 * (kw // 2))
    kx = gaussian_kernel1d(kw, sigma, device=x.device).repeat_interleave(c, dim=0)
    ky = gaussian_kernel1d(kh, sigma, device=x.device).repeat_interleave(c, dim=0)
    kx, ky = kx.view(n * c, 1, 1, kw), ky.view(n * c, 1, kh, 1)
    x = F.conv2d(x, kx.to(x.device), groups=n * c)
    x = F.conv2d(x, ky.to(x.device), groups=n * c)
    return x.view(n, c, h, w).to(images.dtype)


# ----------------------------------------------------------------------------- SR degradation

BLUR_SIGMA = 1.0


def downscale(x: Tensor, scale: int) -> Tensor:
    """Bicubic, antialiased downscale by an integer factor (sizes must divide)."""
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not a multiple of scale {scale}; crop first "
                         f"(crop_to_multiple)")
    return F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", antialias=True,
                         align_corners=False)


def degrade(hr: Tensor, scale: int, sigma: float = BLUR_SIGMA, quantize_8bit: bool = True
            ) -> Tensor:
    """High-resolution batch -> the network's low-resolution input (blur, bicubic /scale)."""
    lr = downscale(gaussian_blur(hr, sigma), scale)
    return quantize(lr) if quantize_8bit else lr.clamp(0, 1)


def reference_target(x: Tensor, size: int = 288) -> Tensor:
    """The study's target geometry: short side -> ``size`` (bilinear), centre crop ``size``."""
    return quantize(center_crop(resize_short_side(x, size), size))
