"""The metric as a library and a command line (workflow/metric.py): the same distances as
the similarity benchmark and as the `lpips` package with identical weights, finite gradients
where the lpips package has NaN ones, and the two-folder command."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workflow import cli
from workflow.archs import LossNet
from workflow.benchmarks.similarity import Scorer
from workflow.compare import METHODS, all_variants
from workflow.lossnets import feature_loss, load_backbone
from workflow.metric import MetricError, PerceptualLoss, PerceptualMetric

torch.set_num_threads(2)


def _images(n: int, seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(255)


PRESET = "mobilenet_v3_large/2"  # the cheapest preset to build


@pytest.mark.parametrize("lossnet, methods, n, seed", [
    ("squeezenet1_1/lpips", METHODS, 4, 0), ("alexnet/2", METHODS, 4, 0),
    (PRESET, ["spatial", "mean", "sort"], 3, 4)])
def test_distances_equal_the_similarity_benchmark(cpu_job, lossnet, methods, n, seed):
    """Every comparison method, with and without channel norm: the library's distance is the
    benchmark's (its Scorer, the code that scores BAPPS), random weights of the same seed; a
    preset (a node-tapped backbone) too."""
    net = LossNet.parse(lossnet)
    variants = all_variants(methods, (True, False))
    job = cpu_job()
    scorer = Scorer(job, job.extractor(net), [net], variants, image_size=64)
    a, b = _images(n, seed), _images(n, seed + 1)
    bench = scorer.jnd(a, b)
    for v in variants:
        metric = PerceptualMetric(lossnet, v.method, v.channel_norm, weights="random")
        with torch.no_grad():
            ours = metric(_tensor(a), _tensor(b))
        torch.testing.assert_close(ours, bench[(net.id, v)].float(), rtol=1e-5, atol=1e-7)


def test_equals_the_lpips_package_with_identical_weights(tmp_path):
    lpips = pytest.importorskip("lpips")
    backbone = load_backbone("squeezenet1_1", "random", seed=3)
    path = tmp_path / "squeeze.pth"
    torch.save(backbone.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pkg = lpips.LPIPS(net="squeeze", lpips=False, pnet_rand=True, verbose=False).eval()
    state = backbone.state_dict()
    pkg.net.load_state_dict({k: state[f"features.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}"]
                             for k in pkg.net.state_dict()})
    metric = PerceptualMetric("squeezenet1_1/lpips", "spatial", True, weights=str(path))
    x, y = _tensor(_images(3, 5)), _tensor(_images(3, 6))
    with torch.no_grad():
        torch.testing.assert_close(metric(x, y), pkg(x, y, normalize=True).reshape(-1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("comparison", ["spatial", "mean", "sort", "spatial+sort"])
def test_gradients_are_finite_at_identical_and_black_images(comparison):
    """lpips' normalize_tensor puts eps outside a sqrt whose gradient is NaN at an all-zero
    feature vector (its issues #69 / #121); here both cases have finite gradients."""
    metric = PerceptualMetric("alexnet/lpips", comparison, True, weights="random")
    for x in (torch.rand(2, 3, 64, 64), torch.zeros(2, 3, 64, 64)):
        x = x.requires_grad_()
        d = metric(x, x.detach().clone())
        assert torch.all(d == 0)
        (g,) = torch.autograd.grad(d.sum(), x)
        assert torch.isfinite(g).all()
    x = torch.zeros(2, 3, 64, 64, requires_grad=True)
    d = metric(x, torch.rand(1, 3, 64, 64))  # a batch of 1 broadcasts
    (g,) = torch.autograd.grad(d.sum(), x)
    assert d.shape == (2,) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_loss_is_the_study_feature_mse_with_no_gradient_into_the_target():
    loss_fn = PerceptualLoss("alexnet/2", weights="random")
    out = torch.rand(2, 3, 48, 48, requires_grad=True)
    target = torch.rand(2, 3, 48, 48, requires_grad=True)
    loss = loss_fn(out, target)
    ext = loss_fn.metric.extractor
    assert loss.item() == pytest.approx(feature_loss(ext, [*LossNet.parse("alexnet/2").taps],
                                                     out, target).item())
    loss.backward()
    assert out.grad is not None and target.grad is None
    with pytest.raises(MetricError, match=r"output must be an image batch \[N, 3, H, W\]"):
        loss_fn(torch.rand(3, 48, 48), target)


def _write(folder, names, seed):
    folder.mkdir()
    for k, name in enumerate(names):
        Image.fromarray(_images(1, seed + k, 32)[0]).save(folder / name)


def test_two_folders_pair_by_name_one_row_per_pair(tmp_path):
    _write(tmp_path / "a", ["x.png", "y.png", "z.png"], 0)
    _write(tmp_path / "b", ["x.png", "y.png", "z.png"], 10)
    out = tmp_path / "d.csv"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--lossnet",
            "alexnet/2", "--weights", "random", "--comparison", "mean", "--channel-norm", "false"]
    df = cli.run("metric", "score", argv)
    got = pd.read_csv(out)
    assert list(got["a"].map(lambda p: p.rsplit("/", 1)[1])) == ["x.png", "y.png", "z.png"]
    assert (got["lossnet"] == "alexnet/2").all() and not got["channel_norm"].any()
    metric = PerceptualMetric("alexnet/2", "mean", False, weights="random")
    with torch.no_grad():
        want = metric(_tensor(np.stack([np.asarray(Image.open(tmp_path / "a" / n))
                                        for n in ("x.png", "y.png", "z.png")])),
                      _tensor(np.stack([np.asarray(Image.open(tmp_path / "b" / n))
                                        for n in ("x.png", "y.png", "z.png")])))
    np.testing.assert_allclose(got["distance"], want.numpy(), rtol=1e-5)
    assert len(df) == 3
    # two single files give one row
    one = cli.run("metric", "score", [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                                      "--out", str(tmp_path / "one.parquet"), "--weights",
                                      "random", "--lossnet", "alexnet/2"])
    assert len(one) == 1 and (tmp_path / "one.parquet").exists()


def test_unpaired_or_unreadable_files_are_named(tmp_path, capsys):
    _write(tmp_path / "a", ["x.png", "only_a.png"], 0)
    _write(tmp_path / "b", ["x.png", "only_b.png"], 5)
    out = tmp_path / "d.csv"
    base = ["--out", str(out), "--weights", "random", "--lossnet", "alexnet/2"]
    assert cli.main(["metric", "score", str(tmp_path / "a"), str(tmp_path / "b"), *base]) == 1
    err = capsys.readouterr().err
    assert "only_a.png" in err and "only_b.png" in err and "pair by file name" in err
    (tmp_path / "a" / "only_a.png").unlink()
    (tmp_path / "b" / "only_b.png").write_text("not an image")
    (tmp_path / "a" / "only_b.png").write_text("not an image either")
    assert cli.main(["metric", "score", str(tmp_path / "a"), str(tmp_path / "b"), *base]) == 1
    assert "only_b.png is not a readable image" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- node-name kind


def test_a_preset_s_gradient_is_finite_at_x_equals_y():
    x = _tensor(_images(3, 4)).requires_grad_()
    PerceptualMetric(PRESET, "mean", True, weights="random")(x, x.detach()).sum().backward()
    assert torch.isfinite(x.grad).all()  # at x == y too


def test_weights_imagenet_from_a_hub_cache_random_or_a_file(tmp_path, monkeypatch):
    from workflow.archs import weights_filename

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    state = load_backbone("mobilenet_v3_large", "random", seed=5).state_dict()
    torch.save(state, hub / "checkpoints" / weights_filename("mobilenet_v3_large"))
    monkeypatch.chdir(tmp_path)  # no resources/weights here
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    x, y = _tensor(_images(2, 6)), _tensor(_images(2, 7))
    with torch.no_grad():
        want = PerceptualMetric(PRESET, "mean", weights="random", seed=5)(x, y)
        for kwargs in ({}, {"weights_dir": hub / "checkpoints"}):
            got = PerceptualMetric(PRESET, "mean", weights="imagenet", **kwargs)(x, y)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        path = tmp_path / "mine.pth"
        torch.save(state, path)
        torch.testing.assert_close(PerceptualMetric(PRESET, "mean", weights=str(path))(x, y),
                                   want, rtol=0, atol=0)
    with pytest.raises(MetricError, match="weights_dir .* has no mobilenet_v3_large-8738ca79"):
        PerceptualMetric(PRESET, weights="imagenet", weights_dir=tmp_path)
    with pytest.raises(MetricError, match="'imagenet', 'random' or the path"):
        PerceptualMetric(PRESET, weights=str(tmp_path / "none.pth"))
    with pytest.raises(MetricError, match="did you mean mobilenet_v3_large"):
        PerceptualMetric("mobilenet_v3_larg/2", weights="random")


def test_a_custom_entry_as_a_metric():
    custom = {"r18": {"builder": "resnet18", "taps": ["relu", "layer1", "layer2.1", "layer4"]}}
    metric = PerceptualMetric("r18/3", "spatial", weights="random", custom=custom)
    x, y = _tensor(_images(2, 8)), _tensor(_images(2, 9))
    with torch.no_grad():
        fx, fy = metric.extractor(x)["layer2.1"], metric.extractor(y)["layer2.1"]
        unit = lambda f: f / f.norm(dim=1, keepdim=True).clamp_min(1e-10)  # noqa: E731
        want = ((unit(fx) - unit(fy)) ** 2).sum(1).mean((1, 2))
        torch.testing.assert_close(metric(x, y), want, rtol=1e-4, atol=1e-6)
    from workflow.archs import CUSTOM

    CUSTOM.clear()


@pytest.mark.parametrize("lossnet", ["alexnet/2", PRESET])
def test_an_adapted_metric_from_the_adaptation_model_file(cpu_job, tmp_path, lossnet):
    """The adaptation benchmark's model file (FusedAdapter + save_model) into PerceptualMetric:
    its distance is the benchmark's adapted distance (feature_diffs + FusedAdapter.distances)
    of the chosen comparison and ranking."""
    from workflow.benchmarks.adaptation import feature_diffs
    from workflow.compare import Variant
    from workflow.models.adapter import FusedAdapter, tap_channels
    from workflow.training import save_model

    job = cpu_job()
    net = LossNet.parse(lossnet)
    extractor = job.extractor(net, "imagenet")
    variants = [Variant("mean", True), Variant("spatial", False)]
    adapter = FusedAdapter(tap_channels(extractor, 64, job.device), variants, [0, 1, 2], seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.channel_weights.values():
            p.copy_(torch.rand(p.shape, generator=g) * 2)
    path = save_model(tmp_path / "adapter.pt", {"adapter": adapter},
                      {**adapter.describe(), "net": net.id, "run": 0})
    x, y = _tensor(_images(3, 10)), _tensor(_images(3, 11))
    bench = adapter.eval().distances(feature_diffs(job, extractor, variants, [x, y])[0])
    metric = PerceptualMetric.from_adapted(path, "spatial", False, ranking=2, weights="random")
    with torch.no_grad():
        torch.testing.assert_close(metric(x, y), bench[:, 1, 2], rtol=1e-5, atol=1e-7)
        plain = PerceptualMetric(lossnet, "spatial", False, weights="random")(x, y)
    assert not torch.allclose(metric(x, y), plain)
    with pytest.raises(MetricError, match="holds the adapted comparisons mean-norm, spatial"):
        PerceptualMetric.from_adapted(path, weights="random")
    with pytest.raises(MetricError, match="rankings \\[0, 1, 2\\]; ranking=5"):
        PerceptualMetric.from_adapted(path, "mean", ranking=5, weights="random")
