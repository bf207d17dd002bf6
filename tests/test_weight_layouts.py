"""Weight files in the layouts torchvision publishes them, and the files that are refused.

The published IMAGENET1K_V1 files are what torchvision's own loaders read strictly: the keys
of the model its builder makes when given weights (GoogLeNet and Inception-v3 with their
auxiliary heads: ``googlenet()`` / ``inception_v3()`` force ``aux_logits=True`` and load
``aux1.*`` / ``aux2.*`` / ``AuxLogits.*``), except DenseNet, whose file has the legacy key
names that ``torchvision.models.densenet._load_state_dict`` renames (``norm.1`` ->
``norm1``) and no ``num_batches_tracked`` buffers (it predates PyTorch 0.4.1). Files saved
before PyTorch 1.6 and never re-saved (e.g. vgg19-dcbb9e9d.pth, pytorch/vision#125) are in
the legacy non-zip serialisation.

Every architecture's layout is checked key by key on the meta device (no memory, no time);
the layout-specific ones (DenseNet, GoogLeNet, Inception-v3), a legacy-serialised file and a
fine-tuned head go through real files, against torchvision's own loading code.
"""

from __future__ import annotations

import functools
import io
import re
import tarfile

import pytest
import torch
import torchvision
from torch import nn

from workflow import lossnets
from workflow.archs import ARCHS, arch_spec
from workflow.datasets.weights import WeightsFileError
from workflow.lossnets import FeatureExtractor, build_extractor, load_backbone
from workflow.plan import ConfigError, Plan, complete_config

# what torchvision's builders set when they are given IMAGENET1K_V1 weights
TORCHVISION_PRETRAINED = {
    "googlenet": {"aux_logits": True, "init_weights": False, "transform_input": True},
    "inception_v3": {"aux_logits": True, "init_weights": False, "transform_input": True},
}
AUX = ("aux1.", "aux2.", "AuxLogits.")


def torchvision_model(arch: str, **kwargs) -> nn.Module:
    builder = getattr(torchvision.models, arch_spec(arch).builder)
    return builder(weights=None, **{**TORCHVISION_PRETRAINED.get(arch, {}), **kwargs})


@functools.cache
def meta_layout(arch: str) -> tuple[dict, nn.Module]:
    """The published layout (meta tensors) and the model ``load_backbone`` builds, on meta."""
    with torch.device("meta"):
        state = published(arch, torchvision_model(arch).state_dict())
        return state, lossnets._build_model(arch, pretrained_layout=True)


def published(arch: str, state: dict) -> dict:
    """``state`` (a torchvision model's) in the layout of the published file."""
    if arch != "densenet121":
        return dict(state)
    # written independently of torchvision's regex: denselayerN.norm1 -> denselayerN.norm.1
    return {re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", k): v
            for k, v in state.items() if not k.endswith("num_batches_tracked")}


def all_taps(arch: str) -> list[int]:
    spec = ARCHS[arch]
    return sorted({*spec.layers, *(spec.lpips or ())})


def tapped_keys(model: nn.Module, arch: str, taps) -> set[str]:
    """The model's state_dict keys that the extractor's pass reads (by tensor identity)."""
    ex = FeatureExtractor(model, arch, taps)
    used = {id(t) for t in [*ex.parameters(), *ex.buffers()]}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in used}


def loaded_the_torchvision_way(arch: str, path, monkeypatch) -> nn.Module:
    """``torchvision.models.<arch>(weights="IMAGENET1K_V1")`` reading ``path`` instead of the
    download: torchvision's builder, key remapping and strict load_state_dict."""
    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url",
                        lambda url, *a, **k: torch.load(path, map_location="cpu"))
    builder = getattr(torchvision.models, arch_spec(arch).builder)
    return builder(weights="IMAGENET1K_V1").eval()


# ----------------------------------------------------------------------------- every layout


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_published_key_layout_loads_completely(arch):
    state, ours = meta_layout(arch)
    variants = [state]
    if any(k.endswith("num_batches_tracked") for k in state):  # as saved before PyTorch 0.4.1
        variants.append({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    for variant in variants:
        picked = lossnets.fit_state_dict(ours, arch, variant)
        assert len(picked) == len(variant)  # the whole published file fits
        with torch.device("meta"):
            model = lossnets._build_model(arch, pretrained_layout=True)
        # as strict as torchvision's load (BatchNorm fills in absent num_batches_tracked)
        model.load_state_dict(picked, strict=True, assign=True)
    if arch in ("googlenet", "inception_v3"):
        assert any(k.startswith(AUX) for k in state)  # the published file has them
        # ... and a file without them (saved with aux_logits=False) fits as well
        no_aux = {k: v for k, v in state.items() if not k.startswith(AUX)}
        picked = lossnets.fit_state_dict(ours, arch, no_aux)
        assert tapped_keys(ours, arch, all_taps(arch)) <= set(picked)
    if arch == "densenet121":
        assert "features.denseblock1.denselayer1.norm.1.weight" in state
        assert "features.denseblock1.denselayer1.norm1.weight" in picked


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_only_layers_up_to_the_deepest_tap_are_required(arch):
    """A file with nothing after the deepest tap (or another head) serves the loss network;
    one that misses a tapped layer's tensor is refused, naming that key."""
    state, ours = meta_layout(arch)
    taps = all_taps(arch)
    needed = tapped_keys(ours, arch, taps)
    renamed = lossnets.torchvision_keys(arch_spec(arch).builder, state)
    trunk = {k: v for k, v in renamed.items() if k in needed}
    assert set(lossnets.fit_state_dict(ours, arch, trunk, taps)) == set(trunk)
    deepest = max(needed, key=list(ours.state_dict()).index)  # the last tensor the pass reads
    short = {k: v for k, v in trunk.items() if k != deepest}
    if deepest.endswith("num_batches_tracked"):
        assert set(lossnets.fit_state_dict(ours, arch, short, taps)) == set(short)
    else:
        with pytest.raises(WeightsFileError, match=re.escape(repr(deepest))):
            lossnets.fit_state_dict(ours, arch, short, taps)


# ----------------------------------------------------------------------------- real files

ROUND_TRIPS = {  # arch: (what its published file tests, legacy serialisation, input size)
    "densenet121": ("legacy key names, no num_batches_tracked", True, 32),
    "googlenet": ("aux1 / aux2 keys", False, 32),
    "inception_v3": ("AuxLogits keys", False, 75),
    "squeezenet1_1": ("legacy serialisation", True, 32),
}


@pytest.mark.parametrize("arch", sorted(ROUND_TRIPS))
def test_published_file_gives_the_taps_torchvision_gives(arch, tmp_path, monkeypatch):
    _, legacy, size = ROUND_TRIPS[arch]
    torch.manual_seed(1)
    state = published(arch, torchvision_model(arch).state_dict())
    path = tmp_path / ARCHS[arch].weights_file
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    assert (path.read_bytes()[:2] == b"PK") is not legacy

    ours = load_backbone(arch, str(path))
    reference = loaded_the_torchvision_way(arch, path, monkeypatch)
    taps = all_taps(arch)
    own = ours.state_dict()
    for key in tapped_keys(ours, arch, taps):  # the saved tensors, bit for bit
        for name in published(arch, {key: None}):  # (none for DenseNet's absent counters)
            assert torch.equal(own[key], state[name]), key
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        a = FeatureExtractor(ours, arch, taps)(x)
        b = FeatureExtractor(reference, arch, taps)(x)
    for t in taps:
        assert torch.equal(a[t], b[t]), t


def test_a_fine_tuned_head_is_a_valid_loss_network(tmp_path):
    torch.manual_seed(2)
    tuned = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18-cifar10.pth"
    torch.save(tuned.state_dict(), path)
    ours = load_backbone("resnet18", str(path))
    assert torch.equal(ours.layer4[1].bn2.running_var, tuned.layer4[1].bn2.running_var)
    x = torch.rand(1, 3, 32, 32)
    taps = ARCHS["resnet18"].layers
    with torch.no_grad():
        a = FeatureExtractor(ours, "resnet18", taps)(x)
        b = FeatureExtractor(tuned.eval(), "resnet18", taps)(x)
    assert all(torch.equal(a[t], b[t]) for t in taps)
    assert ours.fc.out_features == 1000  # the head that does not fit is left alone


def test_a_file_that_ends_early_serves_the_earlier_taps(tmp_path):
    state = lossnets.load_backbone("squeezenet1_1", "random", seed=5).state_dict()
    path = tmp_path / "squeeze-trunk.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("features.12.")}, path)
    ex = build_extractor("squeezenet1_1", [1, 7], weights=str(path))
    assert torch.equal(ex.body[6].squeeze.weight, state["features.6.squeeze.weight"])
    with pytest.raises(WeightsFileError, match="no key 'features.12.squeeze.weight'"):
        build_extractor("squeezenet1_1", [12], weights=str(path))


# ----------------------------------------------------------------------------- refused


def _refused(arch: str, path, match: str, weights: str | None = None, weights_dir=None) -> str:
    with pytest.raises(WeightsFileError) as e:
        load_backbone(arch, weights or str(path), weights_dir or path.parent)
    msg = str(e.value)
    assert str(path) in msg and re.search(match, msg), msg
    key = "lossnets.weights" if weights == "imagenet" else f"lossnets.weights_paths.{arch}"
    assert f"config key {key})" in msg and "\n" not in msg
    assert type(e.value).__module__.startswith("workflow.")  # the CLI prints it as one line
    return msg


def test_weights_paths_naming_an_unknown_architecture_fails_at_dag_build(tmp_path):
    cfg = {"lossnets": {"weights_paths": {"vgg16": str(tmp_path / "a.pth"),
                                          "vgg17": str(tmp_path / "b.pth")}}}
    with pytest.raises(ConfigError) as e:
        Plan(cfg)
    msg = str(e.value)
    assert "lossnets.weights_paths" in msg and "'vgg17'" in msg and "b.pth" in msg
    assert all(a in msg for a in ARCHS)
    with pytest.raises(ConfigError, match=r"lossnets.weights_paths.vgg16: the path is empty"):
        complete_config({"lossnets": {"weights_paths": {"vgg16": ""}}})


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    conv = nn.Conv2d(3, 64, 3, stride=2)
    cases = {
        "list.pth": (lambda p: torch.save([conv.state_dict()], p),
                     r"holds a list, not a state_dict"),
        "lfs.pth": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\n"),
                    r"not a PyTorch file: it starts with the text 'version https://git-lfs"),
        "module.pth": (lambda p: torch.save(conv, p),
                       r"pickled Python objects \(it needs torch.nn.modules.conv.Conv2d\)"),
        "empty.pth": (lambda p: p.write_bytes(b""), r"is empty"),
        "checkpoint.pth": (lambda p: torch.save({"epoch": 3, "state_dict": conv.state_dict()}, p),
                           r"entry 'epoch' is a int.*entry 'state_dict' may be the state_dict"),
        "script.pth": (lambda p: torch.jit.save(torch.jit.trace(conv, torch.zeros(1, 3, 8, 8)),
                                                str(p)), r"TorchScript archive"),
    }
    for name, (write, match) in cases.items():
        path = tmp_path / name
        write(path)
        _refused("squeezenet1_1", path, match)
    # a truncated download of a good file
    good = tmp_path / "good.pth"
    torch.save(conv.state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:200])
    _refused("squeezenet1_1", tmp_path / "cut.pth", r"cannot be read by torch.load .*truncated")
    # PyTorch's tar serialisation (before 2017), which weights_only cannot read
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sys_info")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x80\x02N."))
    (tmp_path / "old.pth").write_bytes(buf.getvalue())
    _refused("squeezenet1_1", tmp_path / "old.pth", r"tar serialisation.*weights_only=False")
    # the imagenet file itself, in the weights folder: config key lossnets.weights
    bad = tmp_path / ARCHS["alexnet"].weights_file
    bad.write_text("<html>404</html>")
    _refused("alexnet", bad, r"starts with the text '<html>.*fetch it again .*download_weights",
             weights="imagenet")


def test_state_dict_of_another_architecture_names_the_first_mismatch(tmp_path):
    squeeze = tmp_path / "squeezenet.pth"
    torch.save(lossnets.load_backbone("squeezenet1_1", "random").state_dict(), squeeze)
    _refused("densenet121", squeeze, r"is not a densenet121 state_dict: it has no key "
             r"'features.conv0.weight' \(its first key is 'features.0.weight'")
    resnet18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet18)
    _refused("resnet50", resnet18, r"key 'layer1.0.conv1.weight' has shape \[64, 64, 3, 3\] in "
             r"the file, resnet50 needs \[64, 64, 1, 1\]")
    # a DataParallel model's state_dict says so
    wrapped = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in torch.load(squeeze).items()}, wrapped)
    _refused("squeezenet1_1", wrapped, r"start with 'module.'.*model.module.state_dict\(\)")
