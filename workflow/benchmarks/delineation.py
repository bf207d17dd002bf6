"""Benchmark 3: road delineation with a refinement U-Net per loss network (docs/delineation.md).

``train``: the U-Net of :mod:`workflow.models.unet` on random ``crop_size`` crops of the
Massachusetts Roads training tiles (one crop per tile per epoch, horizontal flip with
probability 1/2), loss = BCE + ``feature_weight`` x MSE of the loss network's features of
prediction and reference map (each repeated to 3 channels), Adam, ``epochs`` epochs, one
refinement pass (K = 1). After every ``eval_every_epochs`` epochs the pixel-exact quality on
the validation tiles at full resolution picks the checkpoint kept.

``eval``: the kept model on the test tiles at full resolution (tiled inference, equal to
whole-image inference), K = 1..max(passes) refinement passes, each pass scored separately,
pixel-exact and relaxed (``tolerance`` px); and the reference protocol: the validation tiles
resized to ``reference_size`` and scored whole. Writes per-tile rows and summary rows in the
scores schema (``variant`` = ``K2/relaxed``, ``K1/exact``, ``reference/K3``).

Wiring only: the tiles come from :func:`workflow.datasets.roads.load`, live in two
:class:`~workflow.datasets.bank.ImageBank` s (satellite image and map, cut by one crop grid),
batches from :class:`~workflow.datasets.bank.EpochSampler`, the loop is
:class:`~workflow.training.Trainer`, the metrics :mod:`workflow.metrics.delineation`, the
scoring :mod:`workflow.benchmarks.delineation_scoring`; ``fuse``:
:mod:`workflow.benchmarks.delineation_fused`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.nn import functional as F

from workflow.archs import LossNet, weights_id
from workflow.benchmarks.delineation_scoring import match_name, score_tiles, summarize
from workflow.datasets import roads
from workflow.datasets.bank import EpochSampler, ImageBank, crop_grid, random_crops
from workflow.files import write_parquet
from workflow.imaging import masks_to_float
from workflow.job import Job, seed_everything
from workflow.lossnets import feature_loss
from workflow.metrics.delineation import COUNT_KEYS, scores_from_counts
from workflow.models.unet import RefinementUNet
from workflow.results import score_frame
from workflow.training import (
    TrainConfig,
    Trainer,
    key_fingerprint,
    load_model,
    make_adam,
    resume_key,
    save_model,
)

__all__ = ["evaluate", "make_trainer", "score_tiles", "summarize", "train", "train_banks",
           "train_config", "train_crops", "train_key", "valid_scores"]

BENCHMARK, DATASET = "delineation", "roads"
# What evaluation needs from the model file's meta (the eval stage builds no loss network).
MODEL_META = ("net", "run", "steps", "weights_id", "train_wall_s")


def _check(config: Mapping[str, Any], job: Job) -> None:
    """The config checks JSON schema cannot say (the schema has the multiples and minimums)."""
    tile, margin = int(job.setting("tile_size")), int(config["tile_margin"])
    if 2 * margin >= tile:
        raise ValueError(f"config key delineation.tile_margin {margin} must be less than half "
                         f"of delineation.tile_size {tile}; raise tile_size")


def _load(prepared: Mapping[str, Path], config: Mapping[str, Any], split: str
          ) -> dict[str, np.ndarray]:
    return roads.load(prepared[DATASET], split, config["max_tiles"][split])


def _check_crop_fits(extractor, net: LossNet, crop: int, device: torch.device) -> None:
    """Fail before training when the loss network's features vanish at this crop size."""
    with torch.no_grad():
        try:
            feats = extractor(torch.zeros(1, 3, crop, crop, device=device))
        except RuntimeError as e:
            raise ValueError(f"{net.arch}: a {crop}x{crop} crop is too small for this loss "
                             f"network ({e}); raise config key delineation.crop_size") from e
    for t in net.taps:
        if feats[t].numel() == 0:
            raise ValueError(f"{net.arch} tap {t} has no features at {crop}x{crop}; raise "
                             f"config key delineation.crop_size")


def train_banks(job: Job, config: Mapping[str, Any], train_tiles: Mapping[str, np.ndarray]
                ) -> tuple[ImageBank, ImageBank]:
    """The training images and maps as two banks cut by one crop grid (image and map of a
    crop come from the same place), placed by the ``data_on_device`` setting."""
    policy = job.setting("data_on_device")
    sat = ImageBank(train_tiles["sat"], job.device, policy)
    maps = ImageBank(train_tiles["map"], job.device, policy)
    crop, (_, h, w) = int(config["crop_size"]), maps.shape
    if crop > min(h, w):
        raise ValueError(f"config key delineation.crop_size {crop} exceeds the {h}x{w} road "
                         f"tiles; lower it")
    return sat, maps


def train_crops(sat: ImageBank, maps: ImageBank, idx: Tensor, crop: int, device: torch.device,
                channels_last: bool, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor]:
    """One training batch: a random ``crop`` crop of each tile ``idx`` (flipped with
    probability 1/2), offsets and flips from ``generator`` or the device's global RNG;
    returns the images [B, 3, c, c] and the maps [B, 1, c, c] as floats."""
    _, h, w = maps.shape
    top, left, flips = random_crops(len(idx), h, w, crop, flip=True, device=device,
                                    generator=generator)
    rows, cols = crop_grid(top, left, crop, flips)
    img = sat.images(idx, rows, cols, channels_last=channels_last)
    return img, masks_to_float(maps.gather(idx, rows, cols))


# ----------------------------------------------------------------------------- commands


def make_trainer(job: Job, config: Mapping[str, Any], net: LossNet, run: int,
                 train_tiles: Mapping[str, np.ndarray],
                 valid_tiles: Mapping[str, np.ndarray] | None, workdir: str | Path, *,
                 max_steps: int | None = None, log_every: int | None = None,
                 progress: bool = True, inputs: Mapping[str, Path] | None = None
                 ) -> tuple[Trainer, RefinementUNet, dict[str, Any]]:
    """The U-Net, its loss and data wired into the training harness.

    Args: the job, the train stage's config, the loss network, the run index, the training
    (and validation: ``None`` trains without model selection, as the speed script does)
    tiles of :func:`roads.load`, the harness's folder; ``max_steps`` / ``log_every`` override
    the epoch-derived values (speed script). Returns ``(trainer, model, info)``.
    """
    _check(config, job)
    seed = int(config["seed"]) + run
    seed_everything(seed)  # the U-Net's initialisation
    model = RefinementUNet()
    crop = int(config["crop_size"])
    sat, maps = train_banks(job, config, train_tiles)
    sampler = EpochSampler(len(sat), int(config["batch_size"]), seed, job.device)
    # built after the U-Net: random loss-network weights come from their own seed (fork_rng)
    extractor = job.extractor(net, config["normalize"])
    _check_crop_fits(extractor, net, crop, job.device)
    optimizer = make_adam(model.parameters(), config["lr"], job.device)
    spe = sampler.steps_per_epoch
    trainer: Trainer

    def step_fn(step: int) -> tuple[Tensor, int]:
        idx = sampler(step)
        img, gt = train_crops(sat, maps, idx, crop, job.device, trainer.channels_last)
        x = torch.cat([img, torch.zeros_like(img[:, :1])], 1)  # K = 1: an empty previous map
        logits = model.logits(x)
        bce = F.binary_cross_entropy_with_logits(logits.float(), gt)
        perceptual = feature_loss(extractor, net.taps, torch.sigmoid(logits).expand(-1, 3, -1, -1),
                                  gt.expand(-1, 3, -1, -1))
        return bce + config["feature_weight"] * perceptual.float(), len(idx)

    eval_fn = None
    if valid_tiles is not None:
        def eval_fn(step: int) -> dict[str, float]:
            return valid_scores(job, model, valid_tiles, config)

    tc = train_config(config, spe, seed, selecting=eval_fn is not None, max_steps=max_steps,
                      log_every=log_every, progress=progress)
    key = train_key(job, inputs, net, run, len(sat))
    trainer = Trainer(job, workdir, {"model": model}, optimizer, step_fn, tc, eval_fn=eval_fn,
                      aux_modules={"lossnet": extractor}, key=key,
                      description=f"delineation {net.id} run{run}")
    info = {"net": net.id, "run": run, "epochs": int(config["epochs"]), "steps_per_epoch": spe,
            "device": str(job.device), "precision": job.precision, "data_on_device": sat.where,
            "channels_last": trainer.channels_last, "train_tiles": len(sat),
            "weights_id": weights_id(net.arch, job.weights)}
    return trainer, model, info


def valid_scores(job: Job, model: RefinementUNet, valid_tiles: Mapping[str, np.ndarray],
                 config: Mapping[str, Any]) -> dict[str, float]:
    """Model selection's numbers: pixel-exact scores on the validation tiles at full
    resolution after ``select_passes`` passes (pooled counts)."""
    df = score_tiles(job, model, valid_tiles, config, [int(config["select_passes"])], [0])
    return scores_from_counts({k: int(df[k].sum()) for k in COUNT_KEYS})


def train_config(config: Mapping[str, Any], steps_per_epoch: int, seed: int, selecting: bool,
                 max_steps: int | None = None, log_every: int | None = None,
                 progress: bool = True) -> TrainConfig:
    """The harness's settings: ``epochs`` epochs, a checkpoint every epoch, validation (and
    selection by quality) every ``eval_every_epochs``."""
    spe = steps_per_epoch
    return TrainConfig(
        max_steps=int(config["epochs"]) * spe if max_steps is None else max_steps,
        eval_every=int(config["eval_every_epochs"]) * spe, checkpoint_every=spe, seed=seed,
        select_metric="quality" if selecting else None, select_mode="max",
        log_every=log_every or max(1, min(100, spe)), progress=progress)


def train_key(job: Job, inputs: Mapping[str, Path] | None, net: LossNet, run: int,
              n_train: int, exact: bool = False) -> dict[str, Any]:
    """What a U-Net's checkpoints belong to (:func:`resume_key`). Raising ``epochs`` extends
    a finished run, so it is no part of the resume key; ``exact`` keeps it (what a finished
    model was trained with: its meta's ``key`` fingerprint)."""
    return resume_key(job, inputs, continues=() if exact else ("epochs",), arch=net.arch,
                      net=net.id, run=run, n_train=n_train)


def train(job: Job, config: Mapping[str, Any], net: str, run: int | None,
          prepared: Mapping[str, Path], workdir: Path, out: Path,
          eval_config: Mapping[str, Any] | None = None, samples: Path | None = None,
          scores: Path | None = None) -> dict[str, Any]:
    """Train one U-Net for loss network ``net`` (resuming from ``workdir``; a run whose
    checkpoint is complete trains no further step), then, given ``eval_config``, score it.

    Args: the job, the train stage's config, ``arch/layer``, the run index (seed offset),
    ``{"roads": folder}``, the harness's folder, the model file to write (the weights of the
    best validation quality; its meta carries what ``evaluate`` needs); the eval stage's
    config and :func:`evaluate`'s two outputs (the rule's one process: the evaluation runs in
    a job of its own config, so its scores are those of a separate eval). Returns the meta.
    """
    lossnet, run = LossNet.parse(net), int(run or 0)
    valid = _load(prepared, config, "valid")
    trainer, model, info = make_trainer(job, config, lossnet, run, _load(prepared, config,
                                                                         "train"), valid, workdir,
                                        inputs={"roads": prepared["roads"]})
    result = trainer.fit()  # leaves the best weights in the model
    info |= {"steps": result.steps, "best_step": result.best_step,
             "best_valid_quality": result.best_metric, "stop_reason": result.stop_reason,
             "valid_tiles": len(valid["sat"]), "train_wall_s": job.elapsed(),
             "key": key_fingerprint(train_key(job, {"roads": prepared["roads"]}, lossnet, run,
                                              info["train_tiles"], exact=True))}
    save_model(out, {"model": model}, info)
    print(info, flush=True)
    if eval_config is not None:
        evaluate(Job.create(eval_config, job.settings), eval_config, net, run, out, prepared,
                 samples, scores)
    return info


def evaluate(job: Job, config: Mapping[str, Any], net: str, run: int | None, model: Path,
             prepared: Mapping[str, Path], samples: Path, scores: Path) -> pd.DataFrame:
    """Score a trained U-Net: test tiles at full resolution, and the reference protocol.

    Args: the job, the eval stage's config, ``arch/layer``, the run index, the model file of
    :func:`train`, ``{"roads": folder}``, the per-tile Parquet and the summary Parquet to
    write. Returns the summary rows (scores schema).
    """
    lossnet, run = LossNet.parse(net), int(run or 0)
    _check(config, job)
    unet = RefinementUNet()
    meta = load_model(model, {"model": unet})
    missing = [k for k in MODEL_META if k not in meta]
    if missing:
        raise ValueError(f"{model} lacks {missing} in its meta: it was not written by "
                         f"`python -m workflow delineation train`; delete it and retrain")
    unet.to(job.device).eval()
    passes, tols = list(config["passes"]), sorted({0, int(config["tolerance"])})
    test = score_tiles(job, unet, _load(prepared, config, "test"), config, passes, tols)
    ref = score_tiles(job, unet, _load(prepared, config, "valid"), config, passes, [0],
                      reference=True)
    tiles = pd.concat([test.assign(protocol="full", split="test"),
                       ref.assign(protocol="reference", split="valid")], ignore_index=True)
    tiles = tiles.assign(benchmark=BENCHMARK, dataset=DATASET, arch=lossnet.arch,
                         layer=lossnet.layer, run=run, match=tiles["tolerance"].map(match_name))
    # the loss network's weights are the training's (the eval stage builds none)
    provenance = {**job.provenance(lossnet.arch, job.elapsed() + float(meta["train_wall_s"])),
                  "weights_id": meta["weights_id"]}
    summary = score_frame(summarize(tiles), benchmark=BENCHMARK, dataset=DATASET,
                          arch=lossnet.arch, layer=lossnet.layer, comparison="", run=run,
                          **provenance)
    write_parquet(tiles, samples)
    write_parquet(summary, scores)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(summary[["split", "variant", "metric", "value", "n"]].to_string(index=False))
    return summary
