"""2AFC and JND average precision against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workflow.metrics.similarity import bapps_rows, jnd_average_precision, score_2afc, twoafc_rate


def test_2afc_fractional_judgements_and_ties():
    d0 = [1.0, 2.0, 3.0, 4.0]
    d1 = [2.0, 1.0, 3.0, 5.0]
    judge = [0.2, 0.6, 0.4, 1.0]  # fraction of humans who chose p1
    # by hand: p0 preferred -> 1-0.2; p1 preferred -> 0.6; tie -> 0.5; p0 preferred -> 1-1.0
    expected = [0.8, 0.6, 0.5, 0.0]
    per, mean = score_2afc(d0, d1, judge)
    np.testing.assert_allclose(per, expected)
    assert mean == pytest.approx(0.475)


def test_2afc_torch_matches_and_shapes_flatten():
    d0 = torch.tensor([[0.1], [0.5], [0.3]])
    d1 = torch.tensor([0.2, 0.4, 0.3])
    j = np.array([[[0.0]], [[0.8]], [[1.0]]])
    per, mean = score_2afc(d0, d1, j)
    assert isinstance(per, torch.Tensor)
    np.testing.assert_allclose(per.numpy(), [1.0, 0.8, 0.5])
    assert mean == pytest.approx(2.3 / 3)


def test_2afc_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same number"):
        score_2afc([1, 2], [1, 2, 3], [0, 0])


def test_jnd_ap_soft_labels_by_hand():
    d = [0.1, 0.4, 0.2, 0.3]
    same = [1.0, 0.0, 0.5, 1.0]
    # sorted: same = 1, .5, 1, 0 -> TP 1, 1.5, 2.5, 2.5; FP 0, .5, .5, 1.5
    # recall .4 .6 1 1; precision 1 .75 .8333 .625; envelope 1 .8333 .8333 .625
    # AP = .4*1 + .2*.8333 + .4*.8333 = 0.9
    assert jnd_average_precision(d, same) == pytest.approx(0.9)


def test_jnd_ap_binary_equals_mean_precision_at_positives():
    d = np.array([0.3, 0.1, 0.4, 0.2])
    same = np.array([1, 1, 0, 0])  # sorted by d: 1(0.1), 0(0.2), 1(0.3), 0(0.4)
    assert jnd_average_precision(d, same) == pytest.approx((1 + 2 / 3) / 2)


def test_jnd_ap_flattens_distances():
    # the reference code's [N,1,1,1] argsort left the order unchanged: flattened here
    d = np.array([0.4, 0.3, 0.2, 0.1]).reshape(4, 1, 1, 1)
    same = np.array([0, 0, 1, 1])
    assert jnd_average_precision(d, same) == pytest.approx(1.0)
    assert jnd_average_precision(torch.tensor(d), torch.tensor(same)) == pytest.approx(1.0)


def test_jnd_ap_without_positives_is_nan():
    assert np.isnan(jnd_average_precision([0.1, 0.2], [0, 0]))


def test_twoafc_rate_broadcasts_over_metrics():
    """[N, V, R] distances against [N, 1, R] labels: each (v, r) scored alone, by hand."""
    d0 = torch.tensor([[[0.1, 0.5]], [[0.3, 0.3]], [[0.9, 0.2]]])  # N=3, V=1, R=2
    d1 = torch.tensor([[[0.2, 0.4]], [[0.3, 0.1]], [[0.4, 0.6]]])
    labels = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]], [[1.0, 1.0]]])
    got = twoafc_rate(d0, d1, labels)
    # r=0: agree, tie (0.5), d1<d0 with label 1 -> agree;  r=1: d1<d0 label 1 -> 1,
    #      d1<d0 label 0 -> 0, d0<d1 label 1 -> 0
    assert got.shape == (1, 2)
    assert torch.allclose(got, torch.tensor([[(1 + 0.5 + 1) / 3, (1 + 0 + 0) / 3]]))


def test_bapps_rows_by_hand():
    twoafc = {"a": (np.array([0.1, 0.5]), np.array([0.2, 0.4]), np.array([0.0, 0.0])),
              "b": (np.array([0.3, 0.3, 0.1]), np.array([0.3, 0.2, 0.2]),
                    np.array([1.0, 1.0, 0.4]))}
    jnd = {"x": (np.array([0.1, 0.2]), np.array([1.0, 0.0])),
           "y": (np.array([0.05, 0.3]), np.array([0.0, 1.0]))}
    rows = {(r["dataset"], r["split"]): r for r in bapps_rows(twoafc, jnd)}
    assert rows[("bapps-2afc", "a")]["value"] == 0.5  # one agrees, one does not
    b = (0.5 + 1.0 + 0.6) / 3  # tie, d1 < d0 with j=1, d0 < d1 with j=0.4
    assert rows[("bapps-2afc", "b")]["value"] == pytest.approx(b)
    mean = rows[("bapps-2afc", "mean")]
    assert mean["value"] == pytest.approx((0.5 + b) / 2) and mean["n"] == 5  # the plain mean
    assert rows[("bapps-jnd", "x")]["value"] == pytest.approx(1.0)
    # pooled: order 0.05 (not same), 0.1 (same), 0.2 (not), 0.3 (same): precision at the
    # recall steps 1/2 and 1 is 1/2 and 2/4, so AP = 0.5 * 0.5 + 0.5 * 0.5
    pooled = rows[("bapps-jnd", "pooled")]
    assert pooled["value"] == pytest.approx(0.5) and pooled["n"] == 4
    assert list(rows) == [("bapps-2afc", "a"), ("bapps-2afc", "b"), ("bapps-2afc", "mean"),
                          ("bapps-jnd", "x"), ("bapps-jnd", "y"), ("bapps-jnd", "pooled")]
