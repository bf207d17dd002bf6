"""LPIPS calibration, the "lin" variant: per-channel weights trained on BAPPS 2AFC train.

Protocol (Zhang et al. 2018, section 3; docs/calibration.md): non-negative weights on the
per-channel differences of every tap of a loss network (LPIPS's 1x1 convolutions without bias,
projected to >= 0 after every step) and the LPIPS ranking net G on
``[d0, d1, d0 - d1, d0 / (d1 + 0.1), d1 / (d0 + 0.1)]``, trained with BCE against the judge
fraction, Adam lr 1e-4 betas (0.5, 0.999), batch 50, 5 epochs constant + 5 of linear decay,
dropout 0.5 before the weights. The model is the adaptation's
:class:`workflow.models.adapter.FusedAdapter` with one "ranking" (the human judgement) and no
sync loss, so every configured comparison x channel-norm metric of one loss network is
calibrated at once from one extractor pass per batch (a combined comparison has weights per
term), and scoring is the adaptation's :func:`workflow.benchmarks.adaptation.bapps_scores`.

``shipped`` scores the lpips package's own lin weights
(``weights/v0.1/<alex|vgg|squeeze>.pth``, read by
:func:`workflow.models.adapter.load_lpips_lin`) the same way. Commands
(rules/calibration.smk): ``python -m workflow calibration train | evaluate | shipped``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workflow.archs import LossNet
from workflow.benchmarks.adaptation import bapps_scores, feature_diffs
from workflow.compare import all_variants
from workflow.datasets import bapps
from workflow.datasets.bank import EpochSampler
from workflow.files import write_parquet
from workflow.imaging import to_images
from workflow.job import Job
from workflow.lossnets import FeatureExtractor
from workflow.models.adapter import (
    FusedAdapter,
    load_adapter,
    load_lpips_lin,
    make_optimizer,
    tap_channels,
)
from workflow.results import score_frame
from workflow.training import TrainConfig, Trainer, constant_then_linear, resume_key, save_model

__all__ = ["CalibrationError", "TrainSet", "calibration_step", "evaluate", "shipped", "train"]

BENCHMARK = "calibration"
SEED_STRIDE = 100_003  # the epoch permutation of run seed s, epoch e is seeded s * 100_003 + e


class CalibrationError(ValueError):
    """Inputs that do not fit together; the message names them and the fix."""


class TrainSet:
    """The BAPPS 2AFC train triplets of ``subsets`` (at most ``limit`` of each), memory-mapped;
    ``batch(idx)`` gathers items by their position in the concatenation."""

    def __init__(self, folder: Path, subsets: Sequence[str], limit: int | None) -> None:
        self.parts = []
        for s in subsets:
            a = bapps.load(folder, "2afc", "train", s)
            n = len(a["judge"]) if limit is None else min(int(limit), len(a["judge"]))
            if n == 0:
                raise CalibrationError(f"{folder}: BAPPS 2afc/train/{s} has no triplets "
                                       f"(config key calibration.train_subsets)")
            self.parts.append({k: a[k] for k in ("ref", "p0", "p1", "judge")} | {"n": n})
        self.offsets = np.cumsum([0] + [p["n"] for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, idx: Tensor, device: torch.device, size: int
              ) -> tuple[list[Tensor], Tensor]:
        """``[ref, p0, p1]`` images (float, on ``device``) and the judge fractions ``[N, 1]``."""
        idx = idx.cpu().numpy()
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        arrays: dict[str, np.ndarray] = {}
        for j in np.unique(which):
            at = np.flatnonzero(which == j)
            local = idx[at] - self.offsets[j]
            order = np.argsort(local)  # read each memmap in file order
            for k in ("ref", "p0", "p1", "judge"):
                part = self.parts[j][k]
                if k not in arrays:
                    arrays[k] = np.empty((len(idx), *part.shape[1:]), part.dtype)
                arrays[k][at[order]] = part[local[order]]
        images = [to_images(arrays[k], device, size) for k in ("ref", "p0", "p1")]
        judge = torch.from_numpy(arrays["judge"].astype(np.float32)).to(device).unsqueeze(1)
        return images, judge


def calibration_step(job: Job, extractor: FeatureExtractor, adapter: FusedAdapter,
                     images: Sequence[Tensor], judge: Tensor, gen: torch.Generator
                     ) -> tuple[Tensor, int]:
    """One step's summed loss of every metric of ``adapter`` on a batch of (ref, p0, p1)
    against the judge fraction ``[N, 1]`` (dropout masks from ``gen``)."""
    diffs0, diffs1 = feature_diffs(job, extractor, adapter.terms, images)
    return adapter.batch_loss(diffs0, diffs1, judge, gen), int(judge.shape[0])


def train(job: Job, config: Mapping[str, Any], net: str, run: int, prepared: Mapping[str, Path],
          workdir: Path, out: Path) -> dict[str, Any]:
    """Calibrate every comparison x channel-norm metric of ``net`` for run ``run`` (seed +
    run) on BAPPS 2AFC train; write the model with :func:`workflow.training.save_model`.

    Returns: the model file's meta.
    """
    lossnet, size = LossNet.parse(net), int(config["image_size"])
    seed = int(config["seed"]) + int(run)
    data = TrainSet(prepared["bapps"], config["train_subsets"], config["train_limit"])
    variants = all_variants(config["comparisons"], config["channel_norm"])
    extractor = job.extractor(lossnet, config["normalize"])
    adapter = FusedAdapter(tap_channels(extractor, size, job.device), variants, [0], seed=seed,
                           dropout=float(config["dropout"]), sync_weight=0.0).to(job.device)
    opt = make_optimizer(adapter, config["lr"], config["betas"])
    sampler = EpochSampler(len(data), int(config["batch_size"]), seed, seed_stride=SEED_STRIDE)
    per_epoch = sampler.steps_per_epoch
    constant = per_epoch * int(config["epochs_constant"])
    total = constant + per_epoch * int(config["epochs_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, constant_then_linear(total, constant))
    gen = torch.Generator(device=job.device).manual_seed(seed)

    def step_fn(step: int) -> tuple[Tensor, int]:
        images, judge = data.batch(sampler(step), job.device, size)
        return calibration_step(job, extractor, adapter, images, judge, gen)

    tc = TrainConfig(max_steps=total, checkpoint_every=per_epoch, seed=seed,
                     log_every=max(1, min(100, per_epoch)))
    trainer = Trainer(job, workdir, {"adapter": adapter}, opt, step_fn, tc, sched,
                      post_step=lambda _s: adapter.clamp_(), aux_modules={"lossnet": extractor},
                      generators={"dropout": gen},
                      key=resume_key(job, {"prepared_bapps": prepared["bapps"]},
                                     arch=lossnet.arch, net=net, run=int(run)),
                      description=f"calibration {lossnet.id} run {run}")
    result = trainer.fit()
    meta = {**adapter.describe(), "net": lossnet.id, "run": int(run), "seed": seed,
            "steps": result.steps, "triplets": len(data), "wall_time_s": result.wall_time_s,
            "precision": job.precision, "device": str(job.device)}
    save_model(out, {"adapter": adapter}, meta)
    print(f"{out}: {len(variants)} comparisons, {len(data)} triplets, {result.steps} steps")
    return meta


def _score(job: Job, config: Mapping[str, Any], lossnet: LossNet, extractor: FeatureExtractor,
           adapter: FusedAdapter, folder: Path, variant: str, run: int | None, scores: Path
           ) -> pd.DataFrame:
    rows = bapps_scores(job, extractor, adapter, adapter.variants, config, folder)
    out = []
    for row in rows:
        v, _ = adapter.variants[row.pop("_v")], row.pop("_r")
        out.append({**row, "comparison": v.method, "channel_norm": v.channel_norm,
                    "variant": variant, "run": run})
    df = score_frame(out, benchmark=BENCHMARK, arch=lossnet.arch, layer=lossnet.layer,
                     **job.provenance(lossnet.arch))
    write_parquet(df, scores)
    mean = df[df["split"].isin(["mean", "pooled"])]
    print(mean[["comparison", "channel_norm", "dataset", "split", "value"]].to_string(index=False))
    return df


def evaluate(job: Job, config: Mapping[str, Any], net: str, run: int, model: Path,
             prepared: Mapping[str, Path], scores: Path) -> pd.DataFrame:
    """Score a calibrated model on BAPPS val (2AFC per subset + mean, JND per subset +
    pooled); rows of variant ``lin``."""
    lossnet = LossNet.parse(net)
    adapter, meta = load_adapter(model, job.device)
    if meta.get("net") != lossnet.id:
        raise CalibrationError(f"{model} was trained for {meta.get('net')}, not {lossnet.id}: "
                               f"rerun calibration_train")
    extractor = job.extractor(lossnet, config["normalize"])
    return _score(job, config, lossnet, extractor, adapter, prepared["bapps"], "lin", run,
                  scores)


def shipped(job: Job, config: Mapping[str, Any], net: str, model: Path,
            prepared: Mapping[str, Path], scores: Path) -> pd.DataFrame:
    """Score the lpips package's lin weights (``model``: its ``.pth`` file or folder) on BAPPS
    val; rows of variant ``lin-shipped``."""
    lossnet = LossNet.parse(net)
    extractor = job.extractor(lossnet, config["normalize"])
    channels = tap_channels(extractor, int(config["image_size"]), job.device)
    adapter = load_lpips_lin(model, lossnet, channels).to(job.device)
    return _score(job, config, lossnet, extractor, adapter, prepared["bapps"], "lin-shipped",
                  None, scores)
