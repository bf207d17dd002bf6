"""The benchmarked metrics as a library and a command line.

A loss network of this workflow (``arch/layer``, ``arch/lpips``) with one comparison method
becomes a differentiable distance between images, computed by the same code the similarity
benchmark scores BAPPS with (``workflow.lossnets`` for the features, ``workflow.compare``
for the comparison), so the numbers equal the benchmark's::

    from workflow.metric import PerceptualMetric, PerceptualLoss

    metric = PerceptualMetric("squeezenet1_1/lpips", comparison="mean", channel_norm=True)
    d = metric(x, y)            # x, y: [N, 3, H, W] in [0, 1] (y may be [1, 3, H, W]); d: [N]

    loss_fn = PerceptualLoss("vgg16/2")   # the study's loss: feature MSE at one layer
    loss = loss_fn(output, target)        # a scalar; no gradient flows into the target

    PerceptualMetric("convnext_tiny/2")   # a preset of the node-name kind (docs/lossnets.md)
    PerceptualMetric("mine/3", custom={"mine": {"builder": "resnet34", "taps": [...]}})
    PerceptualMetric.from_adapted("adapter.pt", comparison="mean", ranking=0)  # adaptation's

``weights``: ``"imagenet"`` reads torchvision's published file (never downloads) from
``weights_dir``, by default the first of ``resources/weights`` (this workflow's download
folder) and torch's hub cache (``torch.hub.get_dir()/checkpoints``, same file names) that
holds it; ``"random"``; or a state_dict path. Gradients are finite everywhere, also at
``x == y`` and at all-zero feature vectors (the channel norm has a zero, not NaN, gradient
there).

Command line: ``python -m workflow metric score A B --out distances.csv`` scores two images,
or two folders of images paired by file name (like the lpips package's ``lpips_2dirs.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from workflow import compare
from workflow.archs import (
    CUSTOM,
    SSL_PRESETS,
    LossNet,
    UnknownLossNetError,
    register_custom,
    weights_file_in,
    weights_filename,
)
from workflow.lossnets import build_extractor, feature_loss

__all__ = ["IMAGE_SUFFIXES", "PerceptualLoss", "PerceptualMetric", "find_weights_dir",
           "pair_images", "score"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class MetricError(ValueError):
    """Bad input to the metric or its command line; the message names what and the fix."""


def _hf_hub_cache() -> Path:
    """Hugging Face's hub cache folder (``HF_HUB_CACHE``, ``HF_HOME/hub`` or
    ``~/.cache/huggingface/hub``), where timm's downloads of the self-supervised presets are."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                             "huggingface")
    return Path(home).expanduser() / "hub"


def find_weights_dir(arch: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``arch``'s ImageNet weights file (see the module docstring; the
    self-supervised presets' files are also looked for in the Hugging Face hub cache)."""
    if weights_dir is not None:
        folder = Path(weights_dir).expanduser()
        if not weights_file_in(arch, folder).is_file():
            raise MetricError(f"weights_dir {folder} has no {weights_filename(arch)} (the "
                              f"ImageNet file of {arch}, torchvision's name); fetch it with "
                              f"`snakemake --cores 1 download_weights`, or use weights='random'")
        return folder
    name = weights_filename(arch)
    candidates = [Path("resources/weights"), Path(torch.hub.get_dir()) / "checkpoints"]
    if arch in SSL_PRESETS:
        candidates.append(_hf_hub_cache())
    for d in candidates:
        if weights_file_in(arch, d).is_file():
            return d
    raise MetricError(f"ImageNet weights {name} for {arch} are in none of "
                      f"{', '.join(map(str, candidates))}: fetch them with `snakemake --cores 1 "
                      f"download_weights`, pass weights_dir=, or use weights='random'")


class PerceptualMetric(nn.Module):
    """Distance between images under one loss network and one comparison method.

    Args: ``lossnet`` ``arch/layer`` (layer 1-4 or ``lpips``); ``comparison`` one of
    ``workflow.compare.METHODS``; ``channel_norm`` unit-normalise each position's channel
    vector (after the mean / sort transform); ``weights``, ``weights_dir``: see the module
    docstring; ``normalize``: ``imagenet`` (the loss network sees ImageNet-normalised
    inputs, as in BAPPS scoring) or ``none``; ``seed``: of random weights; ``custom``:
    entries as config ``lossnets.custom`` (docs/lossnets.md) for a ``lossnet`` of your own.
    ``weights="random"`` or a state_dict path; ``"imagenet"`` needs the file in
    ``weights_dir`` (or in ``resources/weights`` or the torch hub cache when unset).
    """

    def __init__(self, lossnet: str = "squeezenet1_1/lpips", comparison: str = "spatial",
                 channel_norm: bool = True, weights: str = "imagenet",
                 weights_dir: str | os.PathLike | None = None, normalize: str = "imagenet",
                 seed: int = 0, custom: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        if custom:
            register_custom({**{k: v for k, v in _custom_specs().items()}, **custom}, "custom")
        try:
            self.net = LossNet.parse(lossnet)
        except UnknownLossNetError as e:
            raise MetricError(str(e)) from None
        if weights not in ("imagenet", "random") and not Path(weights).expanduser().is_file():
            raise MetricError(f"weights={weights!r}: use 'imagenet', 'random' or the path of a "
                              f"state_dict file (no such file)")
        try:
            self.variant = compare.Variant(comparison, bool(channel_norm))
        except ValueError as e:
            raise MetricError(str(e)) from None
        wdir = find_weights_dir(self.net.arch, weights_dir) if weights == "imagenet" \
            else Path(".")
        self.extractor = build_extractor(self.net.arch, lossnets=[self.net], weights=weights,
                                         weights_dir=wdir, normalize=normalize, seed=seed)
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        self.weights = weights
        self.channel_weights: dict[int | str, Tensor] | None = None

    @classmethod
    def from_adapted(cls, model: str | os.PathLike, comparison: str | None = None,
                     channel_norm: bool | None = None, ranking: int = 0, **kwargs: Any
                     ) -> PerceptualMetric:
        """The metric that the adaptation benchmark adapted: its model file (``adapter.pt``,
        written by ``training.save_model``) holds non-negative channel weights per comparison
        and ranking for one loss network (its ``net``); pick the comparison (and
        ``channel_norm``) and the ``ranking``. The distance is the benchmark's adapted one,
        the channel-weighted sum of the per-channel differences. ``kwargs`` go to the
        constructor (``weights``, ``weights_dir``, ``normalize``: as the adaptation ran)."""
        from workflow.models.adapter import load_adapter

        try:
            adapter, meta = load_adapter(model, torch.device("cpu"))
        except (OSError, ValueError) as e:
            raise MetricError(f"{model}: not an adaptation model file ({e})") from None
        names = [v.name for v in adapter.variants]
        pick = [i for i, v in enumerate(adapter.variants)
                if (comparison is None or v.method == comparison)
                and (channel_norm is None or v.channel_norm == bool(channel_norm))]
        if len(pick) != 1:
            raise MetricError(f"{model} holds the adapted comparisons {', '.join(names)}; "
                              f"choose one with comparison= and channel_norm=")
        if int(ranking) not in adapter.rankings:
            raise MetricError(f"{model} was adapted to rankings {adapter.rankings}; "
                              f"ranking={ranking} is not one of them")
        r, var = adapter.rankings.index(int(ranking)), adapter.variants[pick[0]]
        if len(var.parts) > 1:
            raise MetricError(f"{model}: {var.name} is a combined comparison, adapted with one "
                              f"weight set per term; from_adapted loads the single comparisons "
                              f"(spatial, mean, sort) only")
        metric = cls(meta["net"], var.method, var.channel_norm, **kwargs)
        metric.channel_weights = {t: w[r].detach().clone()
                                  for t, w in adapter.weights(pick[0]).items()}
        metric.adapted = {"model": str(model), "ranking": int(ranking), "run": meta.get("run")}
        return metric

    def features(self, x: Tensor) -> dict[int, Tensor]:
        _check_images(x, "x")
        return self.extractor(x)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``[N]`` distances between ``x`` [N, 3, H, W] and ``y`` ([N or 1, 3, H, W]), in [0, 1]."""
        _check_images(y, "y")
        if y.shape[0] not in (1, x.shape[0]) or y.shape[1:] != x.shape[1:]:
            raise MetricError(f"x is {list(x.shape)} and y {list(y.shape)}: y needs x's shape "
                              f"or a batch of 1")
        fx, fy = self.features(x), self.extractor(y)
        weights = None
        if self.channel_weights is not None:
            weights = {t: w.to(x.device) for t, w in self.channel_weights.items()}
        return compare.distances(fx, fy, [self.variant], self.net.taps, weights)[self.variant]

    def extra_repr(self) -> str:
        return f"{self.net.id}, {self.variant.name}, weights={self.weights}"


class PerceptualLoss(nn.Module):
    """The study's deep perceptual loss: the mean squared error of the loss network's
    features at its taps (summed over taps), with no gradient into the target; with
    ``comparison`` set, the batch mean of :class:`PerceptualMetric` instead."""

    def __init__(self, lossnet: str = "vgg16/2", comparison: str | None = None,
                 channel_norm: bool = False, weights: str = "imagenet",
                 weights_dir: str | os.PathLike | None = None, normalize: str = "none",
                 seed: int = 0) -> None:
        super().__init__()
        self.metric = PerceptualMetric(lossnet, comparison or "spatial", channel_norm, weights,
                                       weights_dir, normalize, seed)
        self.comparison = comparison

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        if self.comparison is None:
            _check_images(output, "output")
            return feature_loss(self.metric.extractor, self.metric.net.taps, output, target)
        return self.metric(output, target.detach()).mean()


def _custom_specs() -> dict[str, dict[str, Any]]:
    """The registered custom entries back as config entries (a second metric keeps them)."""
    return {n: {"builder": s.builder, "weights": s.weights, "taps": list(s.layers),
                "input_size": s.input_size, "layout": s.layout, "prefix_tokens": s.prefix_tokens,
                "self_supervised": s.self_supervised, "weights_url": s.weights_url}
            for n, s in CUSTOM.items()}


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise MetricError(f"{name} must be an image batch [N, 3, H, W] in [0, 1], got {shape}")


# ----------------------------------------------------------------------------- command line

def _images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MetricError(f"{path} is neither an image file nor a folder")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def pair_images(a: Path, b: Path) -> list[tuple[Path, Path]]:
    """Two files, or the images of two folders paired by file name (every one paired)."""
    if a.is_file() and b.is_file():
        return [(a, b)]
    if a.is_file() != b.is_file():
        raise MetricError(f"{a} and {b}: give two image files or two folders")
    left, right = {p.name: p for p in _images(a)}, {p.name: p for p in _images(b)}
    only_a, only_b = sorted(left.keys() - right.keys()), sorted(right.keys() - left.keys())
    if only_a or only_b:
        raise MetricError(f"unpaired images: {len(only_a)} only in {a} ({', '.join(only_a[:5])})"
                          f", {len(only_b)} only in {b} ({', '.join(only_b[:5])}); images pair "
                          f"by file name")
    if not left:
        raise MetricError(f"{a} and {b} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(left[k], right[k]) for k in sorted(left)]


def _read(path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise MetricError(f"{path} is not a readable image ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def score(a: Path, b: Path, out: Path, lossnet: str = "squeezenet1_1/lpips",
          comparison: str = "spatial", channel_norm: bool = True, weights: str = "imagenet",
          weights_dir: Path | None = None, device: str = "cpu") -> Any:
    """Distances of image pairs (two files or two folders paired by name) to ``out``
    (``.csv`` or ``.parquet``), one row per pair; returns the table."""
    import pandas as pd
    from tqdm import tqdm

    from workflow.files import write_parquet, write_text
    from workflow.job import pick_device

    if out.suffix not in (".csv", ".parquet"):
        raise MetricError(f"--out {out}: name a .csv or .parquet file")
    pairs = pair_images(Path(a), Path(b))
    dev = pick_device(device)
    metric = PerceptualMetric(lossnet, comparison, channel_norm, weights, weights_dir).to(dev)
    rows = []
    with torch.inference_mode():
        for pa, pb in tqdm(pairs, desc=f"{lossnet} {metric.variant.name}", unit="pair",
                           file=sys.stderr, disable=len(pairs) < 2):
            x, y = _read(pa), _read(pb)
            if x.shape != y.shape:
                raise MetricError(f"{pa} is {x.shape[3]}x{x.shape[2]} and {pb} "
                                  f"{y.shape[3]}x{y.shape[2]}: a pair needs one size")
            rows.append({"a": str(pa), "b": str(pb),
                         "distance": float(metric(x.to(dev), y.to(dev))[0])})
    df = pd.DataFrame(rows).assign(lossnet=metric.net.id, comparison=comparison,
                                   channel_norm=bool(channel_norm), weights=weights)
    if out.suffix == ".csv":
        write_text(df.to_csv(index=False), out)
    else:
        write_parquet(df, out)
    print(f"{out}: {len(df)} pair(s), mean distance {df['distance'].mean():.6g}", flush=True)
    return df
