"""The adaptation statistics table (workflow/analysis/adaptation_stats.py) on a scores table
small enough to work by hand: the paper's per-ranking-mean correlation differs from the
correlation over all cases, and both are checked against numbers computed here by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from workflow.analysis.adaptation_stats import adaptation_statistics
from workflow.results import score_frame

# two methods x three rankings: (method, ranking) -> (baseline, adapted runs)
CASES = {
    ("spatial", 0): (0.60, [0.70, 0.72]),
    ("spatial", 1): (0.50, [0.49, 0.49]),
    ("spatial", 2): (0.70, [0.80, 0.84]),
    ("mean", 0): (0.62, [0.64, 0.66]),
    ("mean", 1): (0.54, [0.60, 0.60]),
    ("mean", 2): (0.58, [0.90, 0.90]),
}


def _table() -> pd.DataFrame:
    rows = []
    for (method, ranking), (base, runs) in CASES.items():
        common = {"benchmark": "adaptation", "dataset": "svhn", "split": "test",
                  "arch": "alexnet", "layer": "lpips", "comparison": method,
                  "channel_norm": True, "ranking": ranking, "metric": "2afc", "n": 64}
        rows.append({**common, "variant": "baseline", "value": base})
        rows += [{**common, "variant": "adapted", "run": r, "value": v}
                 for r, v in enumerate(runs)]
    # BAPPS: one baseline per method (no ranking), an adapted metric per ranking
    for method, base, adapted in (("spatial", 0.70, [0.69, 0.68, 0.70]),
                                  ("mean", 0.68, [0.66, 0.67, 0.69])):
        common = {"benchmark": "adaptation", "dataset": "bapps-2afc", "split": "mean",
                  "arch": "alexnet", "layer": "lpips", "comparison": method,
                  "channel_norm": True, "metric": "2afc", "n": 100}
        rows.append({**common, "variant": "baseline", "value": base})
        rows += [{**common, "variant": "adapted", "ranking": r, "run": 0, "value": v}
                 for r, v in enumerate(adapted)]
    rows.append({"benchmark": "similarity", "dataset": "svhn", "split": "test", "metric": "2afc",
                 "variant": "adapted", "value": 0.0})  # another benchmark: ignored
    return score_frame(rows)


def test_statistics_by_hand():
    t = adaptation_statistics(_table()).set_index("dataset")
    svhn = t.loc["svhn"]
    # adapted means: spatial 0.71, 0.49, 0.82; mean 0.65, 0.60, 0.90 -> improved all but one
    assert svhn["cases"] == 6 and svhn["improved"] == 5 and svhn["rankings"] == 3
    # per-ranking means: baseline (0.61, 0.52, 0.64), adapted (0.68, 0.545, 0.86)
    # ranks: baseline 2,1,3; adapted 2,1,3 -> Spearman 1
    assert svhn["spearman_ranking_means"] == pytest.approx(1.0)
    bx, ax = [0.61, 0.52, 0.64], [0.68, 0.545, 0.86]
    mb, ma = sum(bx) / 3, sum(ax) / 3
    cov = sum((b - mb) * (a - ma) for b, a in zip(bx, ax, strict=True))
    r = cov / math.sqrt(sum((b - mb) ** 2 for b in bx) * sum((a - ma) ** 2 for a in ax))
    assert svhn["pearson_ranking_means"] == pytest.approx(r, abs=1e-12)
    # over all six cases: baselines 0.60 .50 .70 .62 .54 .58 -> ranks 4 1 6 5 2 3;
    # adapted 0.71 .49 .82 .65 .60 .90 -> ranks 4 1 5 3 2 6; d^2 = 0+0+1+4+0+9 = 14
    assert svhn["spearman_cases"] == pytest.approx(1 - 6 * 14 / (6 * 35))
    gains = [0.11, -0.01, 0.12, 0.03, 0.06, 0.32]
    assert svhn["mean_change"] == pytest.approx(sum(gains) / 6)
    bapps = t.loc["bapps-2afc"]
    # the one baseline per method against each ranking's adapted metric
    assert bapps["cases"] == 6 and bapps["improved"] == 1 and bapps["rankings"] == 3
    change = [-0.01, -0.02, 0.0, -0.02, -0.01, 0.01]
    assert bapps["mean_change"] == pytest.approx(sum(change) / 6)


def test_variants_come_from_the_config_and_missing_rows_give_no_row():
    df = _table()
    df["variant"] = df["variant"].replace({"adapted": "tuned"})
    assert adaptation_statistics(df).empty  # no "adapted" rows
    t = adaptation_statistics(df, {"adaptation": {"adapted_variant": "tuned"}})
    assert set(t["dataset"]) == {"svhn", "bapps-2afc"}


def test_adapted_net_in_the_ranking_means_only():
    """Adapted-net rows (two runs of spatial under ranking 0, one of mean under ranking 2)
    join the per-ranking table as the mean over the ranking's cases that have one; the
    statistics, which are the channel-weight adaptation's, do not change."""
    from workflow.analysis.adaptation_stats import ranking_means

    base = _table()
    common = {"benchmark": "adaptation", "dataset": "svhn", "split": "test", "arch": "alexnet",
              "layer": "lpips", "channel_norm": True, "metric": "2afc", "n": 64,
              "variant": "adapted_net"}
    net = score_frame([{**common, "comparison": "spatial", "ranking": 0, "run": 0, "value": 0.9},
                       {**common, "comparison": "spatial", "ranking": 0, "run": 1, "value": 0.8},
                       {**common, "comparison": "mean", "ranking": 2, "run": 0, "value": 0.5}])
    both = pd.concat([base, net], ignore_index=True)
    pd.testing.assert_frame_equal(adaptation_statistics(both), adaptation_statistics(base))
    m = ranking_means(both)
    svhn = m[m["dataset"] == "svhn"].set_index("ranking")
    assert svhn.loc[0, "adapted_net"] == pytest.approx(0.85)  # (0.9 + 0.8) / 2, one case
    assert svhn.loc[2, "adapted_net"] == pytest.approx(0.5)
    assert math.isnan(svhn.loc[1, "adapted_net"])
    assert svhn["net_cases"].tolist() == [1, 0, 1]
    # ranking 0's baseline / adapted means stay over both its cases
    assert svhn.loc[0, "adapted"] == pytest.approx((0.71 + 0.65) / 2)
    assert m[m["dataset"] == "bapps-2afc"]["net_cases"].eq(0).all()
    plain = ranking_means(base)
    assert plain["adapted_net"].isna().all() and plain["net_cases"].eq(0).all()
