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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from workflow import compare
from workflow.archs import LossNet, weights_filename
from workflow.lossnets import build_extractor, feature_loss

__all__ = ["IMAGE_SUFFIXES", "PerceptualLoss", "PerceptualMetric", "find_weights_dir",
           "pair_images", "score"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class MetricError(ValueError):
    """Bad input to the metric or its command line; the message names what and the fix."""


def find_weights_dir(arch: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``arch``'s ImageNet weights file (see the module docstring)."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    name = weights_filename(arch)
    candidates = [Path("resources/weights"), Path(torch.hub.get_dir()) / "checkpoints"]
    for d in candidates:
        if (d / name).is_file():
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
    inputs, as in BAPPS scoring) or ``none``; ``seed``: of random weights.
    """

    def __init__(self, lossnet: str = "squeezenet1_1/lpips", comparison: str = "spatial",
                 channel_norm: bool = True, weights: str = "imagenet",
                 weights_dir: str | os.PathLike | None = None, normalize: str = "imagenet",
                 seed: int = 0) -> None:
        super().__init__()
        self.net = LossNet.parse(lossnet)
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
        return compare.distances(fx, fy, [self.variant], self.net.taps)[self.variant]

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
