"""LPIPS calibration: per-channel weights trained on BAPPS 2AFC train (``lin``), with the
backbone fine-tuned too (``tune``) or trained from a random initialisation (``scratch``).

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

``tune`` and ``scratch`` (config ``calibration.variants``) are the same code path: the loss
network is a :class:`workflow.models.backbone.TrainableBackbone` (its parameters in the same
Adam, its layers in train mode as in the lpips trainer, every 1x1 convolution projected to
>= 0 after each step when ``clamp_backbone_1x1``, as the lpips trainer's ``clamp_weights``);
``scratch`` builds it with torchvision's random initialisation seeded by the run's seed,
whatever ``lossnets.weights`` says. The model file then holds the backbone too.

Scoring (``evaluate``, and ``shipped`` for the lpips package's own lin weights) is in
:mod:`workflow.benchmarks.calibration_scoring`, the triplets in
:mod:`workflow.benchmarks.calibration_data`. Commands (rules/calibration.smk):
``python -m workflow calibration train | tune | scratch | evaluate | shipped``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workflow.archs import LossNet
from workflow.benchmarks.adaptation import feature_diffs
from workflow.benchmarks.calibration_data import CalibrationError, TrainSet
from workflow.compare import all_variants
from workflow.datasets.bank import EpochSampler
from workflow.job import Job
from workflow.lossnets import FeatureExtractor, build_extractor
from workflow.models.adapter import (
    FusedAdapter,
    make_optimizer,
    tap_channels,
)
from workflow.models.backbone import TrainableBackbone, clamp_1x1_, trainable_parameters
from workflow.training import (
    TrainConfig,
    Trainer,
    constant_then_linear,
    make_adam,
    resume_key,
    save_model,
)

__all__ = ["VARIANTS", "backbone", "calibration_step", "scratch", "train", "tune"]

VARIANTS = ("lin", "tune", "scratch")

BENCHMARK = "calibration"
SEED_STRIDE = 100_003  # the epoch permutation of run seed s, epoch e is seeded s * 100_003 + e


def calibration_step(job: Job, extractor: FeatureExtractor | TrainableBackbone,
                     adapter: FusedAdapter, images: Sequence[Tensor], judge: Tensor,
                     gen: torch.Generator) -> tuple[Tensor, int]:
    """One step's summed loss of every metric of ``adapter`` on a batch of (ref, p0, p1)
    against the judge fraction ``[N, 1]`` (dropout masks from ``gen``); the features carry a
    graph when the backbone trains (``tune``, ``scratch``)."""
    diffs0, diffs1 = feature_diffs(job, extractor, adapter.terms, images,
                                   grad=isinstance(extractor, TrainableBackbone))
    return adapter.batch_loss(diffs0, diffs1, judge, gen), int(judge.shape[0])


def backbone(job: Job, lossnet: LossNet, normalize: str, variant: str, seed: int
             ) -> FeatureExtractor | TrainableBackbone:
    """The loss network a variant starts from: ``lin`` the job's frozen extractor, ``tune``
    the same weights trainable, ``scratch`` torchvision's initialisation under ``seed``
    (``lossnets.weights`` is not read: no weights file is needed)."""
    if variant not in VARIANTS:
        raise CalibrationError(f"unknown calibration variant {variant!r} (config key "
                               f"calibration.variants: {', '.join(VARIANTS)})")
    if variant == "lin":
        return job.extractor(lossnet, normalize)
    if variant == "tune":
        return TrainableBackbone(job.extractor(lossnet, normalize), train_mode=True)
    ext = build_extractor(lossnet.arch, lossnets=[lossnet], weights="random",
                          weights_dir=job.weights_dir, normalize=normalize, seed=seed)
    ext = ext.to(job.device)
    if job.channels_last:
        ext = ext.to(memory_format=torch.channels_last)
    return TrainableBackbone(ext, train_mode=True)


def train(job: Job, config: Mapping[str, Any], net: str, run: int, prepared: Mapping[str, Path],
          workdir: Path, out: Path) -> dict[str, Any]:
    """Calibrate every comparison x channel-norm metric of ``net`` for run ``run`` (seed +
    run) on BAPPS 2AFC train (``lin``: the backbone frozen); write the model with
    :func:`workflow.training.save_model`.

    Returns: the model file's meta.
    """
    return _fit(job, config, net, run, prepared, workdir, out, "lin")


def tune(job: Job, config: Mapping[str, Any], net: str, run: int, prepared: Mapping[str, Path],
         workdir: Path, out: Path) -> dict[str, Any]:
    """:func:`train` with the backbone's parameters trained too (LPIPS ``tune``)."""
    return _fit(job, config, net, run, prepared, workdir, out, "tune")


def scratch(job: Job, config: Mapping[str, Any], net: str, run: int,
            prepared: Mapping[str, Path], workdir: Path, out: Path) -> dict[str, Any]:
    """:func:`train` from a randomly initialised backbone, trained too (LPIPS ``scratch``)."""
    return _fit(job, config, net, run, prepared, workdir, out, "scratch")


def _fit(job: Job, config: Mapping[str, Any], net: str, run: int, prepared: Mapping[str, Path],
         workdir: Path, out: Path, variant: str) -> dict[str, Any]:
    lossnet, size = LossNet.parse(net), int(config["image_size"])
    seed = int(config["seed"]) + int(run)
    data = TrainSet(prepared["bapps"], config["train_subsets"], config["train_limit"])
    variants = all_variants(config["comparisons"], config["channel_norm"])
    extractor = backbone(job, lossnet, config["normalize"], variant, seed)
    trained = isinstance(extractor, TrainableBackbone)
    adapter = FusedAdapter(tap_channels(extractor, size, job.device), variants, [0], seed=seed,
                           dropout=float(config["dropout"]), sync_weight=0.0).to(job.device)
    if trained:  # one Adam over the lin weights, G and the backbone (the lpips trainer's)
        opt = make_adam([*adapter.parameters(), *trainable_parameters(extractor)],
                        config["lr"], job.device, config["betas"])
    else:
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
    clamp_backbone = trained and bool(config["clamp_backbone_1x1"])

    def post_step(_step: int) -> None:
        adapter.clamp_()
        if clamp_backbone:
            clamp_1x1_(extractor)

    modules = {"adapter": adapter, **({"backbone": extractor} if trained else {})}
    identity = {"net": net, "run": int(run), **({"variant": variant} if trained else {})}
    trainer = Trainer(job, workdir, modules, opt, step_fn, tc, sched, post_step=post_step,
                      aux_modules={} if trained else {"lossnet": extractor},
                      generators={"dropout": gen},
                      key=resume_key(job, {"prepared_bapps": prepared["bapps"]},
                                     arch=lossnet.arch, **identity),
                      description=f"calibration {variant} {lossnet.id} run {run}")
    result = trainer.fit()
    meta = {**adapter.describe(), "net": lossnet.id, "run": int(run), "seed": seed,
            "variant": variant, "steps": result.steps, "triplets": len(data),
            "wall_time_s": result.wall_time_s, "precision": job.precision,
            "device": str(job.device)}
    if trained:
        meta["backbone_parameters"] = sum(p.numel() for p in trainable_parameters(extractor))
    save_model(out, modules, meta)
    print(f"{out}: {variant}, {len(variants)} comparisons, {len(data)} triplets, "
          f"{result.steps} steps")
    return meta
