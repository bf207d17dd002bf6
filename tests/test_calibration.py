"""LPIPS calibration (workflow/benchmarks/calibration.py): one training step worked by hand, the
shipped lin weights against the lpips package, the commands end to end, the plan's jobs."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.training_helpers import assert_first_adam_step
from workflow import cli, compare
from workflow.archs import LossNet
from workflow.benchmarks.calibration_data import CalibrationError, TrainSet
from workflow.compare import Variant
from workflow.lossnets import build_extractor, load_backbone
from workflow.metrics.similarity import agreement
from workflow.models.adapter import (
    FusedAdapter,
    LinWeightsError,
    load_adapter,
    load_lpips_lin,
    make_optimizer,
    tap_channels,
)
from workflow.plan import Plan, load_config

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BAPPS = {"n_val": 4, "n_train": 3, "n_jnd": 4, "size": 64}
SMALL = {"batch_size": 4, "epochs_constant": 1, "epochs_decay": 1,
         "bapps_2afc_subsets": ["traditional", "cnn"], "bapps_jnd_subsets": ["traditional"]}


# ----------------------------------------------------------------------------- one step by hand


def _hand_logits(layers, d0, d1):
    """G by plain ops: [d0, d1, d0-d1, d0/(d1+.1), d1/(d0+.1)] -> 32 -> 32 -> 1, LeakyReLU 0.2."""
    x = torch.stack([d0, d1, d0 - d1, d0 / (d1 + 0.1), d1 / (d0 + 0.1)], dim=1)
    for j, (w, b) in enumerate(layers):
        x = x @ w + b
        if j < len(layers) - 1:
            x = torch.where(x > 0, x, 0.2 * x)
    return x[:, 0]


def test_one_adam_step_by_hand():
    """The LPIPS recipe's step: d = sum_taps D . w, BCE(sigmoid(G), judge), one Adam step
    (lr 1e-4, betas 0.5 / 0.999, eps 1e-8: the first step moves each parameter by
    lr * g / (|g| + eps)), then the projection w >= 0."""
    channels = {0: 3, 1: 2}
    v = Variant("spatial", True)
    adapter = FusedAdapter(channels, [v], [0], seed=1, dropout=0.0, sync_weight=0.0)
    start = {0: torch.tensor([0.5, 1e-6, 2.0]), 1: torch.tensor([1e-6, 1e-6])}
    with torch.no_grad():
        for t, w in start.items():
            adapter.weights(0)[t][0].copy_(w)
    g = torch.Generator().manual_seed(3)
    diffs0 = {v: {t: torch.rand(4, c, generator=g) for t, c in channels.items()}}
    diffs1 = {v: {t: torch.rand(4, c, generator=g) for t, c in channels.items()}}
    judge = torch.tensor([[0.0], [0.25], [1.0], [0.6]])

    # by hand, on copies of the parameters
    w = {t: start[t].clone().requires_grad_() for t in channels}
    layers = [(wt[0].detach().clone().requires_grad_(), b[0].detach().clone().requires_grad_())
              for wt, b in zip(adapter.rank_net.weights, adapter.rank_net.biases, strict=True)]
    d0 = sum(diffs0[v][t] @ w[t] for t in channels)
    d1 = sum(diffs1[v][t] @ w[t] for t in channels)
    p = torch.sigmoid(_hand_logits(layers, d0, d1))
    y = judge[:, 0]
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    params = [*w.values(), *[x for pair in layers for x in pair]]
    grads = torch.autograd.grad(bce, params)
    lr, eps = 1e-4, 1e-8
    stepped = [(x - lr * gr / (gr.abs() + eps)).detach() for x, gr in zip(params, grads,
                                                                           strict=True)]
    want_w = {t: stepped[i] for i, t in enumerate(channels)}
    assert any(bool((x < 0).any()) for x in want_w.values()), "the projection must matter"
    want_w = {t: x.clamp(min=0) for t, x in want_w.items()}

    # the code: the harness's step (loss, backward, Adam, then post_step = clamp_)
    opt = make_optimizer(adapter, lr, (0.5, 0.999))
    loss = adapter.batch_loss(diffs0, diffs1, judge)
    torch.testing.assert_close(loss, bce.detach(), rtol=1e-6, atol=1e-7)
    loss.backward()
    opt.step()
    adapter.clamp_()
    for t in channels:
        torch.testing.assert_close(adapter.weights(0)[t][0].detach(), want_w[t],
                                   rtol=1e-6, atol=1e-9)
    got = [x for pair in zip(adapter.rank_net.weights, adapter.rank_net.biases, strict=True)
           for x in pair]
    for have, want in zip(got, stepped[len(channels):], strict=True):
        torch.testing.assert_close(have[0].detach(), want, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- shipped weights

lpips = pytest.importorskip("lpips")
NETS = {"alexnet": "alex", "squeezenet1_1": "squeeze"}  # vgg16: same code, 10x the build time


@contextlib.contextmanager
def _skip_init():
    names = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "constant_",
             "xavier_uniform_", "trunc_normal_")
    with mock.patch.multiple(torch.nn.init, **{n: (lambda t, *a, **k: t) for n in names}):
        yield


def _lpips_folder() -> Path:
    return Path(lpips.__file__).parent / "weights" / "v0.1"


@pytest.mark.parametrize("arch", sorted(NETS))
def test_shipped_lin_equals_the_lpips_package(arch, tmp_path):
    backbone = load_backbone(arch, "random", seed=11)
    path = tmp_path / f"{arch}.pth"
    torch.save(backbone.state_dict(), path)
    net = LossNet(arch, "lpips")
    with _skip_init():
        ours = build_extractor(arch, lossnets=[net], weights=str(path))
    with warnings.catch_warnings(), _skip_init():
        warnings.simplefilter("ignore")
        theirs = lpips.LPIPS(net=NETS[arch], version="0.1", pretrained=True, lpips=True,
                             pnet_rand=True, verbose=False)
    state = backbone.state_dict()
    theirs.net.load_state_dict({k: state[f"features.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}"]
                                for k in theirs.net.state_dict()}, strict=True)
    theirs.eval()
    adapter = load_lpips_lin(_lpips_folder(), net, tap_channels(ours, 64, CPU))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    with torch.no_grad():
        d_ours = adapter.distances(compare.per_channel_diffs(ours(x), ours(y), adapter.terms))
        d_pkg = theirs(x, y, normalize=True).reshape(-1)
    torch.testing.assert_close(d_ours[:, 0, 0], d_pkg, rtol=1e-5, atol=1e-5)


def test_shipped_file_errors(tmp_path):
    net = LossNet("alexnet", "lpips")
    channels = {1: 64, 4: 192, 7: 384, 9: 256, 11: 256}
    with pytest.raises(LinWeightsError, match="alex.pth not found.*shipped_weights"):
        load_lpips_lin(tmp_path, net, channels)
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / "alex.pth")
    with pytest.raises(LinWeightsError, match="not the 5 lin layers"):
        load_lpips_lin(tmp_path, net, channels)
    with pytest.raises(LinWeightsError, match="ships lin weights for"):
        load_lpips_lin(tmp_path, LossNet("resnet18", "2"), channels)
    wrong = {1: 64, 4: 192, 7: 384, 9: 256, 11: 255}
    with pytest.raises(LinWeightsError, match="lin4.model.1.weight has 256 channels"):
        load_lpips_lin(_lpips_folder(), net, wrong)


# ----------------------------------------------------------------------------- end to end


def _cmd(cmd, **args):
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", *(map(str, v) if isinstance(v, list) else
                             [json.dumps(v) if isinstance(v, dict) else str(v)])]
    return cli.run("calibration", cmd, argv)


def test_train_and_score(tmp_path, prepared, demo_plan):
    bapps_dir = prepared("bapps", **BAPPS)
    stage = {s: {**demo_plan.stage_config("calibration", s, "alexnet"), "precision": "fp32",
                 **{k: v for k, v in SMALL.items()
                    if k in demo_plan.stage_config("calibration", s, "alexnet")}}
             for s in ("train", "evaluate", "shipped")}
    stage["train"]["comparisons"] = ["spatial", "spatial+mean"]
    stage["evaluate"]["comparisons"] = ["spatial", "spatial+mean"]
    settings = {"device": "cpu", "threads": torch.get_num_threads(), "eval_batch_size": 8}
    model = tmp_path / "lin.pt"
    _cmd("train", config=stage["train"], settings=settings, net="alexnet/lpips", run=0,
         prepared=[bapps_dir], workdir=tmp_path / "train", out=model)
    adapter, meta = load_adapter(model, CPU)
    # 3 train subsets x 3 triplets, batches of 4 (the last of 1 kept), 1 + 1 epochs
    assert meta["triplets"] == 9 and meta["steps"] == 2 * math.ceil(9 / 4)
    assert adapter.variants == [Variant("spatial", True), Variant("spatial+mean", True)]
    weights = list(adapter.channel_weights.values())
    assert len(weights) == 3 * 5 and all(float(p.detach().min()) >= 0 for p in weights)
    assert any(float((p.detach() - 1).abs().max()) > 0 for p in weights)  # it trained

    scores = tmp_path / "scores.parquet"
    df = _cmd("evaluate", config=stage["evaluate"], settings=settings, net="alexnet/lpips",
              run=0, model=model, prepared=[bapps_dir], scores=scores)
    assert set(df["benchmark"]) == {"calibration"} and set(df["variant"]) == {"lin"}
    assert set(df["run"]) == {0} and df["ranking"].isna().all()
    assert set(zip(df["dataset"], df["split"], strict=True)) == {
        ("bapps-2afc", "traditional"), ("bapps-2afc", "cnn"), ("bapps-2afc", "mean"),
        ("bapps-jnd", "traditional"), ("bapps-jnd", "pooled")}
    assert len(df) == 2 * 5
    # the spatial lin 2AFC of one subset, recomputed from the file's weights
    from workflow.datasets import bapps

    a = bapps.load(bapps_dir, "2afc", "val", "cnn")
    ext = build_extractor("alexnet", lossnets=[LossNet("alexnet", "lpips")], weights="random",
                          seed=demo_plan.config["lossnets"]["seed"])
    imgs = [torch.from_numpy(np.array(a[k])).permute(0, 3, 1, 2).float() / 255
            for k in ("ref", "p0", "p1")]
    w = {t: x[0] for t, x in adapter.weights(0).items()}
    with torch.no_grad():
        f = [ext(i) for i in imgs]
        v = Variant("spatial", True)
        d0 = compare.distances(f[1], f[0], [v], weights=w)[v]
        d1 = compare.distances(f[2], f[0], [v], weights=w)[v]
    want = float(agreement(d0, d1, torch.from_numpy(np.array(a["judge"]))).mean())
    row = df[(df["split"] == "cnn") & (df["comparison"] == "spatial")]
    assert float(row["value"].iloc[0]) == pytest.approx(want)

    shipped = _cmd("shipped", config=stage["shipped"], settings=settings, net="alexnet/lpips",
                   model=_lpips_folder() / "alex.pth", prepared=[bapps_dir],
                   scores=tmp_path / "shipped.parquet")
    assert set(shipped["variant"]) == {"lin-shipped"} and shipped["run"].isna().all()
    assert set(shipped["comparison"]) == {"spatial"} and len(shipped) == 5
    # a model of another loss network is refused before anything is written
    with pytest.raises(CalibrationError, match="trained for alexnet/lpips.*calibration_train"):
        _cmd("evaluate", config=stage["evaluate"], settings=settings, net="squeezenet1_1/lpips",
             run=0, model=model, prepared=[bapps_dir], scores=tmp_path / "other.parquet")
    assert not (tmp_path / "other.parquet").exists()


def test_train_set_gathers_across_subsets(prepared):
    folder = prepared("bapps", **BAPPS)
    data = TrainSet(folder, ["traditional", "mix"], limit=2)
    assert len(data) == 4
    from workflow.datasets import bapps

    mix = bapps.load(folder, "2afc", "train", "mix")
    trad = bapps.load(folder, "2afc", "train", "traditional")
    images, judge = data.batch(torch.tensor([3, 0, 2]), CPU, 64)
    torch.testing.assert_close(judge[:, 0], torch.tensor(
        [mix["judge"][1], trad["judge"][0], mix["judge"][0]]))
    want = torch.from_numpy(np.array(mix["p1"][1])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(images[2][0], want)
    assert F.mse_loss(images[0][1], torch.from_numpy(np.array(trad["ref"][0]))
                      .permute(2, 0, 1).float() / 255) == 0


def test_plan_jobs_and_shipped(tmp_path):
    cfg = load_config(ROOT / "config.yaml", overrides={"calibration": {
        "shipped_weights": str(tmp_path), "runs": 2, "lossnets": ["alexnet/lpips", "resnet18/2"]}})
    plan = Plan(cfg)
    assert plan.jobs("calibration") == [
        {"arch": a, "layer": layer, "run": r}
        for a, layer in (("alexnet", "lpips"), ("resnet18", "2")) for r in (0, 1)]
    # shipped weights exist for the LPIPS sets of alexnet, vgg16 and squeezenet1_1 only
    assert plan.shipped_lin() == [{"arch": "alexnet", "layer": "lpips",
                                   "file": f"{tmp_path}/alex.pth"}]
    assert "calibration" in plan.enabled() and plan.datasets("calibration") == ["bapps"]
    train = plan.stage_config("calibration", "train", "alexnet")
    # the LPIPS recipe is the default
    assert (train["lr"], train["betas"], train["batch_size"], train["epochs_constant"],
            train["epochs_decay"], train["dropout"]) == (1e-4, [0.5, 0.999], 50, 5, 5, 0.5)
    assert train["weights"] == "imagenet" and "eval_batch_size" not in train


# ----------------------------------------------------------------------------- tune / scratch


def _backbone_config(demo_plan, variant, arch, **over):
    cfg = {**demo_plan.stage_config("calibration", variant, arch), "precision": "fp32",
           "train_subsets": ["traditional"], "train_limit": 1, "batch_size": 1,
           "epochs_constant": 1, "epochs_decay": 0, "dropout": 0.0, **over}
    assert ("weights" in cfg) == (variant != "scratch")  # scratch: none (stage_config)
    return cfg


def _hand_spatial(fx, fy, w):
    """sum_taps sum_c w_c mean_positions (fx/|fx| - fy/|fy|)^2, channel norm over dim 1."""
    total = 0
    for t, wt in w.items():
        a = fx[t] / (torch.sqrt((fx[t] ** 2).sum(1, keepdim=True)) + 1e-10)
        b = fy[t] / (torch.sqrt((fy[t] ** 2).sum(1, keepdim=True)) + 1e-10)
        total = total + (((a - b) ** 2).mean((2, 3)) * wt).sum(1)
    return total


def test_tune_step_by_hand(tmp_path, prepared, demo_plan):
    """One ``tune`` step through the command (squeezenet1_1: its fire modules have 1x1
    convolutions, which the lpips trainer's clamp projects too): the loss by plain ops from
    the starting backbone (lossnets.weights random, lossnets.seed) and the adapter's initial
    G; one Adam step (first step: lr * g / (|g| + eps)) of the lin weights, G *and* every
    backbone parameter; then w >= 0 and every 1x1 conv weight >= 0. The file's backbone and
    weights equal it. ``lin`` on the same batch leaves the backbone bit-identical."""
    arch, net = "squeezenet1_1", LossNet("squeezenet1_1", "lpips")
    folder = prepared("bapps", **BAPPS)
    cfg = _backbone_config(demo_plan, "tune", arch)
    settings = {"device": "cpu", "threads": torch.get_num_threads()}
    model = tmp_path / "tune.pt"
    meta = cli.run("calibration", "tune", [
        "--config", json.dumps(cfg), "--settings", json.dumps(settings), "--net", net.id,
        "--run", "0", "--prepared", str(folder), "--workdir", str(tmp_path / "w"),
        "--out", str(model)])
    assert meta["steps"] == 1 and meta["variant"] == "tune"

    # the same start, built independently
    seed = int(cfg["seed"])
    ext = build_extractor(arch, lossnets=[net], weights="random", seed=cfg["weights_seed"])
    start = {k: v.clone() for k, v in ext.state_dict().items()}
    adapter0 = FusedAdapter(tap_channels(ext, 64, CPU), [Variant("spatial", True)], [0],
                            seed=seed, dropout=0.0, sync_weight=0.0)
    images, judge = TrainSet(folder, ["traditional"], 1).batch(torch.tensor([0]), CPU, 64)
    bparams = dict(ext.named_parameters())
    for p in bparams.values():
        p.requires_grad_(True)
    w = {t: x[0].detach().clone().requires_grad_() for t, x in adapter0.weights(0).items()}
    layers = [(a[0].detach().clone().requires_grad_(), b[0].detach().clone().requires_grad_())
              for a, b in zip(adapter0.rank_net.weights, adapter0.rank_net.biases, strict=True)]
    f = [ext(x) for x in images]
    d0, d1 = _hand_spatial(f[1], f[0], w), _hand_spatial(f[2], f[0], w)
    p = torch.sigmoid(_hand_logits(layers, d0, d1))
    y = judge[:, 0]
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    names = list(bparams)
    params = [*bparams.values(), *w.values(), *[x for pair in layers for x in pair]]
    grads = torch.autograd.grad(bce, params, allow_unused=True)
    lr, eps = float(cfg["lr"]), 1e-8
    stepped = [(x - lr * g / (g.abs() + eps)).detach() if g is not None else x.detach()
               for x, g in zip(params, grads, strict=True)]
    want_b = dict(zip(names, stepped[:len(names)], strict=True))
    convs = {n for n, m in ext.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)}
    assert convs and any(bool((want_b[f"{c}.weight"] < 0).any()) for c in convs)
    for c in convs:
        want_b[f"{c}.weight"] = want_b[f"{c}.weight"].clamp(min=0)

    from workflow.models.backbone import TrainableBackbone

    fresh = TrainableBackbone(build_extractor(arch, lossnets=[net], weights="random", seed=99))
    adapter, meta = load_adapter(model, CPU, lambda _m: {"backbone": fresh})
    moved, checked = 0, []
    for i, n in enumerate(names):
        have = fresh.net.state_dict()[n]
        checked.append(assert_first_adam_step(have, want_b[n], grads[i], lr, eps, n))
        moved += int(not torch.equal(have, start[n]))
    assert moved == len(names)  # every backbone parameter took a step
    assert float(torch.stack(checked).mean()) > 0.8
    for i, (t, x) in enumerate(adapter.weights(0).items()):
        j = len(names) + i
        assert_first_adam_step(x[0].detach(), stepped[j].clamp(min=0), grads[j], lr, eps,
                                f"lin weight {t}")
    got = [x for pair in zip(adapter.rank_net.weights, adapter.rank_net.biases, strict=True)
           for x in pair]
    for k, (have, want) in enumerate(zip(got, stepped[len(names) + len(w):], strict=True)):
        j = len(names) + len(w) + k
        assert_first_adam_step(have[0].detach(), want, grads[j], lr, eps, f"rank net {k}")

    # lin: the same step through the lin code path moves no backbone bit
    from workflow.benchmarks.calibration import backbone, calibration_step
    from workflow.job import Job

    job = Job.create(_backbone_config(demo_plan, "train", arch), settings)
    frozen = backbone(job, net, "imagenet", "lin", seed)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    lin = FusedAdapter(tap_channels(frozen, 64, CPU), [Variant("spatial", True)], [0],
                       seed=seed, dropout=0.0, sync_weight=0.0)
    opt = make_optimizer(lin, 1e-4, (0.5, 0.999))
    loss, _ = calibration_step(job, frozen, lin, images, judge, torch.Generator())
    loss.backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())
    torch.testing.assert_close(loss.detach(), bce.detach(), rtol=1e-5, atol=1e-7)


def test_scratch_starts_from_random_weights(tmp_path, cpu_job):
    """``scratch`` builds torchvision's initialisation under the run's seed whatever the
    weights config says (an ImageNet weights file that does not exist is never read);
    ``tune`` starts from the configured weights."""
    from workflow.benchmarks.calibration import backbone
    from workflow.job import Job

    net = LossNet("alexnet", "lpips")
    job = Job.create({"precision": "fp32", "weights": "imagenet", "weights_seed": 0},
                     {"device": "cpu", "weights_dir": str(tmp_path / "none")})
    ext = backbone(job, net, "imagenet", "scratch", seed=5)
    want = build_extractor("alexnet", lossnets=[net], weights="random", seed=5)
    assert ext.training is False and all(p.requires_grad for p in ext.parameters())
    for (k, a), b in zip(ext.net.state_dict().items(), want.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = backbone(job, net, "imagenet", "scratch", seed=6)
    assert not torch.equal(next(other.parameters()), next(ext.parameters()))
    with pytest.raises(FileNotFoundError):  # tune reads the configured weights
        backbone(job, net, "imagenet", "tune", seed=5)
    with pytest.raises(CalibrationError, match="calibration.variants"):
        backbone(cpu_job(), net, "imagenet", "fine", seed=5)


def _job_counts(stdout: str) -> dict[str, int]:
    """The ``Job stats`` table of a dry run: rule -> count."""
    counts, on = {}, False
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("Job stats"):
            on = True
        elif on and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
        elif on and counts and not parts:
            break
    return counts


@pytest.mark.slow
def test_dry_run_has_the_new_jobs_only_when_enabled(tmp_path):
    """``snakemake -n calibration adaptation`` on the demo config: no tune / scratch /
    adapted-net job by default; with calibration.variants [tune, scratch] and
    adaptation.adapt_net enabled (2 rankings), one per loss network, run and variant /
    (comparison, ranking), and no lin job."""
    import yaml
    from snakemake_helpers import snakemake

    def dry(extra):
        path = tmp_path / "extra.yaml"
        path.write_text(yaml.safe_dump(extra))
        out = snakemake("-n", "--cores", "1", "--configfile", str(ROOT / "config" / "demo.yaml"),
                        str(path), "--config", f"results_dir={tmp_path / 'results'}",
                        f"resources_dir={tmp_path / 'res'}", "--", "calibration", "adaptation",
                        timeout=600).stdout
        return _job_counts(out)

    plain = dry({})
    assert plain["calibration_train"] == 2 and plain["adaptation_train"] == 2  # 2 LPIPS sets
    new = ("calibration_tune", "calibration_scratch", "calibration_evaluate_backbone",
           "adaptation_train_net", "adaptation_evaluate_net")
    assert not set(new) & set(plain), plain
    on = dry({"calibration": {"variants": ["tune", "scratch"]},
              "adaptation": {"adapt_net": {"enabled": True, "rankings": 2}}})
    assert on["calibration_tune"] == on["calibration_scratch"] == 2
    assert on["calibration_evaluate_backbone"] == 2 * 2
    # 2 loss networks x 1 run x spatial x channel norm [true] x 2 rankings
    assert on["adaptation_train_net"] == on["adaptation_evaluate_net"] == 2 * 2
    assert "calibration_train" not in on and on["adaptation_train"] == 2


def test_scratch_scores_carry_its_variant(tmp_path, prepared, demo_plan):
    """scratch end to end (one step of alexnet/lpips): the scores say variant scratch,
    weights_id random, and a subset's 2AFC recomputed by hand with the file's backbone and
    weights; the file's backbone is not the starting initialisation any more."""
    folder = prepared("bapps", **BAPPS)
    cfg = _backbone_config(demo_plan, "scratch", "alexnet")
    settings = {"device": "cpu", "threads": torch.get_num_threads(), "eval_batch_size": 8}
    model = tmp_path / "scratch.pt"
    net = LossNet("alexnet", "lpips")
    _cmd("scratch", config=cfg, settings=settings, net=net.id, run=1, prepared=[folder],
         workdir=tmp_path / "w", out=model)
    stage = demo_plan.stage_config("calibration", "evaluate_backbone", "alexnet")
    evaluate = {**stage, "precision": "fp32", **{k: v for k, v in SMALL.items() if k in stage}}
    assert evaluate["weights"] == "random"  # the demo's; scratch rows say random whatever
    evaluate["weights"] = "imagenet"  # it is (no weights file is read for scratch)
    df = _cmd("evaluate", config=evaluate, settings=settings, net=net.id, run=1, model=model,
              prepared=[folder], scores=tmp_path / "scores.parquet")
    assert set(df["variant"]) == {"scratch"} and set(df["weights_id"]) == {"random"}
    assert set(df["run"]) == {1}

    from workflow.datasets import bapps
    from workflow.models.backbone import TrainableBackbone

    fresh = TrainableBackbone(build_extractor("alexnet", lossnets=[net], weights="random",
                                              seed=0))
    adapter, meta = load_adapter(model, CPU, lambda _m: {"backbone": fresh})
    assert meta["variant"] == "scratch" and meta["steps"] == 1
    start = build_extractor("alexnet", lossnets=[net], weights="random",
                            seed=int(cfg["seed"]) + 1)
    assert not torch.equal(next(fresh.parameters()), next(start.parameters()))
    a = bapps.load(folder, "2afc", "val", "cnn")
    imgs = [torch.from_numpy(np.array(a[k])).permute(0, 3, 1, 2).float() / 255
            for k in ("ref", "p0", "p1")]
    w = {t: x[0] for t, x in adapter.weights(0).items()}
    v = Variant("spatial", True)
    with torch.no_grad():
        f = [fresh(i) for i in imgs]
        d0 = compare.distances(f[1], f[0], [v], weights=w)[v]
        d1 = compare.distances(f[2], f[0], [v], weights=w)[v]
    want = float(agreement(d0, d1, torch.from_numpy(np.array(a["judge"]))).mean())
    row = df[(df["split"] == "cnn") & (df["dataset"] == "bapps-2afc")]
    assert float(row["value"].iloc[0]) == pytest.approx(want)
