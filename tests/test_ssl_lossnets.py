"""The self-supervised loss networks of the optional extra ``ssl`` (timm): DINO ViT-B/16,
DINOv2 ViT-S/14, CLIP ViT-B/32 (workflow.archs.SSL_PRESETS, workflow.lossnets), their weight
files (workflow.datasets.weights) and what happens without timm.

Random weights only: the published files are never downloaded; a fake hub file (a randomly
initialised timm model of the same architecture, saved as safetensors) is served from
127.0.0.1 and read back."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from http_server import LoopbackServer

from workflow import archs, lossnets
from workflow.archs import CUSTOM, SSL_PRESETS, LossNet, MissingExtraError

try:
    import timm
except ImportError:  # the extra is optional: only the test of its absence runs
    timm = None
# the reason's tag makes such a skip fail CI (tests/conftest.py MUST_RUN_IN_CI): the test
# extra installs timm
needs_timm = pytest.mark.skipif(timm is None, reason="SSL-EXTRA-MISSING: timm, the optional "
                                                     "extra ssl, is not installed (uv sync "
                                                     "--extra ssl)")

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SSL = sorted(SSL_PRESETS)


@pytest.fixture(autouse=True)
def _no_custom_left():
    yield
    CUSTOM.clear()


@pytest.fixture(scope="module")
def random_extractors():
    """One random-weights extractor per preset, built once (ViT-B's init takes seconds)."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = lossnets.build_extractor(arch, weights="random", seed=0)
        return made[arch]

    return get


def _timm_taps(model, x, spec, indices=(2, 5, 8, 11)):
    """timm's own reading of the blocks: ``forward_intermediates`` on the resized image,
    normalised here with the statistics of timm's pretrained_cfg."""
    cfg = model.pretrained_cfg
    x = F.interpolate(x, size=(spec.input_size,) * 2, mode="bilinear", align_corners=False)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_intermediates(x, indices=list(indices), intermediates_only=True,
                                           stop_early=True)


@needs_timm
def test_ssl_presets_are_timm_pretrained_names_with_their_own_normalisation():
    from timm.data import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
    )
    from timm.layers import QuickGELU
    from timm.models import get_pretrained_cfg
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME

    assert SSL == ["clip_vitb32", "dino_vitb16", "dinov2_vits14"]
    assert not set(SSL) & (set(archs.ARCHS) | set(archs.PRESETS))
    for arch in SSL:
        spec = SSL_PRESETS[arch]
        cfg = get_pretrained_cfg(spec.weights)
        assert timm.is_model(spec.builder) and spec.weights.split(".")[0] == spec.builder
        assert cfg.hf_hub_id == spec.hf_repo and cfg.hf_hub_filename is None
        # timm reads a hub repo's model.safetensors first (load_state_dict_from_hf)
        assert archs.weights_url(arch) == (f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/"
                                           f"{HF_SAFE_WEIGHTS_NAME}")
        assert (spec.mean, spec.std) == (tuple(cfg.mean), tuple(cfg.std))
        assert spec.self_supervised and spec.library == "timm" and spec.input_size == 224
        assert spec.weights_sha256 == ""  # no digest is invented (docs/lossnets.md)
        with torch.device("meta"):
            model = lossnets._build_model(arch, False)
        assert model.num_prefix_tokens == spec.prefix_tokens == 1 and model.num_reg_tokens == 0
        assert len(model.blocks) == 12 and spec.layers == ("blocks.2", "blocks.5", "blocks.8",
                                                           "blocks.11")
        assert model.patch_embed.img_size == (224, 224) and not model.dynamic_img_size
        assert np.isnan(lossnets.imagenet_acc1(arch))
        assert LossNet.parse(f"{arch}/3").taps == ("blocks.8",)
    assert SSL_PRESETS["clip_vitb32"].mean == OPENAI_CLIP_MEAN
    assert SSL_PRESETS["clip_vitb32"].std == OPENAI_CLIP_STD
    assert SSL_PRESETS["dino_vitb16"].mean == IMAGENET_DEFAULT_MEAN
    assert SSL_PRESETS["dinov2_vits14"].std == IMAGENET_DEFAULT_STD
    with torch.device("meta"):
        clip = lossnets._build_model("clip_vitb32", False)
    assert isinstance(clip.blocks[0].mlp.act, QuickGELU)  # OpenAI CLIP's activation
    with pytest.raises(archs.UnknownLossNetError, match="no LPIPS layer set"):
        LossNet("dino_vitb16", "lpips")


@needs_timm
@pytest.mark.parametrize("arch", SSL)
def test_taps_equal_timm_forward_intermediates(arch, random_extractors):
    """Every tap (class token dropped, patch tokens folded to C x H x W) equals timm's own
    ``forward_intermediates`` of the same model on the same resized, normalised images."""
    spec = SSL_PRESETS[arch]
    ex = random_extractors(arch)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ex(x)
    want = _timm_taps(ex.backbone, x, spec)
    grid = 224 // ex.backbone.patch_embed.patch_size[0]
    assert list(got) == list(spec.layers)
    for (tap, g), w in zip(got.items(), want, strict=True):
        assert g.shape == w.shape == (2, ex.backbone.embed_dim, grid, grid), tap
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    if arch == "clip_vitb32":  # and the blocks run by hand, the last tap's tokens unfolded
        m = ex.backbone
        xr = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(ex.norm(xr)))))
        with torch.no_grad():
            for block in m.blocks[:12]:
                t = block(t)
        tokens = got["blocks.11"].flatten(2).transpose(1, 2)  # (N, H*W, C) row-major
        torch.testing.assert_close(tokens, t[:, 1:], rtol=1e-4, atol=1e-5)


@needs_timm
def test_gradients_flow_through_every_tap(random_extractors):
    """The loss benchmarks' loss (feature MSE) backpropagates to the image through every
    tap; the network's parameters stay frozen."""
    ex = random_extractors("dinov2_vits14")
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for taps in ([ex.taps[0]], list(ex.taps)):  # the pass stopped after block 2; all four
        out = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3),
                         requires_grad=True)
        loss = lossnets.feature_loss(ex, taps, out, target)
        loss.backward()
        assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0, taps
    assert not any(p.requires_grad or p.grad is not None for p in ex.parameters())


@needs_timm
def test_attributes_flag_self_supervised_and_no_imagenet_accuracy():
    from workflow.analysis.attributes import lossnet_attributes

    df = lossnet_attributes(["dinov2_vits14"], [1], [], [64])
    row = df.iloc[0]
    assert row.lossnet == "dinov2_vits14/1" and bool(row.self_supervised)
    assert np.isnan(row.imagenet_acc1) and np.isnan(row.receptive_field)
    with torch.device("meta"):
        m = timm.create_model(SSL_PRESETS["dinov2_vits14"].weights, img_size=224, num_classes=0)
    # the parameters up to the end of blocks.2: embeddings, tokens and the first three blocks
    mine = sum(p.numel() for p in [m.cls_token, m.pos_embed, *m.patch_embed.parameters(),
                                   *m.norm_pre.parameters(), *m.blocks[:3].parameters()])
    assert row.params_to_tap == mine and row.channels == 384
    assert row.features_64 == 384 * 16 * 16  # 224 px for every S: the 16 x 16 grid


@needs_timm
def test_perceptual_metric_with_a_self_supervised_preset():
    from workflow.metric import PerceptualMetric

    metric = PerceptualMetric(lossnet="dino_vitb16/3", weights="random", comparison="spatial")
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(2, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    d = metric(x, y)
    # by hand from timm's taps: unit channel vectors, squared difference summed over channels,
    # averaged over the 14 x 14 positions
    f, = _timm_taps(metric.extractor.backbone, torch.cat([x, y]), SSL_PRESETS["dino_vitb16"],
                    (8,))
    fx, fy = f[:2], f[2:]
    fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    torch.testing.assert_close(d.detach(), (fx - fy).pow(2).sum(1).mean((1, 2)), rtol=1e-4,
                               atol=1e-6)
    same = x[:1].clone().requires_grad_(True)
    dd = metric(same, x[:1])
    dd.sum().backward()
    assert dd.item() == pytest.approx(0, abs=1e-6) and torch.isfinite(same.grad).all()


# ----------------------------------------------------------------------------- without timm


def test_without_timm_naming_such_a_loss_network_fails_naming_the_extra(monkeypatch, tmp_path):
    from workflow.metric import PerceptualMetric
    from workflow.plan import ConfigError, Plan, load_config, merge_config

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    fix = r"optional extra 'ssl'.*`uv sync --extra ssl`"
    assert archs.missing_extra("alexnet") is None and archs.missing_extra("vit_b_16") is None
    with pytest.raises(MissingExtraError, match="dino_vitb16 is built by timm.*" + fix):
        lossnets.build_extractor("dino_vitb16", weights="random")
    with pytest.raises(ImportError, match=fix):  # an ImportError too
        PerceptualMetric("clip_vitb32/2", weights="random")
    config = load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml",
                         overrides={"resources_dir": str(tmp_path / "r"),
                                    "results_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match="config key similarity.lossnets: the loss network "
                                          "dinov2_vits14 .*" + fix):
        Plan(merge_config(config, {"similarity": {"lossnets": ["alexnet/1", "dinov2_vits14/2"]}}))


# ----------------------------------------------------------------------------- weight files


def _hub_file(tmp_path, arch):
    """A fake hub file: a randomly initialised timm model of the preset's architecture at its
    native size (DINOv2: 518 px, 37 x 37 position embeddings), saved as safetensors the way
    the timm hub repos hold it."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = timm.create_model(SSL_PRESETS[arch].weights, pretrained=False, num_classes=0)
    path = tmp_path / "hub.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@needs_timm
def test_download_records_the_digest_verifies_a_pin_and_reads_back(tmp_path, monkeypatch,
                                                                   capsys):
    import dataclasses

    import workflow.datasets.weights as w
    from workflow.datasets.fetch import ChecksumError
    from workflow.plan import Plan, load_config, merge_config

    arch = "dinov2_vits14"
    spec = SSL_PRESETS[arch]
    src = _hub_file(tmp_path, arch)
    data = src.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    route = "/" + archs.weights_url(arch).split("/", 3)[3]  # the URL's path on the mirror
    assert route == f"/{spec.hf_repo}/resolve/main/model.safetensors"
    out = tmp_path / "weights"
    with LoopbackServer({route: src}) as srv:
        path, = w.fetch_weights([arch], out, mirror=srv.url, progress=False)
        assert path == out / "vit_small_patch14_dinov2.lvd142m.safetensors"
        assert path.read_bytes() == data
        book = json.loads((out / "checksums.json").read_text())
        assert book[path.name]["sha256"] == digest
        assert f"sha256 {digest} recorded in" in capsys.readouterr().out
        # a pin in the table is verified: a wrong one deletes the file, the right one keeps it
        bad = dataclasses.replace(spec, weights_sha256="0" * 64)
        monkeypatch.setitem(SSL_PRESETS, arch, bad)
        with pytest.raises(ChecksumError, match="expected sha256 0000"):
            w.fetch_weights([arch], tmp_path / "pinned", mirror=srv.url, progress=False)
        assert not (tmp_path / "pinned" / path.name).exists()
        monkeypatch.setitem(SSL_PRESETS, arch, dataclasses.replace(spec, weights_sha256=digest))
        w.fetch_weights([arch], tmp_path / "pinned", mirror=srv.url, progress=False)
        assert "verified against the table's pin" in capsys.readouterr().out
        monkeypatch.setitem(SSL_PRESETS, arch, spec)

    # read back offline: the taps equal those of timm's own loader reading the same file
    # (pretrained_cfg_overlay file=...: timm's checkpoint filter resamples the 37 x 37
    # position embeddings to the 16 x 16 grid of 224 px)
    ex = lossnets.build_extractor(arch, weights="imagenet", weights_dir=out)
    ref = timm.create_model(spec.weights, pretrained=True, num_classes=0, img_size=224,
                            pretrained_cfg_overlay={"file": str(path)}).eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = ex(x)
    for g, r in zip(got.values(), _timm_taps(ref, x, spec), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert ex.backbone.pos_embed.shape == ref.pos_embed.shape == (1, 1 + 16 * 16, 384)

    # the Hugging Face hub cache layout, as a user's lossnets.weights_dir
    hub = tmp_path / "hub"
    repo = hub / f"models--{spec.hf_repo.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model.safetensors").symlink_to(path)
    found = archs.weights_file_in(arch, hub)
    assert found == repo / "snapshots" / "0123abcd" / "model.safetensors"
    rec, = w.fetch_weights([arch], tmp_path / "verified", mirror=str(hub))
    assert json.loads(rec.read_text())["sha256"] == digest
    assert rec.name == f"{path.name}.json"
    ex2 = lossnets.build_extractor(arch, weights="imagenet", weights_dir=hub)
    with torch.no_grad():
        torch.testing.assert_close(ex2(x)["blocks.2"], got["blocks.2"], rtol=0, atol=0)
    config = load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml",
                         overrides={"resources_dir": str(tmp_path / "r"),
                                    "results_dir": str(tmp_path / "o")})
    plan = Plan(merge_config(config, {
        "benchmarks": ["similarity"], "similarity": {"lossnets": [f"{arch}/2"]},
        "lossnets": {"weights": "imagenet", "weights_dir": str(hub), "archs": [arch],
                     "lpips_sets": []}}))
    assert plan.weight_file(arch) == str(found)
    assert plan.weights_input(arch)[0] == str(found)
    # a truncated file is refused naming it and the fix
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(w.WeightsFileError, match="cut.safetensors .*cannot be read as "
                                                 "safetensors.*download_weights"):
        w.read_state_dict(cut, "lossnets.weights")


@needs_timm
def test_the_plan_fetches_the_hub_files(tmp_path):
    from workflow.plan import Plan, load_config, merge_config

    config = load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml",
                         overrides={"resources_dir": str(tmp_path / "r"),
                                    "results_dir": str(tmp_path / "o")})
    nets = ["dino_vitb16/3", "clip_vitb32/1"]
    plan = Plan(merge_config(config, {"lossnets": {"weights": "imagenet"},
                                      **{b: {"lossnets": nets} for b in
                                         ("similarity", "super_resolution", "probes")}}))
    assert {"dino_vitb16", "clip_vitb32"} <= set(plan.weight_archs())
    assert ("https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/"
            "model.safetensors") in plan.weight_urls()
    assert plan.weight_file("dino_vitb16") == \
        f"{tmp_path}/r/weights/vit_base_patch16_224.dino.safetensors"
    assert {j["arch"] for j in plan.jobs("similarity")} >= {"dino_vitb16", "clip_vitb32"}
    assert archs.weights_id("dino_vitb16", "imagenet") == \
        "imagenet:vit_base_patch16_224.dino.safetensors"


# ----------------------------------------------------------------------------- scoring


@needs_timm
def test_bapps_scoring_with_a_tiny_random_timm_entry(prepared, demo_plan, tmp_path):
    """The similarity command scores BAPPS with a custom timm entry (a ViT-Tiny built for
    64 px: a 4 x 4 patch grid, seconds on a CPU), and a distance equals one worked out from
    timm's own forward_intermediates."""
    import pandas as pd

    from workflow.cli import main
    from workflow.datasets import bapps

    tiny = {"library": "timm", "builder": "vit_tiny_patch16_224", "layout": "tokens",
            "taps": ["blocks.0", "blocks.1", "blocks.2", "blocks.3"], "input_size": 64,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "self_supervised": True}
    cfg = {**demo_plan.stage_config("similarity", "score", "alexnet"), "precision": "fp32",
           "lossnets": ["tiny/2"], "custom_lossnets": {"tiny": tiny}}
    data = prepared("bapps")
    samples_p, scores_p = tmp_path / "samples.parquet", tmp_path / "scores.parquet"
    rc = main(["similarity", "score", "--config", json.dumps(cfg), "--settings",
               json.dumps({"batch_size": 8, "device": "cpu", "threads": 1}),
               "--prepared", str(data), "--samples", str(samples_p), "--scores", str(scores_p)])
    assert rc == 0
    scores, samples = pd.read_parquet(scores_p), pd.read_parquet(samples_p)
    assert set(scores.arch) == {"tiny"} and scores.value.between(0, 1).all()
    d = bapps.load(data, "2afc", "val", "superres")
    spec = CUSTOM["tiny"]
    model = lossnets.load_backbone("tiny", "random", seed=cfg["weights_seed"])
    x = torch.from_numpy(np.array(d["ref"][1:2])).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(np.array(d["p0"][1:2])).permute(0, 3, 1, 2).float() / 255
    xr, yr = (F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)
              for t in (x, y))
    with torch.no_grad():
        fx, = model.forward_intermediates((xr - 0.5) / 0.5, indices=[1], intermediates_only=True)
        fy, = model.forward_intermediates((yr - 0.5) / 0.5, indices=[1], intermediates_only=True)
    assert spec.mean == (0.5, 0.5, 0.5) and fx.shape == (1, 192, 4, 4)
    expected = (fx.mean((2, 3)) - fy.mean((2, 3))).pow(2).sum().item()  # mean, no channel norm
    got = samples[(samples.dataset == "bapps-2afc") & (samples.split == "superres")
                  & (samples.item == 1) & (samples.comparison == "mean")
                  & ~samples.channel_norm].d0.item()
    assert got == pytest.approx(expected, rel=1e-4)

    # a wrong timm name or node name fails naming the valid ones near it
    archs.register_custom({"bad": {**tiny, "builder": "vit_tiny_patch16_22"}})
    with pytest.raises(archs.UnknownLossNetError, match="lossnets.custom.bad.builder: timm .*"
                                                        "near it: vit_tiny_patch16_224"):
        lossnets.load_backbone("bad", "random")
    archs.register_custom({"bad": {**tiny, "taps": ["blocks.0", "blocks.1", "blocks.2",
                                                    "block.3"]}})
    with pytest.raises(archs.UnknownLossNetError, match="no module 'block.3'.*blocks.3"):
        lossnets.build_extractor("bad", weights="random")
