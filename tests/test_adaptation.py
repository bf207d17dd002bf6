"""Adaptation: ranking labels, rankings and triplet files (workflow/datasets/triplets.py), the
distorted images against torchvision, and the four commands end to end on synthetic SVHN,
STL-10 and BAPPS, with the baseline's scores recomputed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.functional as TF

from tests.training_helpers import assert_first_adam_step
from workflow import cli
from workflow.archs import LossNet
from workflow.benchmarks import adaptation as ada
from workflow.compare import Variant
from workflow.datasets import bapps, svhn
from workflow.datasets.bank import ImageBank
from workflow.datasets.triplets import (
    TripletError,
    build_triplet_file,
    distort_batch,
    load_rankings,
    make_rankings,
    read_triplet_files,
    split_indices,
    triplet_set,
)
from workflow.distortions import NAMES, positions, random_rankings, ranking_labels
from workflow.files import save_npz
from workflow.job import Job
from workflow.models.adapter import load_adapter

SIZES = {"svhn": {"train": 40, "test": 20, "extra": 1},
         "stl10": {"train": 1, "test": 12, "unlabeled": 1},
         "bapps": {"n_val": 4, "n_train": 1, "n_jnd": 4, "size": 64}}
SMALL = {"rankings": 2, "comparisons": ["spatial", "mean"], "batch_size": 8,
         "epochs_constant": 1, "epochs_decay": 1, "train_images": 16, "val_triplets": 6,
         "test_triplets": 10, "bapps_2afc_subsets": ["traditional", "cnn"],
         "bapps_jnd_subsets": ["traditional", "cnn"]}
NET = "alexnet/lpips"


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


def test_rankings_seeded_permutations(tmp_path):
    a, b = random_rankings(20, 0), random_rankings(20, 0)
    assert a == b and a != random_rankings(20, 1)
    assert all(sorted(r) == list(range(6)) for r in a)
    assert len({tuple(r) for r in a}) > 15
    data = ada.rankings({"rankings": 3, "ranking_seed": 0}, tmp_path / "rankings.json")
    assert data == make_rankings(3, 0)
    assert data["names"][0] == [NAMES[i] for i in data["rankings"][0]]
    assert load_rankings(tmp_path / "rankings.json") == a[:3]
    stale = {**data, "distortions": ["rotate", "blur"]}
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(TripletError, match="rerun the adaptation_rankings rule"):
        load_rankings(tmp_path / "stale.json")


def _triplet_config(demo_plan, **over):
    return {**demo_plan.stage_config("adaptation", "triplets"), **over}


def test_triplet_file_split_and_caps(demo_plan):
    cfg = _triplet_config(demo_plan, train_images=50, val_triplets=10, test_triplets=7)
    arr = build_triplet_file("svhn", 200, 30, cfg)
    assert str(arr["dataset"]) == "svhn"
    assert (len(arr["train_index"]), len(arr["val_index"]), len(arr["test_index"])) == (50, 10, 7)
    assert not set(arr["train_index"]) & set(arr["val_index"])  # disjoint split
    assert np.all(arr["val_d0"] != arr["val_d1"]) and np.all(arr["test_d0"] != arr["test_d1"])
    train, val = split_indices(200, 0.2, 0)
    assert len(val) == 40 and len(train) == 160 and set(arr["val_index"]) <= set(val)
    assert set(arr["train_index"]) <= set(train) and set(arr["test_index"]) <= set(range(30))
    again = build_triplet_file("svhn", 200, 30, cfg)
    assert all(np.array_equal(arr[k], again[k]) for k in arr)
    # each dataset draws from its own generator; STL-10 has no training split
    stl = build_triplet_file("stl10", None, 30, cfg)
    assert set(stl) == {"dataset", *(f"test_{k}" for k in ("index", "d0", "d1", "p0", "p1"))}
    assert not np.array_equal(stl["test_d0"], arr["test_d0"])
    full = build_triplet_file("stl10", None, 30, {**cfg, "test_triplets": None})
    assert np.array_equal(full["test_index"], np.arange(30))
    with pytest.raises(ValueError, match="adaptation.val_fraction"):
        split_indices(10, 1.0, 0)


def test_triplet_files_by_dataset(tmp_path, demo_plan):
    cfg = _triplet_config(demo_plan)
    paths = []
    for name, n_train in (("stl10", None), ("svhn", 40)):
        paths.append(save_npz(tmp_path / f"{name}.npz", build_triplet_file(name, n_train, 12, cfg)))
    files = read_triplet_files(paths)  # any order: each file names its dataset
    assert set(files) == {"svhn", "stl10"} and "val_index" in files["svhn"]
    assert set(triplet_set(files["svhn"], "val")) == {"index", "d0", "d1", "p0", "p1"}
    with pytest.raises(TripletError, match="no 'val' set"):
        triplet_set(files["stl10"], "val")
    with pytest.raises(TripletError, match="no triplet file of bapps"):
        files["bapps"]
    with pytest.raises(TripletError, match="two triplet files of svhn"):
        read_triplet_files([paths[1], paths[1]])
    old = dict(np.load(paths[0]))
    del old["dataset"]
    save_npz(tmp_path / "old.npz", old)
    with pytest.raises(TripletError, match="rerun the adaptation_triplets rule"):
        read_triplet_files([tmp_path / "old.npz"])


def test_distort_batch_against_torchvision(prepared):
    images = svhn.load(prepared("svhn", **SIZES["svhn"]), "test")["images"]
    bank = ImageBank(images, torch.device("cpu"))
    darken, blur = NAMES.index("darken"), NAMES.index("blur")
    trip = {"index": torch.tensor([3, 0, 7]), "d0": torch.tensor([darken] * 3),
            "d1": torch.tensor([blur] * 3), "p0": torch.tensor([[0.3, 0], [0.1, 0], [0.5, 0]]),
            "p1": torch.tensor([[4.0, 0], [6.5, 0], [10.0, 0]])}
    ref, p0, p1 = distort_batch(bank, trip, slice(None), 64)
    assert ref.shape == p0.shape == p1.shape == (3, 3, 64, 64)
    for b, i in enumerate([3, 0, 7]):
        src = torch.from_numpy(np.array(images[i])).permute(2, 0, 1).float() / 255
        want = TF.resize(src, [64, 64], antialias=True).clamp(0, 1)
        torch.testing.assert_close(ref[b], want)
        torch.testing.assert_close(p0[b], (want * float(trip["p0"][b, 0])).clamp(0, 1))
        s = float(trip["p1"][b, 0])
        torch.testing.assert_close(p1[b], TF.gaussian_blur(want, [11, 21], [s, s]),
                                   atol=1e-5, rtol=0)
    # a slice takes the same triplets as the whole set
    sub = distort_batch(bank, trip, slice(1, 3), 64)
    assert torch.equal(sub[2], p1[1:3])


# ----------------------------------------------------------------------------- end to end


def _settings(demo_plan, stage):
    return {**demo_plan.stage_settings("adaptation", stage),
            "threads": torch.get_num_threads(), "device": "cpu"}


def _cmd(cmd, **args):
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", *(map(str, v) if isinstance(v, list) else
                             [json.dumps(v) if isinstance(v, dict) else str(v)])]
    return cli.run("adaptation", cmd, argv)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prepared, demo_plan):
    """rankings -> triplets (SVHN, STL-10) -> train run 0 -> evaluate baseline and run 0,
    through the command table, on the demo config made small."""
    root = tmp_path_factory.mktemp("adaptation")
    data = {d: prepared(d, **SIZES[d]) for d in ("svhn", "stl10", "bapps")}
    stage = {s: {**demo_plan.stage_config("adaptation", s, "alexnet"), "precision": "fp32"}
             for s in ("rankings", "triplets", "train", "evaluate")}
    for s in stage.values():
        s.update({k: v for k, v in SMALL.items() if k in s})
    rk = root / "rankings.json"
    _cmd("rankings", config=stage["rankings"], out=rk)
    trips = {}
    for d in ("stl10", "svhn"):
        trips[d] = root / f"{d}.npz"
        _cmd("triplets", config=stage["triplets"], prepared=[data[d]], out=trips[d])
    model = root / "run0" / "adapter.pt"
    _cmd("train", config=stage["train"], settings=_settings(demo_plan, "train"), net=NET,
         run=0, rankings=rk, triplets=[trips["svhn"]], prepared=[data["svhn"] / "manifest.json"],
         workdir=root / "run0" / "train", out=model)
    evals = {"config": stage["evaluate"], "settings": _settings(demo_plan, "evaluate"),
             "net": NET, "rankings": rk, "triplets": [trips["stl10"], trips["svhn"]],
             "prepared": list(data.values())}
    _cmd("evaluate", **evals, scores=root / "baseline.parquet")
    _cmd("evaluate", **evals, run=0, model=model, scores=root / "scores.parquet")
    return {"root": root, "data": data, "trips": trips, "rankings": rk, "model": model,
            "stage": stage, "evals": evals}


def test_train_writes_the_adapter(pipeline):
    adapter, meta = load_adapter(pipeline["model"], torch.device("cpu"))
    assert meta["steps"] == 2 * math.ceil(16 / 8)  # 16 training images, 1 + 1 epochs
    assert meta["net"] == NET and meta["run"] == 0 and adapter.rankings == [0, 1]
    weights = list(adapter.channel_weights.values())
    assert all(float(p.detach().min()) >= 0 for p in weights)
    assert any(float((p.detach() - 1).abs().max()) > 0 for p in weights)  # it trained
    log = pd.read_csv(pipeline["root"] / "run0" / "train" / "metrics.csv")
    assert log["eval_val_2afc_mean"].dropna().between(0, 1).all()


def test_scores_tables(pipeline):
    for name, variant, run in (("baseline", "baseline", None), ("scores", "adapted", 0)):
        df = pd.read_parquet(pipeline["root"] / f"{name}.parquet")
        assert set(df["variant"]) == {variant} and set(df["benchmark"]) == {"adaptation"}
        trip = df[~df["dataset"].str.startswith("bapps")]
        # 2 comparisons x 2 rankings x (svhn test, svhn val, stl10 test)
        assert len(trip) == 12 and set(trip["ranking"]) == {0, 1}
        assert set(zip(trip["dataset"], trip["split"], strict=True)) == {
            ("svhn", "test"), ("svhn", "val"), ("stl10", "test")}
        assert set(trip.loc[trip["split"] == "val", "n"]) == {6}
        assert df["value"].between(0, 1).all()
        assert df["run"].isna().all() if run is None else set(df["run"]) == {run}
        b = df[df["dataset"].str.startswith("bapps")]
        per_metric = 2 + 1 + 2 + 1  # 2AFC subsets + mean, JND subsets + pooled
        assert len(b) == 2 * (1 if run is None else 2) * per_metric
        assert b["ranking"].isna().all() if run is None else set(b["ranking"]) == {0, 1}
        mean = b[b["split"] == "mean"]
        assert set(mean["n"]) == {8}  # the triplets of both subsets
        assert set(b.loc[b["split"] == "pooled", "n"]) == {8}


def _hand_distance(extractor, x, y):
    """Channel-normalised spatial distance by hand: unit channel vectors at every position,
    squared differences averaged over positions, summed over channels and taps."""
    with torch.no_grad():
        fx, fy = extractor(x), extractor(y)
    total = 0
    for t in fx:
        a = fx[t] / (fx[t].pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = fy[t] / (fy[t].pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + (a - b).pow(2).mean((2, 3)).sum(1)
    return total


def _hand_2afc(d0, d1, judge):
    return float(((d0 < d1).double() * (1 - judge) + (d1 < d0).double() * judge
                  + 0.5 * (d0 == d1).double()).mean())


def test_baseline_scores_by_hand(pipeline):
    df = pd.read_parquet(pipeline["root"] / "baseline.parquet")
    spatial = df[(df["comparison"] == "spatial")]
    job = Job.create(pipeline["stage"]["evaluate"], pipeline["evals"]["settings"])
    extractor = job.extractor(LossNet.parse(NET), "imagenet")
    # SVHN test triplets under both rankings
    files = read_triplet_files([pipeline["trips"]["svhn"]])
    trip = triplet_set(files["svhn"], "test")
    bank = ImageBank(svhn.load(pipeline["data"]["svhn"], "test")["images"], job.device)
    ref, x0, x1 = distort_batch(bank, trip, slice(None), 64)
    d0, d1 = _hand_distance(extractor, ref, x0), _hand_distance(extractor, ref, x1)
    labels = ranking_labels(trip["d0"], trip["d1"], positions(load_rankings(
        pipeline["rankings"])))
    for r in (0, 1):
        row = spatial[(spatial["dataset"] == "svhn") & (spatial["split"] == "test")
                      & (spatial["ranking"] == r)]
        assert float(row["value"].iloc[0]) == pytest.approx(_hand_2afc(d0, d1, labels[:, r]))
    # BAPPS 2AFC of one subset (its images are 64 px already)
    a = bapps.load(pipeline["data"]["bapps"], "2afc", "val", "cnn")
    img = {k: torch.from_numpy(np.array(a[k])).permute(0, 3, 1, 2).float() / 255
           for k in ("ref", "p0", "p1")}
    judge = torch.from_numpy(np.array(a["judge"])).double()
    want = _hand_2afc(_hand_distance(extractor, img["ref"], img["p0"]),
                      _hand_distance(extractor, img["ref"], img["p1"]), judge)
    row = spatial[(spatial["dataset"] == "bapps-2afc") & (spatial["split"] == "cnn")]
    assert float(row["value"].iloc[0]) == pytest.approx(want)


def test_bad_inputs_name_the_fix(pipeline, prepared, tmp_path):
    with pytest.raises(ada.AdaptationError, match="one prepared folder of svhn or stl10"):
        ada.triplets(pipeline["stage"]["triplets"], {"bapps": pipeline["data"]["bapps"]},
                     tmp_path / "x.npz")
    evals = dict(pipeline["evals"])
    small = prepared("svhn", train=10, test=5, extra=1)  # fewer images than the triplets index
    evals["prepared"] = [small, pipeline["data"]["stl10"], pipeline["data"]["bapps"]]
    with pytest.raises(ada.AdaptationError, match="rerun the adaptation_triplets rule"):
        _cmd("evaluate", **evals, scores=tmp_path / "s.parquet")
    rk3 = tmp_path / "rankings3.json"
    ada.rankings({"rankings": 3, "ranking_seed": 0}, rk3)
    evals = {**pipeline["evals"], "rankings": rk3}
    with pytest.raises(ada.AdaptationError, match="rerun adaptation_train"):
        _cmd("evaluate", **evals, run=0, model=pipeline["model"], scores=tmp_path / "s.parquet")
    evals = {**pipeline["evals"], "triplets": [pipeline["trips"]["svhn"]]}
    evals["config"] = {**evals["config"], "eval_datasets": ["stl10", "svhn"]}  # fail at once
    with pytest.raises(TripletError, match="no triplet file of stl10"):
        _cmd("evaluate", **evals, scores=tmp_path / "s.parquet")


# ----------------------------------------------------------------------------- the adapted net


def _hand_logits(layers, d0, d1):
    """G by plain ops: [d0, d1, d0-d1, d0/(d1+.1), d1/(d0+.1)] -> 32 -> 32 -> 1, LeakyReLU 0.2."""
    x = torch.stack([d0, d1, d0 - d1, d0 / (d1 + 0.1), d1 / (d0 + 0.1)], dim=1)
    for j, (w, b) in enumerate(layers):
        x = x @ w + b
        if j < len(layers) - 1:
            x = torch.where(x > 0, x, 0.2 * x)
    return x[:, 0]


def _bce(logits, y):
    p = torch.sigmoid(logits)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


@pytest.fixture(scope="module")
def adapted_net(pipeline, demo_plan):
    """One adapted net (spatial, channel norm, ranking 1) trained for one step (16 training
    images, batch 16, 1 + 0 epochs, no dropout), then scored."""
    cfg = {**demo_plan.stage_config("adaptation", "train_net", "alexnet"), "precision": "fp32",
           "batch_size": 16, "epochs_constant": 1, "epochs_decay": 0, "dropout": 0.0}
    root = pipeline["root"] / "net"
    model = root / "adapter.pt"
    meta = _cmd("train_net", config=cfg, settings=_settings(demo_plan, "train_net"), net=NET,
                run=0, comparison="spatial", **{"channel-norm": "true"}, ranking=1,
                rankings=pipeline["rankings"], triplets=[pipeline["trips"]["svhn"]],
                prepared=[pipeline["data"]["svhn"]], workdir=root / "train", out=model)
    evals = {**pipeline["evals"], "config": {
        **demo_plan.stage_config("adaptation", "evaluate_net", "alexnet"), "precision": "fp32",
        **{k: v for k, v in SMALL.items() if k.startswith("bapps_")}}}
    scores = _cmd("evaluate_net", **evals, run=0, model=model, scores=root / "scores.parquet")
    return {"cfg": cfg, "model": model, "meta": meta, "scores": scores}


def test_adapted_net_step_by_hand(pipeline, adapted_net):
    """The adapted net's one step against plain ops: the starting backbone (random weights,
    lossnets.seed), the same triplets (sampler and generator of the run's seed), channel
    weights 1, BCE(G) + sync_weight * BCE(sigmoid(d0 - d1)) while the batch 2AFC <= 0.5;
    one Adam step: the backbone at adapt_net.lr, G at lr (first step lr * g / (|g| + eps));
    the file's backbone and G equal it, the channel weights are still exactly 1."""
    from workflow.datasets.bank import EpochSampler
    from workflow.distortions import draw_pairs, sample_params
    from workflow.lossnets import build_extractor
    from workflow.models.adapter import FusedAdapter, tap_channels
    from workflow.models.backbone import TrainableBackbone

    cfg, meta = adapted_net["cfg"], adapted_net["meta"]
    assert meta["steps"] == 1 and meta["variant"] == "adapted_net" and meta["ranking"] == 1
    seed, r = int(cfg["seed"]), 1
    files = read_triplet_files([pipeline["trips"]["svhn"]])
    train_idx = torch.from_numpy(files["svhn"]["train_index"])
    idx = EpochSampler(train_idx, 16, seed, torch.device("cpu"), seed_stride=ada.SEED_STRIDE)(0)
    gen = torch.Generator().manual_seed(seed)
    d0i, d1i = draw_pairs(16, gen, torch.device("cpu"))
    trip = {"index": idx, "d0": d0i, "d1": d1i, "p0": sample_params(d0i, gen),
            "p1": sample_params(d1i, gen)}
    bank = ImageBank(svhn.load(pipeline["data"]["svhn"], "train")["images"], torch.device("cpu"))
    ref, x0, x1 = distort_batch(bank, trip, slice(None), 64)
    y = ranking_labels(d0i, d1i, positions(load_rankings(pipeline["rankings"])))[:, r]

    net = LossNet.parse(NET)
    ext = build_extractor("alexnet", lossnets=[net], weights="random", seed=cfg["weights_seed"])
    start = {k: v.clone() for k, v in ext.state_dict().items()}
    g0 = FusedAdapter(tap_channels(ext, 64, torch.device("cpu")),
                      [Variant("spatial", True)], [r], seed=seed, dropout=0.0)
    bparams = dict(ext.named_parameters())
    for p in bparams.values():
        p.requires_grad_(True)
    layers = [(a[0].detach().clone().requires_grad_(), b[0].detach().clone().requires_grad_())
              for a, b in zip(g0.rank_net.weights, g0.rank_net.biases, strict=True)]
    fr, f0, f1 = ext(ref), ext(x0), ext(x1)

    def dist(fx, fy):
        total = 0
        for t in fx:
            a = fx[t] / (fx[t].pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = fy[t] / (fy[t].pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (a - b).pow(2).mean((2, 3)).sum(1)
        return total

    d0, d1 = dist(f0, fr), dist(f1, fr)
    acc = _hand_2afc(d0.detach(), d1.detach(), y)
    loss = _bce(_hand_logits(layers, d0, d1), y)
    if acc <= 0.5:
        loss = loss + float(cfg["sync_weight"]) * _bce(d0 - d1, y)
    names = list(bparams)
    params = [*bparams.values(), *[x for pair in layers for x in pair]]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    lrs = [float(cfg["adapt_net"]["lr"])] * len(names) + [float(cfg["lr"])] * (len(params)
                                                                               - len(names))
    eps = 1e-8
    stepped = [(x - lr * g / (g.abs() + eps)).detach() if g is not None else x.detach()
               for x, g, lr in zip(params, grads, lrs, strict=True)]

    fresh = TrainableBackbone(build_extractor("alexnet", lossnets=[net], weights="random",
                                              seed=123), train_mode=False)
    adapter, _ = load_adapter(adapted_net["model"], torch.device("cpu"),
                              lambda _m: {"backbone": fresh})
    checked = []
    for i, n in enumerate(names):
        have = fresh.net.state_dict()[n]
        checked.append(assert_first_adam_step(have, stepped[i], grads[i], lrs[i], eps, n))
        assert not torch.equal(have, start[n])
    assert float(torch.stack(checked).mean()) > 0.8
    got = [x for pair in zip(adapter.rank_net.weights, adapter.rank_net.biases, strict=True)
           for x in pair]
    for k, (have, want) in enumerate(zip(got, stepped[len(names):], strict=True)):
        j = len(names) + k
        assert_first_adam_step(have[0].detach(), want, grads[j], lrs[j], eps, f"rank net {k}")
    assert all(torch.equal(w, torch.ones_like(w)) for w in adapter.channel_weights.values())


def test_adapted_net_scores(pipeline, adapted_net):
    """Rows of variant adapted_net for its one ranking, on every set the adapted runs are
    scored on; the SVHN test 2AFC recomputed by hand with the file's backbone."""
    from workflow.lossnets import build_extractor
    from workflow.models.backbone import TrainableBackbone

    df = adapted_net["scores"]
    assert set(df["variant"]) == {"adapted_net"} and set(df["ranking"]) == {1}
    assert set(df["run"]) == {0} and set(df["comparison"]) == {"spatial"}
    assert set(zip(df["dataset"], df["split"], strict=True)) == {
        ("svhn", "test"), ("svhn", "val"), ("stl10", "test"), ("bapps-2afc", "traditional"),
        ("bapps-2afc", "cnn"), ("bapps-2afc", "mean"), ("bapps-jnd", "traditional"),
        ("bapps-jnd", "cnn"), ("bapps-jnd", "pooled")}
    fresh = TrainableBackbone(build_extractor("alexnet", lossnets=[LossNet.parse(NET)],
                                              weights="random", seed=7), train_mode=False)
    load_adapter(adapted_net["model"], torch.device("cpu"), lambda _m: {"backbone": fresh})
    trip = triplet_set(read_triplet_files([pipeline["trips"]["svhn"]])["svhn"], "test")
    bank = ImageBank(svhn.load(pipeline["data"]["svhn"], "test")["images"], torch.device("cpu"))
    ref, x0, x1 = distort_batch(bank, trip, slice(None), 64)
    labels = ranking_labels(trip["d0"], trip["d1"], positions(load_rankings(
        pipeline["rankings"])))
    want = _hand_2afc(_hand_distance(fresh, ref, x0), _hand_distance(fresh, ref, x1),
                      labels[:, 1])
    row = df[(df["dataset"] == "svhn") & (df["split"] == "test")]
    assert float(row["value"].iloc[0]) == pytest.approx(want)
    # another network's or a channel-weight file is refused, naming the rule
    with pytest.raises(ada.AdaptationError, match="not an adapted net.*adaptation_train_net"):
        _cmd("evaluate_net", **pipeline["evals"], run=0, model=pipeline["model"],
             scores=pipeline["root"] / "x.parquet")


def test_adapt_net_jobs():
    from workflow.plan import Plan, load_config

    root = Path(__file__).resolve().parents[1]
    assert Plan(load_config(root / "config.yaml")).adapt_net_jobs() == []
    plan = Plan(load_config(root / "config.yaml", overrides={"adaptation": {
        "lossnets": ["alexnet/lpips"], "runs": 2, "rankings": 3, "channel_norm": [True, False],
        "adapt_net": {"enabled": True, "rankings": 2, "comparisons": ["spatial", "sort"]}}}))
    jobs = plan.adapt_net_jobs()
    assert len(jobs) == 2 * 2 * 2 * 2  # runs x comparisons x channel_norm x rankings
    assert jobs[0] == {"arch": "alexnet", "layer": "lpips", "run": 0, "comparison": "spatial",
                       "norm": "norm", "ranking": 0}
    assert {j["ranking"] for j in jobs} == {0, 1} and {j["norm"] for j in jobs} == {"norm", "raw"}
    cfg = plan.stage_config("adaptation", "train_net", "alexnet")
    assert cfg["adapt_net"] == {"lr": 1e-4} and "comparisons" not in cfg
