"""The loss-network registry and extractor (workflow.lossnets)."""

from __future__ import annotations

from math import log2

import pytest
import torch

from workflow import lossnets
from workflow.lossnets import ARCHS, FeatureExtractor, LossNet, UnknownLossNetError, build_extractor

# docs/lossnets.md's table: (channels, stride) at layers 1..4, from the architectures' definitions
EXPECTED = {
    "alexnet": [(64, 4), (192, 8), (384, 16), (256, 16)],
    "vgg11": [(64, 1), (128, 2), (256, 4), (512, 16)],
    "vgg16": [(64, 1), (128, 2), (256, 4), (512, 16)],
    "vgg16_bn": [(64, 1), (128, 2), (256, 4), (512, 16)],
    "vgg19": [(64, 1), (128, 2), (256, 4), (512, 16)],
    "resnet18": [(64, 2), (64, 4), (128, 8), (512, 32)],
    "resnet50": [(64, 2), (256, 4), (512, 8), (2048, 32)],
    "resnext50_32x4d": [(64, 2), (256, 4), (512, 8), (2048, 32)],
    "googlenet": [(64, 2), (256, 8), (512, 16), (1024, 32)],
    "inception_v3": [(64, 2), (256, 8), (288, 8), (768, 16)],
    "efficientnet_b0": [(32, 2), (16, 2), (80, 16), (320, 32)],
    "efficientnet_b7": [(64, 2), (32, 2), (160, 16), (640, 32)],
    "densenet121": [(64, 2), (256, 4), (512, 8), (1024, 32)],
    "squeezenet1_1": [(64, 2), (128, 4), (256, 8), (512, 16)],
}
# channels of the LPIPS layer sets, as the lpips package declares them (its `chns`)
LPIPS_CHANNELS = {
    "alexnet": [64, 192, 384, 256, 256],
    "vgg16": [64, 128, 256, 512, 512],
    "squeezenet1_1": [64, 128, 256, 384, 384, 512, 512],
}


def _meta_extractor(arch: str, taps) -> FeatureExtractor:
    # shapes only: build on the meta device, so even efficientnet_b7 costs nothing
    with torch.device("meta"):
        model = lossnets._build_model(arch, pretrained_layout=True)
        return FeatureExtractor(model.eval(), arch, taps)


def _shapes(arch: str, taps, size: int):
    ex = _meta_extractor(arch, taps)
    with torch.device("meta"):
        out = ex(torch.empty(1, 3, size, size))
    return {t: (f.shape[1], 2 ** round(log2(size / f.shape[-1]))) for t, f in out.items()}


def test_registry_covers_the_study():
    assert sorted(ARCHS) == sorted(EXPECTED)
    assert lossnets.LPIPS_ARCHS == ("alexnet", "vgg16", "squeezenet1_1")


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_tap_channels_and_strides(arch):
    size = 299 if arch == "inception_v3" else 224
    taps = ARCHS[arch].layers
    shapes = _shapes(arch, taps, size)
    assert [shapes[t] for t in taps] == EXPECTED[arch]


@pytest.mark.parametrize("arch", sorted(LPIPS_CHANNELS))
def test_lpips_set_channels(arch):
    net = LossNet(arch, "lpips")
    shapes = _shapes(arch, net.taps, 224)
    assert [shapes[t][0] for t in net.taps] == LPIPS_CHANNELS[arch]


def test_unknown_arch_and_layer_rejected_with_the_list():
    with pytest.raises(UnknownLossNetError) as e:
        LossNet("resnet34", "1")
    assert all(a in str(e.value) for a in ARCHS)
    with pytest.raises(UnknownLossNetError,
                       match="LPIPS sets exist for alexnet, vgg16, squeezenet1_1"):
        LossNet("resnet18", "lpips")
    with pytest.raises(UnknownLossNetError, match="1, 2, 3, 4 or lpips"):
        LossNet("alexnet", "5")
    with pytest.raises(UnknownLossNetError):
        build_extractor("not_a_net", weights="random")


def test_parse_and_ids():
    assert LossNet.parse("alexnet/2") == LossNet("alexnet", "2")
    assert LossNet.parse("vgg16:lpips").id == "vgg16/lpips"
    assert LossNet.parse("squeezenet1_1/4").taps == (12,)
    assert LossNet("alexnet", "lpips").taps == (1, 4, 7, 9, 11)
    with pytest.raises(UnknownLossNetError, match="must look like"):
        LossNet.parse("alexnet")


def test_one_pass_returns_every_tap_and_gradients_flow():
    ex = build_extractor("squeezenet1_1", [1, 3, 7], weights="random")
    assert all(not p.requires_grad for p in ex.parameters())
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    feats = ex(x)
    assert sorted(feats) == [1, 3, 7]
    sum(f.square().mean() for f in feats.values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    ex.train()
    assert not ex.training  # a loss network always runs in eval mode


def test_state_dict_file_loads_identically(tmp_path):
    model = lossnets.load_backbone("squeezenet1_1", "random", seed=3)
    path = tmp_path / "squeeze.pth"
    torch.save(model.state_dict(), path)
    a = build_extractor("squeezenet1_1", [12], weights="random", seed=3)
    b = build_extractor("squeezenet1_1", [12], weights=str(path))
    c = build_extractor("squeezenet1_1", [12], weights="random", seed=4)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(a(x)[12], b(x)[12], rtol=0, atol=0)
        assert not torch.allclose(a(x)[12], c(x)[12])
    assert lossnets.weights_id("squeezenet1_1", str(path)) == "file:squeeze.pth"


def test_missing_weights_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_weights"):
        build_extractor("alexnet", weights="imagenet", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_extractor("alexnet", weights=str(tmp_path / "nope.pth"))


def test_imagenet_normalisation_and_raw_input():
    ex_n = build_extractor("alexnet", [1], weights="random", normalize="imagenet")
    ex_r = build_extractor("alexnet", [1], weights="random", normalize="none")
    x = torch.rand(1, 3, 64, 64)
    mean = torch.tensor(lossnets.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(lossnets.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ex_n(x)[1], ex_r((x - mean) / std)[1])


def test_feature_loss_is_the_mse_of_features_with_target_detached():
    ex = build_extractor("alexnet", [1, 4], weights="random")
    out = torch.rand(2, 3, 64, 64, requires_grad=True)
    tgt = torch.rand(2, 3, 64, 64, requires_grad=True)
    loss = lossnets.feature_loss(ex, [1, 4], out, tgt)
    with torch.no_grad():
        fo, ft = ex(out), ex(tgt)
        by_hand = sum(((fo[t] - ft[t]) ** 2).sum() / fo[t].numel() for t in (1, 4))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    loss.backward()
    assert out.grad is not None and tgt.grad is None


def _joint_feature_loss(ex, taps, output, target):
    """The earlier feature loss: output and target in one batch, so backward ran through
    the target's half too (and threw that half's input gradient away)."""
    n = output.shape[0]
    feats = ex(torch.cat([output, target.detach()], 0))
    return sum(torch.mean((feats[t][:n] - feats[t][n:].detach()) ** 2) for t in taps)


@pytest.mark.parametrize("arch,taps", [("squeezenet1_1", [1, 3]), ("resnet18", [2, 5])])
def test_feature_loss_equals_the_joint_pass(arch, taps):
    """Loss and gradient of the separate no-grad target pass = the joint pass's (fp32):
    SqueezeNet keeps in-place ReLUs next to taps, ResNet has (frozen) BatchNorm."""
    ex = build_extractor(arch, taps, weights="random")
    g = torch.Generator().manual_seed(1)
    out = torch.rand(2, 3, 48, 48, generator=g).requires_grad_()
    tgt = torch.rand(2, 3, 48, 48, generator=g)
    new = lossnets.feature_loss(ex, taps, out, tgt)
    (g_new,) = torch.autograd.grad(new, out)
    old = _joint_feature_loss(ex, taps, out, tgt)
    (g_old,) = torch.autograd.grad(old, out)
    assert abs(new.item() - old.item()) <= 1e-6 * abs(old.item())
    assert (g_new - g_old).abs().max() <= 1e-6 * g_old.abs().max()


def test_feature_loss_backpropagates_through_the_output_only():
    """FLOPs by torch.utils.flop_counter: the backward convolutions are exactly those of the
    output's features alone (half the joint pass's), the forward ones two passes of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    ex = build_extractor("alexnet", [1, 4], weights="random")
    out = torch.rand(2, 3, 64, 64, requires_grad=True)
    tgt = torch.rand(2, 3, 64, 64, requires_grad=True)

    def conv_flops(loss_fn):
        with FlopCounterMode(display=False) as fc:
            loss_fn().backward()
        counts = fc.get_flop_counts()["Global"]
        return counts[aten.convolution], counts[aten.convolution_backward]

    fwd_out, bwd_out = conv_flops(lambda: sum(f.sum() for f in ex(out).values()))
    fwd_new, bwd_new = conv_flops(lambda: lossnets.feature_loss(ex, [1, 4], out, tgt))
    fwd_old, bwd_old = conv_flops(lambda: _joint_feature_loss(ex, [1, 4], out, tgt))
    assert bwd_out > 0 and bwd_new == bwd_out and bwd_old == 2 * bwd_out
    assert fwd_new == fwd_old == 2 * fwd_out
    assert tgt.grad is None
    # nothing of the target's pass is kept for backward: its features have no graph
    feats = {}
    hook = ex.body[1].register_forward_hook(lambda _m, _i, o: feats.setdefault(len(feats), o))
    try:
        lossnets.feature_loss(ex, [1, 4], out, tgt)
    finally:
        hook.remove()
    assert feats[0].grad_fn is None and feats[1].grad_fn is not None  # target first, then output


@pytest.mark.gpu
def test_feature_loss_on_cuda_equals_the_cpu_one_in_fp32():
    ex = build_extractor("resnet18", [2, 5], weights="random")
    g = torch.Generator().manual_seed(2)
    out = torch.rand(2, 3, 64, 64, generator=g).requires_grad_()
    tgt = torch.rand(2, 3, 64, 64, generator=g)
    loss = lossnets.feature_loss(ex, [2, 5], out, tgt)
    (grad,) = torch.autograd.grad(loss, out)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32
    try:
        out_c = out.detach().cuda().requires_grad_()
        loss_c = lossnets.feature_loss(ex.cuda(), [2, 5], out_c, tgt.cuda())
        (grad_c,) = torch.autograd.grad(loss_c, out_c)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-4)
    assert (grad_c.cpu() - grad).abs().max() <= 1e-4 * grad.abs().max()


def test_weight_file_names_match_torchvision_enums():
    # the registry holds them as data so the Snakefile never imports torchvision
    from workflow.lossnets import ARCHS, weights_enum, weights_url

    for arch in ARCHS:
        assert weights_url(arch) == weights_enum(arch).url, arch


def _out_of_place_taps(ex: FeatureExtractor, x: torch.Tensor) -> dict:
    """The taps of a deep copy with every in-place op switched off (the safe reference)."""
    import copy

    ref = copy.deepcopy(ex)
    for m in ref.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    with torch.no_grad():
        return {t: f.clone() for t, f in ref(x).items()}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_in_place_ops_never_overwrite_a_tap(arch):
    # the extractor keeps torchvision's in-place ReLUs except where their input is a tap;
    # every tap must equal a fully out-of-place pass, for the study's taps and for a tap
    # after every child (which protects every boundary), and backward must still work
    spec = ARCHS[arch]
    size = 96
    last = spec.layers[-1]
    for taps in (sorted(set(spec.layers) | set(spec.lpips or ())), list(range(last + 1))):
        ex = build_extractor(arch, taps, weights="random")
        x = torch.rand(2, 3, size, size)
        expected = _out_of_place_taps(ex, x)
        with torch.no_grad():
            got = ex(x)
        for t in taps:
            torch.testing.assert_close(got[t], expected[t], rtol=0, atol=0, msg=f"{arch} tap {t}")
        xg = x.clone().requires_grad_(True)
        sum(f.square().mean() for f in ex(xg).values()).backward()
        assert torch.isfinite(xg.grad).all()
    # the study's taps keep most of torchvision's in-place ops
    ex = build_extractor(arch, spec.layers, weights="random")
    assert any(getattr(m, "inplace", False) for m in ex.modules()) \
        or arch in ("googlenet", "inception_v3")
