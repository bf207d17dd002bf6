"""The six adaptation distortions: parameter ranges, effects on constructed images, and
agreement with torchvision.transforms.functional (the semantics they re-implement)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from workflow.distortions import (
    BY_NAME,
    DISTORTIONS,
    NAMES,
    apply_distortions,
    draw_pairs,
    sample_params,
)

RANGES = {"rotate": (30, 330), "translate": (-0.5, 0.5), "darken": (0.1, 0.5), "hue": (-0.5, 0.5),
          "blur": (4, 10), "zoom": (1.1, 2.0)}


def _params(name: str, *values: float) -> torch.Tensor:
    p = torch.zeros(1, 2)
    p[0, : len(values)] = torch.tensor(values)
    return p


def _marker(size: int = 64, row: int = 10, col: int = 40) -> torch.Tensor:
    img = torch.zeros(1, 3, size, size)
    img[0, :, row, col] = 1.0
    return img


def _where(img: torch.Tensor) -> tuple[int, int]:
    nz = (img[0, 0] > 0.5).nonzero()
    assert len(nz) == 1, f"expected one marker pixel, found {len(nz)}"
    return int(nz[0, 0]), int(nz[0, 1])


@pytest.mark.parametrize("name", NAMES)
def test_parameters_in_range(name):
    g = torch.Generator().manual_seed(1)
    p = BY_NAME[name].sample_params(2000, g)
    lo, hi = RANGES[name]
    cols = 2 if name == "translate" else 1
    assert p.shape == (2000, 2)
    assert float(p[:, :cols].min()) >= lo and float(p[:, :cols].max()) <= hi
    # the draw spans the interval (not a constant or a sub-range)
    span = 0.05 * (hi - lo)
    assert float(p[:, 0].min()) < lo + span and float(p[:, 0].max()) > hi - span
    if cols == 1:
        assert torch.all(p[:, 1] == 0)


def test_seeded_and_device_generator():
    a = sample_params(torch.tensor([0, 1, 2, 3, 4, 5]), torch.Generator().manual_seed(3))
    b = sample_params(torch.tensor([0, 1, 2, 3, 4, 5]), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    d0, d1 = draw_pairs(5000, torch.Generator().manual_seed(0))
    assert torch.all(d0 != d1)
    # every ordered pair of distinct distortions occurs, about equally often (30 pairs)
    counts = torch.bincount(d0 * 6 + d1, minlength=36).view(6, 6)
    assert torch.all(counts.diagonal() == 0)
    off = counts[~torch.eye(6, dtype=torch.bool)]
    assert int(off.min()) > 5000 / 30 * 0.7


def test_translate_moves_marker_by_drawn_offset():
    # 0.1 * 64 = 6.4 -> 6 px right; -0.2 * 64 = -12.8 -> 13 px up (torchvision rounds)
    out = BY_NAME["translate"].apply(_marker(row=30, col=20), _params("translate", 0.1, -0.2))
    assert _where(out) == (30 - 13, 20 + 6)


def test_darken_scales_brightness():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 16, 16, generator=g)
    out = BY_NAME["darken"].apply(img, torch.tensor([[0.25, 0.0], [0.5, 0.0]]))
    torch.testing.assert_close(out[0], img[0] * 0.25)
    torch.testing.assert_close(out[1], img[1] * 0.5)


def test_rotation_by_90_and_180_moves_marker():
    # pixel centre (x=40.5, y=10.5) is (+8.5, -21.5) from the centre (32, 32), y pointing down;
    # a counter-clockwise quarter turn on screen maps (dx, dy) -> (dy, -dx) = (-21.5, -8.5)
    img = _marker(row=10, col=40)
    out90 = BY_NAME["rotate"].apply(img, _params("rotate", 90.0))
    assert _where(out90) == (23, 10)
    out180 = BY_NAME["rotate"].apply(img, _params("rotate", 180.0))
    assert _where(out180) == (53, 23)


def test_blur_keeps_mean_and_constant_images():
    img = torch.zeros(1, 3, 64, 64)
    img[:, :, 28:36, 28:36] = 1.0  # far enough from the border for the 21-tall kernel
    out = BY_NAME["blur"].apply(img, _params("blur", 6.0))
    torch.testing.assert_close(out.mean(), img.mean(), rtol=1e-5, atol=1e-6)
    assert float(out.max()) < 1.0  # it did blur
    const = torch.full((1, 3, 32, 32), 0.3)
    torch.testing.assert_close(BY_NAME["blur"].apply(const, _params("blur", 9.0)), const)
    # 11 wide x 21 tall: a vertical spread is wider than the horizontal one
    line = torch.zeros(1, 3, 64, 64)
    line[:, :, 32, 32] = 1.0
    o = BY_NAME["blur"].apply(line, _params("blur", 10.0))[0, 0]
    assert int((o[:, 32] > 0).sum()) == 21 and int((o[32, :] > 0).sum()) == 11


def test_zoom_enlarges_centred_square():
    img = torch.zeros(1, 3, 64, 64)
    img[:, :, 27:37, 27:37] = 1.0  # 10 x 10, centred
    out = BY_NAME["zoom"].apply(img, _params("zoom", 2.0))
    mask = out[0, 0] > 0.5
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert int(mask.sum()) == 400  # 20 x 20
    assert (int(rows.min()) + int(rows.max())) / 2 == pytest.approx(31.5)
    assert (int(cols.min()) + int(cols.max())) / 2 == pytest.approx(31.5)


@pytest.mark.parametrize(("shift", "rgb"),
                         [(1 / 3, (0, 1, 0)), (-1 / 3, (0, 0, 1)), (0.5, (0, 1, 1))])
def test_hue_shift_of_pure_red(shift, rgb):
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    out = BY_NAME["hue"].apply(red, _params("hue", shift))
    expected = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def _torchvision(name: str, img: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    a, b = float(p[0]), float(p[1])
    nearest = InterpolationMode.NEAREST
    if name == "rotate":
        return TF.rotate(img, a, nearest)
    if name == "translate":
        return TF.affine(img, 0.0, [round(a * 32), round(b * 32)], 1.0, [0.0, 0.0], nearest)
    if name == "zoom":
        return TF.affine(img, 0.0, [0, 0], a, [0.0, 0.0], nearest)
    if name == "darken":
        return TF.adjust_brightness(img, a)
    if name == "hue":
        return TF.adjust_hue(img, a)
    return TF.gaussian_blur(img, [11, 21], [a, a])


@pytest.mark.parametrize("name", NAMES)
def test_matches_torchvision_per_image(name):
    g = torch.Generator().manual_seed(7)
    imgs = torch.rand(3, 3, 32, 32, generator=g)
    p = BY_NAME[name].sample_params(3, g)
    out = BY_NAME[name].apply(imgs, p)
    ref = torch.stack([_torchvision(name, imgs[i], p[i]) for i in range(3)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_mixed_batch_equals_per_distortion_calls():
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(12, 3, 32, 32, generator=g)
    ids = torch.arange(12) % len(DISTORTIONS)
    params = sample_params(ids, g)
    out = apply_distortions(imgs, ids, params)
    for i in range(12):
        single = DISTORTIONS[int(ids[i])].apply(imgs[i : i + 1], params[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], single)
    with pytest.raises(ValueError, match="ids"):
        apply_distortions(imgs, torch.full((12,), 6), params)
