"""Benchmark 4: the autoencoder, the MLP grid and its selection rule, the train/encode/fit jobs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from workflow.benchmarks import autoencoder as bench
from workflow.models.autoencoder import ConvAutoencoder
from workflow.models.mlp import HIDDEN_GRID, GridSelection, MLPGrid, mlp_name, select_best

COMMON = {"device": "cpu", "precision": "fp32"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny convolutions on a shared 2-core machine: a thread pool only adds contention
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize(("size", "enc_side", "g"), [(64, 2, 1), (96, 4, 3)])
def test_code_size_and_reconstruction_shape(size, enc_side, g):
    # by hand: 4x4 stride-2 valid convs give 64->31->14->6->2 and 96->47->22->10->4;
    # the decoder starts at g = (size - 64) / 16 + 1 and k5,k5,k6,k6 stride-2 transposed
    # convs give 1->5->13->30->64 and 3->9->21->46->96
    torch.manual_seed(0)
    ae = ConvAutoencoder(size)
    x = torch.rand(3, 3, size, size)
    assert ae.encoder[-1].in_features == 256 * enc_side * enc_side
    assert ae.decoder[0].out_features == 1024 * g * g
    z = ae.encode(x)
    assert z.shape == (3, 64)
    ae.eval()
    with torch.no_grad():
        y = ae(x)
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0  # sigmoid output
    feats = ae.decoder[:3](z)
    assert feats.shape == (3, 1024, g, g)


def test_unsupported_size_fails_clearly():
    with pytest.raises(ValueError, match="64 \\+ 16k"):
        ConvAutoencoder(70)
    with pytest.raises(ValueError, match="64x64"):
        ConvAutoencoder(64).encode(torch.rand(1, 3, 96, 96))


# ----------------------------------------------------------------------------- data helpers


def test_image_bank_matches_numpy_reflect_pad():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    bank = bench.ImageBank(imgs, 16, torch.device("cpu"))
    got = bank.batch(torch.tensor([3, 1])).numpy()
    want = np.pad(imgs[[3, 1]], ((0, 0), (16, 16), (16, 16), (0, 0)), mode="reflect")
    want = want.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    assert got.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_seeded_split_is_reproducible_disjoint_and_80_20():
    tr, va = bench.seeded_split(1000, 0.2, seed=7)
    tr2, va2 = bench.seeded_split(1000, 0.2, seed=7)
    assert len(va) == 200 and len(tr) == 800
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(1000))
    assert not np.array_equal(va, bench.seeded_split(1000, 0.2, seed=8)[1])


def test_steps_per_epoch_drops_a_single_trailing_image():
    assert bench.steps_per_epoch(512, 256) == 2
    assert bench.steps_per_epoch(513, 256) == 2  # a batch of one cannot train BatchNorm
    assert bench.steps_per_epoch(514, 256) == 3
    batches = bench.EpochBatches(10, 4, seed=0)
    e0 = torch.cat([batches(s) for s in range(3)])
    assert sorted(e0.tolist()) == list(range(10))  # one epoch = every item once


def test_bad_prepared_array_names_the_file(tmp_path):
    np.save(tmp_path / "train_images.npy", np.zeros((4, 30, 30, 3), np.uint8))
    np.save(tmp_path / "train_labels.npy", np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="train_images.npy"):
        bench.load_split(tmp_path, bench.DATASETS["svhn"], "train")
    with pytest.raises(FileNotFoundError, match="test_images.npy"):
        bench.load_split(tmp_path, bench.DATASETS["svhn"], "test")


# ----------------------------------------------------------------------------- MLP grid


def test_mlp_grid_architectures():
    grid = MLPGrid(64, 10)
    assert [mlp_name(h) for h in HIDDEN_GRID] == grid.names
    assert grid.names[0] == "mlp[]" and grid.names[4] == "mlp[64,32]"
    # parameter counts by hand: sum over layers of in*out + out
    want = [64 * 10 + 10, 64 * 32 + 32 + 32 * 10 + 10, 64 * 64 + 64 + 64 * 10 + 10,
            64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10, 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10,
            64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10,
            64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10]
    assert [sum(p.numel() for p in n.parameters()) for n in grid.nets] == want
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in grid.nets[6]) == 2
    assert grid(torch.rand(5, 64)).shape == (7, 5, 10)


def test_mlp_loss_is_mse_against_one_hot_summed_over_active_nets():
    torch.manual_seed(0)
    grid = MLPGrid(4, 3, [(), (5,)])
    z, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    onehot = torch.eye(3)[y]
    with torch.no_grad():
        per = [float(((net(z) - onehot) ** 2).mean()) for net in grid.nets]
    with torch.no_grad():
        assert float(grid.loss(z, y)) == pytest.approx(sum(per), rel=1e-6)
        assert float(grid.loss(z, y, [False, True])) == pytest.approx(per[1], rel=1e-6)


def test_inactive_nets_are_not_updated():
    torch.manual_seed(0)
    grid = MLPGrid(4, 3, [(), (5,)])
    opt = torch.optim.Adam(grid.parameters(), lr=0.1)
    z, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    before = [p.clone() for p in grid.parameters()]
    for active in ([True, True], [False, True], [False, True]):  # Adam moments exist for net 0
        opt.zero_grad(set_to_none=True)
        grid.loss(z, y, active).backward()
        opt.step()
        if active[0] is False:
            frozen = [p.clone() for p in grid.nets[0].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, grid.nets[0].parameters()))
    assert not torch.equal(before[-1], list(grid.parameters())[-1])


def test_selection_rule_on_a_constructed_case():
    # highest validation accuracy wins; a tie goes to the first net in grid order
    assert select_best([0.50, 0.71, 0.71, 0.60]) == 1
    assert select_best([0.9, 0.2]) == 0
    assert select_best(torch.tensor([0.1, 0.3, 0.2])) == 1


def test_per_net_early_stopping_keeps_each_nets_best_weights():
    torch.manual_seed(0)
    grid = MLPGrid(2, 2, [(), (3,), (4,)])
    sel = GridSelection(grid, patience=2)
    # scripted validation accuracies per evaluation (rows) and net (columns)
    script = [[0.5, 0.5, 0.5],
              [0.6, 0.4, 0.5],   # net 1 worse (1), net 2 equal = no improvement (1)
              [0.6, 0.4, 0.7],   # net 0 equal (1), net 1 worse (2 -> stops), net 2 improves
              [0.5, 0.9, 0.6],   # net 0 (2 -> stops); net 1 stopped: 0.9 is ignored
              [0.9, 0.9, 0.6]]   # net 0 stopped; net 2 (2 -> stops)
    snaps = []
    for step, accs in enumerate(script):
        with torch.no_grad():
            for p in grid.parameters():
                p.add_(1.0)  # a visibly different state at every evaluation
        snaps.append([{k: v.clone() for k, v in n.state_dict().items()} for n in grid.nets])
        sel.update(grid, torch.tensor(accs, dtype=torch.float64), step)
    assert sel.best_acc.tolist() == [0.6, 0.5, 0.7]
    assert sel.best_step.tolist() == [1, 0, 2]
    assert sel.active.tolist() == [False, False, False] and sel.done
    assert int(sel.improvements) == 3 + 1 + 1  # first evaluation, net 0 at 1, net 2 at 2
    for k, step in enumerate([1, 0, 2]):
        for name, v in sel.best.nets[k].state_dict().items():
            assert torch.equal(v, snaps[step][k][name])
    assert select_best(sel.best_acc) == 2


# ----------------------------------------------------------------------------- the jobs


def _toy_prepared(path, n_ae=100, n_train=240, n_test=160, seed=0):
    """SVHN-format arrays (uint8 [N,32,32,3] + int64 labels) of 4 well separated classes:
    each class a distinct colour, plus noise."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 220]])
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("extra", n_ae), ("train", n_train), ("test", n_test)):
        y = rng.integers(0, 4, n)
        x = colours[y][:, None, None, :] + rng.normal(0, 20, (n, 32, 32, 3))
        np.save(path / f"{split}_images.npy", np.clip(x, 0, 255).astype(np.uint8))
        np.save(path / f"{split}_labels.npy", y.astype(np.int64))
    return path


def _cfg(**train):
    return {"seed": 0, "val_fraction": 0.2, "eval_batch_size": 512,
            "train": {"epochs": 2, "patience": 10, "batch_size": 40, "lr": 1e-3,
                      "normalize": "none", "code_size": 64, **train},
            "encode": {"batch_size": 64},
            "mlp": {"epochs": 60, "patience": 10, "batch_size": 32, "lr": 3e-3}}


@pytest.fixture(scope="module")
def toy_job(tmp_path_factory):
    """The three jobs on the toy set with the pixel baseline; encoder calls counted."""
    root = tmp_path_factory.mktemp("ae")
    prepared = _toy_prepared(root / "prepared")
    job = root / "pixel" / "svhn" / "run0"
    cfg = _cfg()
    torch.manual_seed(0)
    bench.train_autoencoder(job, "svhn", prepared, "pixel", 0, cfg, COMMON, {}, progress=False)
    encoded = []
    orig = ConvAutoencoder.encode

    def counting_encode(self, x):
        encoded.append(x.shape[0])
        return orig(self, x)

    ConvAutoencoder.encode = counting_encode
    try:
        bench.encode_codes(job, "svhn", prepared, cfg, COMMON)
    finally:
        ConvAutoencoder.encode = orig
    return {"job": job, "cfg": cfg, "encoded": encoded, "prepared": prepared}


def test_codes_are_computed_once_and_reused_by_all_mlps(toy_job, monkeypatch):
    job = toy_job["job"]
    assert sum(toy_job["encoded"]) == 240 + 160  # every labelled image encoded exactly once
    codes = job / "codes.npz"
    stamp, blob = codes.stat().st_mtime_ns, codes.read_bytes()

    def forbidden(*a, **k):
        raise AssertionError("fit-mlps must not run the encoder")

    monkeypatch.setattr(ConvAutoencoder, "encode", forbidden)
    monkeypatch.setattr(bench, "load_autoencoder", forbidden)
    bench.fit_mlps(job, "svhn", 0, toy_job["cfg"], COMMON, progress=False)
    assert codes.stat().st_mtime_ns == stamp and codes.read_bytes() == blob
    per = pd.read_parquet(job / "mlps.parquet")
    assert len(per) == 7 and per["n_train"].eq(192).all() and per["n_test"].eq(160).all()
    with np.load(codes) as f:
        assert f["train_codes"].shape == (240, 64) and f["test_codes"].shape == (160, 64)


def test_trained_autoencoder_codes_beat_chance_and_scores_schema(toy_job):
    job = toy_job["job"]
    if not (job / "scores.parquet").exists():
        bench.fit_mlps(job, "svhn", 0, toy_job["cfg"], COMMON, progress=False)
    df = pd.read_parquet(job / "scores.parquet")
    per = pd.read_parquet(job / "mlps.parquet")
    best = df[(df.variant == "best-val-mlp") & (df.split == "test") & (df.metric == "accuracy")]
    assert len(best) == 1
    assert float(best.value.iloc[0]) > 0.7  # 4 classes: chance is 0.25
    # the reported score follows the stated rule, checked against the per-MLP table
    k = int(np.argmax(per.val_accuracy.to_numpy()))  # argmax: first of ties
    assert float(best.value.iloc[0]) == pytest.approx(per.test_accuracy.iloc[k])
    assert per.selected.tolist() == [i == k for i in range(7)]
    assert set(df.variant) == {"best-val-mlp", "autoencoder", *per.mlp}
    assert (df.arch == "").all() and (df.layer == "").all() and (df.benchmark == "autoencoder").all()
    # every MLP's test accuracy, recomputed from the codes with a majority-free check
    assert df[(df.split == "test") & df.variant.str.startswith("mlp")].shape[0] == 7
    # the pixel MSE of the test reconstructions: recompute it from the saved autoencoder
    ae = bench.load_autoencoder(job / "autoencoder.pt")
    x = np.load(toy_job["prepared"] / "test_images.npy")
    xt = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255,
                                 (16,) * 4, mode="reflect")
    with torch.no_grad():
        mse = float(((ae(xt) - xt) ** 2).mean())
    row = df[df.metric == "pixel_mse"]
    assert float(row.value.iloc[0]) == pytest.approx(mse, rel=1e-4)


def test_early_stopping_restores_the_best_epoch(tmp_path, monkeypatch):
    prepared = _toy_prepared(tmp_path / "prepared", n_ae=20, n_train=8, n_test=8)
    script = [0.5, 0.2, 0.3, 0.4, 0.1]  # val loss per epoch; patience 2 stops after epoch 4
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def scripted(out, x):
        if torch.is_grad_enabled():  # a training step: a real loss
            return torch.mean((out - x) ** 2)
        seen.append((x.clone(), out.clone()))
        return torch.tensor(script[len(seen) - 1])

    monkeypatch.setattr(bench, "make_loss", lambda *a, **k: (scripted, None))
    cfg = _cfg(epochs=5, patience=2, batch_size=16, lr=1e-2)
    job = tmp_path / "job"
    info = bench.train_autoencoder(job, "svhn", prepared, "pixel", 0, cfg, COMMON, {},
                                   progress=False)
    assert len(seen) == 4 and info["stop_reason"] == "early_stop"
    assert info["best_epoch"] == 2 and info["best_val_loss"] == pytest.approx(0.2)
    ae = bench.load_autoencoder(job / "autoencoder.pt")
    x2, out2 = seen[1]
    x4, out4 = seen[3]
    with torch.no_grad():
        again = ae(x2)
    torch.testing.assert_close(again, out2)  # the weights of epoch 2, not of the last epoch
    assert not torch.allclose(ae(x4), out4)
    saved = json.loads((job / "train.json").read_text())
    assert saved["epochs_run"] == 4
