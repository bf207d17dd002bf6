"""The fused adapter (workflow/models/adapter.py): the loss by hand, fused training against one
metric at a time, non-negative weights and dropout, the baseline distance, the model file."""

from __future__ import annotations

import pytest
import torch

from workflow.archs import LossNet
from workflow.compare import Variant
from workflow.models.adapter import (
    FusedAdapter,
    baseline_distances,
    load_adapter,
    make_optimizer,
    metric_seed,
    tap_channels,
    terms,
)
from workflow.training import save_model

CPU = torch.device("cpu")


def _random_diffs(n, channels, variants, g):
    return {v: {t: torch.rand(n, c, generator=g) * 0.1 for t, c in channels.items()}
            for v in variants}


def test_loss_by_hand():
    v = Variant("spatial", True)
    adapter = FusedAdapter({3: 4}, [v], [0], seed=5, dropout=0.0, sync_weight=10.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # some draws have batch 2AFC <= 0.5 (sync loss on), some not
        d0 = torch.rand(6, 1, 1, generator=g)
        d1 = torch.rand(6, 1, 1, generator=g)
        labels = (torch.rand(6, 1, generator=g) > 0.5).float()
        total, per, acc = adapter.loss(d0, d1, labels)
        a, b, y = d0.flatten(), d1.flatten(), labels.flatten()
        twoafc = ((a < b).float() * (1 - y) + (b < a).float() * y).mean()
        p = torch.sigmoid(adapter.rank_net(a.view(-1, 1), b.view(-1, 1)).flatten())
        bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
        q = 1 / (1 + torch.exp(-(a - b)))
        sync = -(y * torch.log(q) + (1 - y) * torch.log(1 - q)).mean()
        expected = bce + (10 * sync if twoafc <= 0.5 else 0.0)
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
        assert float(acc) == pytest.approx(float(twoafc))
        assert float(per[0, 0]) == pytest.approx(float(total.detach()))
    with pytest.raises(ValueError, match="labels"):
        adapter.loss(d0, d1, labels[:, :0])


def test_fused_equals_one_metric_at_a_time():
    channels = {1: 5, 4: 3}
    variants = [Variant("spatial", True), Variant("mean", True)]
    rankings = [0, 1, 2]
    fused = FusedAdapter(channels, variants, rankings, seed=3, dropout=0.0)
    singles = {(vi, r): FusedAdapter(channels, [v], [r], seed=3, dropout=0.0)
               for vi, v in enumerate(variants) for r in rankings}
    opt = make_optimizer(fused, 1e-2, (0.5, 0.999))
    opts = {k: make_optimizer(m, 1e-2, (0.5, 0.999)) for k, m in singles.items()}
    g = torch.Generator().manual_seed(0)
    synced = set()
    for _ in range(6):
        diffs0 = _random_diffs(32, channels, variants, g)
        diffs1 = _random_diffs(32, channels, variants, g)
        labels = (torch.rand(32, 3, generator=g) > 0.5).float()
        opt.zero_grad()
        total, per, acc = fused.loss(fused.distances(diffs0), fused.distances(diffs1), labels)
        total.backward()
        opt.step()
        fused.clamp_()
        for (vi, r), m in singles.items():
            o = opts[(vi, r)]
            o.zero_grad()
            v = variants[vi]
            loss, _, acc1 = m.loss(m.distances({v: diffs0[v]}), m.distances({v: diffs1[v]}),
                                   labels[:, r:r + 1])
            loss.backward()
            o.step()
            m.clamp_()
            torch.testing.assert_close(loss.detach(), per[vi, r], rtol=1e-5, atol=1e-6)
            assert float(acc1) == float(acc[vi, r])
            if float(acc1) <= 0.5:
                synced.add((vi, r))
    for (vi, r), m in singles.items():
        for t in channels:
            torch.testing.assert_close(m.weights(0)[t][0], fused.weights(vi)[t][r],
                                       rtol=1e-5, atol=1e-6)
        k = vi * len(rankings) + r
        for wf, ws in zip(fused.rank_net.weights, m.rank_net.weights, strict=True):
            torch.testing.assert_close(ws[0], wf[k], rtol=1e-5, atol=1e-6)
    assert synced, "the sync loss branch was never exercised"
    # each metric's G starts from its own seed, the same fused or alone
    assert metric_seed(3, 1, variants[0]) != metric_seed(3, 2, variants[0])
    assert metric_seed(3, 1, variants[0]) != metric_seed(4, 1, variants[0])


def test_weights_stay_non_negative_and_dropout():
    channels = {0: 8}
    v = Variant("spatial", False)
    adapter = FusedAdapter(channels, [v], [0, 1], seed=0, dropout=0.5)
    opt = make_optimizer(adapter, 0.5, (0.5, 0.999))
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        d0, d1 = _random_diffs(16, channels, [v], g), _random_diffs(16, channels, [v], g)
        labels = (torch.rand(16, 2, generator=g) > 0.5).float()
        opt.zero_grad()
        m0, m1 = adapter.dropout_masks(16, g, CPU), adapter.dropout_masks(16, g, CPU)
        loss, _, _ = adapter.loss(adapter.distances(d0, m0), adapter.distances(d1, m1), labels)
        loss.backward()
        opt.step()
        adapter.clamp_()
        assert float(adapter.weights(0)[0].detach().min()) >= 0.0
    assert float((adapter.weights(0)[0].detach() == 0).float().sum()) > 0  # the clamp was needed
    # dropout: masks are 0 or 1/(1-p), switched off in eval mode
    m = adapter.dropout_masks(1000, g, CPU)[v][0]
    assert set(m.unique().tolist()) == {0.0, 2.0} and abs(float(m.mean()) - 1.0) < 0.05
    adapter.eval()
    assert adapter.dropout_masks(4, g, CPU) is None
    with pytest.raises(ValueError, match="adaptation.dropout"):
        FusedAdapter(channels, [v], [0], dropout=1.0)


def test_distances_by_hand():
    """Adapted distance = sum over taps of diffs @ weights; the baseline has weights 1."""
    channels = {2: 3, 5: 2}
    variants = [Variant("spatial", True), Variant("sort", True)]
    adapter = FusedAdapter(channels, variants, [0, 1], dropout=0.0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in adapter.channel_weights.values():
            p.copy_(torch.rand(p.shape, generator=g))
    diffs = _random_diffs(5, channels, variants, g)
    d = adapter.distances(diffs).detach()
    base = baseline_distances(diffs, variants)
    assert d.shape == (5, 2, 2) and base.shape == (5, 2, 1)
    for vi, var in enumerate(variants):
        for r in range(2):
            want = sum((diffs[var][t] * adapter.weights(vi)[t][r].detach()).sum(1)
                       for t in channels)
            torch.testing.assert_close(d[:, vi, r], want)
        torch.testing.assert_close(base[:, vi, 0], sum(diffs[var][t].sum(1) for t in channels))


def test_model_file_round_trip(tmp_path):
    channels = {1: 4, 3: 6}
    variants = [Variant("mean", True), Variant("spatial+sort", False)]
    adapter = FusedAdapter(channels, variants, [0, 1, 2], seed=7, dropout=0.25, sync_weight=3.0)
    with torch.no_grad():
        adapter.channel_weights["1_1_3"].mul_(0.5)
    path = save_model(tmp_path / "adapter.pt", {"adapter": adapter},
                      {**adapter.describe(), "run": 0})
    loaded, meta = load_adapter(path, CPU)
    assert meta["run"] == 0 and not loaded.training
    assert loaded.variants == variants and loaded.rankings == [0, 1, 2]
    assert (loaded.dropout, loaded.sync_weight, loaded.taps) == (0.25, 3.0, [1, 3])
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    save_model(tmp_path / "other.pt", {"adapter": adapter}, {"run": 0})
    with pytest.raises(ValueError, match="not an adapter file"):
        load_adapter(tmp_path / "other.pt", CPU)
    # a file of the shared-weights adapter (before per-term weights) is refused, not misread
    old = {k: v for k, v in adapter.describe().items() if k != "term_weights"}
    save_model(tmp_path / "old.pt", {"adapter": adapter}, old)
    with pytest.raises(ValueError, match="shared one weight per channel.*rerun"):
        load_adapter(tmp_path / "old.pt", CPU)


def test_combined_comparison_weights_each_term():
    """spatial+mean has one weight matrix per term (the reference code's per-term 1x1 convs):
    the distance is w_spatial . D_spatial + w_mean . D_mean, and each term's gradient reaches
    only its own weights."""
    channels = {0: 3, 2: 2}
    combo, single = Variant("spatial+mean", True), Variant("spatial", True)
    adapter = FusedAdapter(channels, [single, combo], [0, 1], dropout=0.0)
    assert adapter.terms == [Variant("spatial", True), Variant("mean", True)]
    assert terms([Variant("spatial+sort", False), Variant("sort", False)]) == [
        Variant("spatial", False), Variant("sort", False)]
    assert len(adapter.channel_weights) == (1 + 2) * len(channels)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.channel_weights.values():
            p.copy_(torch.rand(p.shape, generator=g))
    diffs = _random_diffs(4, channels, adapter.terms, g)
    sp, mn = diffs[Variant("spatial", True)], diffs[Variant("mean", True)]
    d = adapter.distances(diffs)
    w_sp, w_mn = adapter.weights(1, 0), adapter.weights(1, 1)
    for r in range(2):
        want = sum(sp[t] @ w_sp[t][r] + mn[t] @ w_mn[t][r] for t in channels)
        torch.testing.assert_close(d[:, 1, r], want.detach())
    # d/dw of term j of tap t, ranking r = sum over items of that term's D[:, c]
    d[:, 1, 0].sum().backward()
    for t in channels:
        torch.testing.assert_close(w_sp[t].grad[0], sp[t].sum(0))
        torch.testing.assert_close(w_mn[t].grad[0], mn[t].sum(0))
        assert not torch.allclose(w_sp[t].grad[0], w_mn[t].grad[0])
        assert float(w_sp[t].grad[1].abs().sum()) == 0.0  # ranking 1 untouched
        # the plain spatial metric's weights are its own: no gradient from the combined one
        assert float(adapter.weights(0, 0)[t].grad.abs().sum()) == 0.0
    # with the mean term's differences zero, only the spatial term's weights get a gradient
    adapter.zero_grad()
    zero = {**diffs, Variant("mean", True): {t: torch.zeros_like(x) for t, x in mn.items()}}
    adapter.distances(zero)[:, 1].sum().backward()
    assert all(float(w_mn[t].grad.abs().sum()) == 0.0 for t in channels)
    assert all(float(w_sp[t].grad.abs().sum()) > 0.0 for t in channels)
    # the baseline (weights 1) is the sum of the terms, the old combined distance
    base = baseline_distances(diffs, [combo])
    torch.testing.assert_close(base[:, 0, 0], sum(sp[t].sum(1) + mn[t].sum(1) for t in channels))
    with pytest.raises(KeyError, match="mean-norm"):
        adapter.distances({Variant("spatial", True): sp})


def test_tap_channels_of_alexnet(cpu_job):
    # AlexNet's five ReLU outputs (the LPIPS taps) have 64, 192, 384, 256, 256 channels
    extractor = cpu_job().extractor(LossNet.parse("alexnet/lpips"))
    assert list(tap_channels(extractor, 64, CPU).values()) == [64, 192, 384, 256, 256]
