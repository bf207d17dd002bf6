"""Benchmark 1 (workflow/benchmarks/similarity.py): every loss network x variant of one
architecture scored on BAPPS, checked against the formulas worked out here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from workflow import compare
from workflow.archs import all_lossnets
from workflow.benchmarks import similarity as bench
from workflow.cli import main
from workflow.datasets import bapps
from workflow.job import Job
from workflow.lossnets import build_extractor

CPU = Job(device=torch.device("cpu"), precision="fp32")


@pytest.fixture(scope="module")
def bapps_prepared(prepared):
    return prepared("bapps")


def _config(demo_plan, **changes) -> str:
    cfg = {**demo_plan.stage_config("similarity", "score", "alexnet"), "precision": "fp32",
           "lossnets": ["alexnet/1", "alexnet/lpips"], **changes}
    return json.dumps(cfg)


SETTINGS = json.dumps({"batch_size": 5, "device": "cpu", "threads": 1})


def test_score_command_rows_for_every_lossnet_and_variant(bapps_prepared, demo_plan, tmp_path):
    prepared = bapps_prepared
    nets = ["alexnet/1", "alexnet/lpips"]
    samples_p, summary_p = tmp_path / "samples.parquet", tmp_path / "summary.parquet"
    rc = main(["similarity", "score", "--config", _config(demo_plan), "--settings", SETTINGS,
               "--prepared", str(prepared), "--samples", str(samples_p),
               "--scores", str(summary_p)])
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
    # the mean row covers every triplet of its subsets
    mean_n = summary[(summary.split == "mean")].n.unique().tolist()
    assert mean_n == [sum(len(bapps.load(prepared, "2afc", "val", s)["judge"])
                          for s in bapps.TWOAFC_SUBSETS["val"])]
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


def test_score_command_fails_cleanly_on_missing_subset(demo_plan, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text('{"dataset": "bapps"}')
    rc = main(["similarity", "score", "--config", _config(demo_plan, jnd_subsets=[]),
               "--settings", SETTINGS, "--prepared", str(empty),
               "--samples", str(tmp_path / "a.parquet"), "--scores", str(tmp_path / "b.parquet")])
    assert rc == 1 and "not prepared" in capsys.readouterr().err
    assert not (tmp_path / "b.parquet").exists()


def test_more_than_one_architecture_is_refused(bapps_prepared, demo_plan, tmp_path):
    with pytest.raises(ValueError, match="one architecture"):
        bench.score(CPU, json.loads(_config(demo_plan, lossnets=["alexnet/1", "vgg16/1"])),
                    {"bapps": bapps_prepared}, tmp_path / "a.parquet", tmp_path / "b.parquet")


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
    nets = all_lossnets([arch], lpips_sets=[arch])
    ex = build_extractor(arch, lossnets=nets, weights="random")
    ex = ex.to(memory_format=torch.channels_last)
    variants = compare.all_variants()
    rng = np.random.default_rng(1)
    ref, p0, p1 = (rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8) for _ in range(3))
    whole = bench.Scorer(CPU, ex, nets, variants, forward_bytes=None)
    per_item = ex.peak_activation_bytes(64)
    assert whole.items_per_pass(3, 7) == 7
    for items in (1, 3):
        chunked = bench.Scorer(CPU, ex, nets, variants, forward_bytes=3 * items * per_item)
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
