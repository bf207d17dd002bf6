"""The offline demo, end to end through the real rules: every benchmark writes scores, a
second run has nothing to do, and a setting (or one architecture's loss networks) reruns only
what depends on it."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.snakemake_helpers import ROOT, as_written, demo_args, snakemake
from workflow.compare import all_variants
from workflow.plan import Plan, load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # the demo fixture: its own limit


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """A finished demo (results/ and resources/ in one folder). LOSSNET_DEMO_DIR names a
    folder of an earlier run of the demo FROM THIS CHECKOUT (e.g. its README command's
    `demo/`: Snakemake keeps the params it compares in this checkout's .snakemake/, so a run
    from another clone makes the rerun tests pass or fail for the wrong reason)."""
    tmp = Path(os.environ.get("LOSSNET_DEMO_DIR") or tmp_path_factory.mktemp("demo"))
    snakemake("--cores", "2", *demo_args(tmp), timeout=1500)
    return tmp


def _demo_config():
    return load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml")


def test_scores_for_every_benchmark(demo_run):
    cfg = _demo_config()
    scores = pd.read_parquet(demo_run / "results" / "scores.parquet")
    assert set(scores["benchmark"]) == set(cfg["benchmarks"])
    values = scores["value"].astype(float)
    assert values.map(math.isfinite).all(), scores[~values.map(math.isfinite)]


def test_similarity_rows_for_every_lossnet_and_variant(demo_run):
    cfg = _demo_config()
    scores = pd.read_parquet(demo_run / "results" / "scores.parquet")
    sim = scores[scores["benchmark"] == "similarity"]
    sec = cfg["similarity"]
    variants = all_variants(sec["comparisons"], sec["channel_norm"])
    nets = Plan(cfg).lossnets("similarity")
    assert {"pixel/l2", "pixel/ssim"} <= {n.id for n in nets}
    for net in nets:
        rows = sim[(sim["arch"] == net.arch) & (sim["layer"] == net.layer)]
        if net.is_pixel:  # one row set per baseline: no comparison method, no normalisation
            assert set(rows["comparison"]) == {""} and rows["channel_norm"].isna().all()
            got = set(zip(rows["metric"], rows["split"], strict=True))
            assert {("2afc", "mean"), ("jnd_ap", "pooled")} <= got, net.id
            continue
        for v in variants:
            r = rows[(rows["comparison"] == v.method) & (rows["channel_norm"] == v.channel_norm)]
            got = set(zip(r["metric"], r["split"], strict=True))
            assert ("2afc", "mean") in got, (net.id, v.name)
            assert any(m == "jnd_ap" for m, _ in got), (net.id, v.name)
            twoafc = r[r["metric"] == "2afc"]["value"]
            assert ((twoafc >= 0) & (twoafc <= 1)).all()
    # the human-judgement family beside BAPPS (similarity.datasets): MOS correlations with
    # bootstrap intervals on the TID2013 and KADID-10k fakes, 2AFC on the NIGHTS fake
    mos = {"srcc", "krcc", "plcc"}
    for dataset, metrics in (("tid2013", mos), ("kadid10k", mos), ("nights", {"2afc"})):
        rows = sim[sim["dataset"] == dataset]
        assert metrics <= set(rows["metric"]), (dataset, set(rows["metric"]))
        assert {"pixel/ssim", "alexnet/lpips"} <= set(rows["arch"] + "/" + rows["layer"])
        whole = rows[rows["split"].isin(["all", "test"])]
        assert (whole["ci_low"] <= whole["ci_high"]).all(), dataset  # NaN compares False
    # the probes table has the pixel baselines' rows too (config probes.pixel_baselines)
    pixel = scores[(scores["benchmark"] == "probes") & (scores["arch"] == "pixel")]
    assert {"l2", "ssim"} <= set(pixel["layer"]) and set(pixel["weights_id"]) == {"none"}


# the demo's presets beside the study's networks (docs/lossnets.md): a CNN and a transformer
PRESETS_IN_DEMO = {"convnext_tiny", "swin_t"}


@pytest.mark.parametrize("benchmark", ["similarity", "super_resolution", "delineation",
                                       "autoencoder", "probes"])
def test_presets_reach_scores_attributes_and_figures(demo_run, benchmark):
    """Each of these benchmarks runs the demo's CNN and transformer presets besides the
    study's networks, and their rows reach scores.parquet, the attribute table
    (lossnets.parquet), the analysis table of scores per loss network and the figures (the
    SVGs name every plotted architecture)."""
    from workflow.archs import PRESETS

    results = demo_run / "results"
    every = Plan(_demo_config()).lossnets(benchmark)
    nets = [n for n in every if n.arch in PRESETS]
    assert {n.arch for n in nets} == PRESETS_IN_DEMO, benchmark
    assert any(n.arch not in PRESETS and not n.is_pixel for n in every)  # beside the study's
    scores = pd.read_parquet(results / "scores.parquet")
    attrs = pd.read_parquet(results / "lossnets.parquet").set_index("lossnet")
    table = pd.read_parquet(results / "analysis" / "scores_by_lossnet.parquet")
    layer_svg = (results / "figures" / "scores_by_layer.svg").read_text()
    for net in nets:
        rows = scores[(scores["benchmark"] == benchmark) & (scores["arch"] == net.arch)
                      & (scores["layer"] == net.layer)]
        assert len(rows), (benchmark, net.id)
        assert rows["value"].astype(float).map(math.isfinite).all(), (benchmark, net.id)
        assert net.id in attrs.index and attrs.loc[net.id, "params_to_tap"] > 0, net.id
        assert attrs.loc[net.id, "macs_64"] > 0 and attrs.loc[net.id, "channels"] > 0, net.id
        mine = table[table["lossnet"] == net.id]
        assert len(mine) == 1, net.id
        assert f"<!-- {net.arch} -->" in layer_svg, net.arch


def test_rerun_has_nothing_to_do(demo_run):
    proc = snakemake("-n", "--cores", "2", *demo_args(demo_run), timeout=600)
    out = proc.stdout + proc.stderr
    assert "Nothing to be done" in out, out[-3000:]


def _planned(demo_run, tmp_path, override: dict, results=None) -> dict[str, int]:
    """Rules a dry run would run with ``override`` merged into the demo config."""
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    args = ["--configfile", str(ROOT / "config" / "demo.yaml"), str(path), "--config",
            f"results_dir={as_written(results or demo_run / 'results')}",
            f"resources_dir={as_written(demo_run / 'resources')}"]
    out = snakemake("-n", "--cores", "2", "--quiet", "rules", *args, timeout=600).stdout
    if "Nothing to be done" in out:
        return {}
    lines = out.splitlines()
    start = lines.index("Job stats:") + 3
    stop = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return {line.split()[0]: int(line.split()[1]) for line in lines[start:stop]
            if line.split()[0] != "total"}


SETTINGS = {  # keys that change no number, one of each kind: nothing may rerun
    "similarity": {"batch_size": 7},
    "super_resolution": {"eval_batch_size": 3, "log_every": 1, "checkpoint_every": 1,
                         "data_on_device": "never"},
    "delineation": {"tile_size": 96, "inference_batch": 2},
    "autoencoder": {"eval_batch_size": 17, "encode": {"batch_size": 5}},
    "adaptation": {"eval_batch_size": 9},
    "device": "auto",
}


def test_settings_rerun_nothing(demo_run, tmp_path):
    """All of SETTINGS at once (one dry run: a failure names the rules that would rerun, and
    each rule's params name the key)."""
    assert _planned(demo_run, tmp_path, SETTINGS) == {}


def test_moving_resources_dir_reruns_nothing(demo_run, tmp_path):
    """Input paths are no rerun trigger (profiles/default): the data folder moved (mv keeps
    modification times; cp -a here, to leave the shared run alone) retrains nothing."""
    moved = tmp_path / "elsewhere"
    subprocess.run(["cp", "-a", str(demo_run / "resources"), str(moved)], check=True)
    path = tmp_path / "none.yaml"
    path.write_text("{}\n")
    out = snakemake("-n", "--cores", "2", "--configfile", str(ROOT / "config" / "demo.yaml"),
                    str(path), "--config", f"results_dir={as_written(demo_run / 'results')}",
                    f"resources_dir={moved}", timeout=600).stdout
    assert "Nothing to be done" in out, out[-3000:]


def test_a_result_key_reruns_its_stage_and_what_follows(demo_run, tmp_path):
    planned = _planned(demo_run, tmp_path, {"delineation": {"tolerance": 2}})
    # delineation's eval runs in its train job (which finds its checkpoint complete: no step)
    assert set(planned) == {"train_delineation", "gather_scores", "analysis_tables",
                            "analysis_figures", "all"}, planned


def test_adding_a_loss_network_reruns_only_its_architecture(demo_run, tmp_path):
    """One similarity job per architecture, whose params are that architecture's loss
    networks: adding one of alexnet's reruns the alexnet job and no other."""
    results = tmp_path / "results"
    small = {"similarity": {"lossnets": ["alexnet/1", "resnet18/1"], "lpips_sets": False,
                            "datasets": ["bapps"], "pixel_baselines": []},
             "benchmarks": ["similarity"]}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small))
    snakemake("--cores", "2", "--configfile", str(ROOT / "config" / "demo.yaml"), str(path),
              "--config", f"results_dir={results}", f"resources_dir={demo_run / 'resources'}",
              "--", "similarity", timeout=900)
    grown = {**small, "similarity": {**small["similarity"],
                                     "lossnets": ["alexnet/1", "alexnet/3", "resnet18/1"]}}
    planned = _planned(demo_run, tmp_path, grown, results)
    assert planned.get("score_similarity") == 1, planned
    log = snakemake("-n", "--cores", "2", "--configfile", str(ROOT / "config" / "demo.yaml"),
                    str(tmp_path / "override.yaml"), "--config", f"results_dir={results}",
                    f"resources_dir={demo_run / 'resources'}", "--", "similarity",
                    timeout=600).stdout
    assert "wildcards: arch=alexnet" in log and "arch=resnet18" not in log
