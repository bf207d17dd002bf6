"""Published vs reproduced: the data file's entries name real score coordinates and a source;
the comparison's verdicts and differences on scores tables built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workflow import compare
from workflow.analysis import TABLES
from workflow.analysis.adaptation_stats import COLUMNS
from workflow.analysis.correlations import DEFAULT_ATTRIBUTES, attribute_correlations, run_tables
from workflow.analysis.published import (
    COORDINATES,
    PUBLISHED_FILE,
    PublishedError,
    config_values,
    load,
)
from workflow.analysis.reproduced import display, published_vs_reproduced
from workflow.archs import ARCHS
from workflow.datasets.probes import SET_SIZES
from workflow.metrics.similarity import bapps_rows
from workflow.plan import BENCHMARKS, Plan
from workflow.results import score_frame

IMAGENET = "imagenet:alexnet-owt-7be5be79.pth"
COMMON = dict(benchmark="similarity", layer="lpips", comparison="spatial", channel_norm=True,
              metric="2afc", precision="fp32", weights_id=IMAGENET)
RUN = {"data.source": "download", "similarity.image_size": 64}

DATA = """\
papers:
  p: A. Author 2020, "A paper"
groups:
  - id: twoafc
    what: hand-made 2AFC numbers
    paper: p
    table: Table 1
    scale: 100
    decimals: 1
    tolerance: 0.5
    tolerance_reason: a default for 2AFC
    requires: {data.source: download, similarity.image_size: 64}
    expect: {weights_id: "imagenet:*", precision: fp32}
    scores: {benchmark: similarity, dataset: bapps-2afc, split: mean, layer: lpips,
             comparison: spatial, channel_norm: true, metric: 2afc}
    values:
      - {arch: alexnet, row: "inside", published: 68.9}
      - {arch: squeezenet1_1, row: "outside", published: 68.6}
      - {arch: vgg16, row: "random weights", published: 67.0}
      - {arch: resnet18, row: "missing", published: 60.0}
  - id: probes
    what: counts
    paper: p
    table: Table 2
    scale: 1
    decimals: 0
    tolerance: 0
    tolerance_reason: counts are exact
    requires: {probes.image_size: 96}
    expect: {variant: handmade}
    scores: {benchmark: probes, dataset: probes, arch: alexnet, layer: lpips, metric: correct,
             comparison: mean, channel_norm: true}
    values:
      - {split: invert, row: "invert", published: 11}
      - {split: rotate, row: "rotate", published: 30}
  - id: corr
    what: a correlation
    paper: p
    table: Table 3
    scale: 1
    decimals: 3
    tolerance: 0.02
    tolerance_reason: r over 56 points
    expect: {n: 56}
    from_table: attribute_correlations
    column: pearson_r
    where: {score: 2AFC}
    values:
      - {attribute: layer_index, row: "layer", published: 0.669}
      - {attribute: features, row: "features", published: -0.505}
"""


@pytest.fixture()
def entries(tmp_path):
    path = tmp_path / "published.yaml"
    path.write_text(DATA)
    return load(path)


def _scores(rows):
    return score_frame(rows)


def _hand_scores():
    rows = [
        # alexnet: two runs (0.690, 0.686) -> 68.8, and a random-weights row that must be ignored
        {**COMMON, "dataset": "bapps-2afc", "split": "mean", "arch": "alexnet", "run": 0,
         "value": 0.690},
        {**COMMON, "dataset": "bapps-2afc", "split": "mean", "arch": "alexnet", "run": 1,
         "value": 0.686},
        {**COMMON, "dataset": "bapps-2afc", "split": "mean", "arch": "alexnet", "run": 2,
         "value": 0.30, "weights_id": "random"},
        # squeezenet: 67.5 against 68.6
        {**COMMON, "dataset": "bapps-2afc", "split": "mean", "arch": "squeezenet1_1",
         "value": 0.675},
        # vgg16 with random weights only: not comparable
        {**COMMON, "dataset": "bapps-2afc", "split": "mean", "arch": "vgg16", "value": 0.65,
         "weights_id": "random"},
        # a lin row of alexnet: another variant, must not enter the alexnet mean
        {**COMMON, "dataset": "bapps-2afc", "split": "mean", "arch": "alexnet", "variant": "lin",
         "value": 0.99},
        # probes: generated images (not comparable) for invert; hand-made for rotate
        {"benchmark": "probes", "dataset": "probes", "split": "invert", "arch": "alexnet",
         "layer": "lpips", "comparison": "mean", "channel_norm": True, "variant": "generated",
         "metric": "correct", "value": 10.0, "n": 11},
        {"benchmark": "probes", "dataset": "probes", "split": "rotate", "arch": "alexnet",
         "layer": "lpips", "comparison": "mean", "channel_norm": True, "variant": "handmade",
         "metric": "correct", "value": 29.0, "n": 30},
    ]
    return _scores(rows)


def test_verdicts_and_differences_by_hand(entries):
    run = {**RUN, "probes.image_size": 96}
    df = published_vs_reproduced(_hand_scores(), entries, run).set_index("row")
    assert df.loc["inside", "within_tolerance"] == "yes"
    assert df.loc["inside", "reproduced"] == pytest.approx((0.690 + 0.686) / 2 * 100)
    assert df.loc["inside", "difference"] == pytest.approx(68.8 - 68.9)
    assert df.loc["inside", "rows"] == 2  # the random-weights run and the lin row left out
    assert df.loc["outside", "within_tolerance"] == "no"
    assert df.loc["outside", "difference"] == pytest.approx(67.5 - 68.6)
    assert df.loc["random weights", "within_tolerance"] == (
        "not comparable: weights_id random (the paper's: imagenet:*)")
    assert df.loc["random weights", "reproduced"] == pytest.approx(65.0)  # still shown
    assert df.loc["missing", "within_tolerance"] == "not run"
    assert np.isnan(df.loc["missing", "reproduced"])
    assert df.loc["invert", "within_tolerance"] == (
        "not comparable: variant generated (the paper's: handmade)")
    # tolerance 0: one pair off is outside
    assert df.loc["rotate", "within_tolerance"] == "no"
    assert df.loc["rotate", "difference"] == -1.0
    # the analysis table is not given: not run
    assert df.loc["layer", "within_tolerance"] == "not run"


def test_config_conditions(entries):
    scores = _hand_scores()
    synthetic = published_vs_reproduced(scores, entries, {**RUN, "data.source": "synthetic",
                                                          "probes.image_size": 64})
    v = synthetic.set_index("row")["within_tolerance"]
    assert v["inside"] == "not comparable: data.source synthetic (the paper's: download)"
    assert v["rotate"] == "not comparable: probes.image_size 64 (the paper's: 96)"
    # reasons add up; "not run" wins over them
    assert v["random weights"] == ("not comparable: data.source synthetic (the paper's: "
                                   "download); weights_id random (the paper's: imagenet:*)")
    assert v["missing"] == "not run"
    unknown = published_vs_reproduced(scores, entries, None).set_index("row")["within_tolerance"]
    assert unknown["inside"].startswith("not comparable: config key data.source not given")


def test_analysis_table_entries(entries):
    corr = pd.DataFrame({"attribute": ["layer_index", "features", "layer_index"],
                         "score": ["2AFC", "2AFC", "JND"], "n": [56, 9, 56],
                         "pearson_r": [0.66, -0.3, 0.1]})
    df = published_vs_reproduced(_hand_scores(), entries, RUN,
                                 {"attribute_correlations": corr}).set_index("row")
    assert df.loc["layer", "within_tolerance"] == "yes"
    assert df.loc["layer", "difference"] == pytest.approx(0.66 - 0.669)
    assert df.loc["features", "within_tolerance"] == "not comparable: n 9 (the paper's: 56)"


def test_display_as_the_paper_prints(entries):
    run = {**RUN, "probes.image_size": 96}
    shown = display(published_vs_reproduced(_hand_scores(), entries, run)).set_index("number")
    inside = shown.loc["twoafc/alexnet"]
    assert (inside["published"], inside["reproduced"], inside["difference"]) == (
        "68.9", "68.8", "-0.10")
    assert inside["tolerance"] == "0.5" and inside["within tolerance"] == "yes"
    assert inside["source"] == "p, Table 1: inside"
    rotate = shown.loc["probes/rotate"]
    assert (rotate["published"], rotate["reproduced"], rotate["difference"],
            rotate["tolerance"]) == ("30", "29", "-1.0", "0")
    assert shown.loc["twoafc/resnet18", "reproduced"] == ""


@pytest.mark.parametrize("broken, message", [
    ("    tolerance_reason: a default for 2AFC\n", "group twoafc: tolerance_reason is missing"),
    ("    paper: p\n", "group twoafc: paper is missing"),
    ("    tolerance: 0.5\n", "group twoafc: tolerance must be a number"),
])
def test_data_file_errors_name_file_and_group(tmp_path, broken, message):
    path = tmp_path / "published.yaml"
    path.write_text(DATA.replace(broken, "", 1))
    with pytest.raises(PublishedError, match=f"^{path}: {message}"):
        load(path)


def test_data_file_rejects_unknown_paper_and_coordinates(tmp_path):
    path = tmp_path / "published.yaml"
    path.write_text(DATA.replace("    paper: p\n", "    paper: q\n", 1))
    with pytest.raises(PublishedError, match="paper 'q' is not listed under `papers`"):
        load(path)
    path.write_text(DATA.replace("{arch: alexnet,", "{archh: alexnet,", 1))
    with pytest.raises(PublishedError, match=r"keys \['archh'\] are not coordinates"):
        load(path)
    path.write_text(DATA.replace("resnet18", "alexnet", 1))
    with pytest.raises(PublishedError, match="twoafc/alexnet appears twice"):
        load(path)


# ----------------------------------------------------------------------------- the data file


def _written_coordinates() -> dict[str, set]:
    """(dataset, split, metric) the benchmarks write, from their own row builders."""
    d = np.array([0.1, 0.2])
    subsets = ["traditional", "cnn", "superres", "deblur", "color", "frameinterp"]
    rows = bapps_rows({s: (d, d[::-1], np.array([0.0, 1.0])) for s in subsets},
                      {s: (d, np.array([0.0, 1.0])) for s in ["traditional", "cnn"]})
    out = {"similarity": {(r["dataset"], r["split"], r["metric"]) for r in rows}}
    out["probes"] = {("probes", s, "correct") for s in SET_SIZES}
    out["calibration"] = out["similarity"]  # the lin rows: BAPPS val, the same row builder
    return out


def test_every_entry_names_score_coordinates_and_a_source():
    entries = load(PUBLISHED_FILE)
    assert len(entries) >= 40
    written = _written_coordinates()
    corr_columns = set(attribute_correlations(
        pd.DataFrame(columns=["score", "benchmark", "dataset", "arch", "layer", "value"]),
        pd.DataFrame(columns=["arch", "layer"]), {}).columns)
    default_scores = {s["name"] for s in Plan({}).config["analysis"]["scores"]}
    for e in entries:
        assert e.citation and e.table and e.row and e.tolerance_reason, e.id
        assert e.tolerance >= 0 and e.scale > 0, e.id
        if e.from_table == "adaptation_statistics":
            assert e.column in set(COLUMNS) and set(e.coords) <= set(COLUMNS), e.id
            assert e.coords["dataset"] in Plan({}).config["adaptation"]["eval_datasets"], e.id
            continue
        if e.from_table is not None:
            assert e.from_table in TABLES, e.id
            assert e.column in corr_columns and set(e.coords) <= corr_columns, e.id
            assert e.coords["attribute"] in DEFAULT_ATTRIBUTES, e.id
            assert e.coords["score"] in default_scores, e.id
            continue
        c = {k: e.coords.get(k, e.expect.get(k)) for k in COORDINATES}
        assert c["benchmark"] in BENCHMARKS, e.id
        assert (c["dataset"], c["split"], c["metric"]) in written[c["benchmark"]], e.id
        if c["arch"] == "pixel":  # the pixel baselines (issue 17, item 1): pixel/l2, pixel/ssim
            assert c["layer"] in {"l1", "l2", "ssim", "psnr"}, e.id
        else:
            assert c["arch"] in ARCHS and c["layer"] in {"1", "2", "3", "4", "lpips"}, e.id
            assert c["comparison"] in compare.METHODS, e.id
            assert c["channel_norm"] in (True, False), e.id
        assert c["variant"] in (None, "lin", "handmade"), e.id
        # the published number is in the paper's unit: percent for BAPPS, a count for probes
        if c["benchmark"] in ("similarity", "calibration"):
            assert e.scale == 100 and 50 <= e.published <= 90 and e.decimals == 1, e.id
        else:
            n = SET_SIZES[c["split"]]
            assert e.scale == 1 and 0 <= e.published <= n and e.decimals == 0, e.id


def test_plan_passes_the_required_config_values():
    params = json.loads(Plan({"data": {"source": "synthetic"}}).analysis_params("tables"))
    run = params["published"]["config"]
    assert run["data.source"] == "synthetic" and run["similarity.image_size"] == 64
    assert set(run) == {k for e in load(PUBLISHED_FILE) for k in e.requires}


def test_a_required_key_missing_from_the_config_is_named():
    with pytest.raises(PublishedError, match=r"published.yaml: requires config key "
                                             r"similarity.size, which the config does not have"):
        config_values(Plan({}).config, ["data.source", "similarity.size"])


def test_demo_analysis_writes_the_table(tmp_path):
    """The demo's conditions (random weights, synthetic data): every number that ran is
    'not comparable' and says why; the Markdown and HTML show it."""
    rows = []
    for arch in ("alexnet", "squeezenet1_1"):
        for split in ("mean", "traditional"):
            rows.append({**COMMON, "dataset": "bapps-2afc", "split": split, "arch": arch,
                         "value": 0.6, "weights_id": "random", "n": 12})
    scores = _scores(rows)
    attrs = pd.DataFrame({"arch": ["alexnet"], "layer": ["1"], "lossnet": ["alexnet/1"],
                          "layer_index": [1]})
    cfg = {"scores": [{"name": "2AFC", "benchmark": "similarity", "dataset": "bapps-2afc",
                       "split": "mean", "metric": "2afc"}], "bootstrap": {"n": 0},
           "pareto": {"cost_scores": [], "accuracy_scores": []},
           "published": {"config": {"data.source": "synthetic", "similarity.image_size": 64,
                                    "similarity.normalize": "imagenet", "probes.image_size": 96,
                                    "probes.normalize": "imagenet", "lossnets.weights": "random"}}}
    info = run_tables(scores, attrs, cfg, tmp_path)
    table = pd.read_parquet(tmp_path / "published_vs_reproduced.parquet")
    assert len(table) == len(load(PUBLISHED_FILE))
    ran = table[table["rows"] > 0]
    assert len(ran) == 4  # alexnet and squeezenet: traditional and mean
    assert set(ran["within_tolerance"]) == {
        "not comparable: data.source synthetic (the paper's: download); weights_id random "
        "(the paper's: imagenet:*)"}
    assert info["published"] == {"not run": len(table) - 4, "not comparable": 4}
    md = (tmp_path / "published_vs_reproduced.md").read_text()
    assert "| lpips-spatial-2afc/alexnet/mean " in md and "| 68.9 " in md and "| 60.0 " in md
    html = (tmp_path / "published_vs_reproduced.html").read_text()
    assert "not comparable: data.source synthetic" in html and "thesis, Table 4.4" in html


def test_schema_docs_and_caption_name_the_table():
    root = Path(__file__).resolve().parents[1]
    assert (root / "workflow" / "report" / "published_vs_reproduced.rst").exists()
    doc = (root / "docs" / "analysis.md").read_text()
    assert "published_vs_reproduced" in doc and "published.yaml" in doc
