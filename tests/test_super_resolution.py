"""Super-resolution: image metrics vs scikit-image, the network, the training batches, and the
train / eval commands end to end on the synthetic COCO and test sets."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tests.training_helpers import kill_at
from workflow import cli
from workflow.benchmarks import super_resolution as sr
from workflow.benchmarks import super_resolution_fused as srf
from workflow.datasets.arrays import CorruptFileError
from workflow.datasets.bank import EpochSampler, ImageBank
from workflow.imaging import crop_to_multiple, degrade, quantize, reference_target, to_float
from workflow.lossnets import feature_loss as sr_feature_loss
from workflow.metrics.image import psnr, rgb_to_y, shave, ssim
from workflow.models.srnet import SRNet
from workflow.results import SCORE_COLUMNS
from workflow.training import load_model

CPU = torch.device("cpu")


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).double().numpy()


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("shape", [(3, 40, 53), (1, 24, 31)])
def test_psnr_ssim_match_skimage(shape):
    rng = np.random.default_rng(1)
    x = rng.random((2, *shape))
    y = np.clip(x + 0.08 * rng.standard_normal(x.shape), 0, 1)
    got_p = psnr(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    got_s = ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for i in range(2):
        exp_p = peak_signal_noise_ratio(x[i], y[i], data_range=1)
        exp_s = structural_similarity(x[i], y[i], channel_axis=0, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=1)
        assert got_p[i] == pytest.approx(exp_p, abs=1e-4)
        assert got_s[i] == pytest.approx(exp_s, abs=1e-4)


def test_y_channel_and_shave_match_skimage():
    rng = np.random.default_rng(2)
    x = rng.random((30, 34, 3))
    y = rgb_to_y(_nchw(x))[0, 0].numpy()
    np.testing.assert_allclose(y * 255, rgb2ycbcr(x)[..., 0], atol=1e-6)
    assert shave(_nchw(x), 4).shape[-2:] == (22, 26)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    assert torch.isinf(psnr(x, x)).all()
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("scale", [4, 8])
def test_srnet_shapes_and_range(scale):
    net = SRNet(scale).eval()
    n_up = sum(isinstance(m, torch.nn.Upsample) for m in net.modules())
    assert n_up == {4: 2, 8: 3}[scale]
    assert not any(isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0) for m in net.modules())
    with torch.no_grad():
        y = net(torch.rand(2, 3, 9, 7))
    assert y.shape == (2, 3, 9 * scale, 7 * scale)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_srnet_rejects_other_scales():
    with pytest.raises(ValueError, match="power of two"):
        SRNet(3)


# ----------------------------------------------------------------------------- batches


def _labelled(n: int, side: int) -> np.ndarray:
    """Image i has the value i in channel 0 and position codes in channels 1 and 2."""
    a = np.zeros((n, side, side, 3), np.uint8)
    a[..., 0] = np.arange(n)[:, None, None]
    a[..., 1] = np.arange(side)[None, :, None]  # row
    a[..., 2] = np.arange(side)[None, None, :]  # column
    return a


def test_train_batches_cover_each_epoch_once():
    bank = ImageBank(_labelled(12, 4), CPU)
    batch = sr.train_batches(bank, EpochSampler(12, 4, seed=0, device=CPU), crop=None)
    ids = [batch(s)[:, 0, 0, 0].mul(255).round().long() for s in range(6)]  # 2 epochs
    first, second = torch.cat(ids[:3]).tolist(), torch.cat(ids[3:]).tolist()
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
    assert first != second  # reshuffled per epoch
    # the order is the study's: randperm seeded seed * 1_000_003 + epoch
    g = torch.Generator().manual_seed(1 * 1_000_003 + 1)
    batch1 = sr.train_batches(bank, EpochSampler(12, 4, seed=1, device=CPU), crop=None)
    want = torch.randperm(12, generator=g)[:4].tolist()
    assert batch1(3)[:, 0, 0, 0].mul(255).round().long().tolist() == want


def test_train_batch_crops_are_global_rng_windows_tops_then_lefts():
    a = _labelled(6, 20)
    bank = ImageBank(a, CPU)
    batch = sr.train_batches(bank, EpochSampler(6, 3, seed=0, device=CPU), crop=8)
    torch.manual_seed(5)
    x = batch(0)
    torch.manual_seed(5)
    tops, lefts = torch.randint(0, 13, (3,)), torch.randint(0, 13, (3,))
    assert x.shape == (3, 3, 8, 8) and x.is_contiguous()  # NCHW, as the study stacked crops
    got = (x * 255).round().long()
    for b in range(3):
        i = int(got[b, 0, 0, 0])
        want = a[i, tops[b]:tops[b] + 8, lefts[b]:lefts[b] + 8].transpose(2, 0, 1)
        np.testing.assert_array_equal(got[b].numpy(), want)


def test_crop_as_large_as_the_images_draws_nothing():
    bank = ImageBank(_labelled(4, 8), CPU)
    batch = sr.train_batches(bank, EpochSampler(4, 2, seed=0, device=CPU), crop=8)
    state = torch.get_rng_state()
    x = batch(0)
    assert torch.equal(torch.get_rng_state(), state) and x.shape == (2, 3, 8, 8)


def test_validation_psnr_is_the_mean_over_centre_crops():
    rng = np.random.default_rng(3)
    a = (rng.random((3, 24, 24, 3)) * 255).astype(np.uint8)
    net = torch.nn.Upsample(scale_factor=4, mode="nearest")
    got = sr.validation_psnr(net, ImageBank(a, CPU), 4, 1.0, batch=2, crop=16)
    want = []
    for img in a:
        hr = to_float(torch.from_numpy(img[4:20, 4:20]))
        out = quantize(net(degrade(hr, 4)))
        want.append(peak_signal_noise_ratio(_hwc(hr), _hwc(out), data_range=1))
    assert got == pytest.approx(np.mean(want), abs=1e-9)


# ----------------------------------------------------------------------------- commands

NET = "squeezenet1_1/2"


@pytest.fixture(scope="module")
def stage(demo_plan):
    """``stage(name, **overrides) -> (config, settings)``: the demo's, on the CPU, fp32."""
    def get(name: str, **overrides):
        config = {**demo_plan.stage_config("super_resolution", name, "squeezenet1_1"),
                  "precision": "fp32", **overrides}
        settings = {**demo_plan.stage_settings("super_resolution", name),
                    "threads": torch.get_num_threads(), "device": "cpu"}
        return config, settings

    return get


def _command(name: str, config, settings, **args):
    argv = ["--net", NET, "--scale", str(args.pop("scale", 4)), "--run", "0",
            "--config", json.dumps(config), "--settings", json.dumps(settings)]
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    return cli.run("super_resolution", name, argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared, stage):
    """A 4-step x4 model (32 px crops), trained through the train command."""
    out = tmp_path_factory.mktemp("sr") / "model.pt"
    meta = _command("train", *stage("train", crop_size=32), prepared=prepared("coco"),
                    workdir=out.parent / "train", out=out)
    return out, meta


def test_train_writes_the_best_model_and_its_meta(trained):
    model, meta = trained
    assert meta["steps"] == 4 and meta["best_step"] in (2, 4) and meta["scale"] == 4
    assert meta["stop_reason"] == "max_steps" and meta["train_wall_time_s"] > 0
    assert load_model(model, {"model": SRNet(4)}) == meta  # the one model file holds the meta
    assert not model.with_suffix(".json").exists()
    hist = pd.read_csv(model.parent / "train" / "metrics.csv")
    assert list(hist["step"]) == [2, 4]
    assert hist["eval_psnr"].max() == pytest.approx(meta["best_val_psnr"])


def test_raising_iterations_continues_the_run(tmp_path, prepared, stage, trained):
    config, settings = stage("train", crop_size=32, iterations=2)
    _command("train", config, settings, prepared=prepared("coco"), workdir=tmp_path / "w",
             out=tmp_path / "m2.pt")
    config["iterations"] = 4
    meta = _command("train", config, settings, prepared=prepared("coco"),
                    workdir=tmp_path / "w", out=tmp_path / "m4.pt")
    assert meta["resumed_from"] == 2 and meta["steps"] == 4
    straight, resumed = SRNet(4), SRNet(4)
    load_model(trained[0], {"model": straight})
    load_model(tmp_path / "m4.pt", {"model": resumed})
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_other_training_data_trains_afresh_and_keeps_the_old_run(tmp_path, prepared, stage,
                                                                  capsys):
    """The resume key holds the prepared data's content: a finished run is not resumed
    for other training images (it was, silently, when only the config was keyed)."""
    config, settings = stage("train", crop_size=32, iterations=2)
    workdir = tmp_path / "train"
    _command("train", config, settings, prepared=prepared("coco"), workdir=workdir,
             out=tmp_path / "a.pt")
    again = _command("train", config, settings, prepared=prepared("coco"), workdir=workdir,
                     out=tmp_path / "b.pt")
    assert again["resumed_from"] == 2  # same data, same key: the finished run is reused
    capsys.readouterr()
    other = prepared("coco", train=48)  # a larger archive: another draw of 32 images
    meta = _command("train", config, settings, prepared=other, workdir=workdir,
                    out=tmp_path / "c.pt")
    assert meta["resumed_from"] is None and meta["steps"] == 2
    assert "input coco changed" in capsys.readouterr().err
    kept = list((workdir / "superseded").glob("*/last.pt"))
    assert len(kept) == 1


def test_evaluate_matches_scikit_image(tmp_path, prepared, stage, trained):
    model, meta = trained
    config, settings = stage("eval", test_sets=["set5", "set14"], test_limit=2)
    summary = _command("eval", config, settings, model=model, prepared=prepared("sr_test"),
                       samples=tmp_path / "images.parquet", scores=tmp_path / "scores.parquet")
    assert list(summary.columns) == list(SCORE_COLUMNS)
    assert len(summary) == 2 * 2 * 2  # sets x protocols x metrics
    assert set(summary["variant"]) == {"x4/reference", "x4/standard"}
    assert (summary["n"] == 2).all() and summary["value"].notna().all()
    assert (summary["weights_id"] == "random").all() and (summary["layer"] == "2").all()
    assert pd.read_parquet(tmp_path / "scores.parquet").equals(summary)
    per_image = pd.read_parquet(tmp_path / "images.parquet")
    assert len(per_image) == 2 * 2 * 2

    net = SRNet(4)
    load_model(model, {"model": net})
    net.eval()
    with np.load(prepared("sr_test") / "set5.npz") as z:
        name = sorted(z.files)[0]
        img = z[name]
    hr = to_float(torch.from_numpy(img))
    row = per_image.set_index(["dataset", "image", "protocol"]).sort_index().loc[("set5", name)]
    with torch.no_grad():
        # standard: cropped to a multiple of 4, Y channel, 4 px shaved
        std = crop_to_multiple(hr, 4)
        out = _hwc(quantize(net(degrade(std, 4))))
        y_sr = rgb2ycbcr(out)[4:-4, 4:-4, 0] / 255
        y_hr = rgb2ycbcr(_hwc(std))[4:-4, 4:-4, 0] / 255
        # reference: resized and centre-cropped to image_size, RGB, nothing shaved
        ref = reference_target(hr, config["image_size"])
        ref_out = _hwc(quantize(net(degrade(ref, 4))))
    assert row.loc["standard", "psnr"] == pytest.approx(
        peak_signal_noise_ratio(y_hr, y_sr, data_range=1), abs=1e-6)
    assert row.loc["standard", "ssim"] == pytest.approx(structural_similarity(
        y_hr, y_sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=1), abs=1e-6)
    assert row.loc["reference", "psnr"] == pytest.approx(
        peak_signal_noise_ratio(_hwc(ref), ref_out, data_range=1), abs=1e-6)
    assert row.loc["reference", "ssim"] == pytest.approx(structural_similarity(
        _hwc(ref), ref_out, channel_axis=2, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1), abs=1e-6)
    mean = per_image.query("dataset == 'set14' and protocol == 'reference'")["psnr"].mean()
    got = summary.query("dataset == 'set14' and variant == 'x4/reference' and metric == 'psnr'")
    assert float(got["value"].iloc[0]) == pytest.approx(mean, abs=1e-12)


# ----------------------------------------------------------------------------- bad input


def test_bad_coco_array_is_named(tmp_path, prepared, stage):
    coco = shutil.copytree(prepared("coco"), tmp_path / "coco")
    np.save(coco / "train_images.npy", np.zeros((2, 48, 48), np.float32))
    with pytest.raises(CorruptFileError, match="train_images.npy"):
        _command("train", *stage("train"), prepared=coco, workdir=tmp_path / "w",
                 out=tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_too_small_crop_is_rejected(tmp_path, prepared, stage):
    with pytest.raises(ValueError, match="crop_size"):
        _command("train", *stage("train", crop_size=32), scale=8, prepared=prepared("coco"),
                 workdir=tmp_path / "w", out=tmp_path / "m.pt")


def test_eval_refuses_a_model_of_another_scale(tmp_path, prepared, stage, trained):
    with pytest.raises(ValueError, match="x4 model"):
        _command("eval", *stage("eval"), scale=8, model=trained[0],
                 prepared=prepared("sr_test"), samples=tmp_path / "i.parquet",
                 scores=tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="super_resolution.protocols"):
        sr.evaluate_image(SRNet(4).eval(), torch.rand(1, 3, 16, 16), 4, "bicubic", 1.0, 16)


def test_missing_test_set_names_the_config_key(tmp_path, prepared, stage, trained):
    empty = tmp_path / "sr_test"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"dataset": "sr_test"}))
    with pytest.raises(FileNotFoundError, match="super_resolution.test_sets"):
        _command("eval", *stage("eval"), model=trained[0], prepared=empty,
                 samples=tmp_path / "i.parquet", scores=tmp_path / "s.parquet")


# ----------------------------------------------------------------------------- fused training


def _member_grads(fused, i: int) -> dict[str, torch.Tensor]:
    """Member ``i``'s rows of every gradient of a FusedSRNet, in SRNet's parameter names."""
    out = {}
    for name, p in fused.net.named_parameters():
        n = p.shape[0] // fused.k
        out[name] = p.grad[i * n:(i + 1) * n]
    return out


def _steps(dtype: torch.dtype):
    """One Adam step of K=3 SR models (two sharing a data stream, one with its own batch; two
    layers), alone and fused: (losses, grads, updated weights, outputs after the step) each
    way, the fused ones in the members' own layout."""
    from workflow.archs import LossNet
    from workflow.lossnets import build_extractor, feature_loss, fused_feature_loss
    from workflow.models.srnet import FusedSRNet
    from workflow.training import make_adam

    nets = [LossNet.parse(i) for i in ("squeezenet1_1/1", "squeezenet1_1/2", "squeezenet1_1/2")]
    target_of = [0, 0, 1]
    gen = torch.Generator().manual_seed(5)
    hr = torch.rand(2, 2, 3, 24, 24, generator=gen).to(dtype)  # two target batches, N = 2
    lr = degrade(hr.flatten(0, 1), 4, 1.0).unflatten(0, (2, 2))
    models = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        models.append(SRNet(4).to(dtype))
    fused = FusedSRNet.from_members(models)
    alone = {"loss": [], "grad": [], "weights": [], "out": []}
    for m, net, t in zip(models, nets, target_of, strict=True):
        ext = build_extractor("squeezenet1_1", lossnets=[net], weights="random",
                              normalize="none").to(dtype)
        opt = make_adam(m.parameters(), 1e-3, CPU)
        loss = feature_loss(ext, net.taps, m(lr[t]), hr[t])
        loss.backward()
        opt.step()
        alone["loss"].append(loss.detach())
        alone["grad"].append({k: p.grad.clone() for k, p in m.named_parameters()})
        alone["weights"].append({k: v.clone() for k, v in m.state_dict().items()})
        alone["out"].append(m(lr[t]).detach())
    ext = build_extractor("squeezenet1_1", lossnets=nets, weights="random",
                          normalize="none").to(dtype)
    opt = make_adam(fused.parameters(), 1e-3, CPU)
    losses = fused_feature_loss(ext, [n.taps for n in nets], fused(lr[target_of]), hr, target_of)
    losses.sum().backward()
    opt.step()
    together = {"loss": list(losses.detach()), "grad": [_member_grads(fused, i) for i in range(3)],
                "weights": [fused.member_state_dict(i) for i in range(3)]}
    together["out"] = list(fused(lr[target_of]).detach())
    return alone, together


def test_a_fused_step_of_three_models_is_three_separate_steps():
    """fp64: the fused step's losses, gradients and Adam-updated weights are the separate
    steps' within 1e-10 (the same arithmetic; only the order of sums differs). fp32: losses
    within 1e-5, and every gradient as close to the exact (fp64) one as the separate step's
    is: this tiny random-weight step is ill-conditioned (fp32's own gradient error is up to
    ~1e-4 here), so a fixed 1e-5 would test fp32, not the fusion."""
    alone, together = _steps(torch.float64)
    for i in range(3):
        torch.testing.assert_close(together["loss"][i], alone["loss"][i], atol=1e-10, rtol=0)
        for what in ("grad", "weights"):
            for k, v in together[what][i].items():
                torch.testing.assert_close(v, alone[what][i][k], atol=1e-10, rtol=0,
                                           msg=f"member {i} {what} {k}")
    assert alone["loss"][1] != alone["loss"][2]  # the third model really had its own batch
    alone32, together32 = _steps(torch.float32)
    for i in range(3):
        torch.testing.assert_close(together32["loss"][i], alone32["loss"][i], atol=1e-5, rtol=0)
        for k, exact in alone["grad"][i].items():
            err_alone = float((alone32["grad"][i][k].double() - exact).abs().max())
            err_fused = float((together32["grad"][i][k].double() - exact).abs().max())
            assert err_fused <= 2 * err_alone + 1e-7, (i, k, err_fused, err_alone)


def _fused(tmp_path, prepared, stage, members, workdir, eval_overrides=None, settings_=None,
           **overrides):
    """The train_fused command, scoring each member after training (by default on one Set5
    image: the tests of the training need no more)."""
    config, settings = stage("train", **{"crop_size": 32, **overrides})
    settings = {**settings, **(settings_ or {})}
    eval_config, _ = stage("eval", **(eval_overrides or {"test_sets": ["set5"],
                                                         "test_limit": 1}))
    argv = ["--scale", "4", "--members", json.dumps(members), "--config", json.dumps(config),
            "--eval-config", json.dumps(eval_config), "--settings", json.dumps(settings),
            "--prepared", str(prepared("coco")), str(prepared("sr_test")),
            "--workdir", str(workdir), "--out", str(workdir.parent / "models.json"),
            "--scores", str(workdir.parent / "scores.parquet")]
    return cli.run("super_resolution", "train_fused", argv)


def _state(path) -> dict[str, torch.Tensor]:
    net = SRNet(4)
    meta = load_model(path, {"model": net})
    return {**net.state_dict(), "_meta": meta}


class _Record:
    """Wraps the benchmark's degrade and losses: the training batches and per-model losses."""

    def __init__(self, monkeypatch) -> None:
        self.batches, self.losses = [], []
        real_degrade, real_loss, real_fused = sr.degrade, sr.feature_loss, srf.fused_feature_loss

        def degrade_(hr, *a, **k):
            if torch.is_grad_enabled():  # a training step (evaluation runs under no_grad)
                self.batches.append(hr.clone())
            return real_degrade(hr, *a, **k)

        def loss_(*a, **k):
            out = real_loss(*a, **k)
            self.losses.append(out.detach().reshape(1))
            return out

        def fused_(*a, **k):
            out = real_fused(*a, **k)
            self.losses.append(out.detach())
            return out

        monkeypatch.setattr(sr, "degrade", degrade_)
        monkeypatch.setattr(srf, "degrade", degrade_)
        monkeypatch.setattr(sr, "feature_loss", loss_)
        monkeypatch.setattr(srf, "fused_feature_loss", fused_)


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, prepared, stage):
    """squeezenet1_1/2 run0 and squeezenet1_1/1 run1, fused, 4 steps on 32 px crops; and each
    trained alone; with the batches and losses each saw."""
    root = tmp_path_factory.mktemp("fused")
    members = [{"net": NET, "run": 0, "dir": str(root / "a")},
               {"net": "squeezenet1_1/1", "run": 1, "dir": str(root / "b")}]
    with pytest.MonkeyPatch.context() as mp:
        rec = _Record(mp)
        listing = _fused(root, prepared, stage, members, root / "group" / "train")
    alone = []
    config, settings = stage("train", crop_size=32)
    for m in members:
        with pytest.MonkeyPatch.context() as mp:
            one = _Record(mp)
            argv = ["--net", m["net"], "--scale", "4", "--run", str(m["run"]), "--config",
                    json.dumps(config), "--settings", json.dumps(settings), "--prepared",
                    str(prepared("coco")), "--workdir", str(root / f"alone{m['run']}"),
                    "--out", str(root / f"alone{m['run']}.pt")]
            cli.run("super_resolution", "train", argv)
        alone.append((root / f"alone{m['run']}.pt", one))
    return root, members, listing, rec, alone


def test_fused_training_is_training_each_model_alone(fused_run):
    """Each member sees the batches (data order, crops) it sees alone, bit for bit, starts
    from the same weights (the same first loss within 1e-5), follows the same trajectory and
    keeps its own selection and meta."""
    root, members, listing, rec, alone = fused_run
    assert [m["trained_now"] for m in listing["members"]] == [True, True]
    assert len(rec.batches) == 4 and all(b.shape[0] == 2 * 4 for b in rec.batches)  # 2 streams
    for i, (path, one) in enumerate(alone):
        assert len(one.batches) == 4
        for step, (fused_b, alone_b) in enumerate(zip(rec.batches, one.batches, strict=True)):
            assert torch.equal(fused_b[i * 4:(i + 1) * 4], alone_b), (i, step)
        fused_losses = torch.stack([v[i] for v in rec.losses])
        alone_losses = torch.cat(one.losses)
        torch.testing.assert_close(fused_losses[0], alone_losses[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_losses, alone_losses, rtol=2e-2, atol=0)
        fm = load_model(root / "ab"[i] / "train" / "final.pt", {"model": SRNet(4)})
        am = load_model(path, {"model": SRNet(4)})
        assert fm["best_step"] == am["best_step"] and fm["steps"] == am["steps"] == 4
        assert fm["best_val_psnr"] == pytest.approx(am["best_val_psnr"], abs=0.05)
        assert {k: fm[k] for k in ("net", "scale", "run", "seed")} == \
            {k: am[k] for k in ("net", "scale", "run", "seed")}
        assert fm["fused_with"] == 2
    assert not torch.equal(rec.batches[0][:4], rec.batches[0][4:])  # two data streams
    hist = pd.read_csv(root / "group" / "train" / "metrics.csv")
    assert {f"eval_{NET} run0/psnr", "eval_squeezenet1_1/1 run1/psnr"} <= set(hist.columns)
    for d in "ab":  # each member's own selection, in its own folder
        assert load_model(root / d / "train" / "best.pt", {"model": SRNet(4)})["member"]


def test_fused_training_resumes_bit_exactly_after_a_kill(tmp_path, prepared, stage, fused_run,
                                                         monkeypatch):
    root, members, *_ = fused_run
    mine = [{**m, "dir": str(tmp_path / f"m{i}")} for i, m in enumerate(members)]
    workdir = tmp_path / "group" / "train"
    restore = kill_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _fused(tmp_path, prepared, stage, mine, workdir)  # the demo checkpoints every 2
    assert torch.load(workdir / "last.pt", weights_only=True)["step"] == 2
    restore()
    _fused(tmp_path, prepared, stage, mine, workdir)
    for i in range(2):
        resumed = _state(tmp_path / f"m{i}" / "train" / "final.pt")
        straight = _state(root / "ab"[i] / "train" / "final.pt")
        assert resumed.pop("_meta")["resumed_from"] == 2
        straight.pop("_meta")
        for k in straight:
            assert torch.equal(resumed[k], straight[k]), k
    ckpt = torch.load(workdir / "last.pt", weights_only=True)
    assert set(ckpt["key"]["members"]) == {f"{NET} run0", "squeezenet1_1/1 run1"}
    assert ckpt["key"]["members"][f"{NET} run0"]["job"] == {"net": NET, "scale": 4, "run": 0}


def _finished_copies(tmp_path, root, members):
    """The fused run's members, each pointed at a copy of its finished checkpoint."""
    mine = []
    for i, m in enumerate(members):
        (tmp_path / f"m{i}" / "train").mkdir(parents=True)
        shutil.copy(root / "ab"[i] / "train" / "final.pt", tmp_path / f"m{i}" / "train")
        mine.append({**m, "dir": str(tmp_path / f"m{i}")})
    return mine


def test_a_member_joining_retrains_only_itself(tmp_path, prepared, stage, fused_run, capsys):
    """A third layer joins the group (config lossnets): the two finished members are not
    trained again, the group's new checkpoint is the new member's alone."""
    root, members, *_ = fused_run
    mine = _finished_copies(tmp_path, root, members)
    third = {"net": "squeezenet1_1/3", "run": 0, "dir": str(tmp_path / "c")}
    listing = _fused(tmp_path, prepared, stage, [*mine, third], tmp_path / "group" / "train")
    assert [m["trained_now"] for m in listing["members"]] == [False, False, True]
    assert "not training it again" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "group" / "train" / "last.pt", weights_only=True)
    assert set(ckpt["key"]["members"]) == {"squeezenet1_1/3 run0"}
    assert (tmp_path / "c" / "train" / "final.pt").exists()


def test_the_fused_job_scores_each_member_as_a_separate_eval_would(tmp_path, prepared, stage,
                                                                   fused_run):
    """The folded evaluation (eval stage's config, its own job) writes each member's
    model.pt, images.parquet and scores.parquet equal to the separate eval command's on the
    same model, and the group's scores.parquet holds exactly the members' rows."""
    root, members, *_ = fused_run
    group = pd.read_parquet(root / "group" / "scores.parquet")
    config, settings = stage("eval", test_sets=["set5"], test_limit=1)
    parts = []
    for m in members:
        folder = root / "ab"[members.index(m)]
        assert _state(folder / "model.pt").keys() == _state(folder / "train" / "final.pt").keys()
        argv = ["--net", m["net"], "--scale", "4", "--run", str(m["run"]), "--config",
                json.dumps(config), "--settings", json.dumps(settings), "--model",
                str(folder / "train" / "final.pt"), "--prepared", str(prepared("sr_test")),
                "--samples", str(tmp_path / "images.parquet"),
                "--scores", str(tmp_path / "scores.parquet")]
        separate = cli.run("super_resolution", "eval", argv)
        folded = pd.read_parquet(folder / "scores.parquet")
        assert len(folded) == 1 * 2 * 2  # set5 x protocols x metrics
        keep = ["dataset", "variant", "metric", "value", "n", "arch", "layer", "run",
                "weights_id", "precision"]
        pd.testing.assert_frame_equal(folded[keep], separate[keep])
        pd.testing.assert_frame_equal(pd.read_parquet(folder / "images.parquet"),
                                      pd.read_parquet(tmp_path / "images.parquet"))
        parts.append(folded)
    assert set(zip(group["layer"], group["run"], strict=True)) == {("2", 0), ("1", 1)}
    pd.testing.assert_frame_equal(group[keep], pd.concat(parts, ignore_index=True)[keep])


def test_an_eval_only_key_rescores_without_training(tmp_path, prepared, stage, fused_run,
                                                    monkeypatch):
    """A rerun of the fused job for another eval config (test_limit 2: the rule's --eval-config
    changed) trains no step of any member and scores each again under the new config."""
    root, members, *_ = fused_run
    mine = _finished_copies(tmp_path, root, members)
    from workflow.training import Trainer

    def no_training(self, step):
        raise AssertionError(f"trained step {step} for an eval-only change")

    monkeypatch.setattr(Trainer, "train_step", no_training)
    listing = _fused(tmp_path, prepared, stage, mine, tmp_path / "group" / "train",
                     eval_overrides={"test_sets": ["set5"], "test_limit": 2})
    assert [m["trained_now"] for m in listing["members"]] == [False, False]
    group = pd.read_parquet(tmp_path / "group" / "scores.parquet")
    assert len(group) == 2 * 4 and (group["n"] == 2).all()
    assert (pd.read_parquet(tmp_path / "m1" / "scores.parquet")["n"] == 2).all()


def test_a_fused_job_of_two_architectures_is_refused(tmp_path, prepared, stage):
    members = [{"net": NET, "run": 0, "dir": str(tmp_path / "a")},
               {"net": "alexnet/2", "run": 0, "dir": str(tmp_path / "b")}]
    with pytest.raises(ValueError, match="one loss-network architecture"):
        _fused(tmp_path, prepared, stage, members, tmp_path / "w")


def test_the_index_path_makes_no_host_sync(monkeypatch):
    """A fused job's batches across an epoch boundary, two data streams with crops: the
    indices are device tensors sliced from the epoch order (drawn once per epoch), and no
    step calls .item(), .tolist(), .cpu() or .numpy() (each a blocking copy on a GPU)."""
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    bank = ImageBank(images, CPU, "always")
    assert bank.where == "device"
    samplers = [EpochSampler(len(bank), 4, s, CPU) for s in (0, 1)]
    gens = [torch.Generator(CPU).manual_seed(s) for s in (0, 1)]
    batches = [sr.train_batches(bank, s, 8, g) for s, g in zip(samplers, gens, strict=True)]
    draws = []
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(a) or
                        real_randperm(*a, **k))
    for name in ("item", "tolist", "cpu", "numpy"):
        def refuse(self, *a, _name=name, **k):
            raise AssertionError(f"host sync: Tensor.{_name}() in the index path")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = [[b(step) for b in batches] for step in range(4)]  # 2 steps per epoch: 2 epochs
    idx = samplers[0](3)
    monkeypatch.undo()
    assert isinstance(idx, torch.Tensor) and idx.device == CPU and idx.dtype == torch.int64
    assert len(draws) == 2 * 2  # one permutation per epoch and stream, not one per step
    assert all(x.shape == (4, 3, 8, 8) or x.shape == (2, 3, 8, 8) for o in out for x in o)


def test_the_plan_makes_one_training_job_per_architecture_and_scale(demo_plan):
    """fuse (default): one train_sr job per architecture and scale holding its layers and runs;
    fuse false: one per model. With fuse the gathered files are the groups' (each member is
    scored in its group's job), without the models'."""
    import copy

    from workflow.plan import DAG_KEYS, Plan

    assert "fuse" in DAG_KEYS["super_resolution"]
    config = copy.deepcopy(demo_plan.config)
    config["super_resolution"].update(lossnets=["alexnet/1", "alexnet/2", "squeezenet1_1/2"],
                                      scales=[4, 8], runs=2)
    fused = Plan(config)
    groups = fused.fused_groups("super_resolution")
    assert [(g["arch"], g["scale"], len(g["members"])) for g in groups] == [
        ("alexnet", 4, 4), ("alexnet", 8, 4), ("squeezenet1_1", 4, 2), ("squeezenet1_1", 8, 2)]
    assert len(fused.jobs("super_resolution")) == 12
    folder = "R/{layer}/run{run}"
    assert fused.fused_members("super_resolution", folder, arch="alexnet", scale="8") == [
        {"net": "alexnet/1", "run": 0, "dir": "R/1/run0"},
        {"net": "alexnet/1", "run": 1, "dir": "R/1/run1"},
        {"net": "alexnet/2", "run": 0, "dir": "R/2/run0"},
        {"net": "alexnet/2", "run": 1, "dir": "R/2/run1"}]
    member, group = "R/{arch}/{layer}/x{scale}/run{run}/s", "R/{arch}/fused/x{scale}/s"
    assert fused.fused_targets("super_resolution", member, group) == [
        "R/alexnet/fused/x4/s", "R/alexnet/fused/x8/s", "R/squeezenet1_1/fused/x4/s",
        "R/squeezenet1_1/fused/x8/s"]
    config["super_resolution"]["fuse"] = False
    alone = Plan(config)
    assert [len(g["members"]) for g in alone.fused_groups("super_resolution")] == [1] * 12
    assert alone.jobs("super_resolution") == fused.jobs("super_resolution")
    with pytest.raises(ValueError, match="no super_resolution job trains arch vgg16, scale 4"):
        fused.fused_members("super_resolution", "", arch="vgg16", scale=4)
    assert (alone.fused_targets("super_resolution", member, group)
            == alone.targets(member, "super_resolution"))
    assert len(alone.fused_targets("super_resolution", member, group)) == 12


# ----------------------------------------------------------------------------- target cache


def test_cached_target_features_are_the_target_pass(monkeypatch):
    """A step's loss from the cache equals the loss with a target pass, and the cached step
    runs the loss network once (the output's pass only); the memory rule says no when the
    features would take more than half of the (here: pretended) free memory."""
    from workflow.datasets import bank as bank_mod
    from workflow.lossnets import build_extractor
    from workflow.target_cache import TargetFeatures, plan_cache

    rng = np.random.default_rng(0)
    bank = ImageBank((rng.random((5, 40, 40, 3)) * 255).astype(np.uint8), CPU)
    ext = build_extractor("squeezenet1_1", taps=[3, 6], weights="random", normalize="none").eval()
    cache = TargetFeatures(ext, bank, [3, 6], batch=2, autocast=contextlib.nullcontext,
                           to_device=lambda x: x)
    idx = torch.tensor([4, 1, 2])
    out = torch.rand(3, 3, 40, 40, requires_grad=True)
    want = sr_feature_loss(ext, [3, 6], out, bank.images(idx))
    calls = []
    handle = ext.register_forward_hook(lambda *a: calls.append(1))
    got = sr_feature_loss(ext, [3, 6], out, cache.lookup(idx))
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    stacked = cache.stacked([idx, idx.flip(0)])
    assert stacked[6].shape[:2] == (2, 3)
    torch.testing.assert_close(stacked[6][1], cache.lookup(idx.flip(0))[6])

    noop = (contextlib.nullcontext, lambda x: x)
    assert plan_cache(ext, bank, [3, 6], "never", *noop)[0] is False
    monkeypatch.setattr(bank_mod, "_available_ram", lambda: 1000)  # 1 kB free
    keep, why = plan_cache(ext, bank, [3, 6], "auto", *noop)
    assert not keep and "more than half of the free memory" in why
    assert plan_cache(ext, bank, [3, 6], "always", *noop)[0] is True


@pytest.fixture
def small_images(monkeypatch):
    """The training data of both train commands as 48 px centre crops of the prepared COCO
    images (whole-image training at 288 px takes minutes on a CPU)."""
    real = sr._train_data

    def small(job, config, prepared, scale):
        bank, val = real(job, config, prepared, scale)
        crop = lambda b: ImageBank(np.ascontiguousarray(  # noqa: E731
            np.asarray(b.data)[:, 120:168, 120:168]), CPU)
        return crop(bank), crop(val)

    monkeypatch.setattr(sr, "_train_data", small)
    monkeypatch.setattr(srf, "_train_data", small)


def test_training_on_cached_targets_is_training_on_target_passes(tmp_path, prepared, stage,
                                                                 capsys, small_images):
    """Whole images (crop_size null, the study's setting): the cache is built, and the
    trained weights equal those of a run with a target pass every step (fp32, CPU)."""
    states = {}
    for policy in ("never", "always"):
        config, settings = stage("train", crop_size=None, iterations=2, eval_every=2)
        settings = {**settings, "target_cache": policy}
        _command("train", config, settings, prepared=prepared("coco"),
                 workdir=tmp_path / policy, out=tmp_path / f"{policy}.pt")
        states[policy] = _state(tmp_path / f"{policy}.pt")
    log = capsys.readouterr().out
    assert "caching the target features of 32 images" in log
    assert "target_cache: never" in log
    for k, v in states["never"].items():
        if k != "_meta":
            torch.testing.assert_close(states["always"][k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_fused_training_on_cached_targets_is_training_on_target_passes(tmp_path, prepared,
                                                                       stage, small_images):
    """The fused job's cache holds every member's taps; its members' weights equal those of
    the fused run with target passes (two data streams, two layers)."""
    states = {}
    for policy in ("never", "always"):
        root = tmp_path / policy
        members = [{"net": NET, "run": 0, "dir": str(root / "a")},
                   {"net": "squeezenet1_1/1", "run": 1, "dir": str(root / "b")}]
        _fused(root, prepared, stage, members, root / "group" / "train", crop_size=None,
               iterations=2, eval_every=2, settings_={"target_cache": policy})
        states[policy] = [_state(root / m / "train" / "final.pt") for m in "ab"]
    for never, always in zip(states["never"], states["always"], strict=True):
        for k, v in never.items():
            if k != "_meta":
                torch.testing.assert_close(always[k], v, atol=1e-5, rtol=1e-5, msg=k)
