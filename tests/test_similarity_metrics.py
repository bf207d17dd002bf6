"""2AFC and JND average precision against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workflow.metrics.similarity import jnd_average_precision, score_2afc


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
