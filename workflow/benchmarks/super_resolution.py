"""Benchmark 2: super-resolution trained with one loss network's features as the loss.

After Johnson et al. (2016) as the loss-network study ran it (docs/super_resolution.md):
``SRNet`` (x4 or x8) is trained on the prepared COCO images (10,000 of 288x288) whose
low-resolution inputs are made on the device (:func:`workflow.imaging.degrade`: Gaussian
blur sigma 1, bicubic downscale, 8-bit quantisation). The loss is *pixel-free*: the MSE of
the loss network's features of output and target at ONE layer, input raw [0, 1]
(``normalize: none``), no pixel or TV term. Adam, model selection on the validation PSNR
(COCO val) through the training harness (:class:`workflow.training.Trainer`), which also
checkpoints and resumes.

Evaluation on Set5 / Set14 / BSD100 under two protocols:

* ``reference``: the study's own (non-standard) one: the test image is resized (short side
  ``image_size``, bilinear) and centre-cropped to ``image_size``, degraded, super-resolved;
  PSNR / SSIM on RGB, no border shaved.
* ``standard``: the full image cropped to a multiple of the scale, degraded, super-resolved;
  PSNR / SSIM on the Y channel of YCbCr (BT.601) with a border of ``scale`` pixels shaved.

Outputs are quantised to 8 bits before scoring (as if saved as PNG). Per-image rows go to
``--samples``; the means go to ``--scores`` (scores schema) with ``variant``
``x<scale>/<protocol>``, ``metric`` psnr | ssim, ``split`` test.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from workflow.archs import LossNet, weights_id
from workflow.datasets import coco, sr_test
from workflow.datasets.bank import EpochSampler, ImageBank, crop_grid, random_crops
from workflow.files import write_parquet
from workflow.imaging import (
    center_crop,
    crop_to_multiple,
    degrade,
    quantize,
    reference_target,
    to_images,
)
from workflow.job import Job, seed_everything
from workflow.lossnets import feature_loss
from workflow.metrics.image import psnr, rgb_to_y, shave, ssim
from workflow.models.srnet import SRNet
from workflow.results import score_frame
from workflow.target_cache import TargetFeatures, cached_targets
from workflow.training import (
    TrainConfig,
    Trainer,
    load_model,
    make_adam,
    resume_key,
    save_model,
)

__all__ = ["PROTOCOLS", "evaluate", "evaluate_image", "super_resolve", "target_cache", "train",
           "train_batches", "validation_psnr"]

BENCHMARK = "super_resolution"
PROTOCOLS = ("reference", "standard")
# stage keys that do not change the trajectory so far: raising them continues a run
# (the harness forks the RNGs around every evaluation)
_CONTINUES = ("iterations", "eval_every")


# ----------------------------------------------------------------------------- data


def train_batches(bank: ImageBank, sampler: EpochSampler, crop: int | None,
                  generator: torch.Generator | None = None):
    """``batch(step)``: float ``[B, 3, S, S]`` targets in [0, 1] on the bank's device.

    With ``crop`` below the image side each item is a random crop whose offsets come from
    the global torch RNG (which the harness checkpoints), or from ``generator`` (a fused job:
    one per data stream, checkpointed too): tops, then lefts, the order of every earlier run.
    A ``crop`` as large as the images crops nothing and draws nothing. The indices are a
    slice of the sampler's epoch order on the device: no host synchronisation per step.
    """
    h, w = bank.shape[1:3]
    cropping = bool(crop) and crop < min(h, w)

    def batch(step: int) -> Tensor:
        idx = sampler(step)
        if not cropping:
            return bank.images(idx)
        top, left, _ = random_crops(len(idx), h, w, int(crop), device=bank.device,
                                    generator=generator)
        # contiguous NCHW, the layout earlier runs stacked their crops into (an uncropped
        # batch keeps the bank's NHWC strides): CPU convolutions round differently per layout
        # and the numbers would change
        return bank.images(idx, *crop_grid(top, left, int(crop))).contiguous()

    return batch


# ----------------------------------------------------------------------------- scoring


def super_resolve(net: nn.Module, lr: Tensor, channels_last: bool = False) -> Tensor:
    """The network's output for a low-resolution batch, quantised to 8 bits (fp32)."""
    if channels_last:
        lr = lr.contiguous(memory_format=torch.channels_last)
    return quantize(net(lr).float())


def validation_psnr(net: nn.Module, val: ImageBank, scale: int, sigma: float, batch: int,
                    crop: int | None = None, channels_last: bool = False) -> float:
    """Mean RGB PSNR of ``net`` on the validation bank (no grad; the caller sets eval mode).

    With ``crop`` below the image side the targets are centre crops of that size.
    """
    vals = []
    for i in range(0, len(val), batch):
        hr = val.images(torch.arange(i, min(i + batch, len(val))))
        if crop and crop < min(hr.shape[-2:]):
            hr = center_crop(hr, crop)
        vals.append(psnr(super_resolve(net, degrade(hr, scale, sigma), channels_last), hr))
    return float(torch.cat(vals).mean())


def evaluate_image(net: nn.Module, hr: Tensor, scale: int, protocol: str, sigma: float,
                   image_size: int) -> dict[str, float]:
    """PSNR and SSIM of one float ``[1, 3, H, W]`` test image under one protocol."""
    if protocol == "reference":
        hr = reference_target(hr, image_size)
        sr = super_resolve(net, degrade(hr, scale, sigma))
        return {"psnr": float(psnr(sr, hr)[0]), "ssim": float(ssim(sr, hr)[0])}
    if protocol == "standard":
        hr = crop_to_multiple(hr, scale)
        sr = super_resolve(net, degrade(hr, scale, sigma))
        ys, yh = shave(rgb_to_y(sr), scale), shave(rgb_to_y(hr), scale)
        return {"psnr": float(psnr(ys, yh)[0]), "ssim": float(ssim(ys, yh)[0])}
    raise ValueError(f"unknown protocol {protocol!r} (config key super_resolution.protocols); "
                     f"use {' or '.join(PROTOCOLS)}")


# ----------------------------------------------------------------------------- commands


def train(job: Job, config: Mapping[str, Any], net: str, scale: int, run: int | None,
          prepared: Mapping[str, Path], workdir: Path, out: Path) -> dict[str, Any]:
    """Train one SR network against one loss network; write ``out`` (best weights) last.

    Args: ``config`` the complete train-stage config; ``net`` ``"arch/layer"``; ``scale``
    the upscaling factor; ``run`` the seed offset; ``prepared`` ``{"coco": folder}``;
    ``workdir`` the harness's checkpoints (a rerun resumes there).
    Returns: the meta written into the model file (scale, best step, best val PSNR, steps,
    stop reason, training wall time).
    """
    lossnet, run = LossNet.parse(net), int(run or 0)
    prepared["coco"]  # a missing dataset is named before any config key is read
    device, seed, sigma = job.device, int(config["seed"]) + run, float(config["blur_sigma"])
    bank, val = _train_data(job, config, prepared, scale)

    seed_everything(seed)  # the network's initialisation depends on the run
    model = SRNet(scale)
    extractor = job.extractor(lossnet, config["normalize"])
    opt = make_adam(model.parameters(), config["lr"], device)
    sampler = EpochSampler(len(bank), int(config["batch_size"]), seed, device)
    batch = train_batches(bank, sampler, config["crop_size"])
    cache = target_cache(job, config, extractor, bank, lossnet.taps)

    def step_fn(step: int):
        with torch.autocast(device.type, enabled=False):  # the degradation stays fp32
            hr = batch(step)
            lr = degrade(hr, scale, sigma)
        output = model(job.to_device(lr))
        target = cache.lookup(sampler(step)) if cache else job.to_device(hr)
        return feature_loss(extractor, lossnet.taps, output, target), hr.shape[0]

    def eval_fn(step: int) -> dict[str, float]:
        return {"psnr": validation_psnr(model, val, scale, sigma,
                                        int(job.setting("eval_batch_size")),
                                        config["crop_size"], job.channels_last)}

    key = resume_key(job, {"coco": prepared["coco"]}, continues=_CONTINUES, arch=lossnet.arch,
                     net=lossnet.id, scale=scale, run=run)
    tcfg = TrainConfig(max_steps=int(config["iterations"]), eval_every=int(config["eval_every"]),
                       checkpoint_every=int(job.setting("checkpoint_every")),
                       log_every=int(job.setting("log_every")),
                       compile=bool(job.setting("compile")), seed=seed, select_metric="psnr",
                       select_mode="max")
    trainer = Trainer(job, workdir, {"model": model}, opt, step_fn, tcfg, eval_fn=eval_fn,
                      aux_modules={"lossnet": extractor}, key=key,
                      description=f"sr {lossnet.id} x{scale} run{run}")
    result = trainer.fit()
    if result.best_checkpoint is None:
        raise RuntimeError(f"{workdir}: no finite validation PSNR in {result.steps} steps; "
                           f"see {trainer.metrics_path}")
    meta = {"net": lossnet.id, "scale": scale, "run": run, "seed": seed,
            "best_step": result.best_step, "best_val_psnr": result.best_metric,
            "steps": result.steps, "stop_reason": result.stop_reason,
            "precision": job.precision, "weights_id": weights_id(lossnet.arch, job.weights),
            "train_wall_time_s": job.elapsed(),
            "resumed_from": result.resumed_from}
    save_model(out, {"model": model}, meta)
    print(f"trained {lossnet.id} x{scale} run{run}: best val PSNR "
          f"{meta['best_val_psnr']:.3f} dB at step {meta['best_step']}", flush=True)
    return meta


def target_cache(job: Job, config: Mapping[str, Any], extractor: nn.Module, bank: ImageBank,
                 taps) -> TargetFeatures | None:
    """The training targets' features at ``taps``, computed once, when the targets are whole
    images and the memory rule keeps them (setting ``target_cache``,
    :mod:`workflow.target_cache`); else ``None``."""
    h, w = bank.shape[1:3]
    crop = config["crop_size"]
    return cached_targets(extractor, bank, taps, str(job.setting("target_cache")),
                          int(job.setting("eval_batch_size")), job.autocast, job.to_device,
                          cropping=bool(crop) and crop < min(h, w))


def _train_data(job: Job, config: Mapping[str, Any], prepared: Mapping[str, Path], scale: int
                ) -> tuple[ImageBank, ImageBank]:
    train_np = coco.load(prepared["coco"], "train")["images"]
    size = int(config["crop_size"] or min(train_np.shape[1:3]))
    if size // scale < 5:  # the 9x9 reflection-padded head needs at least 5 input pixels
        raise ValueError(f"config key super_resolution.crop_size ({size}) gives "
                         f"{size // scale}px inputs at x{scale}; use at least {5 * scale}")
    val_np = coco.load(prepared["coco"], "val")["images"][: int(config["val_images"])]
    return (ImageBank(train_np, job.device, job.setting("data_on_device")),
            ImageBank(val_np, job.device))


def evaluate(job: Job, config: Mapping[str, Any], net: str, scale: int, run: int | None,
             model: Path, prepared: Mapping[str, Path], samples: Path, scores: Path
             ) -> pd.DataFrame:
    """Score a trained model on every test set and protocol; write both tables.

    Args: ``config`` the complete eval-stage config; ``model`` the file of :func:`train`
    (its meta gives the scale and the training wall time); ``prepared``
    ``{"sr_test": folder}``; ``samples`` / ``scores`` the per-image and summary outputs.
    Returns: the summary rows (scores schema).
    """
    lossnet, run = LossNet.parse(net), int(run or 0)

    sr_net = SRNet(scale)

    def checked(meta: dict[str, Any]) -> dict[str, nn.Module]:
        if meta.get("scale") != scale:
            raise ValueError(f"{model} holds a x{meta.get('scale')} model, asked to score "
                             f"x{scale}; rerun its train_sr job")
        return {"model": sr_net}

    meta = load_model(model, checked)
    sr_net.to(job.device).eval()
    sigma, size = float(config["blur_sigma"]), int(config["image_size"])
    rows = []
    with torch.no_grad():
        for name in config["test_sets"]:
            for image, img in sr_test.load(prepared["sr_test"], name,
                                           config["test_limit"]).items():
                hr = to_images(img, job.device)
                for protocol in config["protocols"]:
                    m = evaluate_image(sr_net, hr, scale, protocol, sigma, size)
                    rows.append({"dataset": name, "image": image, "protocol": protocol, **m})
    per_image = pd.DataFrame(rows, columns=["dataset", "image", "protocol", "psnr", "ssim"])
    per_image = per_image.assign(arch=lossnet.arch, layer=lossnet.layer, scale=scale, run=run)
    summary_rows = [{"dataset": dataset, "split": "test", "variant": f"x{scale}/{protocol}",
                     "metric": metric, "value": float(g[metric].mean()), "n": len(g)}
                    for (dataset, protocol), g in per_image.groupby(["dataset", "protocol"],
                                                                    sort=False)
                    for metric in ("psnr", "ssim")]
    wall = float(meta.get("train_wall_time_s", 0.0)) + job.elapsed()
    summary = score_frame(summary_rows, benchmark=BENCHMARK, arch=lossnet.arch,
                          layer=lossnet.layer, comparison="spatial", channel_norm=False, run=run,
                          **{**job.provenance(lossnet.arch, wall_time_s=wall),
                             # the loss network is the training's: its weights are there
                             "weights_id": meta.get("weights_id", "unknown")})
    write_parquet(per_image, samples)
    write_parquet(summary, scores)
    print(summary[["dataset", "variant", "metric", "value", "n"]].to_string(index=False))
    return summary
