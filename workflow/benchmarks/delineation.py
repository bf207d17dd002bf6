"""Benchmark 3: road delineation with a refinement U-Net per loss network (REFERENCE.md).

``train``: the U-Net of ``workflow.models.unet`` on random ``crop_size`` crops of the
Massachusetts Roads training tiles (one crop per tile per epoch, horizontal flip with
probability 1/2), loss = BCE + ``feature_weight`` x MSE of the loss network's features of
prediction and reference map (each repeated to 3 channels, ImageNet-normalised), Adam,
``epochs`` epochs, one refinement pass (K = 1). After every ``eval_every_epochs`` epochs the
quality (pixel-exact) on the validation tiles at full resolution picks the checkpoint kept.

``eval``: the kept model on the test tiles at full resolution (tiled inference, stitched, equal
to whole-image inference), K = 1..max(passes) refinement passes, each pass scored separately,
pixel-exact and relaxed (``tolerance`` px); and the reference protocol: the validation tiles
resized to ``reference_size`` and scored whole. Writes per-tile rows and summary rows in the
scores schema (``variant`` = ``K2/relaxed``, ``K1/exact``, ``reference/K3``).

All data handling happens on the device: the training tiles are moved there once when they
fit (``data_on_device``), crops and flips are gathered there by index arithmetic, and every
random draw comes from the global torch RNG (or a generator seeded by the epoch), so a
resumed run is bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.nn import functional as F

from workflow import runtime
from workflow.config import json_arg
from workflow.datasets.common import load_arrays
from workflow.lossnets import LossNet, build_extractor, feature_loss, weights_id
from workflow.metrics.delineation import (
    COUNT_KEYS,
    match_counts,
    scores_from_counts,
)
from workflow.models.unet import SIDE_MULTIPLE, RefinementUNet, pad_to_multiple
from workflow.results import atomic_path, config_hash, score_frame, write_parquet

BENCHMARK = "delineation"
DATASET = "roads"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DelineationConfig:
    """Config key ``delineation`` (workflow/schemas/delineation.schema.yaml has the docs)."""

    lossnets: Any = "all"  # read by the rules only
    runs: int = 1  # read by the rules only
    seed: int = 0
    epochs: int = 100
    batch_size: int = 8
    crop_size: int = 224
    lr: float = 1e-3
    feature_weight: float = 0.01
    normalize: str = "imagenet"
    threshold: float = 0.3
    tolerance: int = 3
    passes: Sequence[int] = (1, 2, 3)
    select_passes: int = 1
    eval_every_epochs: int = 1
    tile_size: int = 512
    tile_margin: int = 48
    inference_batch: int = 8
    reference_size: int = 224
    data_on_device: str = "auto"  # auto | always | never
    max_tiles: Mapping[str, int | None] = field(default_factory=dict)  # split -> first n tiles

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DelineationConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise KeyError(f"config key delineation: unknown keys {sorted(unknown)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"config key delineation.{key}: {why}")

        if self.crop_size % SIDE_MULTIPLE:
            raise bad("crop_size", f"{self.crop_size} is not a multiple of {SIDE_MULTIPLE} "
                                   f"(the U-Net halves the side four times)")
        if self.tile_size % SIDE_MULTIPLE or self.tile_size < SIDE_MULTIPLE:
            raise bad("tile_size", f"{self.tile_size} is not a positive multiple of {SIDE_MULTIPLE}")
        if self.tile_margin % (SIDE_MULTIPLE // 2) or not 0 <= 2 * self.tile_margin < self.tile_size:
            raise bad("tile_margin", f"{self.tile_margin} must be a multiple of {SIDE_MULTIPLE // 2} "
                                     f"and less than half of tile_size {self.tile_size}, so tiles "
                                     f"stay on the U-Net's {SIDE_MULTIPLE}-px grid")
        if self.reference_size % SIDE_MULTIPLE:
            raise bad("reference_size", f"{self.reference_size} is not a multiple of {SIDE_MULTIPLE}")
        if not self.passes or min(self.passes) < 1:
            raise bad("passes", f"{list(self.passes)} must be a non-empty list of passes >= 1")
        if self.select_passes < 1:
            raise bad("select_passes", "must be >= 1")
        if self.data_on_device not in ("auto", "always", "never"):
            raise bad("data_on_device", f"{self.data_on_device!r} is not auto, always or never")
        if self.tolerance < 0:
            raise bad("tolerance", "must be >= 0 px")


# Which keys each rule receives as params (Snakemake reruns a job when its params change, so
# a rule gets exactly the keys it depends on: a new tolerance re-scores, it never retrains).
_RULES_ONLY = ("lossnets", "runs")
_EVAL_ONLY = ("passes", "tolerance", "reference_size")
_TRAIN_ONLY = ("seed", "epochs", "batch_size", "crop_size", "lr", "feature_weight", "normalize",
               "select_passes", "eval_every_epochs", "data_on_device")


def stage_config(section: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The part of config key ``delineation`` that rule ``train`` or ``eval`` depends on."""
    drop = _RULES_ONLY + {"train": _EVAL_ONLY, "eval": _TRAIN_ONLY}[stage]
    return {k: v for k, v in section.items() if k not in drop}


# ----------------------------------------------------------------------------- data


def load_split(data_dir: str | Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped ``{split}_sat.npy`` uint8 [N,H,W,3] and ``{split}_map.npy`` uint8 [N,H,W]."""
    data_dir = Path(data_dir)
    loaded = load_arrays(data_dir, {k: f"{split}_{k}.npy" for k in ("sat", "map")})
    sat, maps = loaded["sat"], loaded["map"]
    if sat.dtype != np.uint8 or sat.ndim != 4 or sat.shape[-1] != 3:
        raise ValueError(f"{data_dir}/{split}_sat.npy: expected uint8 [N,H,W,3], got {sat.dtype} {sat.shape}")
    if maps.dtype != np.uint8 or maps.shape != sat.shape[:3]:
        raise ValueError(f"{data_dir}/{split}_map.npy: expected uint8 {sat.shape[:3]}, got "
                         f"{maps.dtype} {maps.shape}; re-run the roads prepare step")
    if len(sat) == 0:
        raise ValueError(f"{data_dir}: the {split} split has no tiles")
    if limit is not None:
        sat, maps = sat[:limit], maps[:limit]
    return sat, maps


def to_image(sat: Tensor) -> Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return sat.permute(0, 3, 1, 2).float().div_(255)


def to_target(maps: Tensor) -> Tensor:
    """uint8 {0,1} NHW -> float N1HW."""
    return maps[:, None].float()


def data_fits(nbytes: int, device: torch.device, policy: str) -> bool:
    """Whether to hold the training tiles on ``device`` (``policy`` auto | always | never).

    ``auto`` on CUDA: at most half of the free memory (the rest is for activations and the
    loss network); on CPU the arrays are read into RAM when they take at most half of it.
    """
    if policy != "auto":
        return policy == "always"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= free // 2
    try:
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return nbytes <= avail // 2


class CropSampler:
    """Random crops with horizontal flips of a tile set, gathered on ``device``.

    ``draw(n)`` draws crop offsets and flips with the global torch RNG of ``device`` (the
    harness checkpoints it); ``gather(idx, oy, ox, flip)`` cuts them out with one index
    operation (the flip is a reversed column index, so it costs nothing). Tiles held on the
    device are gathered there; otherwise from the memory map on the CPU, then moved.
    """

    def __init__(self, sat: np.ndarray, maps: np.ndarray, crop: int, device: torch.device,
                 on_device: bool) -> None:
        n, h, w, _ = sat.shape
        if crop > h or crop > w:
            raise ValueError(f"crop_size {crop} exceeds the road tiles ({h}x{w}); lower config "
                             f"key delineation.crop_size")
        self.n, self.h, self.w, self.crop, self.device = n, h, w, crop, device
        self.on_device = on_device
        if on_device:
            # np.array copies out of the (read-only) memory map once
            self.sat = torch.from_numpy(np.array(sat)).to(device)
            self.maps = torch.from_numpy(np.array(maps)).to(device)
        else:
            self.sat, self.maps = sat, maps
        self._ar = torch.arange(crop, device=device)

    def draw(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        oy = torch.randint(0, self.h - self.crop + 1, (n,), device=self.device)
        ox = torch.randint(0, self.w - self.crop + 1, (n,), device=self.device)
        flip = torch.rand(n, device=self.device) < 0.5
        return oy, ox, flip

    def gather(self, idx: Tensor, oy: Tensor, ox: Tensor, flip: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,c,c] in [0,1] and targets [B,1,c,c] in {0,1} (float)."""
        rows = oy[:, None] + self._ar  # [B, c]
        cols = torch.where(flip[:, None], ox[:, None] + self.crop - 1 - self._ar, ox[:, None] + self._ar)
        if self.on_device:
            i = idx.to(self.device)[:, None, None]
            sat = self.sat[i, rows[:, :, None], cols[:, None, :]]
            maps = self.maps[i, rows[:, :, None], cols[:, None, :]]
        else:
            i, r, c = (t.cpu().numpy() for t in (idx, rows, cols))
            sat = torch.from_numpy(self.sat[i[:, None, None], r[:, :, None], c[:, None, :]]).to(self.device)
            maps = torch.from_numpy(self.maps[i[:, None, None], r[:, :, None], c[:, None, :]]).to(self.device)
        return to_image(sat), to_target(maps)


class EpochPlan:
    """Which tiles make up batch ``step``: each epoch visits every tile once in a random order.

    The order of epoch ``e`` comes from a generator seeded with (seed, e), not from a running
    RNG, so a run resumed mid-epoch sees the same order without storing it.
    """

    def __init__(self, n_tiles: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.n, self.batch, self.seed, self.device = n_tiles, batch_size, seed, device
        self.steps_per_epoch = math.ceil(n_tiles / batch_size)
        self._epoch: int | None = None
        self._perm: Tensor | None = None

    def batch_indices(self, step: int) -> Tensor:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).to(self.device)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm[b * self.batch:(b + 1) * self.batch]


# ----------------------------------------------------------------------------- inference


def _tile_starts(size: int, tile: int, margin: int) -> list[int]:
    """Tile origins along one axis: stride ``tile - 2 margin``, the last one flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - 2 * margin
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def _kept(start: int, tile: int, size: int, margin: int) -> tuple[int, int]:
    """The part of a tile that is trusted: all but ``margin`` px at edges inside the image."""
    lo = start + (margin if start > 0 else 0)
    hi = start + tile - (margin if start + tile < size else 0)
    return lo, hi


@torch.no_grad()
def predict_tiled(model: RefinementUNet, image: Tensor, passes: int, tile: int = 512,
                  margin: int = 48, batch: int = 8, precision: str = "fp32") -> list[Tensor]:
    """Road probabilities of ``passes`` refinement passes for images [N,3,H,W] in [0,1].

    The images are padded (reflection) to a multiple of 16 at the bottom/right, cut into
    ``tile`` x ``tile`` tiles whose origins lie on the 16-px grid and overlap by ``2 margin``,
    and every output pixel is taken from a tile in which it lies at least ``margin`` px from
    any cut edge. With ``margin >= RECEPTIVE_RADIUS`` (45) the result equals whole-image
    inference on the padded image (the tests check it), so the tile size only trades memory
    for speed. Each pass runs over the whole image before the next starts, because a tile of
    pass k needs pass k-1's prediction in its margins. Returns K tensors [N,1,H,W] (float32).
    """
    model.eval()
    device = next(model.parameters()).device
    n, _, h, w = image.shape
    x = pad_to_multiple(image.to(device, torch.float32))
    hp, wp = x.shape[-2:]
    th, tw = min(tile, hp), min(tile, wp)
    ys = [(s, *_kept(s, th, hp, margin)) for s in _tile_starts(hp, th, margin)]
    xs = [(s, *_kept(s, tw, wp, margin)) for s in _tile_starts(wp, tw, margin)]
    grid = [(i, y, xx) for i in range(n) for y in ys for xx in xs]
    pred = x.new_zeros(n, 1, hp, wp)
    outputs = []
    for _ in range(passes):
        inp = torch.cat([x, pred], 1)
        new = torch.empty_like(pred)
        for b in range(0, len(grid), batch):
            chunk = grid[b:b + batch]
            tiles = torch.stack([inp[i, :, y0:y0 + th, x0:x0 + tw] for i, (y0, _, _), (x0, _, _) in chunk])
            with runtime.autocast(device, precision):
                out = model(tiles).float()
            for k, (i, (y0, ylo, yhi), (x0, xlo, xhi)) in enumerate(chunk):
                new[i, :, ylo:yhi, xlo:xhi] = out[k, :, ylo - y0:yhi - y0, xlo - x0:xhi - x0]
        pred = new
        outputs.append(pred[:, :, :h, :w])
    return outputs


def resize_reference(sat: Tensor, maps: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The reference protocol's inputs: images and maps resized to ``size`` x ``size``.

    Images: bilinear with antialiasing (what torchvision's Resize does to a PIL image). Maps:
    the same resampling, then road where the resampled value is >= 0.5 (the reference's exact
    mask resampling is not recorded; this keeps the map binary).
    """
    img = F.interpolate(to_image(sat), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False).clamp_(0, 1)
    ref = F.interpolate(to_target(maps), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False) >= 0.5
    return img, ref.float()


# ----------------------------------------------------------------------------- scoring


def score_tiles(sat: np.ndarray, maps: np.ndarray, model: RefinementUNet, cfg: DelineationConfig,
                device: torch.device, precision: str, passes: Sequence[int],
                tolerances: Sequence[int], reference: bool = False,
                chunk: int = 4) -> pd.DataFrame:
    """Per-tile counts and scores for every pass in ``passes`` and every tolerance.

    ``reference``: the reference protocol (tiles resized to ``cfg.reference_size``, one
    forward over the whole resized tile); otherwise full resolution with tiled inference.
    Tiles are read from the memory map ``chunk`` at a time, so the test set never has to fit.
    """
    k_max = max(passes)
    rows = []
    for start in range(0, len(sat), chunk):
        s = torch.from_numpy(np.array(sat[start:start + chunk])).to(device)
        m = torch.from_numpy(np.array(maps[start:start + chunk])).to(device)
        if reference:
            img, ref = resize_reference(s, m, cfg.reference_size)
            model.eval()
            with torch.no_grad(), runtime.autocast(device, precision):
                preds = [p.float() for p in model.refine(img, k_max)]
        else:
            img, ref = to_image(s), to_target(m)
            preds = predict_tiled(model, img, k_max, cfg.tile_size, cfg.tile_margin,
                                  cfg.inference_batch, precision)
        for k in passes:
            for tol in tolerances:
                counts = match_counts(preds[k - 1], ref, cfg.threshold, tol)
                for j in range(len(s)):
                    c = {key: int(counts[key][j]) for key in COUNT_KEYS}
                    rows.append({"tile": start + j, "passes": k, "tolerance": tol, **c,
                                 **scores_from_counts(c)})
    return pd.DataFrame(rows)


def match_name(tolerance: int) -> str:
    return "exact" if tolerance == 0 else "relaxed"


def summarize(tiles: pd.DataFrame) -> list[dict[str, Any]]:
    """Pooled counts (every pixel weighs alike) per protocol, pass and tolerance -> score rows."""
    rows = []
    for (protocol, split, k, tol), g in tiles.groupby(["protocol", "split", "passes", "tolerance"],
                                                      sort=True):
        pooled = {key: int(g[key].sum()) for key in COUNT_KEYS}
        variant = f"reference/K{k}" if protocol == "reference" else f"K{k}/{match_name(int(tol))}"
        for metric, value in scores_from_counts(pooled).items():
            rows.append({"split": split, "variant": variant, "metric": metric, "value": value,
                         "n": len(g)})
    return rows


# ----------------------------------------------------------------------------- commands


# Keys that do not change the training trajectory up to a given step: a checkpoint written
# under other values of these is resumed (raising ``epochs`` extends a finished run).
_RESUMABLE_KEYS = ("epochs", "runs", "lossnets", "passes", "tolerance", "reference_size",
                   "inference_batch", "data_on_device")


def _fingerprint(cfg: DelineationConfig, lossnet: Mapping[str, Any], layer: str, run: int,
                 n_train: int) -> str:
    kept = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_KEYS}
    return config_hash({"cfg": kept, "lossnet": dict(lossnet), "layer": layer, "run": run,
                        "n_train": n_train})


def build_lossnet(lossnet: Mapping[str, Any], layer: str, normalize: str):
    net = LossNet(str(lossnet["arch"]), str(layer))
    extractor = build_extractor(net.arch, lossnets=[net], weights=str(lossnet.get("weights", "imagenet")),
                                weights_dir=lossnet.get("weights_dir", "resources/weights"),
                                normalize=normalize, seed=int(lossnet.get("seed", 0)))
    return net, extractor


def check_crop_fits(extractor, taps: Sequence[int], crop: int, device: torch.device) -> None:
    """Fail before training when the loss network's features vanish at this crop size."""
    with torch.no_grad():
        try:
            feats = extractor(torch.zeros(1, 3, crop, crop, device=device))
        except RuntimeError as e:
            raise ValueError(f"{extractor.arch}: a {crop}x{crop} crop is too small for this loss "
                             f"network ({e}); raise config key delineation.crop_size") from e
    for t in taps:
        if feats[t].numel() == 0:
            raise ValueError(f"{extractor.arch} tap {t} has no features at {crop}x{crop}; raise "
                             f"config key delineation.crop_size")


def make_trainer(cfg: DelineationConfig, lossnet: Mapping[str, Any], layer: str,
                 common: Mapping[str, Any], train_arrays: tuple[np.ndarray, np.ndarray],
                 valid_arrays: tuple[np.ndarray, np.ndarray] | None, workdir: str | Path,
                 run: int = 0, threads: int | None = None, progress: bool = True,
                 max_steps: int | None = None, log_every: int | None = None):
    """The U-Net, its loss and data wired into the training harness (``Trainer``).

    ``valid_arrays=None`` trains without model selection (the speed benchmark does).
    Returns ``(trainer, model, info)``.
    """
    from workflow.training import TrainConfig, Trainer

    device = runtime.pick_device(str(common.get("device", "auto")))
    precision = runtime.resolve_precision(str(common.get("precision", "auto")), device)
    seed = cfg.seed + run
    runtime.seed_everything(seed)  # the U-Net's initialisation
    model = RefinementUNet()
    net, extractor = build_lossnet(lossnet, layer, cfg.normalize)
    taps = net.taps
    sat, maps = train_arrays
    on_device = data_fits(sat.nbytes + maps.nbytes, device, cfg.data_on_device)
    sampler = CropSampler(sat, maps, cfg.crop_size, device, on_device)
    plan = EpochPlan(len(sat), cfg.batch_size, seed, device)
    extractor.to(device)
    check_crop_fits(extractor, taps, cfg.crop_size, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    spe = plan.steps_per_epoch
    trainer: Trainer

    def step_fn(step: int) -> tuple[Tensor, int]:
        idx = plan.batch_indices(step)
        img, gt = sampler.gather(idx, *sampler.draw(len(idx)))
        if trainer.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        x = torch.cat([img, torch.zeros_like(img[:, :1])], 1)  # K = 1: an empty previous map
        logits = model.logits(x)
        bce = F.binary_cross_entropy_with_logits(logits.float(), gt)
        pred = torch.sigmoid(logits)
        perceptual = feature_loss(extractor, taps, pred.expand(-1, 3, -1, -1), gt.expand(-1, 3, -1, -1))
        return bce + cfg.feature_weight * perceptual.float(), len(idx)

    eval_fn = None
    if valid_arrays is not None:
        vsat, vmaps = valid_arrays

        def eval_fn(step: int) -> dict[str, float]:
            df = score_tiles(vsat, vmaps, model, cfg, device, precision, [cfg.select_passes], [0])
            return scores_from_counts({k: int(df[k].sum()) for k in COUNT_KEYS})

    tc = TrainConfig(
        max_steps=cfg.epochs * spe if max_steps is None else max_steps,
        eval_every=cfg.eval_every_epochs * spe, checkpoint_every=spe, precision=precision,
        seed=seed, select_metric="quality" if eval_fn else None, select_mode="max",
        device=str(device), log_every=log_every or max(1, min(100, spe)), threads=threads,
        progress=progress)
    trainer = Trainer(workdir, {"model": model}, optimizer, step_fn, tc, eval_fn=eval_fn,
                      aux_modules={"lossnet": extractor},
                      fingerprint=_fingerprint(cfg, lossnet, layer, run, len(sat)),
                      description=f"delineation {net.id} run{run}")
    info = {"lossnet": net.id, "run": run, "epochs": cfg.epochs, "steps_per_epoch": spe,
            "device": str(device), "precision": precision, "data_on_device": on_device,
            "channels_last": trainer.channels_last, "train_tiles": len(sat),
            "weights_id": weights_id(net.arch, str(lossnet.get("weights", "imagenet")))}
    return trainer, model, info


def train(cfg: DelineationConfig, lossnet: Mapping[str, Any], layer: str, common: Mapping[str, Any],
          data_dir: str | Path, workdir: str | Path, out: str | Path, run: int = 0,
          threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one U-Net for loss network (lossnet["arch"], layer); write ``out`` (best weights)."""
    from workflow.training import load_checkpoint

    t0 = time.perf_counter()
    train_arrays = load_split(data_dir, "train", cfg.max_tiles.get("train"))
    valid_arrays = load_split(data_dir, "valid", cfg.max_tiles.get("valid"))
    trainer, model, info = make_trainer(cfg, lossnet, layer, common, train_arrays, valid_arrays,
                                        workdir, run, threads, progress)
    result = trainer.fit()
    best = load_checkpoint(result.best_checkpoint, {"model": model}) if result.best_checkpoint else {}
    info |= {"steps": result.steps, "best_step": result.best_step,
             "best_valid_quality": result.best_metric, "stop_reason": result.stop_reason,
             "valid_tiles": len(valid_arrays[0]), "train_wall_s": time.perf_counter() - t0}
    state = {"modules": {"model": {k: v.cpu() for k, v in model.state_dict().items()}},
             "step": best.get("step"), "info": info}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return info


def evaluate(cfg: DelineationConfig, lossnet: Mapping[str, Any], layer: str,
             common: Mapping[str, Any], data_dir: str | Path, model_path: str | Path,
             tiles_out: str | Path, scores_out: str | Path, run: int = 0,
             threads: int | None = None) -> pd.DataFrame:
    """Score the trained model (test tiles at full resolution + the reference protocol)."""
    t0 = time.perf_counter()
    device = runtime.pick_device(str(common.get("device", "auto")))
    precision = runtime.resolve_precision(str(common.get("precision", "auto")), device)
    runtime.configure(device, precision, threads)
    net = LossNet(str(lossnet["arch"]), str(layer))
    model = RefinementUNet()
    from workflow.training import load_checkpoint

    ckpt = load_checkpoint(model_path, {"model": model})
    model.to(device).eval()
    info = ckpt.get("info", {})
    tols = sorted({0, int(cfg.tolerance)})
    frames = []
    tsat, tmaps = load_split(data_dir, "test", cfg.max_tiles.get("test"))
    df = score_tiles(tsat, tmaps, model, cfg, device, precision, cfg.passes, tols)
    frames.append(df.assign(protocol="full", split="test"))
    vsat, vmaps = load_split(data_dir, "valid", cfg.max_tiles.get("valid"))
    df = score_tiles(vsat, vmaps, model, cfg, device, precision, cfg.passes, [0], reference=True)
    frames.append(df.assign(protocol="reference", split="valid"))
    tiles = pd.concat(frames, ignore_index=True).assign(
        benchmark=BENCHMARK, dataset=DATASET, arch=net.arch, layer=net.layer, run=run,
        match=lambda d: d["tolerance"].map(match_name))
    wall = time.perf_counter() - t0 + float(info.get("train_wall_s", 0.0))
    scores = score_frame(
        summarize(tiles), benchmark=BENCHMARK, dataset=DATASET, arch=net.arch, layer=net.layer,
        comparison="", run=run, config_hash=config_hash(asdict(cfg)),
        weights_id=weights_id(net.arch, str(lossnet.get("weights", "imagenet"))),
        device=str(device), precision=precision, wall_time_s=wall)
    write_parquet(tiles, tiles_out)
    write_parquet(scores, scores_out)
    return scores


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m workflow benchmarks.delineation",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "eval"):
        p = sub.add_parser(name)
        p.add_argument("--config", type=json_arg, required=True, help="config key delineation (JSON)")
        p.add_argument("--lossnet", type=json_arg, required=True,
                       help="workflow.config.lossnet_params(config, arch) (JSON)")
        p.add_argument("--layer", required=True, help="1..4 (or lpips)")
        p.add_argument("--common", type=json_arg, default={}, help="workflow.config.common (JSON)")
        p.add_argument("--data", required=True, help="prepared roads folder")
        p.add_argument("--run", type=int, default=0)
        p.add_argument("--threads", type=int, default=None)
        if name == "train":
            p.add_argument("--workdir", required=True, help="checkpoints and metrics.csv")
            p.add_argument("--out", required=True, help="the kept model (best validation quality)")
        else:
            p.add_argument("--model", required=True)
            p.add_argument("--tiles", required=True, help="per-tile Parquet")
            p.add_argument("--scores", required=True, help="summary Parquet (scores schema)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = DelineationConfig.from_dict(args.config)
    if args.cmd == "train":
        info = train(cfg, args.lossnet, args.layer, args.common, args.data, args.workdir, args.out,
                     args.run, args.threads)
        print(json.dumps(info, indent=2, default=str))
    else:
        scores = evaluate(cfg, args.lossnet, args.layer, args.common, args.data, args.model,
                          args.tiles, args.scores, args.run, args.threads)
        with pd.option_context("display.width", 200, "display.max_rows", 200):
            print(scores[["split", "variant", "metric", "value", "n"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
