"""Flaw probes: set sizes, naming, and correct-pair counts on tiny hand-made images whose
distances are worked out by hand (identity "features": the pixels themselves)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from workflow.benchmarks import probes
from workflow.compare import Variant

SPATIAL, MEAN = Variant("spatial", False), Variant("mean", False)


def identity(x: torch.Tensor) -> dict[int, torch.Tensor]:
    return {0: x}


def _refs(size: int) -> dict[str, torch.Tensor]:
    return probes.reference_images(size, torch.Generator().manual_seed(0))


def _tiny_set(size: int = 8) -> dict[str, torch.Tensor]:
    imgs = {f"reference_{k}": v for k, v in _refs(size).items()}
    half = torch.zeros(3, size, size)
    half[:, :, : size // 2] = 1.0  # left half white, right half black
    imgs["invert_00_original"], imgs["invert_00_variant"] = half, 1.0 - half
    gray = torch.full((3, size, size), 0.5)
    a, b = gray.clone(), gray.clone()
    a[:, 0:2, 0:2] = 1.0
    b[:, 6:8, 6:8] = 1.0
    imgs["translate_00_original"], imgs["translate_00_variant"] = a, b
    red_white = torch.ones(3, size, size)
    red_white[1:, :, : size // 2] = 0.0  # left half red, right half white
    stained = red_white.clone()
    stained[:, :, size // 2 :] = 0.5  # background turned gray
    other = torch.ones(3, size, size)
    other[:2, :, : size // 2] = 0.0  # left half blue: a different object, same background
    imgs["stain_00_original"], imgs["stain_00_stained"], imgs["stain_00_reference"] = red_white, stained, other
    return imgs


def test_hand_worked_counts():
    ps = probes.build_probe_set(_tiny_set())
    assert ps.sizes() == {"invert": 1, "translate": 1, "stain": 1}
    counts = probes.count_correct(identity, ps, [SPATIAL, MEAN])
    # invert, spatial: d(o, inverse) = 3 (every pixel differs by 1 in 3 channels) while
    # d(o, gray) = 3 * 0.25 = 0.75 -> wrong. mean: both have channel means 0.5 -> d = 0 -> right.
    assert counts[SPATIAL]["invert"] == (0, 1)
    assert counts[MEAN]["invert"] == (1, 1)
    # translate: d(o, v) = 8 px * 0.75 / 64 = 0.094 > d(o, gray) = 4 px * 0.75 / 64 = 0.047 -> wrong;
    # mean: identical channel means -> right
    assert counts[SPATIAL]["translate"] == (0, 1)
    assert counts[MEAN]["translate"] == (1, 1)
    # stain, spatial: d(o, stained) = half the pixels * 3 * 0.25 = 0.375 < d(o, other) = 1.0 -> right;
    # mean: (0.25^2 * 3) = 0.1875 < (0.5^2 + 0 + 0.5^2) = 0.5 -> right
    assert counts[SPATIAL]["stain"] == (1, 1)
    assert counts[MEAN]["stain"] == (1, 1)
    d = probes.probe_distances(identity, ps, [SPATIAL], [("invert_00_original", "reference_gray")])
    assert float(d[SPATIAL][0]) == pytest.approx(0.75)


def test_handmade_folder_round_trip(tmp_path):
    for name, img in _tiny_set().items():
        Image.fromarray(probes.to_uint8(img)).save(tmp_path / f"{name}.png")
    images = probes.read_folder(tmp_path, 8)
    ps = probes.build_probe_set(images, str(tmp_path))
    counts = probes.count_correct(identity, ps, [SPATIAL, MEAN])
    assert counts[SPATIAL]["invert"] == (0, 1) and counts[MEAN]["translate"] == (1, 1)
    out = tmp_path / "copied"
    manifest = probes.write_images({"images": str(tmp_path), "image_size": 8}, out)
    assert manifest["sizes"] == {"invert": 1, "translate": 1, "stain": 1}
    assert (out / "manifest.json").exists() and len(list(out.glob("*.png"))) == len(images)


def test_generated_set_sizes_and_content():
    images = probes.generate(96, seed=0)
    ps = probes.build_probe_set(images)
    assert ps.sizes() == {"invert": 11, "translate": 5, "rotate": 30, "stain": 5}
    assert all(img.shape == (3, 96, 96) for img in images.values())
    assert all(float(img.min()) >= 0 and float(img.max()) <= 1 for img in images.values())
    # invert pairs are exact inversions of black-and-white patterns
    for o, v in ps.pairs["invert"]:
        assert torch.equal(images[v], 1 - images[o])
        assert set(images[o].unique().tolist()) <= {0.0, 1.0}
    # a translated pair has the same pixels, moved: identical sorted values
    for o, v in ps.pairs["translate"]:
        assert torch.equal(images[o].flatten().sort().values, images[v].flatten().sort().values)
        assert not torch.equal(images[o], images[v])
    # 180-degree rotations are exact flips of both axes (bilinear at exact pixel centres)
    rot = images["rotate_00_variant_180"]
    assert np.allclose(rot.numpy(), images["rotate_00_original"].flip(1, 2).numpy(), atol=1e-4)
    assert torch.equal(probes.generate(96, seed=0)["reference_noise"], images["reference_noise"])


def test_bad_folders_fail_clearly(tmp_path):
    imgs = _tiny_set()
    with pytest.raises(probes.ProbeError, match="reference_noise"):
        probes.build_probe_set({k: v for k, v in imgs.items() if k != "reference_noise"})
    with pytest.raises(probes.ProbeError, match="naming"):
        probes.build_probe_set({**imgs, "whatever": imgs["reference_black"]})
    with pytest.raises(probes.ProbeError, match="_variant"):
        probes.build_probe_set({k: v for k, v in imgs.items() if k != "invert_00_variant"})
    with pytest.raises(probes.ProbeError, match="does not exist"):
        probes.read_folder(tmp_path / "nope", 8)
