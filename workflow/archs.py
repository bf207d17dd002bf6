"""The loss-network table: which torchvision classifiers, which taps, which weight files.

Pure data, no torch: the planning module and the rules read it while Snakemake builds the
DAG; :mod:`workflow.lossnets` builds the networks from it.

A *loss network* is an ImageNet classifier plus a set of *taps*: the outputs after given
children of ``model.features`` (VGG, AlexNet, DenseNet, SqueezeNet, EfficientNet) or of the
model itself (ResNet, ResNeXt, GoogLeNet, Inception-v3). It is named ``arch/layer`` with
``layer`` one of ``"1".."4"`` (the study's four extraction layers, early to late) or
``"lpips"`` (the multi-layer set of LPIPS, for alexnet, vgg16 and squeezenet1_1 only).
The taps of every architecture are in docs/lossnets.md.

A *pixel baseline* is a loss network of its own kind: ``pixel/<metric>`` with a metric of
:data:`PIXEL_METRICS` (``pixel/l2``, ``pixel/ssim``, ...). It has no weights, no taps and no
extractor; the benchmarks that score it (plan.PIXEL_BENCHMARKS) compute the metric on the
images themselves (:mod:`workflow.metrics.pixel`). The autoencoder's pixel-MSE baseline is
the bare net id ``pixel`` of that benchmark (a training loss, not one of these metrics).

A *node-name* loss network (:class:`NodeSpec`, the rows of :data:`PRESETS` and the user's
``lossnets.custom`` entries, :func:`register_custom`) is any torchvision classifier with its
taps named by module path (``features.3``, ``layer2``, ``encoder.layers.encoder_layer_5``),
read by forward hooks; transformer taps are folded into ``(N, C, H, W)`` grids
(docs/lossnets.md). It has layers ``"1".."4"`` and no LPIPS set.

The self-supervised presets (:data:`SSL_PRESETS`: DINO ViT-B/16, DINOv2 ViT-S/14, CLIP
ViT-B/32) are node-name loss networks built by timm, the optional extra ``ssl``
(``uv sync --extra ssl``): ``NodeSpec.library == "timm"``, the builder a timm architecture,
the weights timm's pretrained tag and the file timm's Hugging Face ``model.safetensors``.
:func:`missing_extra` tells (torch-free, nothing imported) whether the extra is installed.

Weights: ``"imagenet"`` (torchvision's IMAGENET1K_V1 file, or a self-supervised preset's
published file, fetched by the ``download_weights`` rule into a local folder), ``"random"``
(the library's initialisation, seeded), or a path to a state_dict file.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ARCHS", "CUSTOM", "LAYERS", "LPIPS_ARCHS", "PIXEL", "PIXEL_METRICS", "PIXEL_MIN_SIDE",
    "PRESETS", "SSL_PRESETS", "WEIGHTS_HOST", "ArchSpec", "LossNet", "MissingExtraError",
    "NodeSpec", "UnknownLossNetError", "all_lossnets", "arch_spec", "hub_cache_file",
    "is_node_arch", "known_archs", "missing_extra", "pixel_lossnets", "register_custom",
    "weights_file_in", "weights_filename", "weights_id", "weights_url",
]

WEIGHTS_HOST = "https://download.pytorch.org/models/"
HF_HOST = "https://huggingface.co/"  # the self-supervised presets' files (timm's hub repos)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's input normalisation (timm's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD; tested)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the optional extra of each library that is not a core dependency: library -> (module, extra)
EXTRAS = {"timm": ("timm", "ssl")}
LAYERS = ("1", "2", "3", "4")
PIXEL = "pixel"  # the "architecture" of the pixel baselines
# metric -> definition (docs/similarity.md); distances: higher = less similar
PIXEL_METRICS: dict[str, str] = {
    "l1": "mean |x - y| over pixels and channels, RGB in [0, 1]",
    "l2": "LPIPS's L2: 0.5 * mean ((Lab(x) - Lab(y)) / 100)^2 over pixels and channels",
    "l2_rgb": "mean (x - y)^2 over pixels and channels, RGB in [0, 1]",
    "ssim": "LPIPS's DSSIM: (1 - SSIM) / 2, RGB, 7x7 uniform window, sample covariances",
    "ssim_lab": "(1 - SSIM) / 2 as ssim, on Lab / 100",
    "psnr": "-PSNR in dB, RGB in [0, 1] (peak 1), the MSE over pixels and channels",
    "ms_ssim": "1 - MS-SSIM (piq: 11x11 Gaussian, sigma 1.5; 5 scales, fewer on small images)",
    "gmsd": "GMSD (piq: luma, 2x average pooling, Prewitt gradients, T = 170 / 255^2)",
    "vifp": "1 - VIFp (piq: pixel-domain VIF on luma, sigma_n^2 = 2, 4 scales)",
    "haarpsi": "1 - HaarPSI (piq: 3 Haar scales, luma + chroma, subsampled by 2)",
}
# The smallest image side (px) each pixel metric is defined at; absent: any side. MS-SSIM
# needs (11 - 1) * 2^(s - 1) + 1 px for s scales: 161 for its 5, so smaller images use fewer
# (metrics.pixel.ms_ssim_scales) and below 21 px (2 scales) it is refused.
PIXEL_MIN_SIDE: dict[str, int] = {"ssim": 7, "ssim_lab": 7, "ms_ssim": 21, "gmsd": 6,
                                  "vifp": 41, "haarpsi": 16}


@dataclass(frozen=True)
class ArchSpec:
    """How to build an architecture and where its taps are."""

    name: str
    builder: str  # torchvision.models attribute
    weights_enum: str  # torchvision.models attribute holding IMAGENET1K_V1
    container: str  # "features" or "model": whose children are counted
    layers: tuple[int, int, int, int]  # child index of the study's layers 1..4
    layer_names: tuple[str, str, str, str]
    lpips: tuple[int, ...] | None = None  # the LPIPS multi-layer set, if any
    weights_file: str = ""  # IMAGENET1K_V1 file name (sha256 prefix in the name)


ARCHS: dict[str, ArchSpec] = {
    s.name: s
    for s in [
        ArchSpec("alexnet", "alexnet", "AlexNet_Weights", "features", (1, 4, 7, 11),
                 ("relu1", "relu2", "relu3", "relu5"), (1, 4, 7, 9, 11),
                 weights_file="alexnet-owt-7be5be79.pth"),
        ArchSpec("vgg11", "vgg11", "VGG11_Weights", "features", (1, 4, 9, 19),
                 ("relu1_1", "relu2_1", "relu3_2", "relu5_2"), weights_file="vgg11-8a719046.pth"),
        ArchSpec("vgg16", "vgg16", "VGG16_Weights", "features", (3, 8, 15, 29),
                 ("relu1_2", "relu2_2", "relu3_3", "relu5_3"), (3, 8, 15, 22, 29),
                 weights_file="vgg16-397923af.pth"),
        ArchSpec("vgg16_bn", "vgg16_bn", "VGG16_BN_Weights", "features", (5, 12, 22, 42),
                 ("relu1_2", "relu2_2", "relu3_3", "relu5_3"),
                 weights_file="vgg16_bn-6c64b313.pth"),
        ArchSpec("vgg19", "vgg19", "VGG19_Weights", "features", (3, 8, 17, 35),
                 ("relu1_2", "relu2_2", "relu3_4", "relu5_4"), weights_file="vgg19-dcbb9e9d.pth"),
        ArchSpec("resnet18", "resnet18", "ResNet18_Weights", "model", (2, 4, 5, 7),
                 ("relu", "layer1", "layer2", "layer4"), weights_file="resnet18-f37072fd.pth"),
        ArchSpec("resnet50", "resnet50", "ResNet50_Weights", "model", (2, 4, 5, 7),
                 ("relu", "layer1", "layer2", "layer4"), weights_file="resnet50-0676ba61.pth"),
        ArchSpec("resnext50_32x4d", "resnext50_32x4d", "ResNeXt50_32X4D_Weights", "model",
                 (2, 4, 5, 7), ("relu", "layer1", "layer2", "layer4"),
                 weights_file="resnext50_32x4d-7cdf4587.pth"),
        ArchSpec("googlenet", "googlenet", "GoogLeNet_Weights", "model", (0, 5, 8, 15),
                 ("conv1", "inception3a", "inception4a", "inception5b"),
                 weights_file="googlenet-1378be20.pth"),
        ArchSpec("inception_v3", "inception_v3", "Inception_V3_Weights", "model", (2, 7, 9, 14),
                 ("Conv2d_2b_3x3", "Mixed_5b", "Mixed_5d", "Mixed_6e"),
                 weights_file="inception_v3_google-0cc3c7bd.pth"),
        ArchSpec("efficientnet_b0", "efficientnet_b0", "EfficientNet_B0_Weights", "features",
                 (0, 1, 4, 7), ("stem", "stage1", "stage4", "stage7"),
                 weights_file="efficientnet_b0_rwightman-7f5810bc.pth"),
        ArchSpec("efficientnet_b7", "efficientnet_b7", "EfficientNet_B7_Weights", "features",
                 (0, 1, 4, 7), ("stem", "stage1", "stage4", "stage7"),
                 weights_file="efficientnet_b7_lukemelas-c5b4e57e.pth"),
        ArchSpec("densenet121", "densenet121", "DenseNet121_Weights", "features", (2, 4, 6, 10),
                 ("relu0", "denseblock1", "denseblock2", "denseblock4"),
                 weights_file="densenet121-a639ec97.pth"),
        ArchSpec("squeezenet1_1", "squeezenet1_1", "SqueezeNet1_1_Weights", "features",
                 (1, 3, 7, 12), ("relu1", "fire1", "fire4", "fire8"), (1, 4, 7, 9, 10, 11, 12),
                 weights_file="squeezenet1_1-b8a52dc0.pth"),
    ]
}
LPIPS_ARCHS = tuple(a for a, s in ARCHS.items() if s.lpips is not None)

# how a tap's output is laid out (NodeSpec.layout); every tap reaches the comparisons as
# (N, C, H, W): "nhwc" is permuted, "tokens" drops the prefix tokens and folds the rest
LAYOUTS = ("nchw", "nhwc", "tokens")


@dataclass(frozen=True)
class NodeSpec:
    """A loss network of the node-name kind: any torchvision classification builder, with
    the four layers "1".."4" named by module path and read by forward hooks."""

    name: str
    builder: str  # torchvision.models attribute
    weights: str  # torchvision weights enum member, "ConvNeXt_Tiny_Weights.IMAGENET1K_V1"
    layers: tuple[str, str, str, str]  # module paths of layers 1..4 (early to late)
    weights_file: str = ""  # the enum's file name (its sha256 prefix in the name)
    layout: str = "nchw"  # of every tap: "nchw", "nhwc" (Swin stages), "tokens" (ViT blocks)
    prefix_tokens: int = 0  # class / register tokens in front of a "tokens" tap's patches
    input_size: int | None = None  # None: images as they come; N: resized to N x N first
    self_supervised: bool = False
    weights_url: str = ""  # where the file is fetched from, when not WEIGHTS_HOST
    custom: bool = False  # from config lossnets.custom
    library: str = "torchvision"  # who builds it: torchvision, or timm (the extra "ssl")
    mean: tuple[float, float, float] = IMAGENET_MEAN  # the input normalisation it was
    std: tuple[float, float, float] = IMAGENET_STD  # trained with (normalize: imagenet)
    weights_sha256: str = ""  # the published file's sha256 where known ("": recorded only)
    hf_repo: str = ""  # timm: the Hugging Face repo of the file (timm's pretrained_cfg)

    @property
    def weights_enum(self) -> str:
        return self.weights.split(".", 1)[0]

    @property
    def weights_variant(self) -> str:
        return self.weights.split(".", 1)[1] if "." in self.weights else "IMAGENET1K_V1"

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.layers


# The presets: V1 ImageNet weights throughout (every one of these builders has IMAGENET1K_V1;
# mobilenet_v3_large, regnet_y_1_6gf, resnet101 and wide_resnet50_2 also have a V2, which
# torchvision calls DEFAULT: not used, for the study's like-for-like V1). Taps as the study's:
# an early map, then three stages, the last one the deepest stage before the head.
PRESETS: dict[str, NodeSpec] = {
    s.name: s
    for s in [
        NodeSpec("convnext_tiny", "convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
                 ("features.1", "features.3", "features.5", "features.7"),
                 "convnext_tiny-983f1562.pth"),
        NodeSpec("convnext_base", "convnext_base", "ConvNeXt_Base_Weights.IMAGENET1K_V1",
                 ("features.1", "features.3", "features.5", "features.7"),
                 "convnext_base-6075fbad.pth"),
        NodeSpec("efficientnet_v2_s", "efficientnet_v2_s",
                 "EfficientNet_V2_S_Weights.IMAGENET1K_V1",
                 ("features.1", "features.2", "features.4", "features.6"),
                 "efficientnet_v2_s-dd5fe13b.pth"),
        NodeSpec("mobilenet_v3_large", "mobilenet_v3_large",
                 "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
                 ("features.1", "features.3", "features.6", "features.15"),
                 "mobilenet_v3_large-8738ca79.pth"),
        NodeSpec("regnet_y_1_6gf", "regnet_y_1_6gf", "RegNet_Y_1_6GF_Weights.IMAGENET1K_V1",
                 ("stem", "trunk_output.block1", "trunk_output.block2", "trunk_output.block4"),
                 "regnet_y_1_6gf-b11a554e.pth"),
        NodeSpec("resnet101", "resnet101", "ResNet101_Weights.IMAGENET1K_V1",
                 ("relu", "layer1", "layer2", "layer4"), "resnet101-63fe2227.pth"),
        NodeSpec("wide_resnet50_2", "wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1",
                 ("relu", "layer1", "layer2", "layer4"), "wide_resnet50_2-95faca4d.pth"),
        NodeSpec("swin_t", "swin_t", "Swin_T_Weights.IMAGENET1K_V1",
                 ("features.1", "features.3", "features.5", "features.7"),
                 "swin_t-704ceda3.pth", layout="nhwc"),
        NodeSpec("vit_b_16", "vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1",
                 tuple(f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)),
                 "vit_b_16-c867db91.pth", layout="tokens", prefix_tokens=1, input_size=224),
        NodeSpec("maxvit_t", "maxvit_t", "MaxVit_T_Weights.IMAGENET1K_V1",
                 ("blocks.0", "blocks.1", "blocks.2", "blocks.3"), "maxvit_t-bc5ab103.pth",
                 input_size=224),
    ]
}


def _timm_vit(name: str, model: str, tag: str, hf_repo: str, mean=IMAGENET_MEAN,
              std=IMAGENET_STD) -> NodeSpec:
    """A self-supervised ViT of timm: blocks 2, 5, 8, 11 of 12 (the taps of vit_b_16), one
    class token, no registers, images resized to 224 px."""
    return NodeSpec(name, model, f"{model}.{tag}", tuple(f"blocks.{i}" for i in (2, 5, 8, 11)),
                    f"{hf_repo.rsplit('/', 1)[-1]}.safetensors", layout="tokens",
                    prefix_tokens=1, input_size=224, self_supervised=True,
                    weights_url=f"{HF_HOST}{hf_repo}/resolve/main/model.safetensors",
                    library="timm", mean=mean, std=std, hf_repo=hf_repo)


# The self-supervised presets (the extra "ssl": timm). Model names and tags are timm's
# pretrained names; hf_repo is the pretrained_cfg's hf_hub_id (tests/test_ssl_lossnets.py
# checks both against timm). weights_sha256 is empty: the published digests could not be
# read where this table was written; download_weights records the digest of what it fetched
# (checksums.json next to the file) and later runs verify against that (docs/lossnets.md).
SSL_PRESETS: dict[str, NodeSpec] = {
    s.name: s
    for s in [
        _timm_vit("dino_vitb16", "vit_base_patch16_224", "dino",
                  "timm/vit_base_patch16_224.dino"),
        _timm_vit("dinov2_vits14", "vit_small_patch14_dinov2", "lvd142m",
                  "timm/vit_small_patch14_dinov2.lvd142m"),
        # QuickGELU: OpenAI's CLIP activation (timm's note on vit_base_patch32_clip_224.openai:
        # "natively QuickGELU, use quickgelu model variant"); the file is the same repo's
        _timm_vit("clip_vitb32", "vit_base_patch32_clip_quickgelu_224", "openai",
                  "timm/vit_base_patch32_clip_224.openai", CLIP_MEAN, CLIP_STD),
    ]
}
# config lossnets.custom, registered by the plan (and by each job from its config)
CUSTOM: dict[str, NodeSpec] = {}
_NAME = re.compile(r"[a-z0-9_]+")


def known_archs() -> list[str]:
    """Every architecture name: the study's 14, the presets (torchvision's, then the
    self-supervised ones) and the registered custom ones."""
    return [*ARCHS, *PRESETS, *SSL_PRESETS, *CUSTOM]


def is_node_arch(arch: str) -> bool:
    """A loss network of the node-name kind (a preset or a custom entry)?"""
    return arch in PRESETS or arch in SSL_PRESETS or arch in CUSTOM


def missing_extra(arch: str) -> str | None:
    """Why ``arch`` cannot be built here: the message naming the optional extra whose library
    is not installed, or None. Torch-free and import-free (``importlib.util.find_spec``), so
    the plan calls it at DAG build."""
    spec = arch_spec(arch)
    module, extra = EXTRAS.get(getattr(spec, "library", "torchvision"), (None, None))
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return (f"the loss network {arch} is built by {module}, which is not installed: it comes "
            f"with the optional extra '{extra}'; install it with `uv sync --extra {extra}` (or "
            f"`pip install 'lossnet-bench[{extra}]'`), or remove {arch} from the config")


def register_custom(custom: Mapping[str, Mapping] | None, key: str = "lossnets.custom"
                    ) -> dict[str, NodeSpec]:
    """Check the entries of config ``lossnets.custom`` (torch-free: the node names are checked
    when the network is built) and make them known; returns them as specs."""
    specs = {}
    for name, entry in (custom or {}).items():
        where = f"config key {key}.{name}"
        if not _NAME.fullmatch(str(name)):
            raise UnknownLossNetError(f"{where}: a name of lower-case letters, digits and _ only")
        if name in ARCHS or name in PRESETS or name in SSL_PRESETS or name == PIXEL:
            raise UnknownLossNetError(f"{where}: {name!r} is already a loss network of the "
                                      f"table; pick another name")
        taps = list(entry.get("taps") or ())
        if len(taps) != 4 or not all(isinstance(t, str) and t for t in taps):
            raise UnknownLossNetError(f"{where}.taps: give four module paths (layers 1..4, "
                                      f"early to late), e.g. [layer1, layer2, layer3, layer4]")
        layout = str(entry.get("layout", "nchw"))
        if layout not in LAYOUTS:
            raise UnknownLossNetError(f"{where}.layout: {layout!r}; use one of {LAYOUTS}")
        size = entry.get("input_size")
        weights = str(entry.get("weights", ""))
        url = str(entry.get("weights_url", ""))
        library = str(entry.get("library", "torchvision"))
        if library not in ("torchvision", *EXTRAS):
            raise UnknownLossNetError(f"{where}.library: {library!r}; use torchvision or "
                                      f"{', '.join(EXTRAS)}")
        stats = {}
        for k in ("mean", "std"):
            v = entry.get(k)
            if v is not None:
                if len(v) != 3 or not all(isinstance(c, int | float) for c in v) or (
                        k == "std" and min(v) <= 0):
                    raise UnknownLossNetError(f"{where}.{k}: three numbers (R, G, B"
                                              f"{', each > 0' if k == 'std' else ''})")
                stats[k] = tuple(float(c) for c in v)
        file = url.rsplit("/", 1)[-1] if url else ""
        hf = re.match(re.escape(HF_HOST) + r"([^/]+/[^/]+)/resolve/", url)
        if library != "torchvision" and file:
            file = f"{name}.{file}"  # hub files share names (model.safetensors)
        specs[name] = NodeSpec(
            str(name), str(entry["builder"]), weights, tuple(taps), file, layout,
            int(entry.get("prefix_tokens", 1 if layout == "tokens" else 0)),
            int(size) if size else None, bool(entry.get("self_supervised", False)),
            url, custom=True, library=library, **stats,
            weights_sha256=str(entry.get("weights_sha256", "")).lower(),
            hf_repo=hf.group(1) if hf and library != "torchvision" else "")
    CUSTOM.clear()
    CUSTOM.update(specs)
    return specs


class UnknownLossNetError(ValueError):
    """A loss network, architecture or layer that is not in the table; the message lists them."""


class MissingExtraError(UnknownLossNetError, ImportError):
    """A loss network whose library (an optional extra) is not installed; the message names
    the extra to install (:func:`missing_extra`)."""


def arch_spec(arch: str) -> ArchSpec | NodeSpec:
    spec = ARCHS.get(arch) or PRESETS.get(arch) or SSL_PRESETS.get(arch) or CUSTOM.get(arch)
    if spec is None:
        near = difflib.get_close_matches(str(arch), known_archs(), n=3, cutoff=0.6)
        raise UnknownLossNetError(
            f"unknown architecture {arch!r}{f' (did you mean {near[0]}?)' if near else ''}; "
            f"known architectures: {', '.join(known_archs())} "
            f"(or {PIXEL}/<metric> for a pixel baseline: {', '.join(PIXEL_METRICS)}; or an "
            f"entry of config lossnets.custom)"
        )
    return spec


@dataclass(frozen=True)
class LossNet:
    """One loss network: an architecture and a layer ("1".."4" or "lpips"), or a pixel
    baseline: arch ``pixel`` and a metric of :data:`PIXEL_METRICS` as its layer."""

    arch: str
    layer: str

    def __post_init__(self) -> None:
        if self.arch == PIXEL:
            if self.layer not in PIXEL_METRICS:
                raise UnknownLossNetError(
                    f"unknown pixel metric {self.layer!r} ({self.arch}/{self.layer}); "
                    f"pixel baselines: {', '.join(f'{PIXEL}/{m}' for m in PIXEL_METRICS)}")
            return
        spec = arch_spec(self.arch)
        if self.layer == "lpips":
            if getattr(spec, "lpips", None) is None:
                raise UnknownLossNetError(
                    f"{self.arch} has no LPIPS layer set; LPIPS sets exist for "
                    f"{', '.join(LPIPS_ARCHS)}"
                )
        elif self.layer not in LAYERS:
            raise UnknownLossNetError(
                f"unknown layer {self.layer!r} for {self.arch}; use 1, 2, 3, 4 or lpips"
            )

    @property
    def id(self) -> str:
        return f"{self.arch}/{self.layer}"

    @property
    def is_pixel(self) -> bool:
        """A pixel baseline: no weights, no taps, no extractor."""
        return self.arch == PIXEL

    @property
    def taps(self) -> tuple[int, ...] | tuple[str, ...]:
        """Child indices (the study's architectures) or module paths (the node-name kind)."""
        if self.is_pixel:
            return ()
        spec = arch_spec(self.arch)
        if isinstance(spec, NodeSpec):
            return (spec.layers[int(self.layer) - 1],)
        if self.layer == "lpips":
            return spec.lpips  # type: ignore[return-value]
        return (spec.layers[int(self.layer) - 1],)

    @classmethod
    def parse(cls, text: str) -> LossNet:
        """Parse ``"alexnet/2"``, ``"alexnet:2"`` or ``"alexnet/lpips"``."""
        for sep in ("/", ":"):
            if sep in text:
                arch, layer = text.split(sep, 1)
                return cls(arch, str(layer))
        raise UnknownLossNetError(
            f"loss network {text!r} must look like 'alexnet/2', 'vgg16/lpips' or 'pixel/l2'")


def all_lossnets(
    archs: Iterable[str] | None = None,
    layers: Iterable[str | int] = LAYERS,
    lpips_sets: Iterable[str] = (),
) -> list[LossNet]:
    """The study's grid: every arch x layer, plus the requested LPIPS sets."""
    archs = list(ARCHS) if archs is None else list(archs)
    nets = [LossNet(a, str(layer)) for a in archs for layer in layers]
    nets += [LossNet(a, "lpips") for a in lpips_sets]
    return nets


def pixel_lossnets(metrics: Iterable[str]) -> list[LossNet]:
    """The pixel baselines ``pixel/<metric>`` of ``metrics``."""
    return [LossNet(PIXEL, str(m)) for m in metrics]


def weights_filename(arch: str) -> str:
    """File name of the IMAGENET1K_V1 weights, e.g. ``alexnet-owt-7be5be79.pth``."""
    return arch_spec(arch).weights_file


def hub_cache_file(arch: str, cache: str | os.PathLike) -> Path | None:
    """A self-supervised preset's file in a Hugging Face hub cache folder (the layout
    ``huggingface_hub`` writes, e.g. under ``~/.cache/huggingface/hub``):
    ``models--<org>--<repo>/snapshots/<revision>/model.safetensors``, the revision that
    ``refs/main`` names (else the only snapshot holding the file); None where it is not."""
    spec = arch_spec(arch)
    repo = getattr(spec, "hf_repo", "")
    if not repo:
        return None
    root = Path(os.path.expanduser(str(cache))) / f"models--{repo.replace('/', '--')}"
    name = spec.weights_url.rsplit("/", 1)[-1] if spec.weights_url else "model.safetensors"
    ref = root / "refs" / "main"
    if ref.is_file():
        path = root / "snapshots" / ref.read_text().strip() / name
        return path if path.is_file() else None
    found = sorted((root / "snapshots").glob(f"*/{name}")) if root.is_dir() else []
    return found[0] if len(found) == 1 else None


def weights_file_in(arch: str, folder: str | os.PathLike) -> Path:
    """Where ``arch``'s published weights file is in ``folder``: under its own name
    (:func:`weights_filename`; what ``download_weights`` writes), else, for a
    self-supervised preset, in the Hugging Face hub cache layout (:func:`hub_cache_file`);
    the first path when neither exists (for the message that it is missing)."""
    flat = Path(os.path.expanduser(str(folder))) / weights_filename(arch)
    if flat.is_file():
        return flat
    return hub_cache_file(arch, folder) or flat


def weights_url(arch: str) -> str:
    """Download URL of the IMAGENET1K_V1 weights (equal to the torchvision enum's; tested)."""
    spec = arch_spec(arch)
    if isinstance(spec, NodeSpec) and spec.weights_url:
        return spec.weights_url
    if not weights_filename(arch):
        raise UnknownLossNetError(
            f"config key lossnets.custom.{arch}: no weights_url, so its ImageNet file cannot "
            f"be fetched; give weights_url (torchvision's {spec.weights or 'enum'}.url), a "
            f"lossnets.weights_paths.{arch} file, or use weights: random")
    return WEIGHTS_HOST + weights_filename(arch)


def weights_id(arch: str, weights: str) -> str:
    """A short provenance string for the scores table (``none`` for the pixel baselines)."""
    if arch == PIXEL:
        return "none"
    if weights == "imagenet":
        return f"imagenet:{weights_filename(arch)}"
    if weights == "random":
        return "random"
    return f"file:{Path(weights).name}"
