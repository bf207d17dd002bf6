"""BAPPS: synthesize -> prepare -> load, failure modes, and the scoring command."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workflow.benchmarks import similarity as bench
from workflow.datasets import bapps
from workflow.lossnets import build_extractor
from workflow.metrics.similarity import score_2afc


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bapps") / "raw"
    assert bapps.main(["synthesize", "--raw", str(root), "--seed", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    bapps.prepare(raw, out, workers=2)
    return out


def _expected_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))


def test_synthesize_writes_the_upstream_layout(raw):
    assert (raw / "READY").exists()
    root = raw / "dataset"
    for split, subsets in bapps.TWOAFC_SUBSETS.items():
        for s in subsets:
            for part in ("ref", "p0", "p1"):
                pngs = sorted((root / "2afc" / split / s / part).glob("*.png"))
                assert pngs and Image.open(pngs[0]).size[0] > 64  # prepare must resize
            j = np.load(next((root / "2afc" / split / s / "judge").glob("*.npy")))
            assert j.shape == (1,) and 0 <= j[0] <= 1
    for s in bapps.JND_SUBSETS:
        assert sorted((root / "jnd" / "val" / s / "same").glob("*.npy"))


def test_round_trip(raw, prepared):
    import json

    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["counts"]["2afc/val/traditional"] == 12
    assert manifest["counts"]["jnd/val/cnn"] == 12
    d = bapps.load(prepared, "2afc", "val", "cnn")
    assert d["ref"].shape == (12, 64, 64, 3) and d["ref"].dtype == np.uint8
    assert d["judge"].dtype == np.float32 and d["judge"].shape == (12,)
    src = raw / "dataset" / "2afc" / "val" / "cnn"
    for i in (0, 7):
        name = str(d["names"][i])
        np.testing.assert_array_equal(d["p1"][i], _expected_image(src / "p1" / f"{name}.png"))
        assert d["judge"][i] == pytest.approx(float(np.load(src / "judge" / f"{name}.npy")[0]))
    j = bapps.load(prepared, "jnd", "val", "traditional")
    assert set(j) == {"p0", "p1", "same", "names"}
    with pytest.raises(bapps.BappsError, match="not prepared"):
        bapps.load(prepared, "2afc", "val", "nonexistent")


def test_fake_judgements_are_meaningful(prepared):
    # pixel L2 (independent of any network) agrees with the simulated humans above chance
    scores = []
    for s in bapps.TWOAFC_SUBSETS["val"]:
        d = bapps.load(prepared, "2afc", "val", s)
        ref, p0, p1 = (np.asarray(d[k], np.float64) for k in ("ref", "p0", "p1"))
        d0 = ((ref - p0) ** 2).mean(axis=(1, 2, 3))
        d1 = ((ref - p1) ** 2).mean(axis=(1, 2, 3))
        scores.append(score_2afc(d0, d1, d["judge"]).mean)
    assert np.mean(scores) > 0.6


def test_pairs_by_stem_not_listing_order(raw, tmp_path, monkeypatch):
    tree = tmp_path / "raw"
    shutil.copytree(raw / "dataset" / "2afc" / "val" / "color", tree / "2afc" / "val" / "color")
    real_iterdir = Path.iterdir

    def shuffled(self):
        items = list(real_iterdir(self))
        random.Random(str(self)).shuffle(items)  # a different order in every folder
        return iter(items)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    out = tmp_path / "out"
    bapps.prepare(tree, out, workers=2)
    d = bapps.load(out, "2afc", "val", "color")
    assert list(d["names"]) == sorted(d["names"])
    for i, name in enumerate(d["names"]):
        for part in ("ref", "p0"):
            np.testing.assert_array_equal(d[part][i], _expected_image(tree / "2afc" / "val" / "color" / part / f"{name}.png"))


def _small_tree(raw: Path, dst: Path) -> Path:
    shutil.copytree(raw / "dataset" / "2afc" / "val" / "deblur", dst / "dataset" / "2afc" / "val" / "deblur")
    return dst


def test_missing_partner_names_the_file(raw, tmp_path):
    tree = _small_tree(raw, tmp_path / "raw")
    victim = tree / "dataset" / "2afc" / "val" / "deblur" / "p1" / "000003.png"
    victim.unlink()
    out = tmp_path / "out"
    with pytest.raises(bapps.BappsError, match=r"000003\.png has no partner in .*p1"):
        bapps.prepare(tree, out)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.npy"))


def test_corrupt_png_names_the_file(raw, tmp_path):
    tree = _small_tree(raw, tmp_path / "raw")
    victim = tree / "dataset" / "2afc" / "val" / "deblur" / "p0" / "000005.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "out"
    assert bapps.main(["prepare", "--raw", str(tree), "--out", str(out)]) == 1
    with pytest.raises(bapps.BappsError, match=str(victim)):
        bapps.prepare(tree, out)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.npy"))


def test_no_2afc_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(bapps.BappsError, match="no 2afc/ folder"):
        bapps.prepare(tmp_path / "empty", tmp_path / "out")


def test_score_cli_rows_for_every_lossnet_and_variant(prepared, tmp_path):
    nets = ["alexnet/1", "alexnet/lpips"]
    samples_p, summary_p = tmp_path / "samples.parquet", tmp_path / "summary.parquet"
    rc = bench.main([
        "score", "--arch", "alexnet", "--config", '{"batch_size": 5}',
        "--lossnet", '{"weights": "random", "seed": 0, "lossnets": ["alexnet/1", "alexnet/lpips"]}',
        "--common", '{"device": "cpu", "precision": "auto"}', "--prepared", str(prepared),
        "--out-samples", str(samples_p), "--out-summary", str(summary_p), "--threads", "1",
    ])
    assert rc == 0
    summary = pd.read_parquet(summary_p)
    samples = pd.read_parquet(samples_p)
    splits_2afc = {*bapps.TWOAFC_SUBSETS["val"], "mean"}
    for layer in ("1", "lpips"):
        for method in ("spatial", "mean", "sort", "spatial+mean", "spatial+sort"):
            for norm in (True, False):
                rows = summary[(summary.layer == layer) & (summary.comparison == method)
                               & (summary.channel_norm == norm)]
                assert set(rows[rows.metric == "2afc"].split) == splits_2afc
                assert set(rows[rows.metric == "jnd_ap"].split) == {"traditional", "cnn", "pooled"}
    assert len(summary) == len(nets) * 10 * 10
    assert summary.value.between(0, 1).all()
    assert (summary.benchmark == "similarity").all() and summary.config_hash.notna().all()
    assert (summary.weights_id == "random").all() and (summary.device == "cpu").all()

    # the 2AFC rows follow from the per-sample distances by the formula, computed here by hand
    s2 = samples[(samples.dataset == "bapps-2afc") & (samples.layer == "lpips")
                 & (samples.comparison == "sort") & (~samples.channel_norm)]
    per = []
    for subset, g in s2.groupby("split", observed=True):
        agree = np.where(g.d0 < g.d1, 1 - g.judge, np.where(g.d1 < g.d0, g.judge, 0.5)).mean()
        row = summary[(summary.layer == "lpips") & (summary.comparison == "sort")
                      & (~summary.channel_norm) & (summary.split == subset)
                      & (summary.dataset == "bapps-2afc")]
        assert row.value.item() == pytest.approx(agree)
        per.append(agree)
    mean_row = summary[(summary.layer == "lpips") & (summary.comparison == "sort")
                       & (~summary.channel_norm) & (summary.split == "mean")]
    assert mean_row.value.item() == pytest.approx(np.mean(per))

    # one distance recomputed directly: LPIPS convention, spatial + channel norm on layer 1
    d = bapps.load(prepared, "2afc", "val", "superres")
    ex = build_extractor("alexnet", [1], weights="random", seed=0)
    with torch.no_grad():
        x = torch.from_numpy(np.array(d["ref"][2:3])).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(np.array(d["p1"][2:3])).permute(0, 3, 1, 2).float() / 255
        fx, fy = ex(x)[1], ex(y)[1]
        fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        expected = (fx - fy).pow(2).sum(1).mean().item()
    got = samples[(samples.dataset == "bapps-2afc") & (samples.split == "superres")
                  & (samples.item == 2) & (samples.layer == "1") & (samples.comparison == "spatial")
                  & samples.channel_norm].d1.item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert samples[samples.dataset == "bapps-jnd"].d.notna().all()


def test_score_cli_fails_cleanly_on_missing_subset(prepared, tmp_path):
    rc = bench.main([
        "score", "--arch", "alexnet", "--config", '{"twoafc_subsets": ["traditional"], "jnd_subsets": []}',
        "--lossnet", '{"weights": "random", "lossnets": ["alexnet/1"]}',
        "--common", '{"device": "cpu", "precision": "auto"}', "--prepared", str(tmp_path),
        "--out-samples", str(tmp_path / "a.parquet"), "--out-summary", str(tmp_path / "b.parquet"),
    ])
    assert rc == 1
    assert not (tmp_path / "b.parquet").exists()


def test_peak_activation_bytes_by_hand():
    # alexnet at 64 px: conv1 gives 64 x 15 x 15 floats, the largest tensor of the pass
    # (the input is 3 x 64 x 64 = 12288); at 224 px conv1 gives 64 x 55 x 55
    ex = build_extractor("alexnet", [1, 4], weights="random")
    assert ex.peak_activation_bytes(64) == 4 * 64 * 15 * 15
    assert ex.peak_activation_bytes(224) == 4 * 64 * 55 * 55


@pytest.mark.parametrize("arch", ["squeezenet1_1", "alexnet"])
def test_chunked_scoring_equals_one_pass(arch):
    # on the CPU a batch is scored in chunks of items; every chunking gives the numbers of
    # one pass over the whole batch (the forward and the scoring are per item)
    from workflow import compare
    from workflow.lossnets import all_lossnets

    nets = all_lossnets([arch], lpips_sets=[arch])
    ex = build_extractor(arch, lossnets=nets, weights="random").to(memory_format=torch.channels_last)
    variants = compare.all_variants()
    rng = np.random.default_rng(1)
    ref, p0, p1 = (rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8) for _ in range(3))
    cpu = torch.device("cpu")
    whole = bench.Scorer(ex, nets, variants, cpu, "fp32", forward_bytes=None)
    per_item = ex.peak_activation_bytes(64)
    assert whole.items_per_pass(3, 7) == 7
    for items in (1, 3):
        chunked = bench.Scorer(ex, nets, variants, cpu, "fp32", forward_bytes=3 * items * per_item)
        assert chunked.items_per_pass(3, 7) == items
        a, b = whole.twoafc(ref, p0, p1), chunked.twoafc(ref, p0, p1)
        assert set(a) == set(b) and len(a) == len(nets) * len(variants)
        for k in a:
            assert a[k].shape == (2, 7)
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=str(k))
        ja, jb = whole.jnd(p0, p1), chunked.jnd(p0, p1)
        for k in ja:
            assert ja[k].shape == (7,)
            torch.testing.assert_close(jb[k], ja[k], rtol=1e-5, atol=1e-7, msg=str(k))
