"""Agreement with the `lpips` package when both use identical backbone weights.

A randomly initialised torchvision backbone is saved as a state_dict file and loaded
into both this project's extractor (weights = the file) and the package's trunk
(``pnet_rand=True``, so nothing is downloaded). Then
- spatial + channel norm on the LPIPS layer set == ``lpips.LPIPS(lpips=False)``;
- the same with the package's shipped linear weights (``weights/v0.1/<net>.pth`` inside
  the package) as per-channel weights == ``lpips.LPIPS(lpips=True)``.
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch

from workflow import compare
from workflow.compare import Variant
from workflow.lossnets import LossNet, build_extractor, load_backbone

lpips = pytest.importorskip("lpips")

NETS = {"alexnet": "alex", "vgg16": "vgg", "squeezenet1_1": "squeeze"}


@contextlib.contextmanager
def _skip_init():
    """Skip torch.nn.init while building models whose weights are overwritten right after
    (VGG-16's 138M-parameter initialisation would dominate the test's run time)."""
    names = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "constant_",
             "xavier_uniform_", "trunc_normal_")
    with mock.patch.multiple(torch.nn.init, **{n: (lambda t, *a, **k: t) for n in names}):
        yield


def _package_model(net: str, linear: bool, backbone_state: dict) -> torch.nn.Module:
    with warnings.catch_warnings(), _skip_init():  # the package uses torchvision's old API
        warnings.simplefilter("ignore")
        m = lpips.LPIPS(net=net, pretrained=True, lpips=linear, pnet_rand=True, verbose=False)
    # the trunk holds torchvision's `features` children as net.slice<k>.<child index>
    mapped = {}
    for key in m.net.state_dict():
        _, idx, rest = key.split(".", 2)
        mapped[key] = backbone_state[f"features.{idx}.{rest}"]
    m.net.load_state_dict(mapped, strict=True)
    return m.eval()


@pytest.fixture(scope="module", params=sorted(NETS))
def setup(request, tmp_path_factory):
    arch = request.param
    backbone = load_backbone(arch, "random", seed=7)
    path = tmp_path_factory.mktemp(arch) / f"{arch}.pth"
    torch.save(backbone.state_dict(), path)
    net = LossNet(arch, "lpips")
    with _skip_init():  # every parameter comes from the file
        ours = build_extractor(arch, lossnets=[net], weights=str(path))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    state = {k: v for k, v in backbone.state_dict().items() if k.startswith("features.")}
    return arch, net, ours, state, x, y


def test_spatial_channel_norm_equals_lpips_baseline(setup):
    arch, net, ours, state, x, y = setup
    theirs = _package_model(NETS[arch], False, state)
    v = Variant("spatial", True)
    with torch.no_grad():
        d_ours = compare.distances(ours(x), ours(y), [v], taps=net.taps)[v]
        d_pkg = theirs(x, y, normalize=True).reshape(-1)  # normalize: [0,1] input
    torch.testing.assert_close(d_ours, d_pkg, rtol=1e-5, atol=1e-6)


def test_shipped_linear_weights_equal_lpips(setup):
    arch, net, ours, state, x, y = setup
    theirs = _package_model(NETS[arch], True, state)
    weights = {tap: lin.model[-1].weight.detach().reshape(-1)
               for tap, lin in zip(net.taps, theirs.lins)}
    assert all((w >= 0).all() for w in weights.values())
    v = Variant("spatial", True)
    with torch.no_grad():
        d_ours = compare.distances(ours(x), ours(y), [v], taps=net.taps, weights=weights)[v]
        d_pkg = theirs(x, y, normalize=True).reshape(-1)
    torch.testing.assert_close(d_ours, d_pkg, rtol=1e-5, atol=1e-6)
