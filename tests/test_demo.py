"""The offline demo, end to end through the real rules: every benchmark writes scores,
and a second run has nothing to do."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from tests.snakemake_helpers import ROOT, demo_args, snakemake
from workflow.compare import all_variants
from workflow.config import select_lossnets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    snakemake("--cores", "2", *demo_args(tmp), timeout=1500)
    return tmp


def _demo_config(tmp):
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    full = yaml.safe_load((ROOT / "config.yaml").read_text())
    for k, v in full.items():
        cfg.setdefault(k, v)
    return cfg


def test_scores_for_every_benchmark(demo_run):
    cfg = _demo_config(demo_run)
    scores = pd.read_parquet(demo_run / "results" / "scores.parquet")
    assert set(scores["benchmark"]) == set(cfg["benchmarks"])
    values = scores["value"].astype(float)
    assert values.map(math.isfinite).all(), scores[~values.map(math.isfinite)]


def test_similarity_rows_for_every_lossnet_and_variant(demo_run):
    cfg = _demo_config(demo_run)
    scores = pd.read_parquet(demo_run / "results" / "scores.parquet")
    sim = scores[scores["benchmark"] == "similarity"]
    sec = cfg["similarity"]
    variants = all_variants(sec["comparisons"], sec["channel_norm"])
    for net in select_lossnets(cfg, "similarity"):
        rows = sim[(sim["arch"] == net.arch) & (sim["layer"] == net.layer)]
        for v in variants:
            r = rows[(rows["comparison"] == v.method) & (rows["channel_norm"] == v.channel_norm)]
            got = set(zip(r["metric"], r["split"], strict=True))
            assert ("2afc", "mean") in got, (net.id, v.name)
            assert any(m == "jnd_ap" for m, _ in got), (net.id, v.name)
            twoafc = r[r["metric"] == "2afc"]["value"]
            assert ((twoafc >= 0) & (twoafc <= 1)).all()


def test_rerun_has_nothing_to_do(demo_run):
    proc = snakemake("-n", "--cores", "2", *demo_args(demo_run), timeout=600)
    out = proc.stdout + proc.stderr
    assert "Nothing to be done" in out, out[-3000:]
