"""workflow.imaging against independent implementations: NumPy, PIL, torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter
from torchvision.transforms._functional_tensor import _get_gaussian_kernel1d

from workflow.imaging import (
    center_crop,
    crop_to_multiple,
    degrade,
    downscale,
    gaussian_blur,
    gaussian_kernel1d,
    masks_to_float,
    quantize,
    reference_target,
    resize,
    resize_short_side,
    to_float,
    to_images,
)


def _smooth(rng, h, w, c=3):
    """Natural-ish uint8 image: smoothed noise stretched over the full range."""
    a = gaussian_filter(rng.random((h, w, c)), (2, 2, 0))
    a = (a - a.min()) / (a.max() - a.min())
    return (a * 255).round().astype(np.uint8)


def _hwc255(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).double().numpy() * 255


# ----------------------------------------------------------------------------- dtype


def test_to_float_is_nchw_over_255():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = to_float(torch.from_numpy(a))
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), a.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert to_float(torch.from_numpy(a[0])).shape == (1, 3, 5, 7)  # one HWC image
    assert to_float(torch.from_numpy(a[..., :1])).shape == (2, 1, 5, 7)  # grayscale


def test_to_float_rejects_channels_first():
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        to_float(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_to_images_copies_a_read_only_batch_and_resizes(tmp_path):
    rng = np.random.default_rng(1)
    a = _smooth(rng, 20, 20)[None]
    np.save(tmp_path / "a.npy", a)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    x = to_images(mm, torch.device("cpu"))
    np.testing.assert_array_equal(_hwc255(x).round(), a[0])
    y = to_images(mm, torch.device("cpu"), size=10, channels_last=True)
    assert y.shape == (1, 3, 10, 10) and y.is_contiguous(memory_format=torch.channels_last)


def test_masks_to_float_and_quantize():
    m = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.uint8)
    assert masks_to_float(m).shape == (1, 1, 2, 2) and masks_to_float(m).sum() == 2
    x = torch.tensor([-0.2, 0.0, 0.5, 100 / 255 + 0.4 / 255, 1.3])
    np.testing.assert_allclose(quantize(x).numpy(), [0, 0, 128 / 255, 100 / 255, 1], atol=1e-7)


# ----------------------------------------------------------------------------- geometry


def test_resize_matches_torchvision_antialiased_bilinear():
    rng = np.random.default_rng(2)
    x = to_float(torch.from_numpy(_smooth(rng, 40, 60)))
    want = TF.resize(x, [20, 24], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    torch.testing.assert_close(resize(x, (20, 24)), want.clamp(0, 1), rtol=0, atol=1e-6)
    assert resize(x, (40, 60)) is x  # same size: untouched


def test_resize_short_side_and_crops():
    x = torch.arange(2 * 3 * 10 * 17, dtype=torch.float32).view(2, 3, 10, 17)
    assert resize_short_side(x, 5).shape[-2:] == (5, 8)  # round(17 * 5 / 10) = 8 (9 by half-up)
    assert resize_short_side(x.transpose(-1, -2), 5).shape[-2:] == (8, 5)
    assert resize_short_side(x, 10) is x
    c = center_crop(x, 4)
    torch.testing.assert_close(c, x[..., 3:7, 6:10])
    torch.testing.assert_close(center_crop(x, (2, 5)), x[..., 4:6, 6:11])
    with pytest.raises(ValueError, match="center-crop"):
        center_crop(x, 11)
    torch.testing.assert_close(crop_to_multiple(x, 4), x[..., :8, :16])


def test_reference_target_matches_pil_resize_and_center_crop():
    rng = np.random.default_rng(4)
    a = _smooth(rng, 120, 200)
    # PIL: short side to 72 (bilinear, which antialiases when shrinking), centre crop 72
    pil = Image.fromarray(a).resize((120, 72), Image.Resampling.BILINEAR)
    ref = np.asarray(pil)[:, 24:96].astype(np.float64)
    got = _hwc255(reference_target(to_float(torch.from_numpy(a)), 72))
    assert got.shape == (72, 72, 3)
    assert np.abs(got - ref).mean() < 1.0 and np.abs(got - ref).max() <= 3.0
    assert np.allclose(got, np.round(got), atol=1e-3)  # 8-bit levels


# ----------------------------------------------------------------------------- Gaussian


@pytest.mark.parametrize("size,sigma", [(7, 1.0), (11, 1.5), (3, 0.7), (9, 2.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_kernel_is_torchvisions(size, sigma, dtype):
    want = _get_gaussian_kernel1d(size, sigma, dtype, torch.device("cpu"))
    assert torch.equal(gaussian_kernel1d(size, sigma, dtype=dtype), want)
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-r**2 / (2 * sigma**2))
    np.testing.assert_allclose(gaussian_kernel1d(size, sigma, torch.float64).numpy(), g / g.sum(),
                               rtol=1e-12)


def test_gaussian_kernel_per_sigma_rows():
    sigmas = torch.tensor([0.5, 1.0, 2.0])
    k = gaussian_kernel1d(5, sigmas)
    assert k.shape == (3, 5)
    for row, s in zip(k, sigmas.tolist(), strict=True):
        torch.testing.assert_close(row, _get_gaussian_kernel1d(5, s, torch.float32,
                                                               torch.device("cpu")))


def test_blur_is_a_normalised_gaussian_with_a_3_sigma_kernel():
    img = torch.zeros(1, 3, 15, 15)
    img[..., 7, 7] = 1.0
    out = gaussian_blur(img, 1.0)[0, 0].double()
    r = np.arange(-3, 4)
    g = np.exp(-r**2 / 2.0)
    g /= g.sum()
    np.testing.assert_allclose(out[4:11, 4:11].numpy(), np.outer(g, g), atol=1e-6)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert gaussian_blur(img, 0.0) is img


def test_blur_replicates_the_border():
    # a constant image stays constant up to the edge (replicate padding, as PIL)
    x = torch.full((1, 1, 9, 9), 0.25)
    torch.testing.assert_close(gaussian_blur(x, 1.5), x)


def test_per_image_blur_matches_torchvision():
    rng = np.random.default_rng(5)
    x = to_float(torch.from_numpy(np.stack([_smooth(rng, 24, 30) for _ in range(3)])))
    sigmas = torch.tensor([0.6, 1.2, 2.0])
    got = gaussian_blur(x, sigmas, (7, 5), padding="reflect")
    for i, s in enumerate(sigmas.tolist()):
        want = TF.gaussian_blur(x[i:i + 1], [7, 5], [s, s])
        torch.testing.assert_close(got[i:i + 1], want, rtol=0, atol=2e-6)


def test_per_image_blur_rejects_too_small_images():
    with pytest.raises(ValueError, match="larger than"):
        gaussian_blur(torch.zeros(1, 3, 4, 4), torch.tensor([1.0]), (9, 9))


# ----------------------------------------------------------------------------- degradation


@pytest.mark.parametrize("scale", [4, 8])
def test_degradation_matches_the_pil_pipeline(scale):
    """The study's input: PIL GaussianBlur(radius=1), then a BICUBIC resize to 1/scale."""
    rng = np.random.default_rng(3)
    for a in (_smooth(rng, 96, 128), (rng.random((96, 128, 3)) * 255).astype(np.uint8)):
        pil = Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius=1))
        pil = pil.resize((128 // scale, 96 // scale), Image.Resampling.BICUBIC)
        ref = np.asarray(pil).astype(np.float64)
        got = _hwc255(degrade(to_float(torch.from_numpy(a)), scale))
        assert got.shape == ref.shape
        diff = np.abs(got - ref)
        # PIL approximates the Gaussian with box blurs; still within a level on average
        assert diff.mean() < 1.0 and diff.max() <= 3.0 + 1e-6
        assert np.allclose(got, np.round(got), atol=1e-3)  # 8-bit levels, as a PIL image


def test_blur_alone_matches_pil_gaussian_blur():
    rng = np.random.default_rng(6)
    a = _smooth(rng, 40, 50)
    ref = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius=1)), np.float64)
    got = _hwc255(gaussian_blur(to_float(torch.from_numpy(a)), 1.0))
    # PIL's three box passes approximate the Gaussian, and its output is rounded to 8 bits
    assert np.abs(got - ref).mean() < 1.0 and np.abs(got - ref).max() <= 3.0


def test_downscale_matches_pil_bicubic_and_names_bad_sizes():
    rng = np.random.default_rng(7)
    a = _smooth(rng, 48, 64)
    ref = np.asarray(Image.fromarray(a).resize((16, 12), Image.Resampling.BICUBIC), np.float64)
    got = _hwc255(downscale(to_float(torch.from_numpy(a)), 4).clamp(0, 1))
    assert np.abs(got - ref).max() <= 1.0
    with pytest.raises(ValueError, match="crop_to_multiple"):
        downscale(torch.zeros(1, 3, 10, 12), 4)
    lr = degrade(torch.zeros(1, 3, 10, 12)[..., :8, :12], 4, quantize_8bit=False)
    assert lr.shape == (1, 3, 2, 3)
