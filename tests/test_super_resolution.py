"""Super-resolution: metrics vs scikit-image, degradation vs PIL, the network, a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from workflow.benchmarks import super_resolution as sr
from workflow.degrade import degrade, gaussian_blur, reference_target, to_float
from workflow.metrics.image import psnr, quantize, rgb_to_y, shave, ssim
from workflow.models.srnet import SRNet
from workflow.results import SCORE_COLUMNS


def _smooth(rng, h, w, c=3):
    """Natural-ish uint8 image: smoothed noise stretched over the full range."""
    a = gaussian_filter(rng.random((h, w, c)), (2, 2, 0))
    a = (a - a.min()) / (a.max() - a.min())
    return (a * 255).round().astype(np.uint8)


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("shape", [(3, 40, 53), (1, 24, 31)])
def test_psnr_ssim_match_skimage(shape):
    rng = np.random.default_rng(1)
    x = rng.random((2, *shape))
    y = np.clip(x + 0.08 * rng.standard_normal(x.shape), 0, 1)
    got_p = psnr(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    got_s = ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for i in range(2):
        exp_p = peak_signal_noise_ratio(x[i], y[i], data_range=1)
        exp_s = structural_similarity(x[i], y[i], channel_axis=0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1)
        assert got_p[i] == pytest.approx(exp_p, abs=1e-4)
        assert got_s[i] == pytest.approx(exp_s, abs=1e-4)


def test_y_channel_and_shave_match_skimage():
    rng = np.random.default_rng(2)
    x = rng.random((30, 34, 3))
    y = rgb_to_y(_nchw(x))[0, 0].numpy()
    np.testing.assert_allclose(y * 255, rgb2ycbcr(x)[..., 0], atol=1e-6)
    assert shave(_nchw(x), 4).shape[-2:] == (22, 26)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    assert torch.isinf(psnr(x, x)).all()
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- degradation


@pytest.mark.parametrize("scale", [4, 8])
def test_degradation_matches_pil_pipeline(scale):
    rng = np.random.default_rng(3)
    for a in (_smooth(rng, 96, 128), (rng.random((96, 128, 3)) * 255).astype(np.uint8)):
        pil = Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius=1))
        pil = pil.resize((128 // scale, 96 // scale), Image.Resampling.BICUBIC)
        ref = np.asarray(pil).astype(np.float64)
        got = degrade(to_float(torch.from_numpy(a)), scale)[0].permute(1, 2, 0).numpy() * 255
        assert got.shape == ref.shape
        diff = np.abs(got - ref)
        # PIL approximates the Gaussian with box blurs; still within a level on average
        assert diff.mean() < 1.0 and diff.max() <= 3.0 + 1e-6
        assert np.allclose(got, np.round(got), atol=1e-3)  # 8-bit levels, as a PIL image


def test_blur_is_a_normalised_gaussian():
    img = torch.zeros(1, 3, 15, 15)
    img[..., 7, 7] = 1.0
    out = gaussian_blur(img, 1.0)[0, 0].double()
    r = torch.arange(-3, 4, dtype=torch.float64)
    g = torch.exp(-(r**2) / 2)
    g /= g.sum()
    np.testing.assert_allclose(out[4:11, 4:11].numpy(), torch.outer(g, g).numpy(), atol=1e-6)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)


def test_reference_target_matches_pil_resize_and_center_crop():
    rng = np.random.default_rng(4)
    a = _smooth(rng, 120, 200)
    # PIL: short side to 72 (bilinear), center crop 72
    pil = Image.fromarray(a).resize((120, 72), Image.Resampling.BILINEAR)
    ref = np.asarray(pil)[:, 24:96].astype(np.float64)
    got = reference_target(to_float(torch.from_numpy(a)), 72)[0].permute(1, 2, 0).numpy() * 255
    assert got.shape == (72, 72, 3)
    assert np.abs(got - ref).mean() < 1.0 and np.abs(got - ref).max() <= 3.0


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("scale", [4, 8])
def test_srnet_shapes_and_range(scale):
    net = SRNet(scale).eval()
    n_up = sum(isinstance(m, torch.nn.Upsample) for m in net.modules())
    assert n_up == {4: 2, 8: 3}[scale]
    assert not any(isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0) for m in net.modules())
    with torch.no_grad():
        y = net(torch.rand(2, 3, 9, 7))
    assert y.shape == (2, 3, 9 * scale, 7 * scale)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_srnet_rejects_other_scales():
    with pytest.raises(ValueError, match="power of two"):
        SRNet(3)


def test_train_batches_cover_each_epoch_once():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 3)
    b = sr.TrainBatches(images, batch=4, seed=0, device=torch.device("cpu"))
    drawn = torch.cat([b.indices(s) for s in range(5)])  # 20 items = 2 epochs
    assert sorted(drawn[:10].tolist()) == list(range(10))
    assert sorted(drawn[10:].tolist()) == list(range(10))
    assert drawn[:10].tolist() != drawn[10:].tolist()  # reshuffled per epoch
    x = b(2)
    assert x.shape == (4, 3, 2, 2) and torch.equal(x[:, 0, 0, 0] * 255, drawn[8:12].float())


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def prepared(tmp_path):
    rng = np.random.default_rng(5)
    coco = tmp_path / "coco"
    coco.mkdir()
    np.save(coco / "train_images.npy", np.stack([_smooth(rng, 48, 48) for _ in range(6)]))
    np.save(coco / "val_images.npy", np.stack([_smooth(rng, 48, 48) for _ in range(2)]))
    test = tmp_path / "sr_test"
    test.mkdir()
    for name in ("set5", "set14"):
        np.savez(test / f"{name}.npz", img_a=_smooth(rng, 45, 61), img_b=_smooth(rng, 42, 44)[..., 0])
    return coco, test


CFG = {"iterations": 3, "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "val_images": 2,
       "crop_size": 32, "image_size": 32, "test_sets": ["set5", "set14"]}
COMMON = {"device": "cpu", "precision": "auto"}
LOSSNET = {"arch": "squeezenet1_1", "weights": "random", "weights_dir": "unused", "seed": 0}


def test_train_and_eval_end_to_end(tmp_path, prepared):
    coco, test = prepared
    model = tmp_path / "out" / "model.pt"
    meta = sr.train(sr.stage_config(CFG, "train"), COMMON, LOSSNET, "squeezenet1_1", "1", 4, 0,
                    coco, tmp_path / "out" / "train", model, progress=False)
    assert meta["steps"] == 3 and meta["best_step"] in (2, 3)
    assert json.loads(model.with_suffix(".json").read_text())["best_step"] == meta["best_step"]
    hist = pd.read_csv(tmp_path / "out" / "train" / "metrics.csv")
    assert hist["eval_psnr"].max() == pytest.approx(meta["best_val_psnr"])

    summary = sr.evaluate(sr.stage_config(CFG, "eval"), COMMON, LOSSNET, "squeezenet1_1", "1", 4, 0,
                          model, test, tmp_path / "images.parquet", tmp_path / "scores.parquet")
    assert list(summary.columns) == list(SCORE_COLUMNS)
    assert len(summary) == 2 * 2 * 2  # sets x protocols x metrics
    assert set(summary["variant"]) == {"x4/reference", "x4/standard"}
    assert (summary["n"] == 2).all() and summary["value"].notna().all()
    per_image = pd.read_parquet(tmp_path / "images.parquet")
    assert len(per_image) == 2 * 2 * 2

    # the standard protocol, recomputed independently with scikit-image
    net = SRNet(4)
    net.load_state_dict(torch.load(model, weights_only=True)["modules"]["model"])
    net.eval()
    with np.load(test / "set5.npz") as z:
        img = z["img_a"][:44, :60]  # cropped to a multiple of 4
    hr = to_float(torch.from_numpy(np.ascontiguousarray(img)))
    with torch.no_grad():
        out = quantize(net(degrade(hr, 4)))[0].permute(1, 2, 0).numpy().astype(np.float64)
    y_sr = rgb2ycbcr(out)[4:-4, 4:-4, 0] / 255
    y_hr = rgb2ycbcr(img.astype(np.float64) / 255)[4:-4, 4:-4, 0] / 255
    row = per_image.query("dataset == 'set5' and image == 'img_a' and protocol == 'standard'").iloc[0]
    assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(y_hr, y_sr, data_range=1), abs=1e-4)
    exp_ssim = structural_similarity(y_hr, y_sr, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1)
    assert row["ssim"] == pytest.approx(exp_ssim, abs=1e-4)
    mean = per_image.query("dataset == 'set14' and protocol == 'reference'")["psnr"].mean()
    got = summary.query("dataset == 'set14' and variant == 'x4/reference' and metric == 'psnr'")
    assert float(got["value"].iloc[0]) == pytest.approx(mean)


def test_bad_coco_array_is_named(tmp_path, prepared):
    coco, _ = prepared
    np.save(coco / "train_images.npy", np.zeros((2, 48, 48), np.float32))
    with pytest.raises(ValueError, match="train_images.npy"):
        sr.train(CFG, COMMON, LOSSNET, "squeezenet1_1", "1", 4, 0, coco, tmp_path / "w",
                 tmp_path / "m.pt", progress=False)
    assert not (tmp_path / "m.pt").exists()


def test_too_small_crop_is_rejected(tmp_path, prepared):
    coco, _ = prepared
    with pytest.raises(ValueError, match="crop_size"):
        sr.train({**CFG, "crop_size": 32}, COMMON, LOSSNET, "squeezenet1_1", "1", 8, 0, coco,
                 tmp_path / "w", tmp_path / "m.pt", progress=False)
