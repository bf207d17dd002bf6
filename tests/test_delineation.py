"""Road delineation: metrics on hand-made masks, the U-Net and its tiled inference, the data
wiring, the stage split and config checks, and train + eval end to end through the CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from torch.nn import functional as F

from workflow.archs import LossNet
from workflow.benchmarks import delineation as bench
from workflow.datasets import roads
from workflow.datasets.bank import ImageBank, crop_grid
from workflow.metrics.delineation import delineation_scores, match_counts, scores_from_counts
from workflow.models.unet import (
    RECEPTIVE_RADIUS,
    RefinementUNet,
    kept_span,
    pad_to_multiple,
    predict_tiled,
    tile_starts,
)
from workflow.training import load_model

SIZES = {"train": 6, "valid": 2, "test": 3, "size": 48}  # synthetic roads, 48 px tiles
TINY = {"epochs": 2, "batch_size": 4, "crop_size": 32, "tile_margin": 48, "reference_size": 32,
        "tolerance": 2, "passes": [1, 2, 3]}
TINY_SETTINGS = {"tile_size": 112, "inference_batch": 4}  # one tile: 48 px fits in 112
NET = LossNet("squeezenet1_1", "1")  # quick to build (alexnet's random init takes a second)

# ----------------------------------------------------------------------------- metrics


def _masks(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, h, w), torch.zeros(1, h, w)


def test_exact_counts_hand_made():
    pred, ref = _masks(12, 12)
    ref[0, 0:10, 3] = 1  # a 10-px vertical road
    pred[0, 0:5, 3] = 0.9  # half of it found: TP = 5, FN = 5
    pred[0, 11, 9:12] = 0.5  # 3 false pixels far from the road: FP = 3
    s = delineation_scores(pred, ref, threshold=0.3, tolerance=0)
    assert s["completeness"] == pytest.approx(5 / 10)
    assert s["correctness"] == pytest.approx(5 / 8)
    assert s["quality"] == pytest.approx(5 / (5 + 3 + 5))


def test_road_shifted_by_two_pixels_is_relaxed_correct_not_exact():
    pred, ref = _masks(20, 20)
    ref[0, :, 5] = 1
    pred[0, :, 7] = 1  # the same road, 2 px to the right
    exact = delineation_scores(pred, ref, tolerance=0)
    assert exact == {"completeness": 0.0, "correctness": 0.0, "quality": 0.0}
    relaxed = delineation_scores(pred, ref, tolerance=3)
    assert relaxed == {"completeness": 1.0, "correctness": 1.0, "quality": 1.0}
    assert delineation_scores(pred, ref, tolerance=1)["quality"] == 0.0  # 2 px > 1 px buffer


def test_relaxed_partial_counts_by_hand():
    pred, ref = _masks(30, 30)
    ref[0, 10, 0:20] = 1  # 20 reference pixels
    pred[0, 12, 0:10] = 1  # 10 px, 2 px off the road: matched
    pred[0, 25, 0:5] = 1  # 5 px, 15 px off: false
    c = {k: int(v) for k, v in match_counts(pred, ref, tolerance=3).items()}
    # a predicted pixel (12, x) reaches reference (10, x') when 4 + (x - x')^2 <= 9: |x - x'| <= 2,
    # so predicted columns 0..9 cover reference columns 0..11
    assert c == {"n_pred": 15, "n_ref": 20, "matched_pred": 10, "matched_ref": 12}
    s = scores_from_counts(c)
    compl, corr = 12 / 20, 10 / 15
    assert s["completeness"] == pytest.approx(compl)
    assert s["correctness"] == pytest.approx(corr)
    assert s["quality"] == pytest.approx(1 / (1 / compl + 1 / corr - 1))


def test_buffer_is_a_euclidean_disk():
    pred, ref = _masks(15, 15)
    ref[0, 7, 7] = 1
    pred[0, 9, 9] = 1  # distance sqrt(8) = 2.83 <= 3: inside
    pred[0, 10, 10] = 1  # distance sqrt(18) = 4.24 > 3: outside (a square buffer would take it)
    pred[0, 7, 10] = 1  # distance 3: on the edge, inside
    c = match_counts(pred, ref, tolerance=3)
    assert int(c["matched_pred"]) == 2 and int(c["n_pred"]) == 3


def _scipy_counts(p: np.ndarray, r: np.ndarray, tol: int) -> dict[str, int]:
    """Counts of binary masks by Euclidean distance transforms (independent of the code)."""
    near_ref = ndimage.distance_transform_edt(~r) <= tol
    near_pred = ndimage.distance_transform_edt(~p) <= tol
    return {"n_pred": int(p.sum()), "n_ref": int(r.sum()),
            "matched_pred": int((p & near_ref).sum()), "matched_ref": int((r & near_pred).sum())}


def test_relaxed_matches_scipy_distance_transform():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(3, 40, 50, generator=g)
    ref = (torch.rand(3, 40, 50, generator=g) > 0.97).float()
    for tol in (0, 1, 2, 3, 5):
        c = match_counts(pred, ref, threshold=0.9, tolerance=tol)
        for i in range(3):
            want = _scipy_counts(pred[i].numpy() >= 0.9, ref[i].numpy() > 0.5, tol)
            assert {k: int(v[i]) for k, v in c.items()} == want


def test_threshold_is_inclusive_and_empty_sets_are_nan():
    pred, ref = _masks(4, 4)
    ref[0, 0, 0] = ref[0, 1, 1] = 1
    pred[0, 0, 0], pred[0, 1, 1] = 0.3, 0.2999
    c = match_counts(pred, ref, threshold=0.3)
    assert int(c["n_pred"]) == 1 and int(c["matched_ref"]) == 1
    empty = delineation_scores(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
    assert all(math.isnan(v) for v in empty.values())
    none_found = delineation_scores(torch.zeros(1, 4, 4), ref)
    assert none_found["completeness"] == 0.0 and math.isnan(none_found["correctness"])


# ----------------------------------------------------------------------------- U-Net


def _unet(seed: int = 0) -> RefinementUNet:
    torch.manual_seed(seed)
    net = RefinementUNet()
    for m in net.modules():  # non-trivial BatchNorm statistics, so eval mode is really tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_unet_shapes_and_channels():
    net = _unet()
    with torch.no_grad():
        out = net(torch.rand(2, 4, 64, 48))
    assert out.shape == (2, 1, 64, 48)
    assert float(out.min()) > 0 and float(out.max()) < 1
    torch.testing.assert_close(torch.sigmoid(net.logits(torch.ones(1, 4, 32, 32))),
                               net(torch.ones(1, 4, 32, 32)))
    channels = [m.out_channels for m in net.down.modules() if isinstance(m, torch.nn.Conv2d)]
    assert channels == [8, 16, 32, 32]
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.rand(1, 4, 40, 48))
    with pytest.raises(ValueError, match="RGB \\+ prediction"):
        net(torch.rand(1, 3, 32, 32))


def test_receptive_radius_bounds_the_gradient_support():
    net = _unet()
    centers = list(range(64, 80))  # every phase of the 16-px grid, one per batch element
    x = torch.rand(len(centers), 4, 160, 160, requires_grad=True)
    out = net.logits(x)
    sum(out[i, 0, c, c] for i, c in enumerate(centers)).backward()
    widest = 0
    for i, c in enumerate(centers):  # batch elements are independent in eval mode
        ys, xs = torch.nonzero(x.grad[i].abs().sum(0) > 0, as_tuple=True)
        widest = max(widest, int((ys - c).abs().max()), int((xs - c).abs().max()))
    assert widest == RECEPTIVE_RADIUS


def test_refine_feeds_back_the_previous_output():
    net = _unet()
    img = torch.rand(2, 3, 32, 32)
    outs = net.refine(img, 3)
    assert len(outs) == 3
    p1 = net(torch.cat([img, torch.zeros(2, 1, 32, 32)], 1))
    p2 = net(torch.cat([img, p1], 1))
    p3 = net(torch.cat([img, p2], 1))
    for got, want in zip(outs, [p1, p2, p3], strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(outs[0], outs[1])  # the fed-back map changes the output


# ----------------------------------------------------------------------------- tiled inference


def test_tiled_inference_equals_whole_image():
    net = _unet(3)
    img = torch.rand(1, 3, 170, 150)  # padded to 176 x 160: neither side a multiple of 16
    with torch.no_grad():
        whole = net.refine(pad_to_multiple(img), 3)
    tiled = predict_tiled(net, img, 3, tile=128, margin=48, batch=4)  # 3 x 2 tiles
    assert len(tiled) == 3
    for t, w in zip(tiled, whole, strict=True):
        assert t.shape == (1, 1, 170, 150)
        # equal up to float summation order (convolutions of different sizes)
        torch.testing.assert_close(t, w[:, :, :170, :150], atol=1e-5, rtol=0)
    # a margin below the receptive radius leaves seams: the check above is not vacuous
    rough = predict_tiled(net, img, 1, tile=128, margin=16, batch=8)
    assert float((rough[0] - whole[0][:, :, :170, :150]).abs().max()) > 10 * 1e-5


def test_tile_starts_cover_and_stay_on_grid():
    for size in (16, 96, 208, 1504):
        tile = min(112, size)
        starts = tile_starts(size, tile, 48)
        assert all(s % 16 == 0 for s in starts) and starts[-1] == size - tile
        covered = np.zeros(size, bool)
        for lo, hi in (kept_span(s, tile, size, 48) for s in starts):
            covered[lo:hi] = True
        assert covered.all()
    with pytest.raises(ValueError, match="less than half"):
        tile_starts(208, 96, 48)


# ----------------------------------------------------------------------------- data


def test_two_banks_one_grid_match_numpy_slicing(prepared):
    d = roads.load(prepared("roads", **SIZES), "train")
    idx, top, left = torch.tensor([4, 0, 2]), torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5])
    flips = torch.tensor([True, False, True])
    rows, cols = crop_grid(top, left, 32, flips)
    cpu = torch.device("cpu")
    for policy, share in (("always", 0.5), ("never", 0.5), ("never", 0.0)):  # device/host/disk
        sat, maps = ImageBank(d["sat"], cpu, policy, share), ImageBank(d["map"], cpu, policy, share)
        img, gt = sat.images(idx, rows, cols), maps.gather(idx, rows, cols)
        assert img.shape == (3, 3, 32, 32) and gt.shape == (3, 32, 32)
        for k in range(3):
            i, y, x = int(idx[k]), int(top[k]), int(left[k])
            s, m = d["sat"][i, y:y + 32, x:x + 32], d["map"][i, y:y + 32, x:x + 32]
            if flips[k]:
                s, m = s[:, ::-1], m[:, ::-1]
            np.testing.assert_array_equal((img[k].permute(1, 2, 0) * 255).round().byte().numpy(),
                                          s)
            np.testing.assert_array_equal(gt[k].numpy(), m)


def test_bad_arrays_fail_clearly(prepared, tmp_path):
    root = tmp_path / "roads"
    shutil.copytree(prepared("roads", **SIZES), root)
    np.save(root / "train_map.npy", np.zeros((2, 8, 9), np.uint8))
    with pytest.raises(ValueError, match="train_map.npy"):
        roads.load(root, "train")
    (root / "valid_sat.npy").unlink()
    with pytest.raises(FileNotFoundError, match="valid_sat.npy"):
        roads.load(root, "valid")


# ----------------------------------------------------------------------------- config


def test_rules_get_only_the_keys_they_depend_on(demo_plan):
    train = demo_plan.stage_config("delineation", "train", "alexnet")
    evaluate = demo_plan.stage_config("delineation", "eval", "alexnet")
    assert {"tolerance", "passes", "lossnets", "runs"}.isdisjoint(train)
    assert {"lr", "epochs", "runs", "seed", "weights"}.isdisjoint(evaluate)
    assert {"threshold", "tile_margin", "max_tiles"} <= train.keys() & evaluate.keys()
    assert train["max_tiles"].keys() == {"train", "valid"}
    assert evaluate["max_tiles"].keys() == {"test", "valid"}
    for stage in ("train", "eval"):  # results do not depend on the tiling: settings
        settings = demo_plan.stage_settings("delineation", stage)
        assert {"tile_size", "inference_batch"} <= settings.keys()
        assert "tile_size" not in demo_plan.stage_config("delineation", stage, "alexnet")


def test_config_checks_name_the_key(demo_plan, prepared, cpu_job, tmp_path):
    from workflow.plan import ConfigError, complete_config

    config = json.loads(json.dumps(demo_plan.config))
    config["delineation"]["tile_margin"] = 44  # off the 8-px grid (the schema says it)
    with pytest.raises(ConfigError, match="delineation.tile_margin"):
        complete_config(config)
    config["delineation"] |= {"tile_margin": 48, "crop_size": 40}
    with pytest.raises(ConfigError, match="delineation.crop_size"):
        complete_config(config)
    config["delineation"] |= {"crop_size": 48, "epoch": 3}  # a misspelt key
    with pytest.raises(ConfigError, match="'epoch' was unexpected"):
        complete_config(config)
    data = prepared("roads", **SIZES)
    cfg = demo_plan.stage_config("delineation", "train", "squeezenet1_1")
    tiles = {s: roads.load(data, s) for s in ("train", "valid")}
    net = "squeezenet1_1"  # small and quick to build; any loss network would do
    cases = [({"tile_margin": 48}, {"tile_size": 96}, "2", "delineation.tile_margin"),
             ({"crop_size": 64}, {}, "2", "delineation.crop_size"),  # > 48 px tiles
             ({"crop_size": 16}, {}, "4", "delineation.crop_size")]  # no features left
    for over, settings, layer, key in cases:
        job = cpu_job("delineation", "train", net, **settings)
        with pytest.raises(ValueError, match=key):
            bench.make_trainer(job, {**cfg, **over}, LossNet(net, layer), 0, tiles["train"],
                               tiles["valid"], tmp_path / "w")


# ----------------------------------------------------------------------------- end to end


def _cli(group_cmd: str, config: dict, settings: dict, **paths) -> object:
    from workflow.cli import run

    argv = ["--config", json.dumps(config), "--settings", json.dumps(settings)]
    for k, v in paths.items():
        argv += [f"--{k}", str(v)]
    return run("delineation", group_cmd, argv)


def _eval_config(demo_plan, **over):
    return {**demo_plan.stage_config("delineation", "eval", NET.arch), "precision": "fp32",
            **{k: v for k, v in TINY.items() if k in ("tile_margin", "reference_size",
                                                      "tolerance", "passes")}, **over}


def _settings(demo_plan, *stages):
    return {**demo_plan.settings_param("delineation", *stages).value,
            "threads": torch.get_num_threads(), **TINY_SETTINGS, "device": "cpu"}


def _train(demo_plan, data, workdir, eval_over=None, score=True, **over):
    """The rule's one process: train (resuming from ``workdir``), then score into
    ``workdir/tiles.parquet`` and ``workdir/scores.parquet`` (``score=False``: train only)."""
    cfg = {**demo_plan.stage_config("delineation", "train", NET.arch), "precision": "fp32",
           **{k: v for k, v in TINY.items() if k in ("epochs", "batch_size", "crop_size",
                                                     "tile_margin")}, **over}
    out = workdir / "model.pt"
    if not score:
        from workflow.job import Job

        job = Job.create(cfg, _settings(demo_plan, "train"))
        bench.train(job, cfg, NET.id, 0, {"roads": data}, workdir, out)
        return out
    _cli("train", cfg, _settings(demo_plan, "train", "eval"), net=NET.id, run=0,
         prepared=data, workdir=workdir, out=out, samples=workdir / "tiles.parquet",
         scores=workdir / "scores.parquet",
         **{"eval-config": json.dumps(_eval_config(demo_plan, **(eval_over or {})))})
    return out


def test_train_and_eval_end_to_end(demo_plan, prepared, tmp_path):
    data = prepared("roads", **SIZES)
    model = _train(demo_plan, data, tmp_path / "run0")
    net = RefinementUNet()
    meta = load_model(model, {"model": net})
    assert meta["steps"] == 4 and meta["steps_per_epoch"] == 2 and meta["train_tiles"] == 6
    assert meta["weights_id"] == "random" and meta["net"] == NET.id
    # the train command scored the model as the eval command does on its own
    samples, scores = tmp_path / "tiles.parquet", tmp_path / "scores.parquet"
    _cli("eval", _eval_config(demo_plan), _settings(demo_plan, "eval"), net=NET.id, run=0,
         model=model, prepared=data, samples=samples, scores=scores)
    cols = ["split", "variant", "metric", "value", "n", "config_hash", "weights_id"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run0" / "scores.parquet")[cols],
                                  pd.read_parquet(scores)[cols])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run0" / "tiles.parquet"),
                                  pd.read_parquet(samples))
    s, t = pd.read_parquet(scores), pd.read_parquet(samples)
    full = {f"K{k}/{m}" for k in (1, 2, 3) for m in ("exact", "relaxed")}
    assert set(s["variant"]) == full | {"reference/K1", "reference/K2", "reference/K3"}
    assert set(s["metric"]) == {"completeness", "correctness", "quality"}
    assert (s["benchmark"] == "delineation").all() and (s["arch"] == NET.arch).all()
    assert (s["weights_id"] == "random").all() and (s["wall_time_s"] > meta["train_wall_s"]).all()
    assert set(s.loc[s["variant"].str.startswith("K"), "split"]) == {"test"}
    assert (s.loc[s["variant"].str.startswith("K"), "n"] == 3).all()

    # per-tile counts, recomputed from whole-image inference (one tile covers the 48 px
    # tiles) with scipy's distance transform
    test = roads.load(data, "test")
    img = torch.from_numpy(np.array(test["sat"])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        preds = net.eval().refine(img, 3)
    full_rows = t[t["protocol"] == "full"].set_index(["tile", "passes", "tolerance"])
    for k in (1, 2, 3):
        for tol in (0, 2):
            for i in range(3):
                p, r = preds[k - 1][i, 0].numpy() >= 0.3, test["map"][i] > 0
                got = full_rows.loc[(i, k, tol), ["n_pred", "n_ref", "matched_pred",
                                                   "matched_ref"]].to_dict()
                assert got == _scipy_counts(p, r, tol)
    # the reference protocol: maps resampled like the images, road where >= 0.5
    maps = torch.from_numpy(np.array(roads.load(data, "valid")["map"]))[:, None].float()
    small = F.interpolate(maps, size=(32, 32), mode="bilinear", antialias=True) >= 0.5
    ref_rows = t[(t["protocol"] == "reference") & (t["passes"] == 1)].sort_values("tile")
    assert ref_rows["n_ref"].tolist() == small.sum((1, 2, 3)).tolist()
    # summaries pool the per-tile counts: exact quality TP / (TP + FP + FN), relaxed quality
    # from completeness and correctness
    for variant, k, tol in (("K2/exact", 2, 0), ("K3/relaxed", 3, 2)):
        g = t[(t["protocol"] == "full") & (t["passes"] == k) & (t["tolerance"] == tol)]
        compl = g["matched_ref"].sum() / g["n_ref"].sum()
        corr = g["matched_pred"].sum() / g["n_pred"].sum()
        row = s[s["variant"] == variant].set_index("metric")["value"]
        assert row["completeness"] == pytest.approx(compl)
        assert row["correctness"] == pytest.approx(corr)
        if tol == 0:
            tp = g["matched_ref"].sum()
            want = tp / (g["n_pred"].sum() + g["n_ref"].sum() - tp)
        else:
            want = compl * corr / (compl + corr - compl * corr)
        assert row["quality"] == pytest.approx(want)


def test_resume_extends_training_bit_identically(demo_plan, prepared, tmp_path):
    data = prepared("roads", **SIZES)
    _train(demo_plan, data, tmp_path / "a", score=False, epochs=1)
    _train(demo_plan, data, tmp_path / "a", score=False, epochs=2)  # resumes after epoch 1
    _train(demo_plan, data, tmp_path / "b", score=False, epochs=2)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in b["modules"]["model"]:
        assert torch.equal(a["modules"]["model"][k], b["modules"]["model"][k]), k


def test_an_eval_key_rescores_without_training(demo_plan, prepared, tmp_path, monkeypatch):
    """What the rule does when only an eval key changed: the trainer finds its checkpoint
    complete and trains no step; the same model is scored with the new key."""
    from workflow.training import Trainer

    data = prepared("roads", **SIZES)
    run = tmp_path / "run0"
    _train(demo_plan, data, run, epochs=1)
    weights = torch.load(run / "model.pt", weights_only=True)["modules"]["model"]
    (run / "model.pt").unlink()  # Snakemake removes a job's outputs before it reruns
    (run / "scores.parquet").unlink()

    def forbidden(*a, **k):
        raise AssertionError("an eval key must not train the U-Net")

    monkeypatch.setattr(Trainer, "train_step", forbidden)
    _train(demo_plan, data, run, eval_over={"tolerance": 1}, epochs=1)
    again = torch.load(run / "model.pt", weights_only=True)["modules"]["model"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    tiles = pd.read_parquet(run / "tiles.parquet")
    assert sorted(tiles.loc[tiles["protocol"] == "full", "tolerance"].unique()) == [0, 1]
    assert "K1/relaxed" in set(pd.read_parquet(run / "scores.parquet")["variant"])
