"""Analysis: attributes against independent values, statistics against scipy, Pareto by hand,
figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats
from torch import nn

from workflow.analysis import FIGURE_FORMATS, FIGURES, TABLE_FORMATS, TABLES
from workflow.analysis.all_figures import run_figures
from workflow.analysis.attributes import (
    GraphFacts,
    build_meta_model,
    container_children,
    count_flops,
    lossnet_attributes,
    walk_child,
)
from workflow.analysis.correlations import (
    arch_best,
    attribute_correlations,
    correlate,
    run_tables,
    score_correlations,
    select_scores,
)
from workflow.analysis.figures import TEXT_PX
from workflow.analysis.pareto import pareto_front
from workflow.lossnets import ARCHS, load_backbone, weights_enum
from workflow.results import score_frame

SIZE = 96  # one small input size keeps the 14-architecture table fast


@pytest.fixture(scope="module")
def attrs() -> pd.DataFrame:
    return lossnet_attributes(
        list(ARCHS), [1, 2, 3, 4], ["alexnet", "vgg16", "squeezenet1_1"], [SIZE]
    )


def _row(attrs, arch, layer):
    return attrs[(attrs["arch"] == arch) & (attrs["layer"] == str(layer))].iloc[0]


# ----------------------------------------------------------------------------- attributes

VGG_HEAD = 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
# Parameters after the last tap (layer 4), counted by hand from the torchvision definitions.
TAIL_AFTER_LAYER4 = {
    "alexnet": 9216 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000,  # maxpool, classifier
    "vgg11": VGG_HEAD,
    "vgg16": VGG_HEAD,
    "vgg16_bn": VGG_HEAD,
    "vgg19": VGG_HEAD,
    "resnet18": 512 * 1000 + 1000,  # fc
    "resnet50": 2048 * 1000 + 1000,
    "resnext50_32x4d": 2048 * 1000 + 1000,
    "googlenet": 1024 * 1000 + 1000,  # fc (the aux heads are not in the released model)
    "efficientnet_b0": 320 * 1280 + 2 * 1280 + 1280 * 1000 + 1000,  # 1x1 conv (no bias) + BN, fc
    "efficientnet_b7": 640 * 2560 + 2 * 2560 + 2560 * 1000 + 1000,
    "densenet121": 2 * 1024 + 1024 * 1000 + 1000,  # norm5, classifier
    "squeezenet1_1": 512 * 1000 + 1000,  # final 1x1 conv classifier
}
# Inception-v3's released state keeps AuxLogits (torchvision counts it in num_params); it is
# not in any forward pass, so the attribute table leaves it out: conv0 1x1 768->128 + BN,
# conv1 5x5 128->768 + BN, fc 768->1000.
INCEPTION_AUX = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameter_counts_match_torchvision_metadata(attrs, arch):
    meta = weights_enum(arch).meta["num_params"]
    last = _row(attrs, arch, 4)
    aux = INCEPTION_AUX if arch == "inception_v3" else 0
    assert last["params_total"] == meta - aux
    if arch in TAIL_AFTER_LAYER4:
        assert last["params_to_tap"] == meta - TAIL_AFTER_LAYER4[arch]
    assert last["params_pct"] == pytest.approx(100 * last["params_to_tap"] / last["params_total"])
    assert last["imagenet_acc1"] == weights_enum(arch).meta["_metrics"]["ImageNet-1K"]["acc@1"]
    rows = attrs[(attrs["arch"] == arch) & (attrs["layer"] != "lpips")].sort_values("layer_index")
    for col in (
        "params_to_tap",
        "depth_pct",
        "conv_depth_pct",
        "receptive_field",
        "matmul_depth",
        f"flops_{SIZE}",
    ):
        assert rows[col].is_monotonic_increasing, col
    assert (rows["depth_pct"] <= 100).all() and (rows[f"flops_pct_{SIZE}"] <= 100 + 1e-9).all()


def test_receptive_fields_by_hand(attrs):
    # AlexNet: conv11/4 -> 11 (jump 4); pool3/2 -> 11+2*4=19 (j 8); conv5 -> 19+4*8=51;
    # pool3/2 -> 51+2*8=67 (j 16); conv3 -> 99; conv3 -> 131; conv3 -> 163
    assert [_row(attrs, "alexnet", x)["receptive_field"] for x in (1, 2, 3, 4)] == [11, 51, 99, 163]
    # VGG16: 3x3 convs add 2*jump, 2x2 pools add 1*jump and double it:
    # relu1_2 1+2+2=5; pool 6, 10, 14; pool 16, 24, 32, 40; pool 44, 60, 76, 92;
    # pool 100, 132, 164, 196
    assert [_row(attrs, "vgg16", x)["receptive_field"] for x in (1, 2, 3, 4)] == [5, 14, 40, 196]
    assert _row(attrs, "vgg16", "lpips")["receptive_field"] == 196


def _swap_maxpool(mod: nn.Module) -> None:
    for name, ch in mod.named_children():
        if isinstance(ch, nn.MaxPool2d):  # same window, but every input gets a gradient
            setattr(mod, name, nn.AvgPool2d(ch.kernel_size, ch.stride, ch.padding, ch.ceil_mode))
        else:
            _swap_maxpool(ch)


def empirical_receptive_field(arch: str, tap: int, size: int) -> tuple[int, int]:
    """Input pixels reached by the gradient of the centre position (all channels) of the tap,
    in a model with positive constant weights, identity BatchNorm and average pooling."""
    model = load_backbone(arch, "random").double()
    seq = nn.Sequential(*container_children(model, arch)[: tap + 1])
    _swap_maxpool(seq)
    with torch.no_grad():
        for m in seq.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                (
                    m.running_mean.zero_(),
                    m.running_var.fill_(1.0),
                    m.weight.fill_(1.0),
                    m.bias.zero_(),
                )
    x = (torch.rand(1, 3, size, size, dtype=torch.float64) + 0.5).requires_grad_(True)
    y = seq(x)
    y[0, :, y.shape[2] // 2, y.shape[3] // 2].sum().backward()
    hit = x.grad[0].abs().sum(0) > 0
    rows, cols = hit.any(1).nonzero().flatten(), hit.any(0).nonzero().flatten()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize(
    ("arch", "layer", "size"), [("resnet18", 2, 96), ("squeezenet1_1", 3, 128)]
)
def test_receptive_field_of_branching_nets_empirically(attrs, arch, layer, size):
    # residual adds (resnet) and Fire concatenations (squeezenet): the graph walk's maximum
    # over branches equals the gradient's extent (inputs large enough to avoid borders)
    rf = _row(attrs, arch, layer)["receptive_field"]
    assert size > rf
    assert empirical_receptive_field(arch, ARCHS[arch].layers[layer - 1], size) == (rf, rf)


def test_structure_from_inspection(attrs):
    assert [_row(attrs, "alexnet", x)["matmul_depth"] for x in (1, 2, 3, 4)] == [1, 2, 3, 5]
    assert [_row(attrs, "vgg16", x)["matmul_depth"] for x in (1, 2, 3, 4)] == [2, 4, 7, 13]
    assert _row(attrs, "resnet50", 4)["matmul_depth"] == 1 + 16 * 3  # stem + 16 bottlenecks
    # channels at the taps, as the table of docs/lossnets.md states them
    assert [_row(attrs, "alexnet", x)["channels"] for x in (1, 2, 3, 4)] == [64, 192, 384, 256]
    assert _row(attrs, "resnet50", 4)["channels"] == 2048
    assert _row(attrs, "alexnet", "lpips")["channels"] == 64 + 192 + 384 + 256 + 256
    # conv1 11x11/4 pad 2 on 96 px: (96 + 4 - 11) // 4 + 1 = 23
    assert _row(attrs, "alexnet", 1)[f"features_{SIZE}"] == 64 * 23 * 23
    flags = ["skip_connections", "branching", "conv1x1", "batch_norm"]
    expect = {
        ("alexnet", 4): [False, False, False, False],
        ("vgg16_bn", 4): [False, False, False, True],
        ("resnet18", 1): [False, False, False, True],
        ("resnet18", 3): [True, False, True, True],  # layer2 has a 1x1 projection shortcut
        ("googlenet", 2): [False, True, True, True],
        ("squeezenet1_1", 2): [False, True, True, False],
        ("densenet121", 2): [True, False, True, True],
        ("efficientnet_b0", 3): [True, False, True, True],
    }
    for (arch, layer), want in expect.items():
        assert [bool(_row(attrs, arch, layer)[f]) for f in flags] == want, (arch, layer)
    assert bool(_row(attrs, "efficientnet_b0", 2)["global_context"])  # squeeze-and-excitation


def test_graph_walk_on_toy_modules():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.Conv2d(4, 4, 3, padding=1))

        def forward(self, x):
            return nn.functional.relu(torch.cat([self.a(x), self.b(x)], 1))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.c(x) + nn.functional.max_pool2d(x, kernel_size=2, stride=2)

    f = walk_child(TwoBranches(), GraphFacts())
    assert max(f.flow.rf) == 1 + 4 + 2 and f.flow.matmuls == 2  # the deeper branch: 5x5 then 3x3
    assert f.branching and not f.skip
    g = walk_child(Residual(), f)
    # conv 3x3/2 after rf 7 (jump 1): 7 + 2 = 9 wins over the pool's 7 + 1 = 8; jump 2
    assert max(g.flow.rf) == 9 and g.flow.jump == (2, 2) and g.skip and g.flow.matmuls == 3


def test_flops_hand_count():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )
    # 2 FLOPs per multiply-accumulate: out elements x (in channels x kernel area)
    hand = 2 * (8 * 16 * 16) * (3 * 9) + 2 * (16 * 8 * 8) * (8 * 9) + 2 * 1024 * 10
    assert count_flops(net, torch.zeros(1, 3, 16, 16)) == hand


def test_flops_in_table_by_hand(attrs):
    # AlexNet conv1 on 96 px: 64 x 23 x 23 outputs, 3 x 11 x 11 MACs each; ReLU is not counted
    assert _row(attrs, "alexnet", 1)[f"flops_{SIZE}"] == 2 * 64 * 23 * 23 * 3 * 121
    # the thesis counts multiply-adds ("MFLOPS"): half the FLOPs, 0.30 lower on a log10 axis
    assert _row(attrs, "alexnet", 1)[f"macs_{SIZE}"] == 64 * 23 * 23 * 3 * 121
    assert (attrs[f"macs_total_{SIZE}"] * 2 == attrs[f"flops_total_{SIZE}"]).all()
    # the full pass of every architecture runs at 96 px (Inception-v3 needs >= 75 px)
    assert attrs[f"flops_total_{SIZE}"].notna().all()


def test_inception_s_share_at_64_px_is_its_share_at_75_px():
    """At 64 px Inception-v3's full pass fails (Mixed_7a on a 2 x 2 map): its total stays NaN,
    the cost to each tap is counted at 64 px and the share is the one at 75 px, the smallest
    side the full pass runs at (found by trying 65, 66, ...)."""
    from workflow.analysis.attributes import smallest_full_pass

    df = lossnet_attributes(["inception_v3"], [1, 4], [], [64, 75])
    assert df["flops_total_64"].isna().all() and df["flops_total_75"].notna().all()
    assert df["flops_64"].notna().all() and (df["flops_64"] < df["flops_75"]).all()
    assert df["flops_pct_64"].tolist() == df["flops_pct_75"].tolist()
    assert (df["flops_pct_75"] == 100 * df["flops_75"] / df["flops_total_75"]).all()
    model = load_backbone("inception_v3", "random").eval()
    assert smallest_full_pass(model, "inception_v3", 64) == 75


def test_flops_total_near_torchvision_ops():
    # torchvision's meta["_ops"] (GFLOPs at 224 px) counts one multiply-accumulate as one op
    df = lossnet_attributes(["alexnet", "resnet18"], [4], [], [224])
    for arch in ("alexnet", "resnet18"):
        total = df[df["arch"] == arch]["flops_total_224"].iloc[0]
        assert total / 2 / 1e9 == pytest.approx(weights_enum(arch).meta["_ops"], rel=0.01)


# ----------------------------------------------------------------------------- statistics

X = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, np.nan, 10.0])
Y = np.array([2.1, 1.9, 3.5, 3.0, 6.2, 5.0, 7.7, 6.9, 8.0, np.nan])


def test_correlate_matches_scipy():
    r = correlate(X, Y, n_boot=500, seed=1)
    ok = ~np.isnan(X) & ~np.isnan(Y)
    assert r["n"] == 8
    p, s = stats.pearsonr(X[ok], Y[ok]), stats.spearmanr(X[ok], Y[ok])
    assert r["pearson_r"] == pytest.approx(p.statistic) and r["pearson_p"] == pytest.approx(
        p.pvalue
    )
    assert r["spearman_rho"] == pytest.approx(s.statistic) and r["spearman_p"] == pytest.approx(
        s.pvalue
    )
    assert r["pearson_lo"] <= r["pearson_r"] <= r["pearson_hi"]
    assert r == correlate(X, Y, n_boot=500, seed=1)  # seeded
    exact = correlate([1, 2, 3, 4], [3, 5, 7, 9], n_boot=100)
    assert exact["pearson_lo"] == pytest.approx(1) and exact["pearson_hi"] == pytest.approx(1)
    assert math.isnan(correlate([1, 1, 1], [1, 2, 3])["pearson_r"])


def test_bootstrap_interval_coverage():
    # bivariate normal with rho = 0.5: Pearson's population value is 0.5, Spearman's
    # (6/pi) asin(rho/2); a 90% interval should cover them in about 90% of samples
    rho, n, reps = 0.5, 40, 150
    spearman_true = 6 / np.pi * np.arcsin(rho / 2)
    rng = np.random.default_rng(123)
    cov = [[1, rho], [rho, 1]]
    hit_p = hit_s = 0
    for i in range(reps):
        xy = rng.multivariate_normal([0, 0], cov, size=n)
        r = correlate(xy[:, 0], xy[:, 1], n_boot=400, confidence=0.9, seed=i)
        hit_p += r["pearson_lo"] <= rho <= r["pearson_hi"]
        hit_s += r["spearman_lo"] <= spearman_true <= r["spearman_hi"]
    assert 0.80 <= hit_p / reps <= 0.97
    assert 0.80 <= hit_s / reps <= 0.97


def _scores(rows):
    return score_frame(rows, code_version="test")


def test_select_scores_expands_and_averages():
    rows = [
        dict(
            benchmark="super_resolution",
            dataset=d,
            split="test",
            arch="alexnet",
            layer="1",
            variant="x4/standard",
            run=r,
            metric="psnr",
            value=v,
            n=5,
        )
        for d, r, v in [("set5", 0, 20.0), ("set5", 1, 22.0), ("set14", 0, 18.0)]
    ]
    rows.append(
        dict(
            benchmark="super_resolution",
            dataset="set5",
            split="test",
            arch="",
            layer="",
            variant="x4/standard",
            metric="psnr",
            value=15.0,
            n=5,
        )
    )  # pixel baseline
    sel = select_scores(
        _scores(rows), [{"name": "PSNR", "benchmark": "super_resolution", "metric": "psnr"}]
    )
    got = dict(zip(sel["score"], sel["value"], strict=True))
    assert got == {"PSNR (set14)": 18.0, "PSNR (set5)": 21.0}


def test_attribute_correlations_against_scipy():
    layers = ["1", "2", "3", "4"]
    attrs = pd.DataFrame(
        {
            "arch": ["a"] * 4 + ["b"] * 4,
            "layer": layers * 2,
            "lossnet": [f"x{i}" for i in range(8)],
            "layer_index": [1, 2, 3, 4] * 2,
            "features_64": [9.0, 7.0, 4.0, 1.0, 8.0, 8.0, 2.0, 2.0],
            "features_288": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        }
    )
    values = [0.60, 0.63, 0.64, 0.70, 0.61, 0.62, 0.68, 0.66]
    rows = [
        dict(
            benchmark="similarity",
            dataset="bapps-2afc",
            split="mean",
            arch=a,
            layer=x,
            comparison="spatial",
            channel_norm=True,
            metric="2afc",
            value=v,
            n=1,
        )
        for (a, x), v in zip(attrs[["arch", "layer"]].itertuples(index=False), values, strict=True)
    ]
    sel = select_scores(_scores(rows), [{"name": "2AFC", "metric": "2afc"}])
    cfg = {
        "input_sizes": {"similarity": 64},
        "attributes": ["layer_index", "features"],
        "bootstrap": {"n": 50},
    }
    out = attribute_correlations(sel, attrs, cfg).set_index("attribute")
    assert out.loc["layer_index", "pearson_r"] == pytest.approx(
        stats.pearsonr(attrs["layer_index"], values)[0]
    )
    # "features" is taken at the benchmark's input size (64), not another size
    assert out.loc["features", "pearson_r"] == pytest.approx(
        stats.pearsonr(attrs["features_64"], values)[0]
    )
    assert out.loc["features", "spearman_rho"] == pytest.approx(
        stats.spearmanr(attrs["features_64"], values)[0]
    )


def test_arch_best_layer():
    rows = [
        dict(
            benchmark="similarity", dataset="d", split="s", arch=a, layer=x, metric=m, value=v, n=1
        )
        for a, x, m, v in [
            ("a", "1", "2afc", 0.6),
            ("a", "3", "2afc", 0.7),
            ("a", "lpips", "2afc", 0.9),
            ("b", "2", "2afc", 0.65),
            ("a", "1", "err", 1.0),
            ("a", "2", "err", 0.5),
        ]
    ]
    sel = select_scores(
        _scores(rows), [{"name": "2AFC", "metric": "2afc"}, {"name": "err", "metric": "err"}]
    )
    best = arch_best(sel, lower_is_better=["err"]).set_index(["score", "arch"])["layer"]
    assert best.to_dict() == {("2AFC", "a"): "3", ("2AFC", "b"): "2", ("err", "a"): "2"}


# ----------------------------------------------------------------------------- Pareto


def test_pareto_front_by_hand():
    #            A  B  C  D  E  F  G(=B) H(nan)
    cost = [1, 2, 3, 4, 4, 5, 2, np.nan]
    score = [1, 3, 2, 5, 4, 5, 3, 9]
    # C is beaten by B (cheaper, better), E by D (same cost, better), F by D (same score, cheaper)
    assert pareto_front(cost, score).tolist() == [
        True,
        True,
        False,
        True,
        False,
        False,
        True,
        False,
    ]
    # maximising x (accuracy): (70, .6) (75, .5) (72, .65) (80, .4) (72, .6)
    acc, s = [70, 75, 72, 80, 72], [0.6, 0.5, 0.65, 0.4, 0.6]
    assert pareto_front(acc, s, minimize_x=False).tolist() == [False, True, True, True, False]


# ----------------------------------------------------------------------------- figures


def _demo_scores() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for a in ("alexnet", "squeezenet1_1", "resnet18"):
        for x in ("1", "2", "3", "4"):
            for ds, split, metric in (
                ("bapps-2afc", "mean", "2afc"),
                ("bapps-jnd", "pooled", "jnd_ap"),
            ):
                rows.append(
                    dict(
                        benchmark="similarity",
                        dataset=ds,
                        split=split,
                        arch=a,
                        layer=x,
                        comparison="spatial",
                        channel_norm=True,
                        metric=metric,
                        value=0.6 + 0.02 * int(x) + rng.normal(0, 0.01),
                        n=10,
                    )
                )
            rows.append(
                dict(
                    benchmark="super_resolution",
                    dataset="set5",
                    split="test",
                    arch=a,
                    layer=x,
                    variant="x4/standard",
                    metric="psnr",
                    value=rng.normal(22, 1),
                    n=5,
                )
            )
    for a in ("alexnet", "squeezenet1_1"):
        for rk in range(3):
            b = rng.uniform(0.5, 0.7)
            rows.append(
                dict(
                    benchmark="adaptation",
                    dataset="svhn",
                    split="test",
                    arch=a,
                    layer="lpips",
                    comparison="spatial",
                    channel_norm=True,
                    variant="baseline",
                    ranking=rk,
                    metric="2afc",
                    value=b,
                    n=50,
                )
            )
            rows.append(
                dict(
                    benchmark="adaptation",
                    dataset="svhn",
                    split="test",
                    arch=a,
                    layer="lpips",
                    comparison="spatial",
                    channel_norm=True,
                    variant="adapted",
                    ranking=rk,
                    run=0,
                    metric="2afc",
                    value=b + 0.1,
                    n=50,
                )
            )
        for ps, n in (("invert", 11), ("translate", 5)):
            rows.append(
                dict(
                    benchmark="probes",
                    dataset="probes",
                    split=ps,
                    arch=a,
                    layer="lpips",
                    comparison="mean",
                    channel_norm=False,
                    variant="generated",
                    metric="correct",
                    value=float(n - 1),
                    n=n,
                )
            )
    return _scores(rows)


CFG = {
    "input_sizes": {"similarity": SIZE, "super_resolution": SIZE, "adaptation": SIZE},
    "scores": [
        {
            "name": "2AFC",
            "benchmark": "similarity",
            "dataset": "bapps-2afc",
            "split": "mean",
            "metric": "2afc",
        },
        {"name": "JND", "benchmark": "similarity", "dataset": "bapps-jnd", "metric": "jnd_ap"},
        {"name": "PSNR", "benchmark": "super_resolution", "metric": "psnr"},
    ],
    "bootstrap": {"n": 50, "confidence": 0.95, "seed": 0},
    "pareto": {"cost": "flops", "cost_scores": ["2AFC", "JND"], "accuracy_scores": ["2AFC"]},
    "figures": {"dpi": 60},
}


def _check_outputs(tmp_path):
    for t in TABLES:
        for fmt in TABLE_FORMATS:
            assert (tmp_path / "tables" / f"{t}.{fmt}").stat().st_size > 0
    for f in FIGURES:
        for fmt in FIGURE_FORMATS:
            assert (tmp_path / "figures" / f"{f}.{fmt}").stat().st_size > 0
        with Image.open(tmp_path / "figures" / f"{f}.png") as im:
            assert min(im.size) > 100


@pytest.mark.parametrize("which", ["demo", "similarity_only", "empty"])
def test_tables_and_figures_with_partial_results(attrs, tmp_path, which):
    scores = _demo_scores()
    if which == "similarity_only":
        scores = scores[scores["benchmark"] == "similarity"]
    elif which == "empty":
        scores = scores.iloc[:0]
    demo_attrs = attrs[attrs["arch"].isin(["alexnet", "squeezenet1_1", "resnet18"])]
    info = run_tables(scores, demo_attrs, CFG, tmp_path / "tables")
    notes = run_figures(scores, tmp_path / "tables", CFG, tmp_path / "figures")
    _check_outputs(tmp_path)
    no_data = [n for n in notes if "no data" in n]
    if which == "demo":
        assert info["scores"] == 3 and not no_data
        # every figure's smallest text is readable where the report shows it 1000 px wide
        assert min(TEXT_PX[f] for f in FIGURES) >= 7.0, TEXT_PX
        for f in FIGURES:
            assert (tmp_path / "figures" / f"{f}.rst").read_text().startswith(
                "**Finding:** {% raw %}")
        pareto = pd.read_parquet(tmp_path / "tables" / "pareto.parquet")
        assert set(pareto["view"]) == {"flops vs 2AFC", "flops vs JND", "imagenet_acc1 vs 2AFC"}
    elif which == "similarity_only":
        assert sorted(n.split(":")[0] for n in no_data) == [
            "adaptation", "adaptation_change", "adaptation_rankings", "probes",
            "super_resolution"]
    else:
        assert len(no_data) == len(FIGURES)


# ----------------------------------------------------------------------------- the rules


@pytest.mark.slow
def test_figures_target_and_replot_only(tmp_path):
    """`snakemake figures` from an existing scores table; a figure setting re-plots only."""
    from tests.snakemake_helpers import ROOT, demo_args, snakemake

    results = tmp_path / "results"
    results.mkdir()
    _demo_scores().to_parquet(results / "scores.parquet", index=False)
    args = ["--cores", "2", *demo_args(tmp_path, "benchmarks=[]")]
    snakemake("figures", *args, timeout=1200)
    for f in FIGURES:
        assert (results / "figures" / f"{f}.png").stat().st_size > 0
    override = tmp_path / "dpi.yaml"
    override.write_text("analysis:\n  figures: {dpi: 77}\n")
    dry = snakemake(
        "figures",
        "-n",
        "--cores",
        "2",
        "--configfile",
        str(ROOT / "config" / "demo.yaml"),
        str(override),
        "--config",
        f"results_dir={results}",
        f"resources_dir={tmp_path / 'resources'}",
        "benchmarks=[]",
        timeout=600,
    )
    # the "Job stats:" table: header, rule, dashes, then "<rule> <count>" lines up to a blank line
    lines = dry.stdout.splitlines()
    start = lines.index("Job stats:") + 3
    stop = next(i for i in range(start, len(lines)) if not lines[i].strip())
    jobs = {line.split()[0] for line in lines[start:stop]}
    assert jobs == {"analysis_figures", "figures", "total"}, dry.stdout[-3000:]


# ----------------------------------------------------------------------------- thesis Table 2.2


def _tree_facts(arch: str) -> dict:
    """Table 2.2's columns worked independently from the torchvision module tree."""
    from torchvision.models.densenet import _DenseBlock, _Transition
    from torchvision.models.efficientnet import MBConv
    from torchvision.models.googlenet import Inception
    from torchvision.models.inception import InceptionA
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.models.squeezenet import Fire

    model = build_meta_model(arch)
    mods = [m for n, m in model.named_modules()
            if not n.startswith(("aux1", "aux2", "AuxLogits"))]
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    linear = sum(isinstance(m, nn.Linear) for m in mods)
    blocks = [m for m in mods if isinstance(m, (BasicBlock, Bottleneck))]
    mbconv = [m for m in mods if isinstance(m, MBConv)]
    fires = [m for m in mods if isinstance(m, Fire)]
    inception = [m for m in mods if isinstance(m, Inception)]
    shortcut_convs = sum(isinstance(m, nn.Conv2d) for b in blocks if b.downsample is not None
                         for m in b.downsample.modules())
    depth = {  # weight layers on the main path, as each paper counts them
        "plain": len(convs) + linear,
        "resnet": len(convs) - shortcut_convs + linear,
        "dense": len(convs) + linear,  # conv0 + 2 per dense layer + transitions + classifier
        "efficientnet": len(mbconv) + 2,  # stem + blocks + head (Tan & Le Table 1)
        "squeezenet": len(convs) - len(fires),  # a Fire module is 2 deep (squeeze, expand)
        "googlenet": 3 + 2 * len(inception) + linear,  # conv1-3, 2 per module, fc
    }
    return {
        "depth": depth,
        "skip_connections": bool(blocks) or any(isinstance(m, _DenseBlock) for m in mods)
        or any(m.use_res_connect for m in mbconv),
        "branching": bool(fires or inception) or any(isinstance(m, InceptionA) for m in mods),
        "conv1x1": any(tuple(m.kernel_size) == (1, 1) for m in convs),
        "batch_norm": any(isinstance(m, nn.BatchNorm2d) for m in mods),
        "transitions": sum(isinstance(m, _Transition) for m in mods),
    }


DEPTH_KIND = {"alexnet": "plain", "vgg11": "plain", "vgg16": "plain", "vgg16_bn": "plain",
              "vgg19": "plain", "resnet18": "resnet", "resnet50": "resnet",
              "resnext50_32x4d": "resnet", "googlenet": "googlenet", "efficientnet_b0":
              "efficientnet", "efficientnet_b7": "efficientnet", "densenet121": "dense",
              "squeezenet1_1": "squeezenet"}  # inception_v3's 42 is the paper's own count


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_table_against_the_module_tree(arch):
    from workflow.analysis import arch_table

    row = arch_table.load().set_index("arch").loc[arch]
    facts = _tree_facts(arch)
    for col in arch_table.FLAGS:
        assert bool(row[col]) == facts[col], (arch, col)
    if arch in DEPTH_KIND:
        assert int(row["depth"]) == facts["depth"][DEPTH_KIND[arch]], arch
    if arch == "densenet121":
        assert facts["transitions"] == 3


def test_architecture_table_by_hand():
    """Three rows against the published definitions: VGG-16 (13 conv + 3 FC, no shortcut, no
    1x1), ResNet-50 (bottlenecks: 1x1 convs and shortcuts, batch norm), SqueezeNet 1.1 (Fire
    modules branch into 1x1 / 3x3 expand paths; no batch norm, no bypass)."""
    from workflow.analysis import arch_table

    t = arch_table.load().set_index("arch")
    cols = ["depth", "skip_connections", "branching", "conv1x1", "batch_norm"]
    assert t.loc["vgg16", cols].tolist() == [16, False, False, False, False]
    assert t.loc["resnet50", cols].tolist() == [50, True, False, True, True]
    assert t.loc["squeezenet1_1", cols].tolist() == [18, False, True, True, False]
    assert len(t) == len(ARCHS) and set(t.index) == set(ARCHS)


def test_architecture_join_and_errors(tmp_path):
    from workflow.analysis import arch_table

    attrs = pd.DataFrame({"arch": pd.array(["vgg16", "vgg16", "resnet18"], dtype="string"),
                          "layer": pd.array(["1", "2", "1"], dtype="string")})
    joined = arch_table.join(attrs, arch_table.load())
    assert joined["arch_depth"].tolist() == [16.0, 16.0, 18.0]
    assert joined["arch_skip_connections"].tolist() == [0.0, 0.0, 1.0]
    attrs.loc[2, "arch"] = "convnext_tiny"  # a preset: not in Table 2.2, NA
    assert arch_table.join(attrs, arch_table.load())["arch_depth"].isna().tolist() == [
        False, False, True]
    table = arch_table.load()
    with pytest.raises(arch_table.ArchTableError, match=r"no row for the architectures \['vgg16'"):
        arch_table.join(attrs, table[table["arch"] != "vgg16"])
    bad = tmp_path / "a.yaml"
    bad.write_text("architectures:\n  x: {depth: 3, skip_connections: 1, branching: false,"
                   " conv1x1: false, batch_norm: false, source: s}\n")
    with pytest.raises(arch_table.ArchTableError, match="a.yaml: architectures.x"):
        arch_table.load(bad)


# ----------------------------------------------------------------------------- summaries

# (arch, layer) -> (2AFC, err): err is lower-is-better
HAND = {("a", "1"): (0.60, 3.0), ("a", "2"): (0.70, 1.0), ("a", "3"): (0.65, 2.0),
        ("b", "1"): (0.62, 4.0), ("b", "2"): (0.64, 5.0), ("b", "3"): (0.70, 1.0),
        ("c", "1"): (0.50, 2.0), ("c", "2"): (0.55, 2.5), ("c", "3"): (0.58, 0.5),
        ("a", "lpips"): (0.99, 0.0)}


def _hand_selected() -> pd.DataFrame:
    rows = [dict(benchmark="similarity", dataset="d", split="s", arch=a, layer=x, metric=m,
                 value=v[i], n=1)
            for (a, x), v in HAND.items() for i, m in enumerate(("2afc", "err"))]
    return select_scores(_scores(rows), [{"name": "2AFC", "metric": "2afc"},
                                         {"name": "err", "metric": "err"}])


def test_arch_scores_and_rankings_by_hand():
    from workflow.analysis.summaries import arch_scores, rankings

    sel = _hand_selected()
    s = arch_scores(sel, ["err"]).set_index(["score", "arch"])
    # 2AFC: a (0.60+0.70+0.65)/3 = 0.65, best 0.70 at 2; b 0.6533, 0.70 at 3; c 0.5433, 0.58 at 3
    assert s.loc[("2AFC", "a"), "mean"] == pytest.approx(0.65)
    assert s.loc[("2AFC", "b"), "mean"] == pytest.approx(1.96 / 3)
    assert s.loc[("2AFC", "c"), ["best", "best_layer"]].tolist() == [0.58, "3"]
    assert s.loc[("2AFC", "a"), "layers"] == 3  # the LPIPS set is not a layer
    # err, lower is better: a best 1.0 at 2; b 1.0 at 3; c 0.5 at 3
    assert s.loc[("err", "c"), ["best", "best_layer"]].tolist() == [0.5, "3"]
    assert s.loc[("err", "b"), "mean"] == pytest.approx(10 / 3)
    r = rankings(sel, ["err"])
    arch = r[r["kind"] == "architecture"]
    # 2AFC: a and b tie at 0.70 (both rank 1), c third
    got = {(x["score"], x["item"]): x["rank"] for _, x in arch.iterrows()}
    assert got == {("2AFC", "a"): 1, ("2AFC", "b"): 1, ("2AFC", "c"): 3,
                   ("err", "c"): 1, ("err", "a"): 2, ("err", "b"): 2}
    layer = r[(r["kind"] == "layer") & (r["score"] == "2AFC")].set_index("item")
    # layer means: 1 (0.60+0.62+0.50)/3 = 0.5733, 2 0.63, 3 0.6433 -> ranks 3, 2, 1
    assert layer["rank"].to_dict() == {"3": 1, "2": 2, "1": 3}
    assert layer.loc["2", "value"] == pytest.approx(0.63)
    assert layer["best_for"].to_dict() == {"3": 2, "2": 1, "1": 0}  # b, c best at 3; a at 2
    err = r[(r["kind"] == "layer") & (r["score"] == "err")].set_index("item")
    # err means: 1 3.0, 2 2.833, 3 1.1667 -> lower is better: 3, 2, 1
    assert err["rank"].to_dict() == {"3": 1, "2": 2, "1": 3}


def test_arch_mean_correlations_by_hand():
    sel = _hand_selected()
    t = score_correlations(sel, {"bootstrap": {"n": 0}, "lower_is_better": ["err"]})
    row = t[t["level"] == "arch_mean"].iloc[0]
    x = [0.65, 1.96 / 3, 1.63 / 3]  # 2AFC means of a, b, c
    y = [2.0, 10 / 3, 5 / 3]  # err means
    assert row["n"] == 3
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    best = t[t["level"] == "arch_best"].iloc[0]
    assert best["pearson_r"] == pytest.approx(stats.pearsonr([0.70, 0.70, 0.58],
                                                             [1.0, 1.0, 0.5]).statistic)


def test_adaptation_ranking_means_by_hand(tmp_path):
    from workflow.analysis.adaptation_stats import ranking_means

    rows = []
    for comp, rk, base, runs in (("spatial", 0, 0.6, [0.7, 0.8]), ("mean", 0, 0.5, [0.6]),
                                 ("spatial", 1, 0.4, [0.5]), ("mean", 1, 0.6, [0.5])):
        c = dict(benchmark="adaptation", dataset="svhn", split="test", arch="alexnet",
                 layer="lpips", comparison=comp, channel_norm=True, ranking=rk, metric="2afc",
                 n=10)
        rows.append({**c, "variant": "baseline", "value": base})
        rows += [{**c, "variant": "adapted", "run": i, "value": v} for i, v in enumerate(runs)]
    m = ranking_means(_scores(rows)).set_index("ranking")
    # ranking 0: baseline (0.6+0.5)/2, adapted (0.75+0.6)/2; ranking 1: 0.5 and 0.5
    assert m.loc[0, ["baseline", "adapted", "cases"]].tolist() == pytest.approx([0.55, 0.675, 2])
    assert m.loc[1, ["baseline", "adapted"]].tolist() == pytest.approx([0.5, 0.5])
    from workflow.analysis.study_figures import adaptation_change_figure

    _, finding = adaptation_change_figure(_scores(rows), {"figures": {"dpi": 40}},
                                          tmp_path / "change")
    change = ((0.75 - 0.6) + (0.6 - 0.5) + (0.5 - 0.4) + (0.5 - 0.6)) / 4  # the four cases
    assert finding.startswith(f"Mean change after adaptation: {change:+.3f} on svhn test 2afc")


# ----------------------------------------------------------------------------- study figures


def _bapps_method_rows() -> list[dict]:
    # 2AFC = base + method offset + norm offset, two loss networks, two subsets + mean
    off = {"spatial": 0.03, "mean": -0.02, "sort": 0.01}
    return [dict(benchmark="similarity", dataset="bapps-2afc", split=sp, arch=a, layer="2",
                 comparison=c, channel_norm=cn, metric="2afc", n=10,
                 value=0.6 + off[c] + (0.01 if cn else 0.0) + (0.02 if a == "vgg16" else 0.0))
            for sp in ("cnn", "color", "mean") for a in ("alexnet", "vgg16") for c in off
            for cn in (True, False)] + [
        dict(benchmark="similarity", dataset="bapps-jnd", split="pooled", arch="alexnet",
             layer="2", comparison="spatial", channel_norm=True, metric="jnd_ap", n=10,
             value=0.5)]


def test_study_figures_findings_and_readability(tmp_path):
    from workflow.analysis import study_figures as sf
    from workflow.analysis.figures import arch_colors, probes_figure
    from workflow.analysis.summaries import arch_scores, rankings

    cfg = {"figures": {"dpi": 50}, "adaptation": {"datasets": ["svhn"]}}
    sel = _hand_selected()
    note, finding = sf.rankings_figure(rankings(sel, ["err"]), arch_scores(sel, ["err"]), cfg,
                                       tmp_path / "rank_heatmap")
    assert finding.startswith("a = b ranks first on 2AFC (layer 3 is best on average); "
                              "c ranks first on err"), finding
    scores = _scores(_bapps_method_rows())
    note, finding = sf.comparison_methods_figure(scores, cfg, tmp_path / "cm")
    assert note == "cm: 4 panels"  # cnn, color, the mean, JND pooled
    # mean split: spatial with norm 0.6 + 0.03 + 0.01 + 0.01 (vgg16's 0.02 averaged) = 0.65
    assert finding == ("On BAPPS 2AFC (mean), spatial (channel-normalised) scores highest on "
                       "average over the loss networks (0.650) and mean (not normalised) lowest "
                       "(0.590).")
    sr = [dict(benchmark="super_resolution", dataset=ds, split="test", arch=a, layer=x,
               variant=f"x4/{p}", metric="psnr", n=5,
               value=20 + int(x) + (3 if a == "vgg16" and p == "reference" else 0)
               + (1 if a == "alexnet" and p == "standard" else 0) + (0.5 if ds == "set5" else 0))
          for ds in ("set5", "set14") for a in ("alexnet", "vgg16") for x in "1234"
          for p in ("standard", "reference")]
    _, finding = sf.super_resolution_figure(_scores(sr), cfg, arch_colors(), tmp_path / "sr")
    assert finding.startswith("PSNR x4: best alexnet/4 under the standard protocol (25.25), "
                              "best vgg16/4 under the reference protocol (27.25)"), finding
    # probes: 4 sets x 5 methods x 24 lines (loss network, normalisation): the cell text must
    # stay >= 8 px where the report shows the figure
    probes = [dict(benchmark="probes", dataset="probes", split=f"set{k}", arch=a,
                   layer=str(x), comparison=c, channel_norm=cn, variant="generated",
                   metric="correct", value=float((k + x + len(a)) % 7), n=6)
              for k in range(4) for a in ("alexnet", "vgg16", "resnet18") for x in (1, 2, 3, 4)
              for cn in (True, False)
              for c in ("spatial", "mean", "sort", "spatial+mean", "spatial+sort")]
    _, finding = probes_figure(_scores(probes), cfg, tmp_path / "probes")
    assert TEXT_PX["probes"] >= 8.0, TEXT_PX["probes"]
    assert "orders the most probe pairs correctly" in finding
