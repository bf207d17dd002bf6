"""Road delineation: metrics on hand-made masks, the U-Net, tiled inference, data, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from workflow.benchmarks import delineation as bench
from workflow.metrics.delineation import delineation_scores, match_counts, scores_from_counts
from workflow.models.unet import RECEPTIVE_RADIUS, RefinementUNet, pad_to_multiple

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
    pred[0, 12, 0:10] = 1  # 10 px, 2 px off the road: matched; they cover ref columns 0..12
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


def test_relaxed_matches_scipy_distance_transform():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(3, 40, 50, generator=g)
    ref = (torch.rand(3, 40, 50, generator=g) > 0.97).float()
    for tol in (0, 1, 2, 3, 5):
        c = match_counts(pred, ref, threshold=0.9, tolerance=tol)
        for i in range(3):
            p, r = pred[i].numpy() >= 0.9, ref[i].numpy() > 0.5
            near_ref = ndimage.distance_transform_edt(~r) <= tol
            near_pred = ndimage.distance_transform_edt(~p) <= tol
            assert int(c["matched_pred"][i]) == int((p & near_ref).sum())
            assert int(c["matched_ref"][i]) == int((r & near_pred).sum())
            assert int(c["n_pred"][i]) == int(p.sum()) and int(c["n_ref"][i]) == int(r.sum())


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
    tiled = bench.predict_tiled(net, img, 3, tile=128, margin=48, batch=4)  # 3 x 2 tiles
    assert len(tiled) == 3
    for t, w in zip(tiled, whole, strict=True):
        assert t.shape == (1, 1, 170, 150)
        # equal up to float summation order (convolutions of different sizes)
        torch.testing.assert_close(t, w[:, :, :170, :150], atol=1e-5, rtol=0)
    # a margin below the receptive radius leaves seams: the check above is not vacuous
    rough = bench.predict_tiled(net, img, 1, tile=128, margin=16)
    assert float((rough[0] - whole[0][:, :, :170, :150]).abs().max()) > 10 * 1e-5


def test_tile_starts_cover_and_stay_on_grid():
    for size in (16, 96, 208, 1504):
        starts = bench._tile_starts(size, min(112, size), 48)
        assert all(s % 16 == 0 for s in starts)
        kept = [bench._kept(s, min(112, size), size, 48) for s in starts]
        covered = np.zeros(size, bool)
        for lo, hi in kept:
            covered[lo:hi] = True
        assert covered.all()


# ----------------------------------------------------------------------------- data


def make_roads(root: Path, sizes: dict[str, int], side: int = 48, seed: int = 0) -> Path:
    """Prepared road arrays in the documented format: roads are bright 3-px lines."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        maps = np.zeros((n, side, side), np.uint8)
        for i in range(n):
            for _ in range(2):
                c = rng.integers(2, side - 3)
                if rng.random() < 0.5:
                    maps[i, :, c - 1:c + 2] = 1
                else:
                    maps[i, c - 1:c + 2, :] = 1
        noise = rng.integers(0, 80, (n, side, side, 3))
        sat = (noise + 150 * maps[..., None]).clip(0, 255).astype(np.uint8)
        np.save(root / f"{split}_sat.npy", sat)
        np.save(root / f"{split}_map.npy", maps)
    (root / "manifest.json").write_text(json.dumps({"counts": sizes}))
    return root


def test_crop_sampler_matches_numpy_slicing(tmp_path):
    data = make_roads(tmp_path / "roads", {"train": 5}, side=40)
    sat, maps = bench.load_split(data, "train")
    idx, oy, ox = torch.tensor([4, 0, 2]), torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5])
    flip = torch.tensor([True, False, True])
    for on_device in (True, False):
        sampler = bench.CropSampler(sat, maps, 32, torch.device("cpu"), on_device)
        img, gt = sampler.gather(idx, oy, ox, flip)
        assert img.shape == (3, 3, 32, 32) and gt.shape == (3, 1, 32, 32)
        for k in range(3):
            i, y, x = int(idx[k]), int(oy[k]), int(ox[k])
            s, m = sat[i, y:y + 32, x:x + 32], maps[i, y:y + 32, x:x + 32]
            if flip[k]:
                s, m = s[:, ::-1], m[:, ::-1]
            np.testing.assert_array_equal((img[k].permute(1, 2, 0) * 255).round().byte().numpy(), s)
            np.testing.assert_array_equal(gt[k, 0].byte().numpy(), m)
    with pytest.raises(ValueError, match="crop_size"):
        bench.CropSampler(sat, maps, 48, torch.device("cpu"), True)


def test_epoch_plan_visits_every_tile_once_per_epoch():
    plan = bench.EpochPlan(11, 4, seed=0, device=torch.device("cpu"))
    assert plan.steps_per_epoch == 3
    for epoch in range(2):
        seen = torch.cat([plan.batch_indices(epoch * 3 + b) for b in range(3)])
        assert sorted(seen.tolist()) == list(range(11))
    again = bench.EpochPlan(11, 4, seed=0, device=torch.device("cpu"))
    assert torch.equal(again.batch_indices(4), plan.batch_indices(4))  # no hidden state


def test_bad_arrays_fail_clearly(tmp_path):
    root = tmp_path / "roads"
    root.mkdir()
    np.save(root / "train_sat.npy", np.zeros((2, 8, 8, 3), np.uint8))
    np.save(root / "train_map.npy", np.zeros((2, 8, 9), np.uint8))
    with pytest.raises(ValueError, match="train_map.npy"):
        bench.load_split(root, "train")
    with pytest.raises(FileNotFoundError, match="valid_sat.npy"):
        bench.load_split(root, "valid")


def test_rules_get_only_the_keys_they_depend_on(repo_root):
    import yaml

    section = yaml.safe_load((repo_root / "config.yaml").read_text())["delineation"]
    train, evaluate = bench.stage_config(section, "train"), bench.stage_config(section, "eval")
    assert "tolerance" not in train and "passes" not in train and "lossnets" not in train
    assert "lr" not in evaluate and "epochs" not in evaluate and "runs" not in evaluate
    assert {"threshold", "tile_size", "max_tiles"} <= train.keys() & evaluate.keys()
    bench.DelineationConfig.from_dict(train)
    bench.DelineationConfig.from_dict(evaluate)


def test_config_checks_name_the_key():
    with pytest.raises(ValueError, match="delineation.tile_margin"):
        bench.DelineationConfig.from_dict({"tile_size": 64, "tile_margin": 40})
    with pytest.raises(KeyError, match="unknown keys"):
        bench.DelineationConfig.from_dict({"epoch": 3})


# ----------------------------------------------------------------------------- end to end


TINY = {"epochs": 2, "batch_size": 4, "crop_size": 32, "tile_size": 112, "tile_margin": 48,
        "reference_size": 32, "inference_batch": 4, "tolerance": 2, "passes": [1, 2, 3]}
LOSSNET = {"arch": "alexnet", "weights": "random", "weights_dir": "unused", "seed": 0}
COMMON = {"device": "cpu", "precision": "auto"}


def _train(data: Path, workdir: Path, epochs: int) -> Path:
    out = workdir / "model.pt"
    argv = ["train", "--config", json.dumps({**TINY, "epochs": epochs}), "--lossnet",
            json.dumps(LOSSNET), "--layer", "1", "--common", json.dumps(COMMON), "--data",
            str(data), "--workdir", str(workdir), "--out", str(out), "--threads", "1"]
    assert bench.main(argv) == 0
    return out


def test_train_and_eval_end_to_end(tmp_path):
    data = make_roads(tmp_path / "roads", {"train": 6, "valid": 2, "test": 3}, side=48)
    model = _train(data, tmp_path / "run0", epochs=2)
    ckpt = torch.load(model, weights_only=True)
    assert ckpt["info"]["steps"] == 4 and ckpt["info"]["steps_per_epoch"] == 2
    tiles, scores = tmp_path / "tiles.parquet", tmp_path / "scores.parquet"
    argv = ["eval", "--config", json.dumps(TINY), "--lossnet", json.dumps(LOSSNET), "--layer", "1",
            "--common", json.dumps(COMMON), "--data", str(data), "--model", str(model),
            "--tiles", str(tiles), "--scores", str(scores), "--run", "0"]
    assert bench.main(argv) == 0
    s, t = pd.read_parquet(scores), pd.read_parquet(tiles)
    full = {f"K{k}/{m}" for k in (1, 2, 3) for m in ("exact", "relaxed")}
    assert set(s["variant"]) == full | {"reference/K1", "reference/K2", "reference/K3"}
    assert set(s["metric"]) == {"completeness", "correctness", "quality"}
    assert (s["benchmark"] == "delineation").all() and (s["arch"] == "alexnet").all()
    assert set(s.loc[s["variant"].str.startswith("K"), "split"]) == {"test"}
    assert (s.loc[s["variant"].str.startswith("K"), "n"] == 3).all()
    # summary = pooled per-tile counts, recomputed here by hand
    g = t[(t["protocol"] == "full") & (t["passes"] == 2) & (t["tolerance"] == 2)]
    tp_ref, n_ref = g["matched_ref"].sum(), g["n_ref"].sum()
    row = s[(s["variant"] == "K2/relaxed") & (s["metric"] == "completeness")]
    assert float(row["value"].iloc[0]) == pytest.approx(tp_ref / n_ref)
    # relaxed matching can only add matches
    ex = t[(t["protocol"] == "full") & (t["tolerance"] == 0)].set_index(["tile", "passes"])
    rx = t[(t["protocol"] == "full") & (t["tolerance"] == 2)].set_index(["tile", "passes"])
    assert (rx["matched_ref"] >= ex["matched_ref"]).all()


def test_resume_extends_training_bit_identically(tmp_path):
    data = make_roads(tmp_path / "roads", {"train": 5, "valid": 1}, side=48)
    _train(data, tmp_path / "a", epochs=1)
    _train(data, tmp_path / "a", epochs=2)  # resumes from last.pt after epoch 1
    _train(data, tmp_path / "b", epochs=2)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["modules"]["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["modules"]["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_too_small_crop_for_the_loss_network_fails_before_training():
    net, extractor = bench.build_lossnet({"arch": "alexnet", "weights": "random"}, "4", "imagenet")
    bench.check_crop_fits(extractor, net.taps, 32, torch.device("cpu"))
    with pytest.raises(ValueError, match="delineation.crop_size"):
        bench.check_crop_fits(extractor, net.taps, 16, torch.device("cpu"))
