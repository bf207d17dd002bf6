"""Comparison methods on tiny tensors worked by hand (workflow.compare)."""

from __future__ import annotations

from math import sqrt

import numpy as np
import pytest
import torch

from workflow import compare
from workflow.compare import Variant

# one image pair, C=2 channels, H=1, W=2 positions
X = torch.tensor([[[[1.0, 3.0]], [[0.0, 4.0]]]])
Y = torch.tensor([[[[2.0, 1.0]], [[2.0, 0.0]]]])
S = 1 / sqrt(2)
R = sqrt(3.25)

# per-channel differences D[c] = mean over positions of (t_x - t_y)^2, by hand
HAND = {
    Variant("spatial", False): [(1 + 4) / 2, (4 + 16) / 2],
    Variant("mean", False): [(2 - 1.5) ** 2, (2 - 1) ** 2],
    # sorted: x c0 [1,3], c1 [0,4]; y c0 [1,2], c1 [0,2]
    Variant("sort", False): [(0 + 1) / 2, (0 + 4) / 2],
    # positions normalised over channels: x (1,0),(3,4)/5; y (2,2)/sqrt8, (1,0)
    Variant("spatial", True): [((1 - S) ** 2 + (0.6 - 1) ** 2) / 2, (S ** 2 + 0.8 ** 2) / 2],
    # means x (2,2) -> (S,S); y (1.5,1) -> (1.5,1)/sqrt(3.25)
    Variant("mean", True): [(S - 1.5 / R) ** 2, (S - 1 / R) ** 2],
    # sorted positions x (1,0),(3,4)/5; y (1,0),(2,2)/sqrt8
    Variant("sort", True): [(0 + (0.6 - S) ** 2) / 2, (0 + (0.8 - S) ** 2) / 2],
}
for _n in (False, True):
    for _b in ("mean", "sort"):
        _pairs = zip(HAND[Variant("spatial", _n)], HAND[Variant(_b, _n)], strict=True)
        HAND[Variant(f"spatial+{_b}", _n)] = [a + b for a, b in _pairs]


@pytest.mark.parametrize("variant", list(HAND), ids=lambda v: v.name)
def test_each_method_by_hand(variant):
    diffs = compare.per_channel_diffs({0: X}, {0: Y}, [variant])
    torch.testing.assert_close(diffs[variant][0], torch.tensor([HAND[variant]]), atol=1e-6,
                               rtol=1e-6)
    d = compare.distances({0: X}, {0: Y}, [variant])[variant]
    assert d.shape == (1,)
    assert d.item() == pytest.approx(sum(HAND[variant]), abs=1e-6)
    # the papers' 1/C form
    d_mean = compare.distances({0: X}, {0: Y}, [variant], channel_reduction="mean")[variant]
    assert d_mean.item() == pytest.approx(sum(HAND[variant]) / 2, abs=1e-6)


def test_all_variants_at_once_equal_one_at_a_time():
    variants = compare.all_variants()
    assert len(variants) == 10
    together = compare.distances({0: X}, {0: Y}, variants)
    for v in variants:
        assert together[v].item() == pytest.approx(sum(HAND[v]), abs=1e-6)


def test_per_channel_weights():
    v = Variant("spatial", False)
    w = torch.tensor([2.0, 0.5])
    d = compare.distances({0: X}, {0: Y}, [v], weights={0: w})[v]
    assert d.item() == pytest.approx(2 * 2.5 + 0.5 * 10)


def test_k_by_c_weights_equal_k_separate_runs():
    g = torch.Generator().manual_seed(0)
    fx = {1: torch.rand(3, 4, 5, 5, generator=g), 2: torch.rand(3, 6, 2, 2, generator=g)}
    fy = {1: torch.rand(3, 4, 5, 5, generator=g), 2: torch.rand(3, 6, 2, 2, generator=g)}
    wk = {1: torch.rand(7, 4, generator=g), 2: torch.rand(7, 6, generator=g)}
    for v in compare.all_variants():
        diffs = compare.per_channel_diffs(fx, fy, [v])[v]
        together = compare.reduce_channels(diffs, wk)
        assert together.shape == (3, 7)
        for k in range(7):
            alone = compare.reduce_channels(diffs, {t: w[k] for t, w in wk.items()})
            torch.testing.assert_close(together[:, k], alone)


def test_taps_are_summed_and_reference_broadcasts():
    fx = {0: torch.cat([X, Y]), 5: torch.cat([X, Y]) * 2}
    fy = {0: Y, 5: Y * 2}  # one reference for the whole batch
    v = Variant("spatial", False)
    d = compare.distances(fx, fy, [v])[v]
    # tap 5 doubles the features: 4x the squared differences; the second item equals the reference
    assert d.tolist() == pytest.approx([12.5 + 4 * 12.5, 0.0])


def test_transform_once_broadcast_equals_pairwise():
    g = torch.Generator().manual_seed(1)
    feats = {0: torch.rand(6, 3, 4, 4, generator=g)}  # ref (2), p0 (2), p1 (2)
    variants = compare.all_variants()
    t = compare.transform_features(feats, variants)
    ref = {k: {0: x[0][:2]} for k, x in t.items()}
    both = {k: {0: x[0][2:].unflatten(0, (2, 2))} for k, x in t.items()}
    joint = compare.diffs_from_transformed(both, ref, variants)
    for v in variants:
        for i, sl in enumerate((slice(2, 4), slice(4, 6))):
            pair = compare.per_channel_diffs({0: feats[0][sl]}, {0: feats[0][:2]}, [v])[v][0]
            torch.testing.assert_close(joint[v][0][i], pair)


def test_sort_with_gradients_matches_numpy_path():
    z = torch.rand(2, 3, 4, 4)
    fast = compare.transform(z, "sort")
    zg = z.clone().requires_grad_(True)
    slow = compare.transform(zg, "sort")
    torch.testing.assert_close(fast, slow.detach())
    slow.sum().backward()
    assert zg.grad is not None


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="known"):
        Variant("median", True)
    with pytest.raises(ValueError, match="channel_reduction"):
        compare.distances({0: X}, {0: Y}, [Variant("spatial", False)], channel_reduction="max")


def _plain_diff(x: torch.Tensor, y: torch.Tensor, v: Variant) -> torch.Tensor:
    """The module docstring's formula, written out with plain torch ops: ``[N, C]``."""
    def base(z, b):
        z = z.reshape(z.shape[0], z.shape[1], -1)
        if b == "mean":
            z = z.mean(dim=2, keepdim=True)
        elif b == "sort":
            z = torch.sort(z, dim=2).values
        if v.channel_norm:  # after the transform
            z = z / (z.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        return z
    return sum(((base(x, b) - base(y, b)) ** 2).mean(dim=2) for b in v.parts)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("chunk", [1, 40, None])
def test_grouped_diffs_equal_plain_formula(channels_last, chunk, threads):
    # with several threads the chunks run side by side on a pool (one torch thread each)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_grouped_diffs(channels_last, chunk)
        assert torch.get_num_threads() == threads  # the pool restores the caller's count
    finally:
        torch.set_num_threads(before)


def _check_grouped_diffs(channels_last, chunk):
    g = torch.Generator().manual_seed(2)
    n = 5  # ref, p0, p1: 3 sets of 5 items, concatenated as one forward pass would give them
    feats = {1: torch.randn(3 * n, 4, 3, 5, generator=g).relu(),
             7: torch.randn(3 * n, 6, 2, 2, generator=g)}
    feats[1][0, :, 1, 2] = 0  # an all-zero position: the epsilon of the channel norm
    if channels_last:
        feats = {t: z.contiguous(memory_format=torch.channels_last) for t, z in feats.items()}
    variants = compare.all_variants()
    with torch.inference_mode():
        got = compare.grouped_diffs(feats, 3, [(1, 0), (2, 0)], variants, chunk_elements=chunk)
    for v in variants:
        for tap, z in feats.items():
            ref, p0, p1 = z[:n], z[n:2 * n], z[2 * n:]
            want = torch.stack([_plain_diff(p0, ref, v), _plain_diff(p1, ref, v)])
            assert got[v][tap].shape == (2, n, z.shape[1])
            torch.testing.assert_close(got[v][tap], want, rtol=1e-5, atol=1e-6)


def test_grouped_diffs_pairs_in_any_order():
    g = torch.Generator().manual_seed(3)
    z = torch.rand(8, 3, 4, 4, generator=g)  # two sets of 4 (a JND batch: p0, p1)
    v = Variant("spatial+sort", True)
    got = compare.grouped_diffs({0: z}, 2, [(0, 1), (1, 0), (0, 0)], [v], chunk_elements=50)[v][0]
    want = _plain_diff(z[:4], z[4:], v)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-6)
    assert torch.all(got[2] == 0)


def test_grouped_diffs_rejects_uneven_sets():
    with pytest.raises(ValueError, match="3 equal image sets"):
        compare.grouped_diffs({0: torch.rand(4, 2, 2, 2)}, 3, [(1, 0)], [Variant("mean", False)])


def test_channel_normalize_zero_position_has_finite_gradient():
    z = torch.zeros(1, 3, 2, 2)
    z[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])
    z.requires_grad_(True)
    out = compare.channel_normalize(z)
    torch.testing.assert_close(out[0, :, 0, 0].detach(), torch.tensor([0.6, 0.8, 0.0]))
    out.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(3, 5, 80, 64), (1, 1, 300, 256), (2, 9000, 7), (2, 900, 7)])
def test_sort_columns_split_over_threads_equals_numpy(threads, shape):
    # whatever torch's thread count, the sort of a (non-contiguous) block is NumPy's exactly
    from workflow.compare import _sort_columns

    base = torch.rand(shape)
    t = base.transpose(-1, -2).contiguous().transpose(-1, -2)  # a non-contiguous view
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _sort_columns(t)
    finally:
        torch.set_num_threads(before)
    expected = np.sort(base.numpy(), axis=-2)
    assert got.shape == t.shape
    np.testing.assert_array_equal(got.numpy(), expected)


def test_sort_of_autocast_features_is_the_sort_of_their_fp32_copy():
    """bf16 features are sorted before widening (half the bytes): the same values, and the
    same gradient, as sorting their fp32 copy."""
    from workflow.compare import Variant, transform_features

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4).to(torch.bfloat16).requires_grad_(True)
    got = transform_features({0: x}, [Variant("sort", False)])[("sort", False)][0]
    x32 = x.detach().float().requires_grad_(True)
    want = torch.sort(x32.flatten(2), dim=-1).values
    assert got.dtype == torch.float32 and torch.equal(got, want)
    w = torch.randn_like(want)
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert torch.equal(x.grad.float(), x32.grad.to(torch.bfloat16).float())
