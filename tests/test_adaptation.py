"""Adaptation: labels, rankings, triplet files, the fused trainer against one metric at a
time, non-negative weights, the loss by hand, and a tiny end-to-end train + evaluate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from workflow.benchmarks import adaptation as ada
from workflow.compare import Variant
from workflow.distortions import positions, random_rankings, ranking_labels


def test_labels_follow_the_ranking():
    orders = [[2, 0, 1, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    d0 = torch.tensor([0, 2, 5, 3])
    d1 = torch.tensor([2, 0, 4, 1])
    labels = ranking_labels(d0, d1, positions(orders))
    for r, order in enumerate(orders):
        for i in range(4):
            # 0 when p0's distortion comes earlier (less disruptive) in the ranking
            expected = 0.0 if order.index(int(d0[i])) < order.index(int(d1[i])) else 1.0
            assert float(labels[i, r]) == expected
    # hand-worked: ranking 0 puts darken (2) first, so rotate (0) vs darken is label 1
    assert labels[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="permutation"):
        positions([[0, 0, 1, 2, 3, 4]])


def test_rankings_seeded_permutations():
    a, b = random_rankings(20, 0), random_rankings(20, 0)
    assert a == b and a != random_rankings(20, 1)
    assert all(sorted(r) == list(range(6)) for r in a)
    assert len({tuple(r) for r in a}) > 15
    data = ada.make_rankings(3, 0)
    assert data["names"][0] == [data["distortions"][i] for i in data["rankings"][0]]


def test_triplet_file_split_and_caps():
    cfg = ada.with_defaults({"train_images": 50, "val_triplets": 10, "test_triplets": 7})
    arr = ada.build_triplet_file("svhn", 200, 30, cfg)
    assert len(arr["train_index"]) == 50 and len(arr["val_index"]) == 10 and len(arr["test_index"]) == 7
    assert not set(arr["train_index"]) & set(arr["val_index"])  # disjoint split
    assert np.all(arr["val_d0"] != arr["val_d1"]) and np.all(arr["test_d0"] != arr["test_d1"])
    train, val = ada.split_indices(200, 0.2, 0)
    assert len(val) == 40 and len(train) == 160 and set(arr["val_index"]) <= set(val)
    again = ada.build_triplet_file("svhn", 200, 30, cfg)
    assert all(np.array_equal(arr[k], again[k]) for k in arr)


def test_lr_schedule_constant_then_linear():
    f = ada.lr_lambda(total_steps=10, constant_steps=5)
    assert [f(s) for s in range(10)] == [1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2]


def _random_diffs(n, channels, variants, g):
    return {v: {t: torch.rand(n, c, generator=g) * 0.1 for t, c in channels.items()} for v in variants}


def test_loss_by_hand():
    channels = {3: 4}
    v = Variant("spatial", True)
    adapter = ada.FusedAdapter(channels, [v], [0], seed=5, dropout=0.0, sync_weight=10.0)
    g = torch.Generator().manual_seed(0)
    d0 = torch.rand(6, 1, 1, generator=g)
    d1 = torch.rand(6, 1, 1, generator=g)
    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
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


def test_fused_equals_one_metric_at_a_time():
    channels = {1: 5, 4: 3}
    variants = [Variant("spatial", True), Variant("mean", True)]
    rankings = [0, 1, 2]
    fused = ada.FusedAdapter(channels, variants, rankings, seed=3, dropout=0.0)
    singles = {(vi, r): ada.FusedAdapter(channels, [v], [r], seed=3, dropout=0.0)
               for vi, v in enumerate(variants) for r in rankings}
    cfg = {"lr": 1e-2, "betas": (0.5, 0.999)}
    opt = ada.make_optimizer(fused, cfg)
    opts = {k: ada.make_optimizer(m, cfg) for k, m in singles.items()}
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
            loss, _, acc1 = m.loss(m.distances({v: diffs0[v]}), m.distances({v: diffs1[v]}), labels[:, r:r + 1])
            loss.backward()
            o.step()
            m.clamp_()
            torch.testing.assert_close(loss.detach(), per[vi, r], rtol=1e-5, atol=1e-6)
            assert float(acc1) == float(acc[vi, r])
            if float(acc1) <= 0.5:
                synced.add((vi, r))
    for (vi, r), m in singles.items():
        for t in channels:
            torch.testing.assert_close(m.weights(0)[t][0], fused.weights(vi)[t][r], rtol=1e-5, atol=1e-6)
        k = vi * len(rankings) + r
        for wf, ws in zip(fused.rank_net.weights, m.rank_net.weights, strict=True):
            torch.testing.assert_close(ws[0], wf[k], rtol=1e-5, atol=1e-6)
    assert synced, "the sync loss branch was never exercised"


def test_weights_stay_non_negative():
    channels = {0: 8}
    v = Variant("spatial", False)
    adapter = ada.FusedAdapter(channels, [v], [0, 1], seed=0, dropout=0.5)
    opt = ada.make_optimizer(adapter, {"lr": 0.5, "betas": (0.5, 0.999)})
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        d0, d1 = _random_diffs(16, channels, [v], g), _random_diffs(16, channels, [v], g)
        labels = (torch.rand(16, 2, generator=g) > 0.5).float()
        opt.zero_grad()
        m0, m1 = adapter.dropout_masks(16, g, torch.device("cpu")), adapter.dropout_masks(16, g, torch.device("cpu"))
        loss, _, _ = adapter.loss(adapter.distances(d0, m0), adapter.distances(d1, m1), labels)
        loss.backward()
        opt.step()
        adapter.clamp_()
        assert float(adapter.weights(0)[0].detach().min()) >= 0.0
    assert float((adapter.weights(0)[0].detach() == 0).float().sum()) > 0  # the clamp was needed
    # dropout: masks are 0 or 1/(1-p), switched off in eval mode
    m = adapter.dropout_masks(1000, g, torch.device("cpu"))[0]
    assert set(m.unique().tolist()) == {0.0, 2.0} and abs(float(m.mean()) - 1.0) < 0.05
    adapter.eval()
    assert adapter.dropout_masks(4, g, torch.device("cpu")) is None


def test_tiny_train_and_evaluate(tmp_path):
    """The whole CLI path on tiny arrays with a random-weight AlexNet LPIPS set."""
    rng = np.random.default_rng(0)
    svhn, stl = tmp_path / "svhn", tmp_path / "stl10"
    for d, size in ((svhn, 32), (stl, 96)):
        d.mkdir()
        for split in ("train", "test"):
            np.save(d / f"{split}_images.npy", rng.integers(0, 256, (20, size, size, 3), dtype=np.uint8))
    cfg = {"lossnets": "lpips_sets", "comparisons": ["spatial", "mean"], "rankings": 2, "runs": 1,
           "batch_size": 8, "eval_batch_size": 16, "epochs_constant": 1, "epochs_decay": 1,
           "val_triplets": 4, "test_triplets": 6, "bapps": False}
    c = json.dumps(cfg)
    lossnet = json.dumps({"arch": "alexnet", "weights": "random", "weights_dir": "x", "seed": 0})
    common = json.dumps({"device": "cpu", "precision": "auto"})
    rk, tr, ts = tmp_path / "rankings.json", tmp_path / "svhn.npz", tmp_path / "stl10.npz"
    assert ada.main(["rankings", "--config", c, "--out", str(rk)]) == 0
    assert ada.main(["triplets", "--config", c, "--dataset", "svhn", "--prepared", str(svhn), "--out", str(tr)]) == 0
    assert ada.main(["triplets", "--config", c, "--dataset", "stl10", "--prepared", str(stl), "--out", str(ts)]) == 0
    base = ["--config", c, "--lossnet", lossnet, "--common", common, "--net", "alexnet/lpips", "--rankings", str(rk)]
    out = tmp_path / "adapter.pt"
    assert ada.main(["train", *base, "--run", "0", "--triplets", str(tr), "--prepared", str(svhn),
                     "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    adapter, meta = ada.load_adapter(out, torch.device("cpu"))
    assert meta["steps"] == 2 * math.ceil(16 / 8)  # 80% of 20 images, 2 epochs
    assert all(float(p.detach().min()) >= 0 for p in adapter.channel_weights.values())
    assert any(float((p.detach() - 1).abs().max()) > 0 for p in adapter.channel_weights.values())  # it trained
    evals = ["--triplets", f"svhn={tr}", f"stl10={ts}", "--prepared", f"svhn={svhn}", f"stl10={stl}"]
    assert ada.main(["evaluate", *base, "--run", "0", *evals, "--adapter", str(out),
                     "--out", str(tmp_path / "scores.parquet")]) == 0
    assert ada.main(["evaluate", *base, *evals, "--out", str(tmp_path / "baseline.parquet")]) == 0
    import pandas as pd

    for name, variant in (("scores", "adapted"), ("baseline", "baseline")):
        df = pd.read_parquet(tmp_path / f"{name}.parquet")
        # 2 comparisons x 2 rankings x (svhn test, svhn val, stl10 test)
        assert len(df) == 12 and set(df["variant"]) == {variant}
        assert df["value"].between(0, 1).all() and set(df["ranking"]) == {0, 1}
        assert set(zip(df["dataset"], df["split"], strict=True)) == {("svhn", "test"), ("svhn", "val"), ("stl10", "test")}
