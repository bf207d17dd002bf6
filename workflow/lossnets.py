"""Building loss networks from the table in :mod:`workflow.archs`, and the one feature extractor.

:class:`FeatureExtractor` returns every requested tap of one architecture from a single
forward pass; :func:`feature_loss` is the deep perceptual loss. The models' own ``forward``
is never used, so GoogLeNet/Inception ``transform_input`` is not applied (as in the study).
Names, taps and weight files: :mod:`workflow.archs` (re-exported here).

The node-name kind (:class:`workflow.archs.NodeSpec`: the presets and config
``lossnets.custom``) is built by the same functions and read by :class:`NodeExtractor`:
forward hooks on the named modules, one pass that stops after the last tap, transformer
taps folded into ``(N, C, H, W)`` (:func:`fold_tap`). The self-supervised presets
(``archs.SSL_PRESETS``: DINO, DINOv2, CLIP) are built by timm, the optional extra ``ssl``
(:func:`timm_module`; without it they fail naming the extra), and read the same way.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision is imported lazily: importing it pulls in torch._dynamo (seconds of CPU).
from workflow.archs import (  # noqa: F401  (re-exported: the registry belongs with the builders)
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LAYERS,
    LPIPS_ARCHS,
    PRESETS,
    SSL_PRESETS,
    WEIGHTS_HOST,
    ArchSpec,
    LossNet,
    MissingExtraError,
    NodeSpec,
    UnknownLossNetError,
    all_lossnets,
    arch_spec,
    is_node_arch,
    missing_extra,
    weights_file_in,
    weights_filename,
    weights_id,
    weights_url,
)
from workflow.datasets.weights import (
    WeightsFileError,
    read_state_dict,
    refetch,
    torchvision_keys,
)

# ----------------------------------------------------------------------------- weights


def _is_timm(spec: ArchSpec | NodeSpec) -> bool:
    return getattr(spec, "library", "torchvision") == "timm"


def timm_module(arch: str):
    """The ``timm`` package, or a :class:`MissingExtraError` naming the extra to install."""
    why = missing_extra(arch)
    if why is None:
        try:
            import timm
        except ImportError as e:  # installed but broken
            why = f"the loss network {arch} needs timm, which fails to import ({e})"
        else:
            return timm
    raise MissingExtraError(why)


def weights_enum(arch: str):
    """The torchvision weights enum member of ``arch`` (IMAGENET1K_V1 for the study's)."""
    import torchvision

    spec = arch_spec(arch)
    if _is_timm(spec):
        raise UnknownLossNetError(
            f"{arch} is a self-supervised timm model ({spec.weights}), not a torchvision "
            f"classifier: it has no torchvision weights enum and no ImageNet accuracy")
    if isinstance(spec, NodeSpec):
        try:
            return getattr(getattr(torchvision.models, spec.weights_enum), spec.weights_variant)
        except AttributeError:
            raise UnknownLossNetError(
                f"{arch}: torchvision {torchvision.__version__} has no weights "
                f"{spec.weights!r} (config key lossnets.custom.{arch}.weights, e.g. "
                f"ResNet34_Weights.IMAGENET1K_V1)") from None
    return getattr(torchvision.models, spec.weights_enum).IMAGENET1K_V1


def imagenet_acc1(arch: str) -> float:
    """Top-1 of the weights' metadata; NaN for the self-supervised presets (not classifiers:
    DINO and DINOv2 have no head, CLIP's is a text-embedding projection)."""
    if _is_timm(arch_spec(arch)):
        return math.nan
    return float(weights_enum(arch).meta["_metrics"]["ImageNet-1K"]["acc@1"])


def _build_timm(spec: NodeSpec) -> nn.Module:
    """A timm model of the spec's pretrained name (``spec.weights``, e.g.
    ``vit_base_patch16_224.dino``: the architecture with that tag's pretrained_cfg, nothing
    downloaded), built for its ``input_size`` (the position embeddings of that grid; a
    file's are resampled to it when loaded), without a head (``num_classes=0``)."""
    timm = timm_module(spec.name)
    kwargs: dict = {"pretrained": False, "num_classes": 0}
    if spec.input_size:
        kwargs["img_size"] = spec.input_size
    name = spec.weights or spec.builder
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model"
        near = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        key = (f"config key lossnets.custom.{spec.name}.{'weights' if spec.weights else 'builder'}"
               if spec.custom else f"the preset {spec.name}")
        raise UnknownLossNetError(
            f"{key}: timm {timm.__version__} cannot build {name!r} ({e}); timm models near "
            f"it: {', '.join(near) or 'none'}") from None


def _build_model(arch: str, pretrained_layout: bool) -> nn.Module:
    import torchvision

    spec = arch_spec(arch)
    if _is_timm(spec):
        return _build_timm(spec)  # type: ignore[arg-type]
    builder = getattr(torchvision.models, spec.builder, None)
    if builder is None or not callable(builder):
        near = difflib.get_close_matches(spec.builder, torchvision.models.list_models(), n=5)
        raise UnknownLossNetError(
            f"config key lossnets.custom.{arch}.builder: torchvision.models has no builder "
            f"{spec.builder!r}; near it: {', '.join(near) or 'none'}")
    kwargs: dict = {"weights": None}
    if isinstance(spec, NodeSpec):
        if spec.input_size and spec.builder.startswith("vit_"):
            kwargs["image_size"] = spec.input_size  # position embeddings for that grid
        return builder(**kwargs)
    if arch in ("googlenet", "inception_v3"):
        # the IMAGENET1K_V1 state_dicts carry the auxiliary heads
        kwargs.update(aux_logits=True, init_weights=not pretrained_layout)
    return builder(**kwargs)


def _where(arch: str, weights: str, weights_dir: str | Path) -> tuple[Path, str]:
    """The file ``weights`` names for ``arch`` and the config key that named it."""
    if weights == "imagenet":
        return weights_file_in(arch, weights_dir), "lossnets.weights"
    return Path(weights), f"lossnets.weights_paths.{arch}"


def _check_shape(got: torch.Tensor, param: torch.Tensor, key: str, where: str, arch: str,
                 what_to_do: str) -> None:
    """A weights file's tensor ``got`` for ``key`` has the shape ``param`` of ``arch`` needs."""
    if tuple(got.shape) != tuple(param.shape):
        raise WeightsFileError(
            f"{where} does not fit {arch}: key {key!r} has shape {list(got.shape)} "
            f"in the file, {arch} needs {list(param.shape)}; {what_to_do}")


def fit_state_dict(model: nn.Module, arch: str, state: dict[str, Tensor],
                   taps: Iterable[int] | None = None, where: str = "the weights file",
                   fix: str = "") -> dict[str, Tensor]:
    """The entries of ``state`` to load into ``model`` (a :func:`_build_model` of ``arch``).

    ``state`` is a file's state_dict as published or saved; legacy key names are renamed
    first, as torchvision's loader renames them (:func:`torchvision_keys`). Only the children
    up to the deepest of ``taps`` (default: every tap of the table for ``arch``) compute a
    loss network's features: their keys and shapes must be exactly the model's
    (``num_batches_tracked`` may be absent, as in files saved before PyTorch 0.4.1), or a
    :class:`WeightsFileError` names the first key that differs. Later layers (the classifier
    head, GoogLeNet's and Inception-v3's auxiliary heads) may differ or be absent: their
    entries are kept where name and shape fit, ignored otherwise.
    """
    spec = arch_spec(arch)
    if _is_timm(spec):
        state = _timm_keys(model, state)
    else:
        state = torchvision_keys(spec.builder, state)
    if isinstance(spec, NodeSpec):
        return _fit_node_state_dict(model, spec, state, taps, where, fix)
    taps = sorted(set(taps)) if taps else sorted({*spec.layers, *(spec.lpips or ())})
    container = model.features if spec.container == "features" else model
    base = "features." if spec.container == "features" else ""
    names = [n for n, _ in container.named_children()]
    deepest = taps[-1]
    if deepest >= len(names):
        raise ValueError(f"{arch} has {len(names)} children; tap {deepest} out of range")
    tapped = tuple(f"{base}{n}." for n in names[: deepest + 1])
    needs = (f"the layers up to {base}{names[deepest]} (child {deepest}, the deepest tap) "
             f"must be {arch}'s; later ones, e.g. a classifier head, may differ")
    fix = fix or f"give a {arch} state_dict"
    own = model.state_dict()
    for key, param in own.items():
        if not key.startswith(tapped):
            continue
        if key not in state:
            if key.endswith(".num_batches_tracked"):
                continue
            keys = list(state)
            if all(k.startswith("module.") for k in keys):
                hint = ("its keys start with 'module.': a DataParallel model's; save "
                        "model.module.state_dict()")
            else:
                hint = f"its first key is {keys[0]!r}: a state_dict of another architecture?"
            raise WeightsFileError(
                f"{where} is not a {arch} state_dict: it has no key {key!r} ({hint}); {needs}; "
                f"{fix}")
        _check_shape(state[key], param, key, where, arch, f"{needs}; {fix}")
    extra = next((k for k in state if k.startswith(tapped) and k not in own), None)
    if extra is not None:
        raise WeightsFileError(
            f"{where} does not fit {arch}: it has the key {extra!r}, which {arch} does not "
            f"have; {needs}; {fix}")
    return {k: v for k, v in state.items() if k in own
            and (k.startswith(tapped) or tuple(v.shape) == tuple(own[k].shape))}


def _timm_keys(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` as timm's own loader gives it to ``model``: the model module's
    ``checkpoint_filter_fn`` (timm's ViTs: position embeddings resampled to the model's grid,
    bicubic with antialias, e.g. DINOv2's 37 x 37 to 16 x 16 at 224 px; the original DINOv2 /
    OpenAI CLIP layouts converted), where the module has one."""
    import sys

    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is None:
        return dict(state)
    try:
        return dict(filt(dict(state), model))
    except Exception:  # not a layout the filter knows: the key check below names the problem
        return dict(state)


def _fit_node_state_dict(model: nn.Module, spec: NodeSpec, state: dict[str, Tensor],
                         taps: Iterable[str] | None, where: str, fix: str) -> dict[str, Tensor]:
    """:func:`fit_state_dict` for the node-name kind: the modules that run up to the end of
    the deepest tap (in ``named_modules`` order, the order torchvision defines and runs
    them) must be the file's; a ViT's position embeddings are interpolated to the grid the
    model was built for (torchvision's ``interpolate_embeddings``)."""
    arch = spec.name
    order = [n for n, _ in model.named_modules()]
    taps = list(taps) if taps else list(spec.layers)
    check_taps(model, arch, taps)
    last = max(order.index(t) for t in taps)
    deepest = order[last]
    end = max(i for i, n in enumerate(order) if n == deepest or n.startswith(deepest + "."))
    owner = {n: i for i, n in enumerate(order)}
    own = model.state_dict()
    pos = "encoder.pos_embedding"
    if pos in own and pos in state and state[pos].shape != own[pos].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = dict(interpolate_embeddings(model.image_size, model.patch_size, state))

    def needed(key: str) -> bool:
        return owner.get(key.rsplit(".", 1)[0] if "." in key else "", 0) <= end

    needs = (f"the modules up to {deepest} (the deepest tap) must be {arch}'s; later ones, "
             f"e.g. a classifier head, may differ")
    fix = fix or f"give a {arch} state_dict"
    for key, param in own.items():
        if not needed(key):
            continue
        if key not in state:
            if key.endswith(".num_batches_tracked"):
                continue
            raise WeightsFileError(f"{where} is not a {arch} state_dict: it has no key {key!r} "
                                   f"(its first key is {next(iter(state), None)!r}); {needs}; "
                                   f"{fix}")
        _check_shape(state[key], param, key, where, arch, f"{needs}; {fix}")
    return {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}


def check_taps(model: nn.Module, arch: str, taps: Iterable[str]) -> None:
    """Every tap names a module of ``model``, or the error names the valid ones near it."""
    names = [n for n, _ in model.named_modules() if n]
    for t in taps:
        if t not in names:
            near = difflib.get_close_matches(str(t), names, n=6, cutoff=0.5)
            parent = str(t).rsplit(".", 1)[0]
            near += [n for n in names if n.rsplit(".", 1)[0] == parent and n not in near][:6]
            raise UnknownLossNetError(
                f"{arch} has no module {t!r} (a tap of config lossnets.custom.{arch}.taps or of "
                f"its preset); modules near it: {', '.join(near) or ', '.join(names[:12])}")


def load_backbone(
    arch: str,
    weights: str = "imagenet",
    weights_dir: str | Path = "resources/weights",
    seed: int = 0,
    taps: Iterable[int] | None = None,
) -> nn.Module:
    """The torchvision model with the requested weights, in eval mode, no download.

    ``weights``: ``"imagenet"`` reads ``weights_dir/<torchvision file name>``;
    ``"random"`` uses torchvision's initialisation under ``torch.manual_seed(seed)``;
    anything else is a path to a state_dict file. A file is read as torchvision publishes
    it (zip or legacy serialisation, DenseNet's legacy key names, GoogLeNet's and
    Inception-v3's auxiliary heads) or as a fine-tune saved it; only the layers up to the
    deepest of ``taps`` must match (:func:`fit_state_dict`).
    """
    if _is_timm(arch_spec(arch)):
        timm_module(arch)  # the extra, named before anything else is looked at
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build_model(arch, pretrained_layout=False)
        return model.eval()
    path, key = _where(arch, weights, weights_dir)
    if not path.exists():
        if weights == "imagenet":
            raise FileNotFoundError(
                f"{'Published' if _is_timm(arch_spec(arch)) else 'ImageNet'} weights for "
                f"{arch} are missing: {path}. Fetch them on a machine "
                f"with internet access with `snakemake --cores 1 download_weights` "
                f"(they come from {weights_url(arch)}), or set weights: random."
            )
        raise FileNotFoundError(f"weights file for {arch} not found: {path} (config key {key})")
    state = read_state_dict(path, key)
    model = _build_model(arch, pretrained_layout=True)
    picked = fit_state_dict(model, arch, state, taps, f"{path} (config key {key})", refetch(key))
    model.load_state_dict(picked, strict=False)
    return model.eval()  # in-place ops stay as torchvision builds them; see FeatureExtractor


# ----------------------------------------------------------------------------- extractor


class ImageNetNormalize(nn.Module):
    """``(x - mean) / std`` as one fused multiply-add, ``x * (1 / std) - mean / std``; the
    ImageNet statistics unless others are given (OpenAI CLIP's, for clip_vitb32)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        mean = torch.tensor(tuple(mean), dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(tuple(std), dtype=torch.float64).view(1, 3, 1, 1)
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

    def __init__(self, backbone: nn.Module, arch: str, taps: Sequence[int],
                 normalize: str = "imagenet"):
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
                if isinstance(out, dict):
                    out = list(out.values())
                for t in out if isinstance(out, tuple | list) else (out,):
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


def fold_tap(t: Tensor, layout: str, prefix_tokens: int = 0) -> Tensor:
    """One tap's output as ``(N, C, H, W)``: ``nchw`` as it is; ``nhwc`` (a Swin stage's
    ``(N, H, W, C)``) permuted; ``tokens`` (a ViT block's ``(N, prefix + H*W, C)``) without
    its ``prefix_tokens`` class / register tokens, the patch tokens folded back row-major
    (the order torchvision flattens the patch grid in) onto a square grid. The permutes are
    views: a folded tap is a channels_last tensor, no copy."""
    if layout == "nchw":
        return t
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    if layout != "tokens":
        raise ValueError(f"unknown tap layout {layout!r}")
    n, length, c = t.shape
    patches = length - prefix_tokens
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"a token tap of {length} tokens less {prefix_tokens} prefix tokens "
                         f"is not a square grid of patches")
    return t[:, prefix_tokens:].reshape(n, side, side, c).permute(0, 3, 1, 2)


class _Stop(Exception):
    """Raised by the hook of the last tap: the pass stops there."""


class NodeExtractor(nn.Module):
    """The taps of a node-name loss network (module paths) from one forward pass.

    Forward hooks on the named modules record their outputs (folded by :func:`fold_tap`);
    the hook of the last one to run stops the pass, so nothing after it is computed.
    Images in [0, 1] are resized to the spec's ``input_size`` first where it has one
    (bilinear, differentiable), then normalised with the statistics the network was trained
    with (``normalize="imagenet"``: ImageNet's, OpenAI CLIP's for clip_vitb32). The
    output is ``{module path: (N, C, H, W)}``; gradients flow, parameters are frozen,
    eval mode always. Every in-place op of the backbone is switched off: a hook's output
    is then never overwritten, whatever module a user names.
    """

    def __init__(self, backbone: nn.Module, arch: str, taps: Sequence[str],
                 normalize: str = "imagenet"):
        super().__init__()
        spec = arch_spec(arch)
        if normalize not in ("imagenet", "none"):
            raise ValueError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")
        if not taps:
            raise ValueError("no taps requested")
        check_taps(backbone, arch, taps)
        order = [n for n, _ in backbone.named_modules()]
        self.taps = tuple(sorted(set(taps), key=order.index))
        self.arch, self.spec = arch, spec
        self.backbone = backbone
        for m in backbone.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
        modules = dict(backbone.named_modules())
        for t in self.taps:
            modules[t].register_forward_hook(self._hook(t))
        self.norm = (ImageNetNormalize(spec.mean, spec.std) if normalize == "imagenet"
                     else nn.Identity())
        self._out: dict[str, Tensor] | None = None
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _hook(self, tap: str):
        def hook(_m, _i, out) -> None:
            got = self._out
            if got is None:  # a pass not started by forward (e.g. a user's own)
                return
            got[tap] = fold_tap(out, self.spec.layout, self.spec.prefix_tokens)
            if len(got) == len(self.taps):
                raise _Stop

        return hook

    def train(self, mode: bool = True) -> NodeExtractor:
        return super().train(False)  # a loss network always runs in eval mode

    peak_activation_bytes = FeatureExtractor.peak_activation_bytes

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = self.spec.input_size
        if size and tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                align_corners=False)
        x = self.norm(x)
        self._out = out = {}
        try:
            self.backbone(x)
        except _Stop:
            pass
        finally:
            self._out = None
        missing = [t for t in self.taps if t not in out]
        if missing:
            raise RuntimeError(f"{self.arch}: the forward pass never ran {', '.join(missing)}")
        return {t: out[t] for t in self.taps}


def build_extractor(
    arch: str,
    taps: Iterable[int] | None = None,
    *,
    lossnets: Iterable[LossNet] = (),
    weights: str = "imagenet",
    weights_dir: str | Path = "resources/weights",
    normalize: str = "imagenet",
    seed: int = 0,
) -> FeatureExtractor | NodeExtractor:
    """One extractor for ``arch`` covering ``taps`` and the taps of every given loss network
    (a :class:`NodeExtractor` for the node-name kind)."""
    wanted = set(taps or ())
    for net in lossnets:
        if net.arch != arch:
            raise ValueError(f"{net.id} is not a {arch} loss network")
        wanted.update(net.taps)
    if not wanted:
        wanted = set(arch_spec(arch).layers)
    backbone = load_backbone(arch, weights, weights_dir, seed=seed, taps=wanted)
    if is_node_arch(arch):
        return NodeExtractor(backbone, arch, sorted(wanted), normalize)
    return FeatureExtractor(backbone, arch, sorted(wanted), normalize)


def feature_loss(extractor: FeatureExtractor, taps: Sequence[int], output: Tensor,
                 target: Tensor | Mapping) -> Tensor:
    """Deep perceptual loss: mean squared error of features at ``taps`` (summed over taps).

    The target's features carry no gradient, so they come from a pass of their own under
    ``no_grad``: no graph is kept for it, and backward runs through the output's pass only
    (a joint ``cat([output, target])`` pass backpropagated through both halves and threw the
    target's input gradient away: 15% of the FLOPs of an SR step with vgg16/2). The loss
    network runs in eval mode (frozen BatchNorm statistics, no dropout), so an image's
    features do not depend on the batch it is in; the in-place ops that :func:`protect_taps`
    leaves on never write into a tap, with or without a graph (on the CPU in fp32 the loss
    and its gradient are bit-identical to the joint pass's for all 14 architectures). The
    target pass runs first, so its activations are freed before the output's graph is built.
    ``target`` may also be the target's features already, ``{tap: Tensor}`` (a
    :class:`workflow.target_cache.TargetFeatures` lookup): then no target pass runs.
    """
    ref = target if isinstance(target, Mapping) else _target_features(extractor, target)
    ref = {t: ref[t] for t in taps}
    feats = extractor(output)
    loss = output.new_zeros(())
    for t in taps:
        loss = loss + torch.mean((feats[t] - ref[t]) ** 2)
    return loss


def _target_features(extractor: nn.Module, target: Tensor) -> dict:
    with torch.no_grad():
        return dict(extractor(target))


def _stacked_targets(extractor: nn.Module, targets: Tensor | Mapping) -> dict:
    """``{tap: [R, N, ...]}`` of ``R`` target batches ``[R, N, 3, H, W]`` (one pass, no_grad),
    or the mapping itself when the features are given (a target cache's ``stacked``)."""
    if isinstance(targets, Mapping):
        return dict(targets)
    r, n = targets.shape[:2]
    return {t: v.unflatten(0, (r, n))
            for t, v in _target_features(extractor, targets.flatten(0, 1)).items()}


def fused_feature_loss(extractor: FeatureExtractor, taps: Sequence[Sequence[int]],
                       outputs: Tensor, targets: Tensor | Mapping, target_of: Sequence[int]
                       ) -> Tensor:
    """:func:`feature_loss` of ``K`` models at once: ``[K]`` losses, one forward pass each way.

    ``outputs`` ``[K, N, 3, H, W]`` (model ``k``'s batch), ``targets`` ``[R, N, 3, H, W]``
    (the distinct target batches: models of one data stream share theirs), ``target_of[k]``
    the target batch of model ``k``, ``taps[k]`` its taps. The targets go through the loss
    network once, under ``no_grad``; the ``K * N`` outputs once, as one batch that sheds a
    model's rows after its deepest tap (the models are ordered deepest first, so shedding is
    a slice), so a layer-1 model's output never runs the layers of a layer-4 one. Model
    ``k``'s loss is the sum over its own taps of the MSE of its rows, as :func:`feature_loss`
    computes it alone (the loss network is in eval mode: an image's features do not depend
    on the batch it is in). Summing the losses gives every model its own gradient only.
    ``targets`` may also be their features already, ``{tap: [R, N, ...]}``.
    """
    k, n = outputs.shape[:2]
    if len(taps) != k or len(target_of) != k:
        raise ValueError(f"{k} outputs need {k} tap sets and target indices, got "
                         f"{len(taps)} and {len(target_of)}")
    if not isinstance(extractor, FeatureExtractor):  # taps by module path (NodeExtractor)
        return _fused_node_loss(extractor, taps, outputs, targets, target_of)
    ref = _stacked_targets(extractor, targets)
    deepest = [max(int(t) for t in ts) for ts in taps]
    order = sorted(range(k), key=lambda i: -deepest[i])  # stable: ties keep their order
    x = extractor.norm(torch.stack([outputs[i] for i in order]).flatten(0, 1))
    active = len(order)  # the first `active` models of `order` are in x
    feats: dict[int, dict[int, Tensor]] = {i: {} for i in range(k)}
    for depth, child in enumerate(extractor.body):
        x = child(x)
        for pos in range(active):
            if depth in taps[order[pos]]:
                feats[order[pos]][depth] = x[pos * n:(pos + 1) * n]
        while active and deepest[order[active - 1]] <= depth:
            active -= 1
        if not active:
            break
        x = x[:active * n]
    losses = []
    for i in range(k):
        loss = outputs.new_zeros(())
        for t in taps[i]:
            loss = loss + torch.mean((feats[i][t] - ref[t][target_of[i]]) ** 2)
        losses.append(loss)
    return torch.stack(losses)


def _fused_node_loss(extractor: nn.Module, taps: Sequence[Sequence[int | str]],
                     outputs: Tensor, targets: Tensor | Mapping, target_of: Sequence[int]
                     ) -> Tensor:
    """:func:`fused_feature_loss` for a loss network whose taps are module paths: the hooks
    see the whole forward pass, so the ``K * N`` outputs run as one batch to the deepest tap
    of any model (no shedding); the targets once, under ``no_grad``."""
    k, n = outputs.shape[:2]
    ref = _stacked_targets(extractor, targets)
    feats = extractor(outputs.flatten(0, 1))
    losses = []
    for i in range(k):
        loss = outputs.new_zeros(())
        for t in taps[i]:
            loss = loss + torch.mean((feats[t][i * n:(i + 1) * n] - ref[t][target_of[i]]) ** 2)
        losses.append(loss)
    return torch.stack(losses)
