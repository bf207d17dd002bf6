"""Loss-network registry and the one feature extractor.

A *loss network* is an ImageNet classifier from torchvision plus a set of *taps*:
the outputs after given children of ``model.features`` (VGG, AlexNet, DenseNet,
SqueezeNet, EfficientNet) or of the model itself (ResNet, ResNeXt, GoogLeNet,
Inception-v3). The models' own ``forward`` is never used, so GoogLeNet/Inception
``transform_input`` is not applied (as in the study).

Names: a loss network is ``(arch, layer)`` with ``layer`` one of ``"1".."4"``
(the study's four extraction layers) or ``"lpips"`` (the multi-layer LPIPS set,
alexnet / vgg16 / squeezenet1_1 only). ``LossNet.id`` is ``"alexnet/2"`` style.

Weights: ``"imagenet"`` (IMAGENET1K_V1, loaded from a local folder, never
downloaded here), ``"random"`` (torchvision's initialisation, seeded), or a path
to a state_dict file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision is imported lazily: importing it pulls in torch._dynamo (seconds of CPU), and
# the Snakefile and rules import this module only for the registry.
WEIGHTS_HOST = "https://download.pytorch.org/models/"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
                 ("relu1", "relu2", "relu3", "relu5"), (1, 4, 7, 9, 11), weights_file="alexnet-owt-7be5be79.pth"),
        ArchSpec("vgg11", "vgg11", "VGG11_Weights", "features", (1, 4, 9, 19),
                 ("relu1_1", "relu2_1", "relu3_2", "relu5_2"), weights_file="vgg11-8a719046.pth"),
        ArchSpec("vgg16", "vgg16", "VGG16_Weights", "features", (3, 8, 15, 29),
                 ("relu1_2", "relu2_2", "relu3_3", "relu5_3"), (3, 8, 15, 22, 29), weights_file="vgg16-397923af.pth"),
        ArchSpec("vgg16_bn", "vgg16_bn", "VGG16_BN_Weights", "features", (5, 12, 22, 42),
                 ("relu1_2", "relu2_2", "relu3_3", "relu5_3"), weights_file="vgg16_bn-6c64b313.pth"),
        ArchSpec("vgg19", "vgg19", "VGG19_Weights", "features", (3, 8, 17, 35),
                 ("relu1_2", "relu2_2", "relu3_4", "relu5_4"), weights_file="vgg19-dcbb9e9d.pth"),
        ArchSpec("resnet18", "resnet18", "ResNet18_Weights", "model", (2, 4, 5, 7),
                 ("relu", "layer1", "layer2", "layer4"), weights_file="resnet18-f37072fd.pth"),
        ArchSpec("resnet50", "resnet50", "ResNet50_Weights", "model", (2, 4, 5, 7),
                 ("relu", "layer1", "layer2", "layer4"), weights_file="resnet50-0676ba61.pth"),
        ArchSpec("resnext50_32x4d", "resnext50_32x4d", "ResNeXt50_32X4D_Weights", "model",
                 (2, 4, 5, 7), ("relu", "layer1", "layer2", "layer4"), weights_file="resnext50_32x4d-7cdf4587.pth"),
        ArchSpec("googlenet", "googlenet", "GoogLeNet_Weights", "model", (0, 5, 8, 15),
                 ("conv1", "inception3a", "inception4a", "inception5b"), weights_file="googlenet-1378be20.pth"),
        ArchSpec("inception_v3", "inception_v3", "Inception_V3_Weights", "model", (2, 7, 9, 14),
                 ("Conv2d_2b_3x3", "Mixed_5b", "Mixed_5d", "Mixed_6e"), weights_file="inception_v3_google-0cc3c7bd.pth"),
        ArchSpec("efficientnet_b0", "efficientnet_b0", "EfficientNet_B0_Weights", "features",
                 (0, 1, 4, 7), ("stem", "stage1", "stage4", "stage7"), weights_file="efficientnet_b0_rwightman-7f5810bc.pth"),
        ArchSpec("efficientnet_b7", "efficientnet_b7", "EfficientNet_B7_Weights", "features",
                 (0, 1, 4, 7), ("stem", "stage1", "stage4", "stage7"), weights_file="efficientnet_b7_lukemelas-c5b4e57e.pth"),
        ArchSpec("densenet121", "densenet121", "DenseNet121_Weights", "features", (2, 4, 6, 10),
                 ("relu0", "denseblock1", "denseblock2", "denseblock4"), weights_file="densenet121-a639ec97.pth"),
        ArchSpec("squeezenet1_1", "squeezenet1_1", "SqueezeNet1_1_Weights", "features",
                 (1, 3, 7, 12), ("relu1", "fire1", "fire4", "fire8"), (1, 4, 7, 9, 10, 11, 12), weights_file="squeezenet1_1-b8a52dc0.pth"),
    ]
}
LPIPS_ARCHS = tuple(a for a, s in ARCHS.items() if s.lpips is not None)
LAYERS = ("1", "2", "3", "4")


class UnknownLossNetError(ValueError):
    pass


def arch_spec(arch: str) -> ArchSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise UnknownLossNetError(
            f"unknown architecture {arch!r}; known architectures: {', '.join(ARCHS)}"
        ) from None


@dataclass(frozen=True)
class LossNet:
    """One loss network: an architecture and a layer ("1".."4" or "lpips")."""

    arch: str
    layer: str

    def __post_init__(self) -> None:
        spec = arch_spec(self.arch)
        if self.layer == "lpips":
            if spec.lpips is None:
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
    def taps(self) -> tuple[int, ...]:
        spec = ARCHS[self.arch]
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
        raise UnknownLossNetError(f"loss network {text!r} must look like 'alexnet/2' or 'vgg16/lpips'")


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


# ----------------------------------------------------------------------------- weights


def weights_enum(arch: str):
    import torchvision

    return getattr(torchvision.models, arch_spec(arch).weights_enum).IMAGENET1K_V1


def weights_filename(arch: str) -> str:
    """File name of the IMAGENET1K_V1 weights, e.g. ``alexnet-owt-7be5be79.pth``."""
    return arch_spec(arch).weights_file


def weights_url(arch: str) -> str:
    """Download URL of the IMAGENET1K_V1 weights (equal to the torchvision enum's; tested)."""
    return WEIGHTS_HOST + weights_filename(arch)


def imagenet_acc1(arch: str) -> float:
    return float(weights_enum(arch).meta["_metrics"]["ImageNet-1K"]["acc@1"])


def weights_id(arch: str, weights: str) -> str:
    """A short provenance string for the scores table."""
    if weights == "imagenet":
        return f"imagenet:{weights_filename(arch)}"
    if weights == "random":
        return "random"
    return f"file:{Path(weights).name}"


def _hash_prefix(name: str) -> str | None:
    stem = name.rsplit(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1]
    return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None


def verify_weights_file(path: Path) -> None:
    """torchvision's check: the file's sha256 starts with the hash in its name."""
    prefix = _hash_prefix(path.name)
    if prefix is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(prefix):
        raise RuntimeError(
            f"{path}: sha256 {h.hexdigest()[:16]}... does not start with {prefix}; the file is "
            f"corrupt. Delete it and fetch it again with `snakemake --cores 1 download_weights`."
        )


def _build_model(arch: str, pretrained_layout: bool) -> nn.Module:
    import torchvision

    spec = arch_spec(arch)
    builder = getattr(torchvision.models, spec.builder)
    kwargs: dict = {"weights": None}
    if arch in ("googlenet", "inception_v3"):
        # the IMAGENET1K_V1 state_dicts carry the auxiliary heads
        kwargs.update(aux_logits=True, init_weights=not pretrained_layout)
    return builder(**kwargs)


def load_backbone(
    arch: str,
    weights: str = "imagenet",
    weights_dir: str | Path = "resources/weights",
    seed: int = 0,
) -> nn.Module:
    """The torchvision model with the requested weights, in eval mode, no download.

    ``weights``: ``"imagenet"`` reads ``weights_dir/<torchvision file name>``;
    ``"random"`` uses torchvision's initialisation under ``torch.manual_seed(seed)``;
    anything else is a path to a state_dict file.
    """
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build_model(arch, pretrained_layout=False)
    else:
        if weights == "imagenet":
            path = Path(weights_dir) / weights_filename(arch)
            if not path.exists():
                raise FileNotFoundError(
                    f"ImageNet weights for {arch} are missing: {path}. Fetch them on a machine "
                    f"with internet access with `snakemake --cores 1 download_weights` "
                    f"(they come from {weights_url(arch)}), or set weights: random."
                )
        else:
            path = Path(weights)
            if not path.exists():
                raise FileNotFoundError(
                    f"weights file for {arch} not found: {path} (config key weights / weights_paths)"
                )
        model = _build_model(arch, pretrained_layout=True)
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(
                f"{path} does not fit {arch}: missing keys {missing[:5]}... Is it a {arch} "
                f"state_dict?"
            )
    return model.eval()  # in-place ops stay as torchvision builds them; see FeatureExtractor


# ----------------------------------------------------------------------------- extractor


class ImageNetNormalize(nn.Module):
    """``(x - mean) / std`` as one fused multiply-add, ``x * (1 / std) - mean / std``."""

    def __init__(self) -> None:
        super().__init__()
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        self.register_buffer("scale", (1 / std).float(), persistent=False)
        self.register_buffer("shift", (-mean / std).float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))


# Children that may return their input (or a view of it) unchanged: an in-place op after
# one of them would still write into the tensor that entered it.
_ALIASING = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.Flatten, nn.Unflatten)


def protect_taps(children: Sequence[nn.Module], taps: Iterable[int]) -> None:
    """Switch off in-place ops only where they could overwrite a tap.

    torchvision builds its ReLUs (and SiLUs, Hardswishes) in place. That is safe, and
    faster (no fresh output to allocate and fault in: SqueezeNet's forward is about 1.5x
    faster on the CPU), except in a child whose input is a tap, or aliases one through
    children that can return their input. In those children every in-place module is
    made out of place; the rest keep torchvision's setting. Tests compare every tap of
    all 14 architectures with a fully out-of-place pass.
    """
    tapset = set(taps)
    exposed = False  # does the current child's input alias a tap?
    for i, child in enumerate(children):
        if exposed:
            for m in child.modules():
                if hasattr(m, "inplace"):
                    m.inplace = False
        exposed = i in tapset or (exposed and isinstance(child, _ALIASING))


class FeatureExtractor(nn.Module):
    """Every requested tap of one architecture from a single forward pass.

    Input: images in [0, 1], shape [N, 3, H, W]. With ``normalize="imagenet"``
    they are ImageNet-normalised first; ``normalize="none"`` feeds them raw.
    Output: ``{child_index: features}`` for every tap. Children after the last tap
    are dropped, so the pass stops there. Gradients flow (use it as a loss); the
    parameters are frozen.
    """

    def __init__(self, backbone: nn.Module, arch: str, taps: Sequence[int], normalize: str = "imagenet"):
        super().__init__()
        spec = arch_spec(arch)
        if normalize not in ("imagenet", "none"):
            raise ValueError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")
        container = backbone.features if spec.container == "features" else backbone
        children = list(container.children())
        self.taps = tuple(sorted(set(int(t) for t in taps)))
        if not self.taps:
            raise ValueError("no taps requested")
        if self.taps[-1] >= len(children) or self.taps[0] < 0:
            raise ValueError(f"{arch} has {len(children)} children; taps {self.taps} out of range")
        self.arch = arch
        self.body = nn.ModuleList(children[: self.taps[-1] + 1])
        protect_taps(self.body, self.taps)
        self.norm = ImageNetNormalize() if normalize == "imagenet" else nn.Identity()
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        # a loss network always runs in eval mode (frozen BatchNorm statistics)
        return super().train(False)

    def peak_activation_bytes(self, size: int | tuple[int, int]) -> int:
        """Bytes of the largest tensor any module of the pass produces, per float32 image.

        Measured by one single-image forward at ``size`` (cached per size). Inference code
        on the CPU sizes its forward chunks with it: a tensor over glibc's mmap threshold
        (32 MiB at most) is a fresh mapping on every pass, and faulting its pages in costs
        more than the arithmetic on it (SqueezeNet at 64 px is 2-3x faster in chunks of
        tens of images than in one batch of hundreds).
        """
        hw = (size, size) if isinstance(size, int) else tuple(size)
        cache = self.__dict__.setdefault("_peak_bytes", {})
        if hw not in cache:
            peak = [3 * hw[0] * hw[1]]

            def hook(_m, _i, out) -> None:
                for t in out.values() if isinstance(out, dict) else (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, Tensor):
                        peak[0] = max(peak[0], t.numel())

            p = next(self.parameters(), None)
            handles = [m.register_forward_hook(hook) for m in self.modules()]
            try:
                with torch.inference_mode():
                    self(torch.zeros(1, 3, *hw, device=p.device if p is not None else None))
            finally:
                for h in handles:
                    h.remove()
            cache[hw] = 4 * peak[0]
        return cache[hw]

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = self.norm(x)
        out: dict[int, Tensor] = {}
        tapset = set(self.taps)
        for i, child in enumerate(self.body):
            x = child(x)
            if i in tapset:
                out[i] = x
        return out


def build_extractor(
    arch: str,
    taps: Iterable[int] | None = None,
    *,
    lossnets: Iterable[LossNet] = (),
    weights: str = "imagenet",
    weights_dir: str | Path = "resources/weights",
    normalize: str = "imagenet",
    seed: int = 0,
) -> FeatureExtractor:
    """One extractor for ``arch`` covering ``taps`` and the taps of every given loss network."""
    wanted = set(taps or ())
    for net in lossnets:
        if net.arch != arch:
            raise ValueError(f"{net.id} is not a {arch} loss network")
        wanted.update(net.taps)
    if not wanted:
        wanted = set(arch_spec(arch).layers)
    backbone = load_backbone(arch, weights, weights_dir, seed=seed)
    return FeatureExtractor(backbone, arch, sorted(wanted), normalize)


def feature_loss(extractor: FeatureExtractor, taps: Sequence[int], output: Tensor, target: Tensor) -> Tensor:
    """Deep perceptual loss: mean squared error of features at ``taps`` (summed over taps).

    The target's features carry no gradient.
    """
    n = output.shape[0]
    feats = extractor(torch.cat([output, target.detach()], 0))
    loss = output.new_zeros(())
    for t in taps:
        f = feats[t]
        loss = loss + torch.mean((f[:n] - f[n:].detach()) ** 2)
    return loss
