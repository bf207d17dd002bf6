"""The similarity family's scoring: SRCC / KRCC / PLCC and their bootstrap over references
(workflow/metrics/iqa.py), one forward pass per reference (workflow/reference_scoring.py),
the classic pixel baselines (workflow/metrics/pixel.py, piq), and the MOS / NIGHTS jobs
(workflow/benchmarks/similarity_family.py) on arrays in the data contract's format, built
here (not through the dataset modules)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage, optimize, signal, stats
from skimage.metrics import peak_signal_noise_ratio

from workflow import compare
from workflow.archs import LossNet
from workflow.benchmarks import similarity as bench
from workflow.benchmarks import similarity_family as family
from workflow.job import Job
from workflow.metrics import iqa, pixel
from workflow.reference_scoring import PixelReferenceScorer, ReferenceScorer

CPU = Job(device=torch.device("cpu"), precision="fp32", settings={"batch_size": 3})


def mos_arrays(refs=3, per_ref=6, h=24, w=32, seed=0, types=("noise", "blur")) -> dict:
    """A MOS dataset as the contract's ``load`` returns it: the distortion strength decides
    the MOS (higher = better), with a little observer noise."""
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 256, (refs, h, w, 3), dtype=np.uint8)
    dist, ref_index, mos, dist_type, level = [], [], [], [], []
    for r in range(refs):
        for k in range(per_ref):
            t, lv = types[k % len(types)], 1 + k // len(types)
            x = ref[r].astype(np.float64)
            if t == "noise":
                x = x + rng.normal(0, 12 * lv, x.shape)
            else:
                x = ndimage.uniform_filter(x, size=(1 + 2 * lv, 1 + 2 * lv, 1))
            dist.append(np.clip(x, 0, 255).round().astype(np.uint8))
            ref_index.append(r)
            mos.append(9 - 2 * lv + rng.normal(0, 0.2))
            dist_type.append(t)
            level.append(lv)
    return {"ref": ref, "dist": np.stack(dist), "ref_index": np.array(ref_index, np.int64),
            "mos": np.array(mos, np.float64), "dist_type": np.array(dist_type),
            "level": np.array(level, np.int64)}


# ----------------------------------------------------------------------------- statistics


def test_srcc_and_krcc_by_hand_and_against_scipy():
    sim, q = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    # Spearman: sum d^2 = 4, rho = 1 - 6 * 4 / (5 * 24); Kendall: 8 concordant, 2 discordant
    assert iqa.srcc(sim, q) == pytest.approx(0.8)
    assert iqa.krcc(sim, q) == pytest.approx(0.6)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=40), rng.normal(size=40).round(1)  # ties in b: tau-b
    assert iqa.srcc(a, b) == pytest.approx(stats.spearmanr(a, b)[0])
    assert iqa.krcc(a, b) == pytest.approx(stats.kendalltau(a, b, variant="b")[0])
    assert np.isnan(iqa.srcc([1, 1, 1], [1, 2, 3]))


def test_mos_rows_are_oriented_so_agreement_is_positive():
    data = {"mos": np.array([9.0, 7.0, 5.0, 3.0]), "dist_type": np.array(["a"] * 4),
            "ref_index": np.array([0, 0, 1, 1])}
    d = np.array([0.1, 0.2, 0.3, 0.4])  # less similar = lower MOS: perfect agreement
    rows = iqa.mos_rows("x", {"m": d}, data, True, 0, 0, 0.95)["m"]
    assert {(r["split"], r["metric"]): r["value"] for r in rows}[("all", "srcc")] == 1.0
    dmos = {**data, "mos": -data["mos"]}  # the same judgements as a DMOS
    rows = iqa.mos_rows("x", {"m": d}, dmos, False, 0, 0, 0.95)["m"]
    values = {(r["split"], r["metric"]): r["value"] for r in rows}
    assert values[("all", "srcc")] == 1.0 and values[("dist/a", "krcc")] == 1.0


def test_plcc_of_an_exact_logistic_is_one():
    s = np.linspace(-2.0, 3.0, 60)
    q = iqa.logistic5(s, 5.0, 3.0, 0.4, 0.2, 1.0)
    assert np.corrcoef(s, q)[0, 1] < 0.98  # not linear: the fit matters
    fit = iqa.plcc(s * 1e-3, q)  # metric scales are arbitrary: standardised before the fit
    assert fit.kind == "logistic" and fit.plcc == pytest.approx(1.0, abs=1e-9)


def test_plcc_falls_back_to_the_linear_pearson_worked_by_hand(monkeypatch):
    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(optimize, "curve_fit", no_convergence)
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-1.5, 0.5, -0.5, 1.5): r = 4 / 5
    fit = iqa.plcc([1, 2, 3, 4], [1, 3, 2, 4])
    assert fit.kind == "linear" and fit.plcc == pytest.approx(0.8)


def test_the_logistic_fits_at_least_as_well_as_a_line():
    rng = np.random.default_rng(2)
    s = rng.uniform(0, 1, 200)
    q = np.tanh(6 * (s - 0.5)) + rng.normal(0, 0.1, 200)
    fit = iqa.plcc(s, q)
    assert fit.kind == "logistic" and fit.plcc >= np.corrcoef(s, q)[0, 1] - 1e-12


def test_bootstrap_draws_whole_references():
    ref_index = np.repeat([0, 1, 2, 3], [5, 3, 4, 2])
    members = {r: set(np.flatnonzero(ref_index == r)) for r in range(4)}
    for idx in iqa.bootstrap_indices(ref_index, 50, seed=3):
        counts = np.bincount(idx, minlength=len(ref_index))
        for r, m in members.items():  # every image of a reference as often as the reference
            assert len({counts[i] for i in m}) == 1, (r, counts)
        drawn = sum(counts[min(m)] for m in members.values())
        assert drawn == 4  # four references drawn with replacement
    a = iqa.bootstrap_indices(ref_index, 5, seed=3)
    assert all((x == y).all() for x, y in zip(a, iqa.bootstrap_indices(ref_index, 5, seed=3),
                                              strict=True))


def test_bootstrap_interval_reflects_the_references_not_the_images():
    """Each reference shifts both the MOS and the metric of all its images: the images of
    one reference are not independent. Resampling the 400 images would give a narrow
    interval; resampling the 8 references gives the honest, wide one."""
    rng = np.random.default_rng(4)
    ref_index = np.repeat(np.arange(8), 50)
    offset = rng.normal(0, 1, 8)[ref_index]
    mos = rng.uniform(0, 1, 400) + 0.5 * offset
    sim = mos + offset
    data = {"mos": mos, "dist_type": np.array(["t"] * 400), "ref_index": ref_index}
    row = next(r for r in iqa.mos_rows("x", {"m": -sim}, data, True, 200, 0, 0.9)["m"]
               if r["split"] == "all" and r["metric"] == "srcc")
    draw = np.random.default_rng(0)
    by_image = [iqa.srcc(sim[i], mos[i]) for i in (draw.integers(0, 400, 400) for _ in range(200))]
    lo, hi = np.quantile(by_image, [0.05, 0.95])
    assert row["ci_low"] < row["value"] < row["ci_high"]
    assert row["ci_high"] - row["ci_low"] > 2.5 * (hi - lo) > 0


def test_twoafc_rows_per_subset_with_intervals():
    agree = np.array([1.0, 0.0, 1.0, 1.0, 0.5, 0.0])
    subsets = np.array(["imagenet"] * 3 + ["no_imagenet"] * 3)
    rows = {r["split"]: r for r in iqa.twoafc_rows("nights", "test", agree, subsets, 200, 0,
                                                    0.95)}
    assert rows["test"]["value"] == pytest.approx(3.5 / 6)
    assert rows["test/imagenet"]["value"] == pytest.approx(2 / 3)
    assert rows["test/no_imagenet"]["value"] == pytest.approx(1.5 / 3)
    assert 0 <= rows["test"]["ci_low"] <= rows["test"]["value"] <= rows["test"]["ci_high"] <= 1
    only = iqa.twoafc_rows("nights", "test", agree, np.array(["all"] * 6), 0, 0, 0.95)
    assert [r["split"] for r in only] == ["test"] and np.isnan(only[0]["ci_low"])


# ----------------------------------------------------------------------------- one pass per ref


class CountingExtractor(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.images, self.calls = inner, 0, []

    def forward(self, x):
        self.images += len(x)
        self.calls.append(len(x))
        return self.inner(x)

    def peak_activation_bytes(self, size):
        return self.inner.peak_activation_bytes(size)


def test_each_reference_passes_through_the_network_once():
    net = LossNet("squeezenet1_1", "2")  # the smallest network: the cheapest to build
    data = mos_arrays(refs=3, per_ref=5, h=32, w=40)
    order = np.random.default_rng(5).permutation(len(data["dist"]))  # references interleaved
    dist, ref_index = data["dist"][order], data["ref_index"][order]
    variants = list(compare.all_variants(["spatial", "sort"], [True]))
    ext = CountingExtractor(CPU.extractor([net], channels_last=True))
    scorer = ReferenceScorer(CPU, ext, [net], variants, image_size=(32, 40))
    d = scorer.distances(data["ref"], dist, ref_index, batch=2)
    assert ext.images == len(data["ref"]) + len(dist)  # 3 references + 15 distorted images
    assert ext.calls.count(1) >= 3 and max(ext.calls) <= 2
    # the same numbers as comparing every image with its own copy of the reference
    with torch.inference_mode():
        fx = ext.inner(torch.from_numpy(dist).permute(0, 3, 1, 2).float() / 255)
        fy = ext.inner(torch.from_numpy(data["ref"][ref_index]).permute(0, 3, 1, 2).float() / 255)
    want = compare.distances(fx, fy, variants, net.taps)
    for v in variants:
        np.testing.assert_allclose(d[(net.id, v)], want[v].double().numpy(), rtol=2e-5)


def test_pixel_reference_scorer_matches_pairwise_distances():
    data = mos_arrays(refs=2, per_ref=4, h=48, w=48)
    nets = [LossNet("pixel", m) for m in ("l2", "psnr", "gmsd")]
    d = PixelReferenceScorer(CPU, nets).distances(data["ref"], data["dist"],
                                                  data["ref_index"], batch=3)
    x = pixel.images64(data["dist"], CPU.device)
    y = pixel.images64(data["ref"][data["ref_index"]], CPU.device)
    for n in nets:
        np.testing.assert_allclose(d[(n.id, None)], pixel.distance(n.layer, x, y).numpy())


# ----------------------------------------------------------------------------- baselines


def _pair(h=64, w=64, n=2, seed=6):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    a = ndimage.uniform_filter(a.astype(float), size=(1, 3, 3, 1)).round().astype(np.uint8)
    b = np.clip(a + rng.normal(0, 10, a.shape), 0, 255).round().astype(np.uint8)
    return a, b, pixel.images64(a, CPU.device), pixel.images64(b, CPU.device)


def test_psnr_is_scikit_image_negated():
    a, b, x, y = _pair()
    want = [-peak_signal_noise_ratio(a[i], b[i], data_range=255) for i in range(len(a))]
    np.testing.assert_allclose(pixel.distance("psnr", y, x).numpy(), want, rtol=1e-12)
    assert pixel.distance("psnr", x, x).tolist() == [-100.0, -100.0]


def _gauss(size=11, sigma=1.5):
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma ** 2))
    k = np.outer(g, g)
    return k / k.sum()


def _ms_ssim_by_hand(a, b, scales):
    """Wang et al. 2003 on [0, 1] images: valid 11x11 Gaussian statistics, 2x2 averaging
    between scales, cs at every scale but the last, SSIM at the last, per channel."""
    weights = np.array(pixel.MS_SSIM_WEIGHTS[:scales])
    if scales < 5:  # fewer scales: the first weights renormalised (5: Wang et al.'s as they are)
        weights = weights / weights.sum()
    k, c1, c2 = _gauss(), 0.01 ** 2, 0.03 ** 2
    out = []
    for ch in range(3):
        x, y, terms = a[..., ch] / 255.0, b[..., ch] / 255.0, []
        for s in range(scales):
            if s:
                x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean((1, 3))
                y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean((1, 3))
            f = lambda z: signal.correlate2d(z, k, mode="valid")  # noqa: E731
            mx, my = f(x), f(y)
            vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
            cs = (2 * cxy + c2) / (vx + vy + c2)
            lum = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
            terms.append(max((lum * cs).mean() if s == scales - 1 else cs.mean(), 0))
        out.append(np.prod(np.array(terms) ** weights))
    return 1 - np.mean(out)


@pytest.mark.parametrize("side, scales", [(64, 3), (176, 5)])
def test_ms_ssim_against_the_formula(side, scales):
    assert pixel.ms_ssim_scales(side, side) == scales
    a, b, x, y = _pair(side, side, n=1)
    got = pixel.distance("ms_ssim", y, x).item()
    # piq computes in float32 (metrics.pixel.PIQ_METRICS): 1 - MS-SSIM to a few 1e-6
    assert got == pytest.approx(_ms_ssim_by_hand(b[0], a[0], scales), abs=1e-5)


def test_ms_ssim_scales_and_the_refusal_of_tiny_images():
    assert [pixel.ms_ssim_scales(s, s) for s in (20, 21, 41, 80, 81, 160, 161, 512)] == \
        [0, 2, 3, 3, 4, 4, 5, 5]
    assert pixel.ms_ssim_scales(384, 512) == 5
    x = torch.rand(1, 3, 20, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match="pixel/ms_ssim needs 21 px"):
        pixel.distance("ms_ssim", x, x)


def test_gmsd_against_the_formula():
    a, b, x, y = _pair(50, 64, n=2)
    t = 170 / 255 ** 2
    prewitt = np.array([[-1, 0, 1]] * 3) / 3
    want = []
    for i in range(2):
        lum = [(z / 255.0) @ np.array([0.299, 0.587, 0.114]) for z in (b[i], a[i])]
        lum = [z.reshape(25, 2, 32, 2).mean((1, 3)) for z in lum]
        mag = [np.hypot(ndimage.correlate(z, prewitt, mode="constant"),
                        ndimage.correlate(z, prewitt.T, mode="constant")) for z in lum]
        gms = (2 * mag[0] * mag[1] + t) / (mag[0] ** 2 + mag[1] ** 2 + t)
        want.append(gms.std())
    np.testing.assert_allclose(pixel.distance("gmsd", y, x).numpy(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("metric", ["vifp", "haarpsi", "ms_ssim", "gmsd", "psnr"])
def test_classic_baselines_are_distances(metric):
    """0 (psnr: its floor) for identical images, and growing with the distortion."""
    a, _, x, _ = _pair(48, 48, n=1)
    rng = np.random.default_rng(7)
    d = [pixel.distance(metric, pixel.images64(np.clip(a + rng.normal(0, s, a.shape), 0, 255)
                                               .round().astype(np.uint8), CPU.device), x).item()
         for s in (2, 8, 32)]
    same = pixel.distance(metric, x, x).item()
    assert same == pytest.approx(-100.0 if metric == "psnr" else 0.0, abs=1e-5)  # float32
    assert same < d[0] < d[1] < d[2], d


# ----------------------------------------------------------------------------- the jobs


def _job_config(dataset, lossnets, **extra):
    return {"dataset": dataset, "lossnets": lossnets, "comparisons": ["spatial", "mean"],
            "channel_norm": [True], "normalize": "imagenet",
            "bootstrap": {"resamples": 50, "seed": 0, "level": 0.9}, **extra}


class FakeModule:
    def __init__(self, data, split=None):
        self.data, self.split = data, split

    def load(self, folder, *split):
        assert split == ((self.split,) if self.split else ())
        return self.data


def test_mos_job_rows_per_dataset_and_distortion_type(tmp_path, monkeypatch):
    data = mos_arrays(refs=3, per_ref=6, h=24, w=32)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"dataset": "tid2013", "higher_is_better": True, "size": [24, 32]}))
    monkeypatch.setattr(family.registry, "module", lambda name: FakeModule(data))
    cfg = _job_config("tid2013", ["pixel/psnr", "pixel/ms_ssim", "pixel/l2"])
    summary = bench.score(CPU, cfg, {"tid2013": tmp_path}, tmp_path / "s.parquet",
                          tmp_path / "scores.parquet")
    assert set(summary["split"]) == {"all", "dist/noise", "dist/blur"}
    assert set(summary["metric"]) == {"srcc", "krcc", "plcc"}
    assert len(summary) == 3 * 3 * 3 and (summary["dataset"] == "tid2013").all()
    assert set(summary.loc[summary.split == "all", "n"]) == {18}
    ok = summary["ci_low"].notna()
    assert ok.all() and (summary["ci_low"] <= summary["ci_high"]).all()
    samples = pd.read_parquet(tmp_path / "s.parquet")
    psnr = samples[samples.layer == "psnr"].sort_values("item")
    want = [-peak_signal_noise_ratio(data["dist"][i], data["ref"][data["ref_index"][i]],
                                     data_range=255) for i in range(18)]
    np.testing.assert_allclose(psnr["d"], want, rtol=1e-12)
    row = summary[(summary.layer == "psnr") & (summary.split == "all")
                  & (summary.metric == "srcc")]
    assert row["value"].item() == pytest.approx(stats.spearmanr(-psnr["d"], psnr["mos"])[0])
    assert pd.read_parquet(tmp_path / "scores.parquet")["ci_high"].notna().all()


def test_mos_job_of_a_loss_network_and_too_small_images(tmp_path, monkeypatch):
    data = mos_arrays(refs=2, per_ref=4, h=32, w=40)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"dataset": "kadid10k", "higher_is_better": False, "size": [32, 40]}))
    monkeypatch.setattr(family.registry, "module", lambda name: FakeModule(data))
    cfg = _job_config("kadid10k", ["squeezenet1_1/1", "squeezenet1_1/2"])
    summary = bench.score(CPU, cfg, {"kadid10k": tmp_path}, tmp_path / "s.parquet",
                          tmp_path / "scores.parquet")
    assert len(summary) == 2 * 2 * 3 * 3  # nets x variants x splits x metrics
    assert set(summary["comparison"]) == {"spatial", "mean"}
    with pytest.raises(ValueError, match=r"32x40 px are too small for pixel/vifp needs 41"):
        bench.score(CPU, _job_config("kadid10k", ["pixel/vifp"]), {"kadid10k": tmp_path},
                    tmp_path / "s.parquet", tmp_path / "scores.parquet")


def test_nights_job_scores_2afc_on_its_test_split(tmp_path, monkeypatch):
    rng = np.random.default_rng(8)
    ref = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    noise = lambda s: np.clip(ref + rng.normal(0, s, ref.shape), 0, 255).astype(np.uint8)  # noqa: E731
    data = {"ref": ref, "p0": noise(5), "p1": noise(40), "judge": np.full(10, 0.2),
            "subset": np.array(["imagenet"] * 6 + ["no_imagenet"] * 4)}
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "nights"}))
    monkeypatch.setattr(family.registry, "module", lambda name: FakeModule(data, "test"))
    summary = bench.score(CPU, _job_config("nights", ["pixel/l2", "pixel/gmsd"]),
                          {"nights": tmp_path}, tmp_path / "s.parquet", tmp_path / "sc.parquet")
    assert set(summary["split"]) == {"test", "test/imagenet", "test/no_imagenet"}
    assert (summary["metric"] == "2afc").all()
    # p0 is the weaker distortion for every triplet: each metric agrees with the 80 %
    assert np.allclose(summary["value"], 0.8)


def test_perf_iqa_runs_and_both_sides_agree(capsys):
    from workflow.perf import iqa as perf

    threads = torch.get_num_threads()
    try:
        assert perf.main(["--archs", "squeezenet1_1", "--refs", "1", "--per-ref", "2", "--size",
                          "32", "48", "--repeats", "1", "--threads", "1", "--device", "cpu",
                          "--no-write"]) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets the process-wide count
    out = capsys.readouterr().out
    assert "squeezenet1_1: ours" in out and "5 loss networks x 10 variants" in out
    assert float(out.split("agree to ")[1].split(")")[0]) < 1e-4


def test_the_default_analysis_correlates_bapps_2afc_with_tid2013_srcc():
    from workflow.analysis.correlations import score_correlations, select_scores
    from workflow.plan import complete_config
    from workflow.results import score_frame

    cfg = complete_config({})["analysis"]
    cfg["bootstrap"]["n"] = 20
    rng = np.random.default_rng(9)
    rows = []
    for arch in ("alexnet", "vgg16"):
        for layer in "1234":
            v = rng.uniform(0.6, 0.7)
            common = {"arch": arch, "layer": layer, "comparison": "spatial", "channel_norm": True}
            rows += [{**common, "dataset": "bapps-2afc", "split": "mean", "metric": "2afc",
                      "value": v},
                     {**common, "dataset": "tid2013", "split": "all", "metric": "srcc",
                      "value": 2 * v - 0.5, "ci_low": 0.1, "ci_high": 0.9},
                     {**common, "dataset": "tid2013", "split": "dist/1", "metric": "srcc",
                      "value": 0.0}]
    selected = select_scores(score_frame(rows, benchmark="similarity"), cfg["scores"])
    assert set(selected["score"]) == {"2AFC", "SRCC TID2013"}
    corr = score_correlations(selected, cfg)
    pair = corr[(corr.level == "lossnet") & (corr.score_a == "2AFC")
                & (corr.score_b == "SRCC TID2013")]
    assert pair["spearman_rho"].item() == pytest.approx(1.0)
    assert pair["n"].item() == 8
