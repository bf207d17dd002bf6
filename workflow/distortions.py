"""The six distortions of the adaptation study, batched, on any device.

Images are float tensors ``[N, 3, H, W]`` in [0, 1] (the study resizes to 64x64
first). Every distortion draws *per-image* parameters with
``sample_params(n, generator)`` (a ``[n, PARAM_DIM]`` float tensor on the
generator's device) and applies them with ``apply(images, params)``; a batch
that mixes distortions goes through :func:`apply_distortions` with one id per
image. Parameters have a fixed width ``PARAM_DIM`` (unused columns are 0) so a
mixed batch, or a stored evaluation set, is one tensor.

The semantics are torchvision's (``transforms.v1``), re-implemented batched so
each image can carry its own parameters and no PIL or Python loop over images is
involved (tests compare against ``torchvision.transforms.functional``):

=========  ===================================================================
rotate     ``RandomRotation((30, 330))``: angle uniform [30, 330) degrees,
           counter-clockwise about the centre, nearest, black fill
translate  ``RandomAffine(0, translate=(0.5, 0.5))``: integer offsets drawn
           uniform in +-50% of width / height and rounded, black fill
darken     ``ColorJitter(brightness=(0.1, 0.5))``: ``clamp(x * f, 0, 1)``
hue        ``ColorJitter(hue=(-0.5, 0.5))``: shift the hue in HSV (mod 1)
blur       ``GaussianBlur((11, 21), sigma=(4, 10))``: kernel 11 wide x 21 tall,
           one sigma for both axes, reflect padding
zoom       ``RandomAffine(0, scale=(1.1, 2))``: scale about the centre, nearest,
           black fill
=========  ===================================================================

The blur is :func:`workflow.imaging.gaussian_blur` with one sigma per image (THE Gaussian
kernel of the project); resizing is :func:`workflow.imaging.resize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from workflow.imaging import gaussian_blur

PARAM_DIM = 2
NAMES = ("rotate", "translate", "darken", "hue", "blur", "zoom")
BLUR_KERNEL = (11, 21)  # (width, height), torchvision's kernel_size order


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _device_of(generator: torch.Generator | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"distortions take images [N, 3, H, W]; got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"distortions take float images in [0, 1]; got {images.dtype}")


# ----------------------------------------------------------------------------- geometry


def _inverse_affine(angle_ccw: Tensor, tx: Tensor, ty: Tensor, scale: Tensor) -> Tensor:
    """``[N, 2, 3]`` output->input maps in pixel units about the centre.

    torchvision's ``_get_inverse_affine_matrix`` with no shear, for the
    counter-clockwise angle that ``F.rotate`` takes (it passes ``-angle``).
    """
    rot = torch.deg2rad(-angle_ccw)
    cos, sin = torch.cos(rot) / scale, torch.sin(rot) / scale
    m = torch.stack(
        [
            torch.stack([cos, sin, cos * (-tx) + sin * (-ty)], dim=-1),
            torch.stack([-sin, cos, -sin * (-tx) + cos * (-ty)], dim=-1),
        ],
        dim=1,
    )
    return m


def _warp(images: Tensor, theta: Tensor) -> Tensor:
    """Resample with per-image ``theta`` (torchvision's ``_gen_affine_grid`` + nearest, zeros)."""
    n, _, h, w = images.shape
    dev = images.device
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=dev, dtype=torch.float32)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=dev, dtype=torch.float32)
    base = torch.stack(
        [xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w), torch.ones(h, w, device=dev)],
        dim=-1,
    ).view(1, h * w, 3)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=dev, dtype=torch.float32)
    rescaled = theta.float().transpose(1, 2) / scale  # [N, 3, 2]
    grid = torch.bmm(base.expand(n, -1, -1), rescaled).view(n, h, w, 2)
    out = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out.to(images.dtype)


# ----------------------------------------------------------------------------- colour


def rgb_to_hsv(images: Tensor) -> Tensor:
    """``[N, 3, H, W]`` RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = images.unbind(dim=1)
    maxc = images.amax(dim=1)
    minc = images.amin(dim=1)
    chroma = maxc - minc
    gray = chroma == 0
    safe = torch.where(gray, torch.ones_like(chroma), chroma)
    s = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    # the hue sector follows the largest channel (red wins ties, then green)
    h = torch.where(
        maxc == r,
        (g - b) / safe,
        torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    h = torch.where(gray, torch.zeros_like(h), torch.remainder(h / 6.0, 1.0))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv` (the closed form ``v - v s clamp(min(k, 4 - k), 0, 1)``)."""
    h, s, v = hsv.unbind(dim=1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h * 6.0, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1).clamp(0.0, 1.0)


def _per_image(x: Tensor, images: Tensor) -> Tensor:
    return x.to(images.device, images.dtype).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- the six


@dataclass(frozen=True)
class Distortion:
    """One distortion: its parameter interval and how to apply per-image parameters."""

    name: str
    low: float
    high: float

    def sample_params(self, n: int, generator: torch.Generator | None = None, device=None
                      ) -> Tensor:
        """``[n, PARAM_DIM]`` parameters on the generator's device (column 1 only for translate)."""
        dev = _device_of(generator, device)
        p = torch.zeros(n, PARAM_DIM, device=dev)
        p[:, 0] = _uniform(n, self.low, self.high, generator, dev)
        if self.name == "translate":
            # torchvision: max_dx = 0.5 * width; tx = round(uniform(-max_dx, max_dx))
            p[:, 1] = _uniform(n, self.low, self.high, generator, dev)
        return p

    def pixel_offsets(self, params: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """translate: fractions of width / height -> integer pixel offsets (rounded, as
        torchvision does)."""
        h, w = size
        return torch.round(params[:, 0] * w), torch.round(params[:, 1] * h)

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        _check_images(images)
        if params.shape[0] != images.shape[0]:
            raise ValueError(f"{self.name}: {params.shape[0]} parameter rows for "
                             f"{images.shape[0]} images")
        if images.shape[0] == 0:
            return images
        p = params.to(images.device).float()
        n, _, h, w = images.shape
        one, zero = torch.ones(n, device=images.device), torch.zeros(n, device=images.device)
        if self.name == "rotate":
            return _warp(images, _inverse_affine(p[:, 0], zero, zero, one))
        if self.name == "translate":
            tx, ty = self.pixel_offsets(p, (h, w))
            return _warp(images, _inverse_affine(zero, tx, ty, one))
        if self.name == "zoom":
            return _warp(images, _inverse_affine(zero, zero, zero, p[:, 0]))
        if self.name == "darken":
            return (images * _per_image(p[:, 0], images)).clamp(0.0, 1.0)
        if self.name == "hue":
            hsv = rgb_to_hsv(images.float())
            hue = torch.remainder(hsv[:, 0] + p[:, 0].view(-1, 1, 1), 1.0)
            return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).to(images.dtype)
        if self.name == "blur":
            # torchvision's GaussianBlur: one sigma for both axes, reflect padding
            return gaussian_blur(images, p[:, 0], BLUR_KERNEL, padding="reflect")
        raise ValueError(f"unknown distortion {self.name!r}")


DISTORTIONS: tuple[Distortion, ...] = (
    Distortion("rotate", 30.0, 330.0),
    Distortion("translate", -0.5, 0.5),
    Distortion("darken", 0.1, 0.5),
    Distortion("hue", -0.5, 0.5),
    Distortion("blur", 4.0, 10.0),
    Distortion("zoom", 1.1, 2.0),
)
BY_NAME = {d.name: d for d in DISTORTIONS}


def sample_params(ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per-image parameters for distortion ids ``[n]``: ``[n, PARAM_DIM]``.

    Every distortion draws ``n`` rows and each image keeps the row of its own id,
    so the draw consumes the generator identically whatever the ids are.
    """
    n = ids.shape[0]
    dev = _device_of(generator, ids.device)
    table = torch.stack([d.sample_params(n, generator, dev) for d in DISTORTIONS], dim=0)
    return table[ids.to(dev).long(), torch.arange(n, device=dev)]


def apply_distortions(images: Tensor, ids: Tensor, params: Tensor) -> Tensor:
    """Distort each image with its own distortion id and parameters (one batched call per id)."""
    _check_images(images)
    ids = ids.to(images.device).long()
    if ids.shape[0] != images.shape[0] or params.shape[0] != images.shape[0]:
        raise ValueError("apply_distortions: images, ids and params must have the same length")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(DISTORTIONS)):
        raise ValueError(f"distortion ids must be in 0..{len(DISTORTIONS) - 1}")
    out = torch.empty_like(images)
    params = params.to(images.device)
    for i, d in enumerate(DISTORTIONS):
        idx = (ids == i).nonzero(as_tuple=True)[0]
        if idx.numel():
            out[idx] = d.apply(images[idx], params[idx])
    return out


def draw_pairs(n: int, generator: torch.Generator | None = None, device=None
               ) -> tuple[Tensor, Tensor]:
    """Two distinct distortion ids per image, uniform over ordered pairs."""
    dev = _device_of(generator, device)
    k = len(DISTORTIONS)
    d0 = torch.randint(0, k, (n,), generator=generator, device=dev)
    d1 = (d0 + torch.randint(1, k, (n,), generator=generator, device=dev)) % k
    return d0, d1


def random_rankings(count: int, seed: int) -> list[list[int]]:
    """``count`` seeded random orders of the distortion ids (position 0 = least disruptive)."""
    g = torch.Generator().manual_seed(int(seed))
    return [torch.randperm(len(DISTORTIONS), generator=g).tolist() for _ in range(count)]


def positions(rankings: Sequence[Sequence[int]]) -> Tensor:
    """``[R, 6]``: position of each distortion id within each ranking."""
    pos = torch.empty(len(rankings), len(DISTORTIONS), dtype=torch.long)
    for r, order in enumerate(rankings):
        if sorted(order) != list(range(len(DISTORTIONS))):
            raise ValueError(f"ranking {r} is not a permutation of "
                             f"0..{len(DISTORTIONS) - 1}: {order}")
        pos[r, torch.tensor(list(order))] = torch.arange(len(DISTORTIONS))
    return pos


def ranking_labels(d0: Tensor, d1: Tensor, pos: Tensor) -> Tensor:
    """``[N, R]`` float labels: 0 when p0's distortion comes earlier in ranking r, else 1."""
    pos = pos.to(d0.device)
    return (pos[:, d0.long()] > pos[:, d1.long()]).t().float()


__all__ = [
    "BLUR_KERNEL", "BY_NAME", "DISTORTIONS", "Distortion", "NAMES", "PARAM_DIM",
    "apply_distortions", "draw_pairs", "hsv_to_rgb", "positions", "random_rankings",
    "ranking_labels", "rgb_to_hsv", "sample_params",
]
