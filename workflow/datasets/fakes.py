"""What the synthetic datasets draw: small images with structure a network responds to.

The fakes are written in the exact raw upstream formats by each dataset's ``synthesize``;
this module only makes their pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["distort", "pattern_images", "photo"]


def pattern_images(rng: np.random.Generator, labels: np.ndarray, size: int,
                   n_classes: int = 10) -> np.ndarray:
    """Synthetic uint8 [N, size, size, 3] images whose content depends on the label (an
    oriented grating per class, random phase, colour and noise), so a demo classifier
    trained on the fakes has something to learn."""
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = np.pi * labels.astype(np.float32) / n_classes
    freq = 2.0 + (labels % 3).astype(np.float32) * 1.5
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    proj = (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
    colour = rng.uniform(0.3, 1.0, (n, 1, 1, 3)).astype(np.float32)
    img = wave[..., None] * colour + rng.normal(0, 0.08, (n, size, size, 3)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth synthetic 'photo' with edges: blurred colour blobs plus a few rectangles."""
    from PIL import Image, ImageDraw, ImageFilter

    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(0.7)))


def distort(img: np.ndarray, kind: int, strength: float, rng: np.random.Generator
            ) -> np.ndarray:
    """uint8 ``img`` distorted by one of four kinds (0 noise, 1 blur, 2 contrast loss,
    3 quantisation), visibly more as ``strength`` in [0, 1] grows: the distorted images of
    the MOS datasets' twins, whose fake scores fall with ``strength``."""
    from PIL import Image, ImageFilter

    x = img.astype(np.float32)
    kind %= 4
    if kind == 0:
        x = x + rng.normal(0, 60 * strength, x.shape)
    elif kind == 1:
        pil = Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.3 + 3 * strength))
        x = np.asarray(pil, np.float32)
    elif kind == 2:
        x = x.mean() + (x - x.mean()) * (1 - 0.8 * strength)
    else:
        step = 1 + 80 * strength
        x = np.round(x / step) * step
    return np.clip(x, 0, 255).round().astype(np.uint8)
