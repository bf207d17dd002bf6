"""Benchmark 4: the autoencoder, the batched MLP grid and its selection rule, the train and
encode + mlp commands (workflow.benchmarks.autoencoder, workflow.models.autoencoder,
workflow.models.mlp)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from workflow import cli
from workflow.archs import LossNet, UnknownLossNetError
from workflow.benchmarks import autoencoder as bench
from workflow.datasets.arrays import CorruptFileError
from workflow.datasets.bank import EpochSampler
from workflow.files import save_npz
from workflow.models.autoencoder import ConvAutoencoder
from workflow.models.mlp import (
    HIDDEN_GRID,
    GridSelection,
    MLPGrid,
    fit_grid,
    mlp_name,
    select_best,
)
from workflow.plan import Plan, as_json
from workflow.training import save_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny convolutions and MLPs on a shared 2-core machine: a thread pool only adds
    # contention (the commands set the job's threads process-wide; restored at the end)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _padded(images: np.ndarray, pad: int) -> torch.Tensor:
    """The autoencoder input by hand: NumPy reflect padding, NCHW float in [0, 1]."""
    x = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


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
    assert ae.decoder[:3](z).shape == (3, 1024, g, g)


def test_unsupported_size_fails_clearly():
    with pytest.raises(ValueError, match="64 \\+ 16k"):
        ConvAutoencoder(70)
    with pytest.raises(ValueError, match="64x64"):
        ConvAutoencoder(64).encode(torch.rand(1, 3, 96, 96))


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize(("dataset", "pad", "size"), [("svhn", 16, 64), ("stl10", 0, 96)])
def test_inputs_are_the_reflect_padded_images(prepared, cpu_job, dataset, pad, size):
    spec = bench.DATASETS[dataset]
    assert (spec.pad, spec.size) == (pad, size)
    folder = prepared("svhn") if dataset == "svhn" else prepared(dataset, unlabeled=4)
    images, labels = bench.load_split({dataset: folder}, dataset, "train", 5, seed=0)
    assert images.shape == (5, size - 2 * pad, size - 2 * pad, 3) and labels.dtype == np.int64
    got = bench.inputs(cpu_job("autoencoder", "train"), images, spec)(torch.tensor([3, 1]))
    assert got.shape == (2, 3, size, size)
    torch.testing.assert_close(got, _padded(images[[3, 1]], pad), atol=1e-7, rtol=0)


def test_seeded_subset_and_split():
    tr, va = bench.seeded_split(1000, 0.2, seed=7)
    tr2, va2 = bench.seeded_split(1000, 0.2, seed=7)
    assert len(va) == 200 and len(tr) == 800
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(1000))
    assert not np.array_equal(va, bench.seeded_split(1000, 0.2, seed=8)[1])
    sub = bench.seeded_subset(100, 10, seed=0)
    assert len(set(sub)) == 10 and list(sub) == sorted(sub) and sub.max() < 100
    assert np.array_equal(sub, bench.seeded_subset(100, 10, seed=0))
    assert np.array_equal(bench.seeded_subset(5, None, 0), np.arange(5))
    assert np.array_equal(bench.seeded_subset(5, 9, 0), np.arange(5))
    with pytest.raises(ValueError, match="too few"):
        bench.seeded_split(2, 0.2, seed=0)


def test_a_trailing_batch_of_one_image_is_dropped():
    steps = {n: EpochSampler(n, 256, 0, min_batch=bench.MIN_BATCH).steps_per_epoch
             for n in (512, 513, 514)}
    assert steps == {512: 2, 513: 2, 514: 3}  # a batch of one cannot train BatchNorm
    sampler = EpochSampler(10, 4, 0, min_batch=bench.MIN_BATCH)
    e0 = torch.cat([sampler(s) for s in range(3)])
    assert sorted(e0.tolist()) == list(range(10))  # one epoch = every item once


def test_bad_prepared_arrays_name_the_file(tmp_path):
    np.save(tmp_path / "train_images.npy", np.zeros((4, 30, 30, 3), np.uint8))
    np.save(tmp_path / "train_labels.npy", np.zeros(4, np.int64))
    np.save(tmp_path / "extra_images.npy", np.zeros((4, 32, 32, 3), np.uint8))
    np.save(tmp_path / "extra_labels.npy", np.full(4, 12, np.int64))
    prepared = {"svhn": tmp_path}
    with pytest.raises(CorruptFileError, match="train_images.npy"):
        bench.load_split(prepared, "svhn", "train", None, 0)
    with pytest.raises(CorruptFileError, match="extra_labels.npy"):
        bench.load_split(prepared, "svhn", "extra", None, 0)
    with pytest.raises(FileNotFoundError, match="test_images.npy"):
        bench.load_split(prepared, "svhn", "test", None, 0)
    with pytest.raises(ValueError, match="--dataset"):
        bench.load_split(prepared, "mnist", "train", None, 0)


def test_net_ids():
    assert bench.parse_net("pixel") is None
    assert bench.parse_net("alexnet/1") == LossNet("alexnet", "1")
    with pytest.raises(UnknownLossNetError, match="--net"):
        bench.parse_net("alexnet/9")


def test_reconstruction_losses_by_hand(cpu_job):
    import torchvision

    torch.manual_seed(1)
    out, x = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    pixel, none = bench.reconstruction_loss(cpu_job("autoencoder", "train"), None, "none")
    assert none is None and float(pixel(out, x)) == pytest.approx(float(((out - x) ** 2).mean()))
    job = cpu_job("autoencoder", "train", "alexnet")
    assert (job.weights, job.weights_seed) == ("random", 0)  # the demo's loss networks
    loss, extractor = bench.reconstruction_loss(job, LossNet("alexnet", "1"), "none")
    torch.manual_seed(0)  # "random" weights: torchvision's initialisation under the seed
    relu1 = torchvision.models.alexnet(weights=None).features[:2].eval()
    with torch.no_grad():  # raw [0, 1] input (normalize: none), alexnet layer 1 = relu1
        want = float(((relu1(out) - relu1(x)) ** 2).mean())
        assert float(loss(out, x)) == pytest.approx(want, rel=1e-5)
    assert not any(p.requires_grad for p in extractor.parameters())


# ----------------------------------------------------------------------------- MLP grid


def test_mlp_grid_architectures():
    grid = MLPGrid(64, 10)
    assert [mlp_name(h) for h in HIDDEN_GRID] == grid.names
    assert grid.names[0] == "mlp[]" and grid.names[4] == "mlp[64,32]"
    # parameter counts by hand: sum over layers of in*out + out
    want = [64 * 10 + 10, 64 * 32 + 32 + 32 * 10 + 10, 64 * 64 + 64 + 64 * 10 + 10,
            64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10,
            64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10,
            64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10,
            64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10]
    heads = [grid.head(k) for k in range(7)]
    assert [sum(p.numel() for p in n.parameters()) for n in heads] == want
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in heads[6]) == 2
    assert [sum(w.numel() + b.numel() for w, b in grid.head_params(k)) for k in range(7)] == want
    assert grid(torch.rand(5, 64)).shape == (7, 5, 10)


def test_mlp_loss_is_mse_against_one_hot_summed_over_active_nets():
    torch.manual_seed(0)
    grid = MLPGrid(4, 3, [(), (5,)])
    z, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    onehot = torch.eye(3)[y]
    with torch.no_grad():
        per = [float(((grid.head(k)(z) - onehot) ** 2).mean()) for k in range(2)]
        assert float(grid.loss(z, y)) == pytest.approx(sum(per), rel=1e-6)
        assert float(grid.loss(z, y, [False, True])) == pytest.approx(per[1], rel=1e-6)


def test_stopped_heads_are_not_updated():
    torch.manual_seed(0)
    grid = MLPGrid(4, 3, [(), (5,), (2,)])  # heads 1 and 2 share a stacked weight
    opt = torch.optim.Adam(grid.parameters(), lr=0.1)
    z, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    opt.zero_grad()
    grid.loss(z, y).backward()
    opt.step()  # Adam moments exist for every head
    frozen = [t.clone() for wb in grid.head_params(1) for t in wb]
    moving = [t.clone() for wb in grid.head_params(2) for t in wb]
    grid.stop_head(opt, 1)
    for _ in range(3):
        opt.zero_grad()
        grid.loss(z, y, [True, False, True]).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in
               zip(frozen, [t for wb in grid.head_params(1) for t in wb], strict=True))
    assert not torch.equal(moving[0], grid.head_params(2)[0][0])
    # without stop_head, Adam's momentum would have kept moving head 1
    grid2 = MLPGrid(4, 3, [(), (5,), (2,)])
    opt2 = torch.optim.Adam(grid2.parameters(), lr=0.1)
    for active in ([True] * 3, [True, False, True]):
        opt2.zero_grad()
        grid2.loss(z, y, active).backward()
        before = grid2.head_params(1)[0][0].clone()
        opt2.step()
    assert not torch.equal(before, grid2.head_params(1)[0][0])


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
    snaps, stops = [], []
    for step, accs in enumerate(script):
        with torch.no_grad():
            for p in grid.parameters():
                p.add_(1.0)  # a visibly different state at every evaluation
        snaps.append([grid.head(k).state_dict() for k in range(3)])
        stops.append(sel.update(grid, torch.tensor(accs, dtype=torch.float64), step))
    assert sel.best_acc.tolist() == [0.6, 0.5, 0.7]
    assert sel.best_step.tolist() == [1, 0, 2]
    assert sel.active.tolist() == [False, False, False] and sel.done
    assert stops == [[], [], [1], [0], [2]]  # the heads that stop at each evaluation
    assert int(sel.improvements) == 3 + 1 + 1  # first evaluation, net 0 at 1, net 2 at 2
    for k, step in enumerate([1, 0, 2]):
        for name, v in sel.best.head(k).state_dict().items():
            assert torch.equal(v, snaps[step][k][name])
    assert select_best(sel.best_acc) == 2


def _seven_separate_nets(train, val, hidden, *, epochs, patience, batch_size, lr, seed):
    """The reference: one nn.Sequential and one Adam per net, each net stepped on its own and
    stopped on its own (after ``patience`` epochs without a strictly higher validation
    accuracy; a stopped net is not run again). Returns per-epoch mean summed losses, every
    net's final and best weights, best accuracy, best epoch and the epoch it stopped at."""
    (tz, ty), (vz, vy) = train, val
    torch.manual_seed(seed)  # fit_grid's initialisation: the nets in grid order
    nets = []
    for hs in hidden:
        layers, width = [], tz.shape[1]
        for h in hs:
            layers += [torch.nn.Linear(width, h), torch.nn.LeakyReLU()]
            width = h
        nets.append(torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)))
    opts = [torch.optim.Adam(n.parameters(), lr=lr) for n in nets]
    sampler = EpochSampler(len(tz), batch_size, seed, min_batch=2)
    spe, onehot = sampler.steps_per_epoch, torch.eye(10)
    best = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    best_acc, best_epoch, since = [-1.0] * 7, [-1] * 7, [0] * 7
    stopped_at: list[int | None] = [None] * 7
    losses = []
    for epoch in range(epochs):
        running = [k for k in range(len(nets)) if stopped_at[k] is None]
        if not running:
            break
        epoch_losses = []
        for step in range(epoch * spe, (epoch + 1) * spe):
            idx = sampler(step)
            total = 0.0
            for k in running:
                opts[k].zero_grad()
                loss = torch.mean((nets[k](tz[idx]) - onehot[ty[idx]]) ** 2)
                loss.backward()
                opts[k].step()
                total += float(loss.detach())
            epoch_losses.append(total)
        losses.append(sum(epoch_losses) / spe)
        with torch.no_grad():
            for k in running:
                acc = float((nets[k](vz).argmax(1) == vy).double().mean())
                if acc > best_acc[k]:
                    best[k] = {n: v.clone() for n, v in nets[k].state_dict().items()}
                    best_acc[k], best_epoch[k], since[k] = acc, epoch, 0
                else:
                    since[k] += 1
                    if since[k] >= patience:
                        stopped_at[k] = epoch
    return losses, nets, best, best_acc, best_epoch, stopped_at


def test_batched_heads_equal_seven_separate_nets(cpu_job, tmp_path):
    # noisy codes of 10 classes: with patience 1 some nets stop early, others run to the end
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(10, 16, generator=g)

    def draw(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return centres[y] + 1.5 * torch.randn(n, 16, generator=g), y

    train, val = draw(96), draw(48)
    args = {"epochs": 6, "patience": 1, "batch_size": 32, "lr": 3e-3, "seed": 5}
    losses, nets, best, best_acc, best_epoch, stopped = _seven_separate_nets(
        train, val, HIDDEN_GRID, **args)
    assert any(s is not None and s < 5 for s in stopped) and None in stopped  # both kinds
    selection, spe = fit_grid(cpu_job("autoencoder", "mlp"), train, val, HIDDEN_GRID,
                              workdir=tmp_path, **args)
    assert spe == 3
    assert selection.best_acc.tolist() == best_acc
    assert selection.best_step.tolist() == [(e + 1) * spe for e in best_epoch]
    assert selection.active.tolist() == [s is None for s in stopped]
    logged = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["loss"])
    np.testing.assert_allclose(logged["loss"].to_numpy(), losses, rtol=1e-6, atol=1e-7)
    final = MLPGrid(16, 10)
    final.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)
                          ["modules"]["grid"])
    for k in range(7):  # the last weights (frozen where a net stopped) and the best ones
        for a, b in zip(final.head(k).parameters(), nets[k].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for name, v in selection.best.head(k).state_dict().items():
            torch.testing.assert_close(v, best[k][name], rtol=0, atol=1e-6)


def test_padded_entries_stay_zero_and_a_step_is_one_batched_pass():
    torch.manual_seed(0)
    grid = MLPGrid(8, 10)
    # three groups (depths 0, 1, 2) padded to the widest head: 3 + 2 weights of 64 / 128
    assert [tuple(w.shape) for w in grid.weights[2]] == [(4, 128, 8), (4, 128, 128),
                                                         (4, 10, 128)]
    opt = torch.optim.Adam(grid.parameters(), lr=0.1)
    z, y = torch.rand(6, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    for _ in range(3):
        opt.zero_grad()
        grid.loss(z, y).backward()
        opt.step()
    w = grid.weights[2][0]  # head mlp[32,32] sits at row 0 of the depth-2 group
    assert w[0, 32:].abs().sum() == 0 and grid.weights[2][1][0, :, 32:].abs().sum() == 0
    assert grid.weights[2][1][0, 32:].abs().sum() == 0 and w[0, :32].abs().sum() > 0
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        grid.loss(z, y).backward()
    ops = fc.get_flop_counts()["Global"]
    # 6 layers (1 + 2 + 3) forward as baddbmm; backward as bmm: one op per layer, not per net
    assert ops[torch.ops.aten.baddbmm] > 0 and torch.ops.aten.addmm not in ops


# ----------------------------------------------------------------------------- the commands


def _argv(plan, stage, net, **paths):
    """The command line the rule writes (plan's config and settings, on the CPU); the mlp
    command also gets the encode stage's config, as the fit_mlps rule passes it."""
    arch = None if net == "pixel" else net.split("/")[0]
    config = {**plan.stage_config("autoencoder", stage, arch), "precision": "fp32"}
    folded = ("encode",) if stage == "mlp" else ()
    settings = {**plan.settings_param("autoencoder", stage, *folded).value, "threads": 1,
                "device": "cpu"}
    argv = ["--config", as_json(config), "--settings", as_json(settings)]
    if stage == "mlp":
        encode = {**plan.stage_config("autoencoder", "encode"), "precision": "fp32"}
        argv += ["--encode-config", as_json(encode)]
    for k, v in paths.items():
        argv += [f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return argv


def _fit(demo_plan, job, net="pixel", workdir="mlps", scores="scores.parquet", plan=None):
    root = job["root"]
    return cli.run("autoencoder", "mlp", [
        "--net", net, "--dataset", "svhn", "--run", "0",
        *_argv(plan or demo_plan, "mlp", net, model=root / "autoencoder.pt",
               prepared=[job["prepared"]], codes=root / "codes.npz", workdir=root / workdir,
               samples=root / f"{workdir}.parquet", scores=root / scores)])


@pytest.fixture(scope="module")
def pixel_job(tmp_path_factory, demo_plan, prepared):
    """The two commands of the rules for the pixel baseline on SVHN (demo config): train,
    then encode + fit the MLPs in one process; the images the encoder saw are recorded."""
    root = tmp_path_factory.mktemp("ae") / "pixel" / "svhn" / "run0"
    data = prepared("svhn")
    meta = cli.run("autoencoder", "train", [
        "--net", "pixel", "--dataset", "svhn", "--run", "0",
        *_argv(demo_plan, "train", "pixel", prepared=[data], workdir=root / "train",
               out=root / "autoencoder.pt")])
    encoded: list[int] = []
    orig = ConvAutoencoder.encode

    def counting_encode(self, x):
        encoded.append(x.shape[0])
        return orig(self, x)

    job = {"root": root, "meta": meta, "encoded": encoded, "prepared": data}
    ConvAutoencoder.encode = counting_encode
    try:
        job["scores"] = _fit(demo_plan, job)
    finally:
        ConvAutoencoder.encode = orig
    return job


def test_model_file_holds_what_encode_needs(pixel_job):
    ae, meta = bench.load_autoencoder(pixel_job["root"] / "autoencoder.pt")
    assert (meta["size"], meta["code_size"], meta["net"], meta["dataset"]) == (64, 64, "pixel",
                                                                              "svhn")
    # demo: 40 of the extra images, 32 / 8 split, batch 16 -> 2 steps, 1 epoch
    assert (meta["n_train"], meta["n_val"], meta["steps"], meta["epochs_run"]) == (32, 8, 2, 1)
    assert meta == pixel_job["meta"] and isinstance(ae, ConvAutoencoder) and not ae.training


def _edited(plan, section, **keys):
    """The plan of the same config with ``autoencoder.<section>`` keys changed."""
    config = json.loads(json.dumps(plan.config))
    config["autoencoder"][section] |= keys
    return Plan(config)


def test_codes_are_computed_once_and_reused_by_all_mlps(demo_plan, pixel_job, monkeypatch):
    root = pixel_job["root"]
    assert sum(pixel_job["encoded"]) == 100 + 50  # every drawn labelled image encoded once
    codes = root / "codes.npz"
    stamp, blob = codes.stat().st_mtime_ns, codes.read_bytes()

    def forbidden(*a, **k):
        raise AssertionError("the mlp command must not run the encoder")

    # an MLP key changed (the rule reruns): the codes of the same model are not encoded again
    other = _edited(demo_plan, "mlp", lr=0.01)
    with monkeypatch.context() as m:
        m.setattr(ConvAutoencoder, "encode", forbidden)
        _fit(demo_plan, pixel_job, workdir="mlps_lr", scores="scores_lr.parquet", plan=other)
    assert codes.stat().st_mtime_ns == stamp and codes.read_bytes() == blob
    per = pd.read_parquet(root / "mlps.parquet")
    assert len(per) == 7 and per["n_train"].eq(80).all() and per["n_test"].eq(50).all()
    # an encode key changed: encoded again, into the same file
    fewer = _edited(demo_plan, "encode", max_test_images=20)
    _fit(demo_plan, pixel_job, workdir="mlps_fewer", scores="scores_fewer.parquet", plan=fewer)
    with np.load(codes) as f:
        assert len(f["test_codes"]) == 20 and len(f["train_codes"]) == 100
    # and back: the demo's codes, bit for bit (encoding is deterministic)
    _fit(demo_plan, pixel_job)
    with np.load(codes) as f, np.load(io.BytesIO(blob)) as g:
        assert sorted(f.files) == sorted(g.files) == sorted([*bench.CODES, "key"])
        assert all(np.array_equal(f[k], g[k]) for k in f.files)


def test_codes_and_pixel_mse_by_hand(pixel_job):
    # the seeded draws of the labelled splits through the saved autoencoder, padded by NumPy
    root, data = pixel_job["root"], pixel_job["prepared"]
    ae, _ = bench.load_autoencoder(root / "autoencoder.pt")
    with np.load(root / "codes.npz") as f:
        codes = {k: f[k] for k in f.files}
    for split, n in (("train", 100), ("test", 50)):
        idx = bench.seeded_subset(len(np.load(data / f"{split}_images.npy")), n, seed=0)
        x = _padded(np.load(data / f"{split}_images.npy")[idx], 16)
        np.testing.assert_array_equal(codes[f"{split}_labels"],
                                      np.load(data / f"{split}_labels.npy")[idx])
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(codes[f"{split}_codes"]), ae.encode(x),
                                       rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        mse = float(((ae(x) - x) ** 2).mean())
    assert float(codes["test_pixel_mse"]) == pytest.approx(mse, rel=1e-5)


def _by_hand_accuracy(state: dict, k: int, hidden: list[int], z: np.ndarray, y: np.ndarray):
    """Net ``k`` of the selection's best weights, as matrix products and LeakyReLU(0.01)."""
    best = MLPGrid(z.shape[1], 10)
    best.load_state_dict({n[5:]: v for n, v in state.items() if n.startswith("best.")})
    h = torch.from_numpy(z)
    for i, (w, b) in enumerate(best.head_params(k)):
        assert w.shape == ((hidden + [10])[i], ([z.shape[1]] + hidden)[i])
        h = h @ w.T + b
        if i < len(hidden):
            h = torch.where(h > 0, h, 0.01 * h)
    return float((h.argmax(1).numpy() == y).mean())


def test_scores_follow_the_selection_rule(demo_plan, pixel_job):
    root = pixel_job["root"]
    if not (root / "scores.parquet").exists():
        _fit(demo_plan, pixel_job)
    df, per = pd.read_parquet(root / "scores.parquet"), pd.read_parquet(root / "mlps.parquet")
    best = df[(df.variant == "best-val-mlp") & (df.split == "test")]
    assert len(best) == 1 and best.metric.iloc[0] == "accuracy" and best.n.iloc[0] == 50
    k = int(np.argmax(per.val_accuracy.to_numpy()))  # argmax: the first of ties
    assert float(best.value.iloc[0]) == per.test_accuracy.iloc[k]
    assert per.selected.tolist() == [i == k for i in range(7)]
    assert set(df.variant) == {"best-val-mlp", "autoencoder", *per.mlp}
    assert len(df) == 3 + 2 * 7
    assert (df.arch == "").all() and (df.layer == "").all() and (df.weights_id == "none").all()
    assert (df.benchmark == "autoencoder").all() and (df.run == 0).all()
    pixel = df[df.metric == "pixel_mse"].value.iloc[0]
    assert pixel == float(np.load(root / "codes.npz")["test_pixel_mse"])
    # every net's test accuracy, recomputed from the codes and the kept best weights
    state = torch.load(root / "mlps" / "best.pt", weights_only=True)["modules"]["selection"]
    with np.load(root / "codes.npz") as f:
        z, y = f["test_codes"], f["test_labels"]
    for k, row in per.iterrows():
        got = _by_hand_accuracy(state, k, json.loads(row.hidden), z, y)
        assert got == pytest.approx(row.test_accuracy)
        assert df[(df.variant == row.mlp) & (df.split == "test")].value.iloc[0] == got


def test_loss_network_columns_come_from_the_net_and_the_job(demo_plan, pixel_job):
    df = _fit(demo_plan, pixel_job, net="alexnet/1", workdir="mlps_alexnet",
              scores="scores_alexnet.parquet")
    assert (df.arch == "alexnet").all() and (df.layer == "1").all()
    assert (df.weights_id == "random").all()  # the demo's weights
    # the same codes and seeds: the same numbers as the pixel job's fit
    again = _fit(demo_plan, pixel_job)  # resumes: the fit is already done
    cols = ["split", "variant", "metric", "value", "n"]
    pd.testing.assert_frame_equal(df[cols], again[cols])


def test_mlps_learn_separable_codes(cpu_job, tmp_path):
    # codes of four well separated classes: every MLP of the grid must learn them
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 64)).astype(np.float32)

    def draw(n):
        y = rng.integers(0, 4, n)
        return centres[y] + rng.normal(0, 0.5, (n, 64)).astype(np.float32), y.astype(np.int64)

    (trz, try_), (tez, tey) = draw(200), draw(100)
    save_npz(tmp_path / "codes.npz", {"train_codes": trz, "train_labels": try_,
                                      "test_codes": tez, "test_labels": tey,
                                      "test_pixel_mse": np.float64(0.1)})
    job = cpu_job("autoencoder", "mlp")
    config = {**job.config, "mlp": {**job.config["mlp"], "epochs": 8, "batch_size": 50,
                                    "lr": 1e-2}}
    df = bench.fit_mlps(job, config, "pixel", "svhn", 0, tmp_path / "codes.npz",
                        tmp_path / "mlps", tmp_path / "mlps.parquet", tmp_path / "s.parquet")
    best = df[(df.variant == "best-val-mlp") & (df.split == "test")].value.iloc[0]
    assert best > 0.9  # chance is 0.25


def test_bad_codes_and_models_fail_clearly(cpu_job, pixel_job, prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --model to encode first"):
        bench.read_codes(tmp_path / "codes.npz")
    save_npz(tmp_path / "codes.npz", {"train_codes": np.zeros((4, 64), np.float32)})
    with pytest.raises(ValueError, match="codes.npz.*delete it to encode again"):
        bench.read_codes(tmp_path / "codes.npz")
    job = cpu_job("autoencoder", "encode")
    args = {"prepared": {"svhn": prepared("svhn")}, "out": tmp_path / "c.npz"}
    with pytest.raises(ValueError, match="trained on 'svhn', not --dataset 'stl10'"):
        bench.encode(job, job.config, "stl10", pixel_job["root"] / "autoencoder.pt", **args)
    save_model(tmp_path / "other.pt", {"autoencoder": torch.nn.Linear(2, 2)}, {"net": "x"})
    with pytest.raises(ValueError, match="not an autoencoder model file"):
        bench.encode(job, job.config, "svhn", tmp_path / "other.pt", **args)
    assert not (tmp_path / "c.npz").exists()


def test_early_stopping_restores_the_best_epoch(cpu_job, prepared, tmp_path, monkeypatch):
    script = [0.5, 0.2, 0.3, 0.4, 0.1]  # val loss per epoch; patience 2 stops after epoch 4
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def scripted(out, x):
        if torch.is_grad_enabled():  # a training step: a real loss
            return torch.mean((out - x) ** 2)
        seen.append((x.clone(), out.clone()))
        return torch.tensor(script[len(seen) - 1])

    monkeypatch.setattr(bench, "reconstruction_loss", lambda *a, **k: (scripted, None))
    job = cpu_job("autoencoder", "train")
    config = {**job.config, "train": {**job.config["train"], "epochs": 5, "patience": 2,
                                      "batch_size": 16, "lr": 1e-2, "max_images": 20}}
    meta = bench.train(job, config, "pixel", "svhn", 0, {"svhn": prepared("svhn")},
                       tmp_path / "train", tmp_path / "ae.pt")
    assert len(seen) == 4 and meta["stop_reason"] == "early_stop"
    assert meta["best_epoch"] == 2 and meta["best_val_loss"] == pytest.approx(0.2)
    assert meta["epochs_run"] == 4 and meta["steps_per_epoch"] == 1  # 16 train images
    ae, _ = bench.load_autoencoder(tmp_path / "ae.pt")
    (x2, out2), (x4, out4) = seen[1], seen[3]
    with torch.no_grad():
        torch.testing.assert_close(ae(x2), out2)  # the weights of epoch 2, not of the last
        assert not torch.allclose(ae(x4), out4)
    # a rerun resumes (the fingerprint ignores the checkpoint interval): nothing retrains
    settings = {**job.settings, "train": {"checkpoint_every": 3}}
    again = bench.train(cpu_job("autoencoder", "train", **settings), config, "pixel", "svhn",
                        0, {"svhn": prepared("svhn")}, tmp_path / "train", tmp_path / "ae2.pt")
    assert again["stop_reason"] == "already_done" and len(seen) == 4
