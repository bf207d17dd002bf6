"""The pixel baselines pixel/<metric> (workflow/metrics/pixel.py and their jobs): Lab, SSIM and
the distances against scikit-image, hand-worked values and the `lpips` package; the 2AFC of a
hand-made triplet set worked by hand; their rows through the command table into the scores
table; the plan gives their jobs no weights."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from skimage import color
from skimage.metrics import structural_similarity

from workflow import cli
from workflow.archs import PIXEL_METRICS, LossNet, UnknownLossNetError
from workflow.benchmarks import probes as probes_bench
from workflow.benchmarks import similarity as bench
from workflow.datasets import bapps
from workflow.datasets import probes as probe_data
from workflow.job import Job
from workflow.metrics import pixel
from workflow.metrics.image import rgb_to_lab, ssim
from workflow.metrics.similarity import bapps_rows
from workflow.plan import Plan, complete_config

CPU = Job(device=torch.device("cpu"), precision="fp32")
RNG = np.random.default_rng(17)


def _patches(n: int = 3, size: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _t(a: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float64 NCHW in [0, 1]."""
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).double() / 255


def _gray_L(level: int) -> float:
    """CIE L* of an sRGB gray by hand: Y = the linearised value (the Y row sums to 1)."""
    v = level / 255
    y = ((v + 0.055) / 1.055) ** 2.4 if v > 0.04045 else v / 12.92
    return 116 * y ** (1 / 3) - 16 if y > 0.008856 else 903.3 * y


# ----------------------------------------------------------------------------- definitions


def test_lab_matches_skimage_and_known_values():
    a = _patches()
    np.testing.assert_allclose(rgb_to_lab(_t(a)).permute(0, 2, 3, 1).numpy(),
                               color.rgb2lab(a), atol=1e-9)
    # published sRGB -> L*a*b* (D65): mid gray 128 -> L* 53.585; pure red -> (53.24, 80.09, 67.20)
    px = np.array([[[[128, 128, 128], [255, 0, 0]]]], dtype=np.uint8)
    lab = rgb_to_lab(_t(px))[0, :, 0]
    assert lab[0, 0].item() == pytest.approx(53.585, abs=1e-3)
    assert lab[0, 0].item() == pytest.approx(_gray_L(128), abs=1e-9)
    assert lab[:, 1].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.01)


def test_lpips_ssim_window_matches_skimage_defaults():
    # scikit-image's defaults (7x7 box, sample covariances) on the 8-bit values, range 255:
    # what lpips.dssim asks of compare_ssim; the project's SR SSIM (Gaussian) differs
    a, b = _patches(), _patches()
    want = [structural_similarity(a[i].astype(float), b[i].astype(float), data_range=255,
                                  channel_axis=-1) for i in range(len(a))]
    got = ssim(_t(a), _t(b), window="uniform", size=7, sample_covariance=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pixel.distance("ssim", _t(a), _t(b)).numpy(),
                               (1 - np.array(want)) / 2, rtol=1e-10)
    gauss = [structural_similarity(a[i].astype(float), b[i].astype(float), data_range=255,
                                   channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False) for i in range(len(a))]
    np.testing.assert_allclose(ssim(_t(a), _t(b)).numpy(), gauss, rtol=1e-10, atol=1e-12)
    assert not np.allclose(gauss, want, rtol=1e-3)


def test_l1_l2_by_hand():
    a, b = _patches(), _patches()
    x, y = a.astype(np.float64) / 255, b.astype(np.float64) / 255
    np.testing.assert_allclose(pixel.distance("l1", _t(a), _t(b)).numpy(),
                               np.abs(x - y).mean(axis=(1, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(pixel.distance("l2_rgb", _t(a), _t(b)).numpy(),
                               ((x - y) ** 2).mean(axis=(1, 2, 3)), rtol=1e-12)
    la, lb = color.rgb2lab(a), color.rgb2lab(b)
    np.testing.assert_allclose(pixel.distance("l2", _t(a), _t(b)).numpy(),
                               0.5 * (((la - lb) / 100) ** 2).mean(axis=(1, 2, 3)), rtol=1e-9)
    with pytest.raises(ValueError, match="unknown pixel metric 'l3'"):
        pixel.distance("l3", _t(a), _t(b))
    assert set(pixel.METRICS) == set(PIXEL_METRICS)


def _reference_round_trip(a: np.ndarray) -> np.ndarray:
    """What the LPIPS loader + tensor2im make of 8-bit values: /255, (x - 0.5) / 0.5 in
    float32, then (x + 1) * 127.5 truncated to uint8."""
    x = (torch.from_numpy(a).float() / 255 - 0.5) / 0.5
    return ((x.numpy() + 1.0) * (255.0 / 2.0)).astype(np.uint8)


def test_distances_equal_the_lpips_package(monkeypatch):
    lpips = pytest.importorskip("lpips")
    import skimage.measure

    # lpips.dssim imports skimage.measure.compare_ssim, which scikit-image 0.18 renamed to
    # skimage.metrics.structural_similarity (same defaults; multichannel -> channel_axis)
    monkeypatch.setattr(skimage.measure, "compare_ssim", lambda p0, p1, data_range, multichannel:
                        structural_similarity(p0, p1, data_range=data_range, channel_axis=-1),
                        raising=False)
    levels = np.arange(256, dtype=np.uint8)
    assert int((_reference_round_trip(levels) != levels).sum()) == 63  # the truncation quirk
    ref = {"l2": lpips.L2(use_gpu=False, colorspace="Lab"),
           "ssim": lpips.DSSIM(use_gpu=False, colorspace="RGB"),
           "ssim_lab": lpips.DSSIM(use_gpu=False, colorspace="Lab")}
    a, b = _patches(2), _patches(2)
    for i in range(len(a)):
        # the LPIPS data loader's [-1, 1] tensors (ToTensor, Normalize(0.5, 0.5)) of the patches
        t0, t1 = ((torch.from_numpy(p[i]).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
                  for p in (a, b))
        ra, rb = _reference_round_trip(a[i:i + 1]), _reference_round_trip(b[i:i + 1])
        for metric, net in ref.items():
            want = float(net(t0, t1))
            got = pixel.distance(metric, _t(ra), _t(rb)).item()
            assert got == pytest.approx(want, rel=2e-6), metric  # lpips returns float32


# ----------------------------------------------------------------------------- 2AFC by hand


def _uniform(*levels: int) -> np.ndarray:
    return np.stack([np.full((64, 64, 3), v, np.uint8) for v in levels])


def test_twoafc_of_hand_made_triplets():
    # triplet 0: p0 (120) is nearer the reference (128) than p1 (200); 20% chose p1 -> 0.8
    # triplet 1: p0 == p1 -> a tie earns half -> 0.5
    # triplet 2: p1 (60) is nearer the reference (50) than p0 (250); 60% chose p1 -> 0.6
    ref, p0, p1 = _uniform(128, 90, 50), _uniform(120, 30, 250), _uniform(200, 30, 60)
    judge = np.array([0.2, 0.6, 0.6])
    nets = [LossNet("pixel", m) for m in ("l1", "l2", "ssim")]
    d = bench.PixelScorer(CPU, nets).twoafc(ref, p0, p1)
    assert set(d) == {(n.id, None) for n in nets}
    # L1 and L2 (Lab: only L* differs between grays, a* and b* are ~0) by hand
    assert d[("pixel/l1", None)][:, 0].tolist() == pytest.approx([8 / 255, 72 / 255])
    hand = [0.5 * ((_gray_L(128) - _gray_L(v)) / 100) ** 2 / 3 for v in (120, 200)]
    assert d[("pixel/l2", None)][:, 0].tolist() == pytest.approx(hand, rel=1e-3)
    for net in nets:
        d0, d1 = d[(net.id, None)].numpy()
        assert d0[1] == d1[1]
        rows = bapps_rows({"val": (d0, d1, judge)}, {})
        assert [r["value"] for r in rows] == pytest.approx([0.8 / 3 + 0.5 / 3 + 0.6 / 3] * 2)
        assert rows[0]["n"] == 3


# ----------------------------------------------------------------------------- through the CLI


def test_similarity_pixel_job_rows_reach_the_scores_table(prepared, demo_plan, tmp_path):
    folder = prepared("bapps")
    cfg = {**demo_plan.stage_config("similarity", "score", "pixel"),
           "lossnets": ["pixel/l2", "pixel/ssim", "pixel/l1"]}
    assert "weights" not in cfg and "comparisons" not in cfg and "precision" not in cfg
    samples, scores, table = (tmp_path / f"{n}.parquet" for n in ("samples", "scores", "all"))
    rc = cli.main(["similarity", "score", "--config", json.dumps(cfg), "--settings",
                   json.dumps({"batch_size": 7, "device": "cpu", "threads": 1}),
                   "--prepared", str(folder), "--samples", str(samples), "--scores", str(scores)])
    assert rc == 0
    assert cli.main(["results", "gather", str(scores), "--out", str(table)]) == 0
    df = pd.read_parquet(table)
    assert set(df["arch"]) == {"pixel"} and set(df["layer"]) == {"l2", "ssim", "l1"}
    assert set(df["comparison"]) == {""} and df["channel_norm"].isna().all()
    assert set(df["weights_id"]) == {"none"} and set(df["benchmark"]) == {"similarity"}
    assert set(df["precision"]) == {"fp64"}
    splits = {*bapps.TWOAFC_SUBSETS["val"], "mean"}
    for metric in ("l2", "ssim", "l1"):
        rows = df[df["layer"] == metric]
        assert set(rows[rows["metric"] == "2afc"]["split"]) == splits
        assert set(rows[rows["metric"] == "jnd_ap"]["split"]) == {"traditional", "cnn", "pooled"}
    # one subset's 2AFC from distances recomputed with scikit-image and the formula by hand
    d = bapps.load(folder, "2afc", "val", "cnn")
    ref, p0, p1 = (np.asarray(d[k]) for k in ("ref", "p0", "p1"))
    judge = np.asarray(d["judge"], np.float64)
    lab = [color.rgb2lab(x) for x in (ref, p0, p1)]
    l2 = [0.5 * (((lab[k] - lab[0]) / 100) ** 2).mean(axis=(1, 2, 3)) for k in (1, 2)]
    ds = [np.array([(1 - structural_similarity(x[i].astype(float), ref[i].astype(float),
                                               data_range=255, channel_axis=-1)) / 2
                    for i in range(len(ref))]) for x in (p0, p1)]
    per = pd.read_parquet(samples)
    for metric, (d0, d1) in (("l2", l2), ("ssim", ds)):
        s = per[(per["layer"] == metric) & (per["split"] == "cnn")
                & (per["dataset"] == "bapps-2afc")].sort_values("item")
        np.testing.assert_allclose(s["d0"], d0, rtol=1e-9)
        np.testing.assert_allclose(s["d1"], d1, rtol=1e-9)
        agree = np.where(d0 < d1, 1 - judge, np.where(d1 < d0, judge, 0.5)).mean()
        row = df[(df["layer"] == metric) & (df["split"] == "cnn") & (df["metric"] == "2afc")]
        assert row["value"].item() == pytest.approx(agree)


def test_probes_pixel_job_hand_worked_counts(tmp_path):
    from tests.test_probes import _tiny_set, _write_pngs

    src = tmp_path / "handmade"
    _write_pngs(src, _tiny_set(16))
    scores = tmp_path / "scores.parquet"
    # L1 on the 8-bit images (gray = 128/255): invert d(o, inverse) = 1 > d(o, gray) = 0.5 ->
    # wrong; translate: 8 moved pixels > the 4 that differ from the gray reference -> wrong;
    # stain: d(o, stained) = 1/2 * (1 - 128/255) = 0.249 < d(o, other) = 1/2 * 2/3 -> right
    config = {"image_size": 16, "images": str(src)}
    assert cli.main(["probes", "score", "--net", "pixel/l1", "--config", json.dumps(config),
                     "--settings", json.dumps({"device": "cpu", "threads": 1}),
                     "--images", str(src), "--scores", str(scores)]) == 0
    df = pd.read_parquet(scores)
    assert df.set_index("split")["value"].to_dict() == {"invert": 0, "translate": 0, "stain": 1}
    assert set(df["arch"]) == {"pixel"} and set(df["layer"]) == {"l1"}
    assert set(df["comparison"]) == {""} and df["channel_norm"].isna().all()
    assert set(df["weights_id"]) == {"none"} and set(df["n"]) == {1}
    assert set(df["precision"]) == {"fp64"}
    # the other metrics count by the same rule (distances from workflow.metrics.pixel)
    ps = probe_data.load(src)
    names = list(ps.images)
    x = torch.cat([_t(np.asarray(ps.images[n])[None]) for n in names])
    counts = probes_bench.count_correct_pixel(x, names, ps, "l2_rgb")
    assert counts == {"invert": (0, 1), "translate": (0, 1), "stain": (1, 1)}


# ----------------------------------------------------------------------------- the plan


def test_plan_pixel_baselines_are_one_job_without_weights():
    cfg = complete_config({})  # the full study: imagenet weights
    plan = Plan(cfg)
    ids = [n.id for n in plan.lossnets("similarity") if n.is_pixel]
    assert ids == ["pixel/l2", "pixel/ssim", "pixel/l1", "pixel/psnr", "pixel/ms_ssim",
                   "pixel/gmsd", "pixel/vifp", "pixel/haarpsi"]
    assert plan.jobs("similarity")[-4:] == [{"arch": "pixel", "dataset": d}
                                            for d in ("bapps", "tid2013", "kadid10k", "nights")]
    assert {"arch": "pixel", "layer": "ssim"} in plan.jobs("probes")

    class W:
        arch = "pixel"

    assert plan.weights_param()(W()) == [] and "pixel" not in plan.imagenet_archs()
    # the probes rule's {layer} takes every pixel metric; other benchmarks' rules none
    for metric in PIXEL_METRICS:
        assert re.fullmatch(plan.layer_wildcard("probes"), metric)
        assert not re.fullmatch(plan.layer_wildcard("adaptation"), metric)
    assert re.fullmatch(plan.layer_wildcard("probes"), "lpips")
    assert plan.stage_config("similarity", "score", "pixel")["lossnets"] == ids
    assert "weights" not in plan.stage_config("probes", "score", "pixel")
    # a pixel id in the lossnets list joins the default ones once; [] turns them off
    cfg["similarity"]["lossnets"] = ["alexnet/2", "pixel/l2_rgb", "pixel/l2"]
    cfg["similarity"]["pixel_baselines"] = []
    assert [n.id for n in Plan(cfg).lossnets("similarity")] == [
        "alexnet/2", "pixel/l2_rgb", "pixel/l2", "alexnet/lpips", "vgg16/lpips",
        "squeezenet1_1/lpips"]
    cfg["probes"]["pixel_baselines"] = []
    assert not [n for n in Plan(cfg).lossnets("probes") if n.is_pixel]
    # a benchmark that scores no pixel baseline refuses one, naming its key
    plan = Plan(complete_config({}))
    plan.config["delineation"]["lossnets"] = ["pixel/l2"]
    with pytest.raises(UnknownLossNetError, match="delineation.lossnets: pixel/l2 .*similarity"):
        plan.lossnets("delineation")
    with pytest.raises(UnknownLossNetError, match="unknown pixel metric 'l3'.*pixel/ssim"):
        LossNet.parse("pixel/l3")


def test_analysis_selects_no_pixel_rows():
    """The correlation tables and figures are about loss networks with attributes: pixel rows
    (comparison "") would otherwise split a selector that leaves the comparison open."""
    from tests.test_analysis import CFG, _demo_scores
    from workflow.analysis.correlations import select_scores
    from workflow.results import score_frame

    scores = _demo_scores()
    pix = score_frame([{"benchmark": "similarity", "dataset": "bapps-2afc", "split": "mean",
                        "arch": "pixel", "layer": m, "comparison": "", "metric": "2afc",
                        "value": 0.63, "n": 10} for m in ("l2", "ssim")])
    both = pd.concat([scores, pix], ignore_index=True)
    want = select_scores(scores, CFG["scores"])
    assert sorted(set(want["score"])) == ["2AFC", "JND", "PSNR"]
    pd.testing.assert_frame_equal(select_scores(both, CFG["scores"]), want)
