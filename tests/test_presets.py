"""Loss networks of the node-name kind: the presets, config lossnets.custom, token folding,
and the study's 14 architectures unchanged (workflow.archs, workflow.lossnets)."""

from __future__ import annotations

import copy
import time
from math import log2

import pytest
import torch
from torch import nn

from workflow import lossnets
from workflow.archs import (
    ARCHS,
    CUSTOM,
    PRESETS,
    LossNet,
    NodeSpec,
    UnknownLossNetError,
    register_custom,
    weights_url,
)
from workflow.lossnets import NodeExtractor, build_extractor, fold_tap

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

# (channels, stride) of layers 1..4 at 224 px (the size the network sees, after the resize of
# vit_b_16 / maxvit_t), from the torchvision definitions: ConvNeXt and Swin stages at /4 /8 /16
# /32, ViT-B/16's 768-wide tokens on a 14 x 14 grid, MaxViT-T's blocks after its /2 stem.
EXPECTED = {
    "convnext_tiny": [(96, 4), (192, 8), (384, 16), (768, 32)],
    "convnext_base": [(128, 4), (256, 8), (512, 16), (1024, 32)],
    "efficientnet_v2_s": [(24, 2), (48, 4), (128, 16), (256, 32)],
    "mobilenet_v3_large": [(16, 2), (24, 4), (40, 8), (160, 32)],
    "regnet_y_1_6gf": [(32, 2), (48, 4), (120, 8), (888, 32)],
    "resnet101": [(64, 2), (256, 4), (512, 8), (2048, 32)],
    "wide_resnet50_2": [(64, 2), (256, 4), (512, 8), (2048, 32)],
    "swin_t": [(96, 4), (192, 8), (384, 16), (768, 32)],
    "vit_b_16": [(768, 16)] * 4,
    "maxvit_t": [(64, 4), (128, 8), (256, 16), (512, 32)],
}
# the presets that torchvision also publishes V2 weights for (V1 is used: the study's)
HAS_V2 = {"mobilenet_v3_large", "regnet_y_1_6gf", "resnet101", "wide_resnet50_2"}


@pytest.fixture(autouse=True)
def _no_custom_left():
    yield
    CUSTOM.clear()


def test_the_presets_are_the_issue_list_with_torchvision_v1_weights():
    import torchvision

    assert sorted(EXPECTED) == sorted(PRESETS)
    assert not set(PRESETS) & set(ARCHS)
    for arch, spec in PRESETS.items():
        enum = getattr(torchvision.models, spec.weights_enum)
        assert spec.weights_variant == "IMAGENET1K_V1" and hasattr(enum, "IMAGENET1K_V1")
        assert hasattr(enum, "IMAGENET1K_V2") == (arch in HAS_V2), arch
        assert weights_url(arch) == lossnets.weights_enum(arch).url == enum.IMAGENET1K_V1.url
        assert LossNet.parse(f"{arch}/2").taps == (spec.layers[1],)
    with pytest.raises(UnknownLossNetError, match="no LPIPS layer set"):
        LossNet("convnext_tiny", "lpips")
    with pytest.raises(UnknownLossNetError, match="did you mean convnext_tiny"):
        LossNet("convnext_tin", "1")


def _meta(arch):
    # shapes only: on the meta device (regnet's builder computes its widths with real tensors)
    dev = "cpu" if arch.startswith("regnet") else "meta"
    with torch.device(dev):
        return NodeExtractor(lossnets._build_model(arch, True).eval(), arch, PRESETS[arch].layers)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_preset_tap_channels_and_strides(arch):
    size = PRESETS[arch].input_size or 224
    ex = _meta(arch)
    out = ex(torch.empty(1, 3, 64, 64, device=next(ex.parameters()).device))
    if PRESETS[arch].input_size is None:  # CNNs and Swin take the 64 px image as it comes
        size = 64
    got = [(f.shape[1], 2 ** round(log2(size / f.shape[-1]))) for f in out.values()]
    assert list(out) == list(PRESETS[arch].layers)
    assert got == EXPECTED[arch]
    assert all(f.dim() == 4 and f.shape[-1] == f.shape[-2] for f in out.values())


HEADS = ("classifier", "fc", "heads", "aux1", "aux2", "AuxLogits")


def _fast_random(arch: str, seed: int = 0, upto: int | None = None) -> torch.nn.Module:
    """Random weights without torchvision's initialisation (seconds for the big models):
    built on meta, then every parameter and buffer drawn from a seeded normal (BatchNorm
    variances positive). The classifier heads (and, with ``upto``, the study container's
    children after child ``upto``) stay on meta: no pass reaches them. Not for Swin and
    MaxViT, whose index buffers are computed at build."""
    with torch.device("meta"):
        model = lossnets._build_model(arch, True).eval()
    model.to_empty(device="cpu")  # allocated, not touched: only what is filled costs
    if upto is None:
        parts = [m for n, m in model.named_children() if n not in HEADS]
        parts.append(nn.ParameterList(model.parameters(recurse=False)))  # a ViT's class token
    else:
        container = model.features if ARCHS[arch].container == "features" else model
        parts = list(container.children())[: upto + 1]
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 16, generator=g) * 0.05  # drawn once, then tiled: fills are copies
    at = 0
    for part in parts:
        with torch.no_grad():
            for name, t in [*part.named_parameters(), *part.named_buffers()]:
                if not t.is_floating_point():
                    t.zero_()
                    continue
                at = (at + 7919) % pool.numel()
                vals = pool.roll(at).repeat(-(-t.numel() // pool.numel()))[: t.numel()]
                t.copy_(vals.view(t.shape).abs() + 0.5 if name.endswith("running_var")
                        else vals.view(t.shape))
    return model


# Built and run here: every preset but the three big ones, whose code paths are the same as
# a smaller one's (convnext_base: convnext_tiny's; vit_b_16: the custom 32 px ViT below,
# backward included; maxvit_t: its 224 px pass alone takes seconds): their taps' shapes are
# checked on meta above.
RUN = sorted(set(EXPECTED) - {"convnext_base", "vit_b_16", "maxvit_t"})


@pytest.mark.parametrize("arch", RUN)
def test_preset_forward_and_backward_at_64px(arch):
    """The preset's four taps from one pass with random weights at 64 px, and a finite input
    gradient through all of them."""
    t0 = time.perf_counter()
    spec = PRESETS[arch]
    if spec.layout == "nchw" and not arch.startswith("regnet"):
        ex = NodeExtractor(_fast_random(arch), arch, spec.layers)
    else:
        ex = build_extractor(arch, weights="random")
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    feats = ex(x)
    assert list(feats) == list(spec.layers)
    sum(f.square().mean() for f in feats.values()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in ex.parameters())
    assert time.perf_counter() - t0 < 30


def test_the_pass_stops_after_the_last_tap():
    ex = build_extractor("mobilenet_v3_large", ["features.3"], weights="random")
    ran = []
    ex.backbone.features[4].register_forward_hook(lambda *_: ran.append(4))
    ex.backbone.classifier.register_forward_hook(lambda *_: ran.append("head"))
    out = ex(torch.rand(2, 3, 32, 32))
    assert list(out) == ["features.3"] and ran == []
    with torch.no_grad():  # = the torchvision children run by hand
        m = copy.deepcopy(ex.backbone)
        y = ex.norm(torch.rand(1, 3, 32, 32))
        ref = m.features[:4](y)
        torch.testing.assert_close(ex.backbone.features[:4](y), ref, rtol=0, atol=0)


def test_fold_tokens_against_a_hand_made_grid():
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 5, 3, 3, generator=g)  # N, C, H, W
    tokens = grid.flatten(2).transpose(1, 2)  # N, H*W, C, row-major as ViT's conv_proj
    cls = torch.randn(2, 1, 5, generator=g)
    regs = torch.randn(2, 4, 5, generator=g)
    torch.testing.assert_close(fold_tap(torch.cat([cls, tokens], 1), "tokens", 1), grid,
                               rtol=0, atol=0)
    torch.testing.assert_close(fold_tap(torch.cat([cls, regs, tokens], 1), "tokens", 5), grid,
                               rtol=0, atol=0)
    # a hand-placed value lands where it belongs: token 1 + (row 2 * 3 + col 1) -> [.., 2, 1]
    t = torch.zeros(1, 10, 2)
    t[0, 1 + 2 * 3 + 1] = torch.tensor([7.0, 8.0])
    folded = fold_tap(t, "tokens", 1)
    assert folded.shape == (1, 2, 3, 3) and folded[0, :, 2, 1].tolist() == [7.0, 8.0]
    assert folded.sum() == 15
    torch.testing.assert_close(fold_tap(grid.permute(0, 2, 3, 1), "nhwc"), grid, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a square grid"):
        fold_tap(torch.zeros(1, 11, 2), "tokens", 1)


def test_vit_tokens_fold_onto_the_patch_grid():
    """A custom ViT at 32 px: the first block's input (class token + position embedding
    added to the patch embedding) folds onto conv_proj's 2 x 2 grid."""
    register_custom({"vit_small_in": {"builder": "vit_b_16", "taps": [
        "encoder.dropout", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1",
        "encoder.layers.encoder_layer_2"], "layout": "tokens", "input_size": 32}})
    ex = NodeExtractor(_fast_random("vit_small_in"), "vit_small_in", CUSTOM["vit_small_in"].layers)
    x = torch.rand(1, 3, 48, 48, requires_grad=True)  # resized to 32 px
    feats = ex(x)
    assert [f.shape for f in feats.values()] == [(1, 768, 2, 2)] * 4
    sum(f.square().mean() for f in feats.values()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        got = ex(x)["encoder.dropout"]
        m = ex.backbone
        patches = m.conv_proj(ex.norm(x))  # N, C, 2, 2
        pos = m.encoder.pos_embedding[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    assert got.shape == (1, 768, 2, 2)
    torch.testing.assert_close(got, patches + pos, rtol=1e-6, atol=1e-6)
    # a 224 px file's 14 x 14 position embeddings are interpolated to the 2 x 2 grid on load,
    # as torchvision's own interpolate_embeddings does it
    from torchvision.models.vision_transformer import interpolate_embeddings

    state = dict(ex.backbone.state_dict())
    state["encoder.pos_embedding"] = torch.randn(1, 1 + 14 * 14, 768)
    picked = lossnets.fit_state_dict(ex.backbone, "vit_small_in", state)
    expected = interpolate_embeddings(32, 16, state)["encoder.pos_embedding"]
    torch.testing.assert_close(picked["encoder.pos_embedding"], expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- study archs


def _by_hand(model, arch, taps, x):
    """The study's taps by hand: ImageNet-normalise, run the container's children in order,
    keep a copy after each tapped child (every in-place op of ``model`` switched off: nothing
    is overwritten)."""
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    mean = torch.tensor(lossnets.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(lossnets.IMAGENET_STD).view(1, 3, 1, 1)
    y = (x - mean) / std
    out = {}
    container = model.features if ARCHS[arch].container == "features" else model
    for i, child in enumerate(container.children()):
        if i > max(taps):
            break
        y = child(y)
        if i in taps:
            out[i] = y.clone()
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_study_taps_equal_the_children_run_by_hand(arch):
    """The 14 study architectures keep their child-index taps: the extractor's tensors are
    the torchvision children's, run by hand (exact up to the one fused multiply-add of the
    normalisation, which is bit-compared by feeding both the same normalised input)."""
    spec = ARCHS[arch]
    taps = sorted({*spec.layers, *(spec.lpips or ())})
    # two builds of the same seeded weights (cheaper than a deep copy)
    model = _fast_random(arch, seed=1, upto=max(taps))
    ex = lossnets.FeatureExtractor(_fast_random(arch, seed=1, upto=max(taps)), arch, taps,
                                   normalize="none")
    size = 80 if arch == "inception_v3" else 48
    x = torch.rand(1, 3, size, size)
    mean = torch.tensor(lossnets.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(lossnets.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        got = ex((x - mean) / std)
        ref = _by_hand(model, arch, taps, x)
    assert sorted(got) == taps
    for t in taps:
        torch.testing.assert_close(got[t], ref[t], rtol=0, atol=0, msg=f"{arch} tap {t}")
    assert LossNet(arch, "2").taps == (spec.layers[1],)  # still child indices


# ----------------------------------------------------------------------------- custom


def test_custom_entry_builds_and_a_wrong_node_name_names_the_valid_ones():
    register_custom({"r18_blocks": {"builder": "resnet18",
                                    "weights": "ResNet18_Weights.IMAGENET1K_V1",
                                    "taps": ["maxpool", "layer1.1", "layer2.0.conv2", "layer3"]}})
    assert isinstance(CUSTOM["r18_blocks"], NodeSpec)
    ex = build_extractor("r18_blocks", lossnets=[LossNet.parse("r18_blocks/3")],
                         weights="random")
    out = ex(torch.rand(1, 3, 64, 64))
    assert list(out) == ["layer2.0.conv2"] and out["layer2.0.conv2"].shape == (1, 128, 8, 8)
    assert lossnets.weights_enum("r18_blocks").meta["_metrics"]["ImageNet-1K"]["acc@1"] == 69.758
    register_custom({"bad": {"builder": "resnet18", "taps": ["relu", "layer1", "layer2.9",
                                                             "layer5"]}})
    with pytest.raises(UnknownLossNetError) as e:
        build_extractor("bad", weights="random")
    msg = str(e.value)
    assert "no module 'layer2.9'" in msg and "layer2.0" in msg and "layer2.1" in msg
    assert "lossnets.custom.bad" in msg
    register_custom({"typo": {"builder": "resnet_18", "taps": ["a", "b", "c", "d"]}})
    with pytest.raises(UnknownLossNetError, match="no builder 'resnet_18'; near it: resnet18"):
        build_extractor("typo", weights="random")
    with pytest.raises(UnknownLossNetError, match="four module paths"):
        register_custom({"short": {"builder": "resnet18", "taps": ["layer1"]}})
    with pytest.raises(UnknownLossNetError, match="already a loss network"):
        register_custom({"alexnet": {"builder": "alexnet", "taps": ["a", "b", "c", "d"]}})


def test_custom_state_dict_file_loads_identically(tmp_path):
    register_custom({"r18": {"builder": "resnet18", "taps": ["relu", "layer1", "layer2",
                                                            "layer4"]}})
    a = build_extractor("r18", ["layer2"], weights="random", seed=3)
    path = tmp_path / "r18.pth"
    torch.save(a.backbone.state_dict(), path)
    b = build_extractor("r18", ["layer2"], weights=str(path))
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(a(x)["layer2"], b(x)["layer2"], rtol=0, atol=0)
    state = {k: v for k, v in a.backbone.state_dict().items() if not k.startswith("layer1.")}
    torch.save(state, path)
    with pytest.raises(lossnets.WeightsFileError, match="no key 'layer1.0.conv1.weight'"):
        build_extractor("r18", ["layer2"], weights=str(path))
    head = {k: v for k, v in a.backbone.state_dict().items() if not k.startswith("fc.")}
    torch.save(head, path)  # a head-less file is fine: fc comes after the deepest tap
    build_extractor("r18", ["layer2"], weights=str(path))


# ----------------------------------------------------------------------------- the plan


def _plan(tmp_path, **over):
    from workflow.plan import Plan, load_config, merge_config

    config = load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml",
                         overrides={"resources_dir": str(tmp_path / "res"),
                                    "results_dir": str(tmp_path / "out")})
    return Plan(merge_config(config, over))


def test_presets_and_custom_entries_in_every_benchmark_of_the_plan(tmp_path):
    nets = ["convnext_tiny/2", "vit_b_16/3", "mine/2"]
    custom = {"mine": {"builder": "resnet34", "weights": "ResNet34_Weights.IMAGENET1K_V1",
                       "weights_url": "https://download.pytorch.org/models/resnet34-b627a593.pth",
                       "taps": ["relu", "layer1", "layer2", "layer4"]}}
    over = {b: {"lossnets": nets} for b in ("similarity", "super_resolution", "delineation",
                                            "autoencoder", "probes")}
    plan = _plan(tmp_path, lossnets={"custom": custom, "weights": "imagenet"}, **over)
    assert {j["arch"] for j in plan.jobs("similarity")} >= {"convnext_tiny", "vit_b_16", "mine"}
    sr = {(j["arch"], j["layer"]) for j in plan.jobs("super_resolution")}
    assert {("convnext_tiny", "2"), ("vit_b_16", "3"), ("mine", "2")} <= sr
    urls = plan.weight_urls()
    assert weights_url("convnext_tiny") in urls and custom["mine"]["weights_url"] in urls
    assert plan.weight_file("vit_b_16").endswith("/vit_b_16-c867db91.pth")
    cfg = plan.stage_config("similarity", "score", "mine")
    assert cfg["custom_lossnets"] == {"mine": custom["mine"]} and cfg["lossnets"] == ["mine/2"]
    assert "custom_lossnets" not in plan.stage_config("similarity", "score", "convnext_tiny")
    assert '"mine"' in plan.custom_param()


def test_bad_custom_entries_fail_at_dag_build(tmp_path):
    from workflow.plan import ConfigError

    mine = {"builder": "resnet34", "taps": ["relu", "layer1", "layer2", "layer4"]}
    with pytest.raises(ConfigError, match="lossnets.custom.mine: weights is imagenet but the "
                                          "entry has no weights_url"):
        _plan(tmp_path, lossnets={"custom": {"mine": mine}, "weights": "imagenet"},
              similarity={"lossnets": ["mine/1"]})
    with pytest.raises(ConfigError, match="lossnets.custom"):
        _plan(tmp_path, lossnets={"custom": {"mine": {**mine, "taps": ["relu"]}}})
    with pytest.raises(UnknownLossNetError, match="similarity.lossnets: unknown architecture "
                                                  "'yours'"):
        _plan(tmp_path, lossnets={"custom": {"mine": mine}, "weights": "random"},
              similarity={"lossnets": ["yours/1"]})


# ----------------------------------------------------------------------------- attributes


def test_attributes_of_the_node_name_kind(tmp_path):
    """Against independent values: parameters counted on the torchvision modules, ConvNeXt's
    receptive field by hand, total FLOPs against torchvision's metadata (GFLOPS = MACs)."""
    from torchvision import models as tvm

    from workflow.analysis.attributes import count_params, lossnet_attributes

    df = lossnet_attributes(["alexnet"], [1], [], [224], extra=[
        "convnext_tiny/2", "vit_b_16/3", "swin_t/1", "pixel/l2"]).set_index("lossnet")
    assert list(df.index) == ["alexnet/1", "convnext_tiny/2", "vit_b_16/3", "swin_t/1"]
    with torch.device("meta"):
        cnx, vit = tvm.convnext_tiny(), tvm.vit_b_16()
    c = df.loc["convnext_tiny/2"]
    assert c["params_to_tap"] == count_params(cnx.features[:4].modules())
    assert c["params_total"] == tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1.meta["num_params"]
    # stem 4x4/4: 4; 3 blocks of 7x7 depthwise at jump 4: +72; 2x2/2 downsample: +4;
    # 3 blocks at jump 8: +144
    assert c["receptive_field"] == 4 + 72 + 4 + 144
    assert c["flops_total_224"] / 2 / 1e9 == pytest.approx(
        tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1.meta["_ops"], rel=0.01)
    assert (c["channels"], c["features_224"], c["container"]) == (192, 192 * 28 * 28, "nodes")
    assert pd_isna(c["child_index"]) and c["self_supervised"] == False  # noqa: E712
    v = df.loc["vit_b_16/3"]
    blocks = [vit.encoder.layers[i] for i in range(9)]
    by_hand = (count_params(vit.conv_proj.modules()) + vit.class_token.numel()
               + vit.encoder.pos_embedding.numel() + sum(count_params(b.modules()) for b in blocks))
    assert v["params_to_tap"] == by_hand
    assert v["imagenet_acc1"] == tvm.ViT_B_16_Weights.IMAGENET1K_V1.meta["_metrics"][
        "ImageNet-1K"]["acc@1"]
    assert v["flops_total_224"] / 2 / 1e9 == pytest.approx(
        tvm.ViT_B_16_Weights.IMAGENET1K_V1.meta["_ops"], rel=0.01)
    assert pd_isna(v["receptive_field"]) and pd_isna(v["skip_connections"])
    assert (v["channels"], v["features_224"]) == (768, 768 * 14 * 14)
    assert df.loc["alexnet/1", "receptive_field"] == 11 and not df.loc["alexnet/1",
                                                                        "self_supervised"]


def pd_isna(v) -> bool:
    import pandas as pd

    return bool(pd.isna(v))


def test_the_attribute_rule_sees_the_benchmarks_presets(tmp_path):
    import json

    plan = _plan(tmp_path, similarity={"lossnets": ["convnext_tiny/2", "vit_b_16/3"]})
    ln = json.loads(plan.analysis_params("attributes"))["lossnets"]
    # the two of similarity, and the demo's other benchmarks' presets (swin_t/2)
    assert sorted(ln["extra"]) == ["convnext_tiny/2", "swin_t/2", "vit_b_16/3"]


def test_the_weights_command_takes_the_custom_entries(tmp_path):
    """`data weights --archs mine --custom JSON` (what download_weights runs): the job's own
    process learns the entry from --custom and verifies its file under the URL's name."""
    import json

    from workflow import cli

    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "mine-file.pth").write_bytes(b"weights")
    custom = {"mine": {"builder": "resnet34", "taps": ["relu", "layer1", "layer2", "layer4"],
                       "weights_url": "https://example.invalid/models/mine-file.pth"}}
    CUSTOM.clear()
    cli.run("data", "weights", ["--archs", "mine", "--out", str(tmp_path / "verified"),
                                "--mirror", str(folder), "--custom", json.dumps(custom)])
    rec = json.loads((tmp_path / "verified" / "mine-file.pth.json").read_text())
    assert rec["arch"] == "mine" and rec["size"] == 7


def test_fused_feature_loss_of_node_taps_equals_each_model_alone():
    """The fused SR loss with a module-path loss network (mobilenet_v3_large/1 and /2): each
    model's loss is feature_loss of its own output against its target."""
    from workflow.lossnets import feature_loss, fused_feature_loss

    nets = [LossNet.parse("mobilenet_v3_large/1"), LossNet.parse("mobilenet_v3_large/2")]
    ex = build_extractor("mobilenet_v3_large", lossnets=nets, weights="random")
    g = torch.Generator().manual_seed(0)
    outputs = torch.rand(2, 2, 3, 32, 32, generator=g, requires_grad=True)
    targets = torch.rand(1, 2, 3, 32, 32, generator=g)
    got = fused_feature_loss(ex, [n.taps for n in nets], outputs, targets, [0, 0])
    for i, n in enumerate(nets):
        want = feature_loss(ex, n.taps, outputs[i], targets[0])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-7)
    got.sum().backward()
    assert torch.isfinite(outputs.grad).all() and outputs.grad[1].abs().sum() > 0
