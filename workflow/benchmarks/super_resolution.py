"""Benchmark 2: super-resolution trained with one loss network's features as the loss.

After Johnson et al. (2016) as the loss-network study ran it (see docs/super_resolution.md):
``SRNet`` (x4 or x8) is trained on 10,000 prepared COCO images (288x288) whose
low-resolution inputs are made on the device (Gaussian blur sigma 1, bicubic
downscale, 8-bit quantisation; ``workflow.degrade``). The loss is *pixel-free*: the
MSE between the loss network's features of output and target at ONE layer, input
raw [0, 1] (``normalize: none``), no pixel or TV term. Adam lr 1e-3, batch 4;
model selection on the validation PSNR (100 COCO val images) through the training
harness (``workflow.training``), which also checkpoints and resumes.

Evaluation on Set5 / Set14 / BSD100 under two protocols:

* ``reference``: the study's own (non-standard) one: the test image is resized
  (short side 288, bilinear) and center-cropped to 288, degraded, super-resolved;
  PSNR / SSIM on RGB, no border shaved.
* ``standard``: the full image cropped to a multiple of the scale, degraded,
  super-resolved; PSNR / SSIM on the Y channel of YCbCr (BT.601) with a border of
  ``scale`` pixels shaved.

Outputs are quantised to 8 bits before scoring (as if saved as PNG). Per-image rows
go to a Parquet file; the means go to the scores table with ``variant``
``x<scale>/<protocol>``, ``metric`` psnr | ssim, ``split`` test.

Commands (what ``rules/super_resolution.smk`` calls)::

    python -m workflow benchmarks.super_resolution train --config JSON --common JSON \\
        --lossnet JSON --arch alexnet --layer 2 --scale 4 --run 0 \\
        --coco RES/prepared/coco --workdir DIR --model OUT/model.pt
    python -m workflow benchmarks.super_resolution eval --config JSON --common JSON \\
        --lossnet JSON --arch alexnet --layer 2 --scale 4 --run 0 --model OUT/model.pt \\
        --sr-test RES/prepared/sr_test --per-image OUT/images.parquet --summary OUT/scores.parquet
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workflow import runtime
from workflow.config import json_arg
from workflow.datasets.common import load_arrays
from workflow.degrade import (
    center_crop,
    crop_to_multiple,
    degrade,
    reference_target,
    to_float,
)
from workflow.lossnets import LossNet, build_extractor, feature_loss, weights_id
from workflow.metrics.image import psnr, quantize, rgb_to_y, shave, ssim
from workflow.models.srnet import SRNet
from workflow.results import atomic_path, config_hash, score_frame, write_json, write_parquet
from workflow.training import TrainConfig, Trainer, load_checkpoint

BENCHMARK = "super_resolution"
PROTOCOLS = ("reference", "standard")

# The defaults are the study's (REFERENCE.md); config.yaml states them again explicitly.
DEFAULTS: dict[str, Any] = {
    "lossnets": "all", "lpips_sets": False, "scales": [4, 8], "runs": 1, "iterations": 200_000, "batch_size": 4,
    "lr": 1e-3, "eval_every": 10_000, "checkpoint_every": 2_000, "log_every": 500,
    "val_images": 100, "normalize": "none", "blur_sigma": 1.0, "image_size": 288,
    "crop_size": None, "test_sets": ["set5", "set14", "bsd100"], "test_limit": None,
    "protocols": list(PROTOCOLS), "compile": False, "seed": 0, "data_on_device": "auto",
    "eval_batch_size": 8,
}


# keys only the evaluation reads; the rest (except the DAG's own keys) shape training
EVAL_KEYS = ("blur_sigma", "image_size", "test_sets", "test_limit", "protocols")
DAG_KEYS = ("lossnets", "lpips_sets", "scales", "runs")


def settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown keys in config section super_resolution: {sorted(unknown)}")
    return {**DEFAULTS, **cfg}


def stage_config(cfg: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The part of the section a rule depends on (its params: the rerun trigger).

    ``train``: everything but the evaluation-only and DAG keys (blur_sigma is in both:
    it defines the task); ``eval``: the evaluation keys.
    """
    s = settings(cfg)
    if stage == "train":
        return {k: v for k, v in s.items()
                if k not in DAG_KEYS and (k not in EVAL_KEYS or k == "blur_sigma")}
    if stage == "eval":
        return {k: s[k] for k in EVAL_KEYS}
    raise ValueError(f"unknown stage {stage!r}")


# ----------------------------------------------------------------------------- data


def load_images(path: Path, what: str) -> np.ndarray:
    """A prepared uint8 [N, H, W, 3] array, memory-mapped, with a clear error if it is wrong."""
    arr = load_arrays(path.parent, {what: path.name})[what]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise ValueError(f"{path}: expected uint8 [N, H, W, 3] images, got {arr.dtype} "
                         f"{arr.shape}; re-run the coco prepare step")
    return arr


def to_device_images(arr: np.ndarray, device: torch.device, mode: str | bool = "auto") -> Tensor:
    """uint8 images as a tensor on ``device`` when they fit (``auto``: half the free memory),
    else in (pinned) host memory; batches are then gathered and moved per step."""
    nbytes = arr.nbytes
    on_device = mode is True or mode == "true"
    if mode == "auto":
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            on_device = nbytes < 0.5 * free
        else:
            on_device = True
    host = torch.from_numpy(np.array(arr, copy=True))  # a writable copy in RAM, not the mmap
    if on_device:
        return host.to(device)
    return host.pin_memory() if device.type == "cuda" else host


def train_size_hint(coco_dir: Path) -> int:
    """The side of the prepared training images (without loading them)."""
    return int(min(load_images(Path(coco_dir) / "train_images.npy", "COCO train").shape[1:3]))


class TrainBatches:
    """Epoch-shuffled batches as the reference's DataLoader drew them, but derived from the step.

    Item ``i = step * batch + j`` of the stream is ``perm_e[i % N]`` with ``e = i // N`` and
    ``perm_e`` a permutation seeded by ``(seed, e)``: no state, so a resumed run draws the
    same batches. Optional random crops take their offsets from the global torch RNG, which
    the harness checkpoints.
    """

    def __init__(self, images: Tensor, batch: int, seed: int, device: torch.device,
                 crop: int | None = None) -> None:
        self.images, self.batch, self.seed, self.device, self.crop = images, batch, seed, device, crop
        self.n = images.shape[0]
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        items = torch.arange(step * self.batch, (step + 1) * self.batch)
        return torch.stack([self._perm(int(i) // self.n)[int(i) % self.n] for i in items])

    def __call__(self, step: int) -> Tensor:
        """float [B, 3, S, S] targets in [0, 1] on the device."""
        idx = self.indices(step)
        x = to_float(self.images[idx.to(self.images.device)].to(self.device, non_blocking=True))
        if self.crop and self.crop < min(x.shape[-2:]):
            h, w = x.shape[-2:]
            tops = torch.randint(0, h - self.crop + 1, (len(x),)).tolist()
            lefts = torch.randint(0, w - self.crop + 1, (len(x),)).tolist()
            x = torch.stack([im[:, t:t + self.crop, left:left + self.crop]
                             for im, t, left in zip(x, tops, lefts, strict=True)])
        return x


# ----------------------------------------------------------------------------- model and eval


def super_resolve(net: torch.nn.Module, lr: Tensor, channels_last: bool = False) -> Tensor:
    if channels_last:
        lr = lr.contiguous(memory_format=torch.channels_last)
    return quantize(net(lr).float())


def validation_psnr(net: torch.nn.Module, val: Tensor, scale: int, sigma: float, batch: int,
                    device: torch.device, crop: int | None = None,
                    channels_last: bool = False) -> float:
    """Mean PSNR (RGB) of the network on the validation images (no grad; caller sets eval)."""
    vals = []
    for i in range(0, len(val), batch):
        hr = to_float(val[i:i + batch].to(device))
        if crop and crop < min(hr.shape[-2:]):
            hr = center_crop(hr, crop)
        sr = super_resolve(net, degrade(hr, scale, sigma), channels_last)
        vals.append(psnr(sr, hr))
    return float(torch.cat(vals).mean())


def evaluate_image(net: torch.nn.Module, img: np.ndarray, scale: int, protocol: str,
                   device: torch.device, sigma: float = 1.0, image_size: int = 288) -> dict[str, float]:
    """PSNR and SSIM of one HWC uint8 test image under one protocol."""
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:  # grayscale test images are scored as RGB with equal channels
        img = np.repeat(img, 3, axis=-1)
    hr = to_float(torch.from_numpy(np.ascontiguousarray(img)).to(device))
    if protocol == "reference":
        hr = reference_target(hr, image_size)
        sr = super_resolve(net, degrade(hr, scale, sigma))
        return {"psnr": float(psnr(sr, hr)[0]), "ssim": float(ssim(sr, hr)[0])}
    if protocol == "standard":
        hr = crop_to_multiple(hr, scale)
        sr = super_resolve(net, degrade(hr, scale, sigma))
        ys, yh = shave(rgb_to_y(sr), scale), shave(rgb_to_y(hr), scale)
        return {"psnr": float(psnr(ys, yh)[0]), "ssim": float(ssim(ys, yh)[0])}
    raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")


def load_test_set(sr_test_dir: Path, name: str, limit: int | None = None) -> dict[str, np.ndarray]:
    path = Path(sr_test_dir) / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"test set {name!r} not found: {path} (config key "
                                f"super_resolution.test_sets; run the sr_test prepare step)")
    with np.load(path) as z:
        names = sorted(z.files)[: limit or None]
        images = {k: z[k] for k in names}
    for k, im in images.items():
        if im.dtype != np.uint8 or im.ndim not in (2, 3):
            raise ValueError(f"{path}: image {k!r} must be uint8 HxW[x3], got {im.dtype} {im.shape}")
    return images


# ----------------------------------------------------------------------------- train / eval jobs


def _device_precision(common: Mapping[str, Any]) -> tuple[torch.device, str]:
    device = runtime.pick_device(common.get("device", "auto"))
    return device, runtime.resolve_precision(common.get("precision", "auto"), device)


def train(cfg: Mapping[str, Any], common: Mapping[str, Any], lossnet: Mapping[str, Any],
          arch: str, layer: str, scale: int, run: int, coco_dir: Path, workdir: Path,
          model_out: Path, progress: bool = True) -> dict[str, Any]:
    """Train one SR network; write ``model_out`` (best weights + metadata) last."""
    s = settings(cfg)
    size = int(s["crop_size"] or train_size_hint(coco_dir))
    if size // scale < 5:  # the 9x9 reflection-padded head needs at least 5 input pixels
        raise ValueError(f"config key super_resolution.crop_size ({size}) gives {size // scale}px "
                         f"inputs at x{scale}; use at least {5 * scale}")
    net_id = LossNet(arch, str(layer))
    device, precision = _device_precision(common)
    seed = int(s["seed"]) + int(run)
    t0 = time.perf_counter()

    train_np = load_images(Path(coco_dir) / "train_images.npy", "COCO train")
    val_np = load_images(Path(coco_dir) / "val_images.npy", "COCO val")[: int(s["val_images"])]
    train_imgs = to_device_images(train_np, device, s["data_on_device"])
    val_imgs = to_device_images(np.asarray(val_np), device, "auto")

    torch.manual_seed(seed)  # the network's initialisation depends on the run
    net = SRNet(scale)
    extractor = build_extractor(arch, lossnets=[net_id], weights=lossnet["weights"],
                                weights_dir=lossnet["weights_dir"], normalize=s["normalize"],
                                seed=int(lossnet.get("seed", 0)))
    taps = net_id.taps
    opt = torch.optim.Adam(net.parameters(), lr=float(s["lr"]))
    batches = TrainBatches(train_imgs, int(s["batch_size"]), seed, device, s["crop_size"])
    sigma = float(s["blur_sigma"])
    trainer: Trainer

    def step_fn(step: int):
        with torch.autocast(device.type, enabled=False):  # the degradation stays fp32
            hr = batches(step)
            lr = degrade(hr, scale, sigma)
        out = net(trainer.to_device(lr))
        return feature_loss(extractor, taps, out, trainer.to_device(hr)), hr.shape[0]

    def eval_fn(step: int) -> dict[str, float]:
        return {"psnr": validation_psnr(net, val_imgs, scale, sigma, int(s["eval_batch_size"]),
                                        device, s["crop_size"], trainer.channels_last)}

    fingerprint = config_hash({"cfg": {k: v for k, v in s.items() if k not in _EVAL_ONLY_KEYS},
                               # where the weights live does not matter, which ones do
                               "lossnet": {k: v for k, v in lossnet.items() if k != "weights_dir"},
                               "arch": arch, "layer": str(layer),
                               "scale": scale, "run": run, "precision": precision})
    tcfg = TrainConfig(
        max_steps=int(s["iterations"]), eval_every=s["eval_every"],
        checkpoint_every=s["checkpoint_every"], log_every=int(s["log_every"]),
        precision=precision, compile=bool(s["compile"]), seed=seed, select_metric="psnr",
        select_mode="max", device=str(device), threads=runtime.job_threads(0) or None,
        progress=progress,
    )
    trainer = Trainer(workdir, {"model": net}, opt, step_fn, tcfg, eval_fn=eval_fn,
                      aux_modules={"lossnet": extractor}, fingerprint=fingerprint,
                      description=f"sr {net_id.id} x{scale} run{run}")
    result = trainer.fit()
    if result.best_checkpoint is None:
        raise RuntimeError(f"{workdir}: no finite validation PSNR in {result.steps} steps; "
                           f"see {trainer.metrics_path}")
    meta = {
        "arch": arch, "layer": str(layer), "scale": scale, "run": run, "seed": seed,
        "best_step": result.best_step, "best_val_psnr": result.best_metric, "steps": result.steps,
        "stop_reason": result.stop_reason, "device": str(device), "precision": precision,
        "weights_id": weights_id(arch, lossnet["weights"]), "config_hash": config_hash(s),
        "train_wall_time_s": time.perf_counter() - t0, "resumed_from": result.resumed_from,
    }
    state = {"modules": {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()}},
             "meta": meta}
    with atomic_path(model_out) as tmp:
        torch.save(state, tmp)
    write_json(meta, Path(model_out).with_suffix(".json"))
    return meta


# keys that do not change the training trajectory: changing them keeps a checkpoint valid
# (iterations too: a longer run continues the same trajectory, evaluation forks the RNG)
_EVAL_ONLY_KEYS = ("test_sets", "test_limit", "protocols", "image_size", *DAG_KEYS,
                   "eval_batch_size", "data_on_device", "iterations", "eval_every",
                   "checkpoint_every", "log_every")


def evaluate(cfg: Mapping[str, Any], common: Mapping[str, Any], lossnet: Mapping[str, Any],
             arch: str, layer: str, scale: int, run: int, model_path: Path, sr_test_dir: Path,
             per_image_out: Path, summary_out: Path) -> pd.DataFrame:
    """Score a trained model on every test set and protocol; write per-image and summary rows."""
    s = settings(cfg)
    device, _ = _device_precision(common)
    t0 = time.perf_counter()
    net = SRNet(scale)
    ckpt = load_checkpoint(model_path, {"model": net})
    meta = ckpt.get("meta", {})
    if meta.get("scale", scale) != scale:
        raise ValueError(f"{model_path} is a x{meta['scale']} model, asked to score x{scale}")
    net.to(device).eval()
    rows = []
    with torch.no_grad():
        for name in s["test_sets"]:
            for image, img in load_test_set(sr_test_dir, name, s["test_limit"]).items():
                for protocol in s["protocols"]:
                    m = evaluate_image(net, img, scale, protocol, device, float(s["blur_sigma"]),
                                       int(s["image_size"]))
                    rows.append({"dataset": name, "image": image, "protocol": protocol, **m})
    per_image = pd.DataFrame(rows, columns=["dataset", "image", "protocol", "psnr", "ssim"])
    per_image = per_image.assign(arch=arch, layer=str(layer), scale=scale, run=run)
    write_parquet(per_image, per_image_out)
    summary_rows = []
    for (dataset, protocol), g in per_image.groupby(["dataset", "protocol"], sort=False):
        for metric in ("psnr", "ssim"):
            summary_rows.append({"dataset": dataset, "split": "test", "variant": f"x{scale}/{protocol}",
                                 "metric": metric, "value": float(g[metric].mean()), "n": len(g)})
    summary = score_frame(
        summary_rows, benchmark=BENCHMARK, arch=arch, layer=str(layer), comparison="spatial",
        channel_norm=False, run=run, config_hash=config_hash(s), weights_id=weights_id(arch, lossnet["weights"]),
        device=str(device), precision=meta.get("precision", "fp32"),
        wall_time_s=float(meta.get("train_wall_time_s", 0.0)) + time.perf_counter() - t0,
    )
    write_parquet(summary, summary_out)
    return summary


# ----------------------------------------------------------------------------- CLI


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=json_arg, required=True, help="config section super_resolution")
    p.add_argument("--common", type=json_arg, required=True, help="device, precision, dirs")
    p.add_argument("--lossnet", type=json_arg, required=True, help="lossnet_params(config, arch)")
    p.add_argument("--arch", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--scale", type=int, required=True)
    p.add_argument("--run", type=int, default=0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow benchmarks.super_resolution",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one SR network (resumes from --workdir)")
    _job_args(t)
    t.add_argument("--coco", type=Path, required=True, help="prepared coco folder")
    t.add_argument("--workdir", type=Path, required=True, help="checkpoints and metrics log")
    t.add_argument("--model", type=Path, required=True, help="output: best weights (.pt)")
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("eval", help="score a trained network on the SR test sets")
    _job_args(e)
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--sr-test", type=Path, required=True, help="prepared sr_test folder")
    e.add_argument("--per-image", type=Path, required=True)
    e.add_argument("--summary", type=Path, required=True)
    a = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.cmd == "train":
        meta = train(a.config, a.common, a.lossnet, a.arch, a.layer, a.scale, a.run, a.coco,
                     a.workdir, a.model, progress=not a.no_progress)
        print(f"trained {a.arch}/{a.layer} x{a.scale} run{a.run}: best val PSNR "
              f"{meta['best_val_psnr']:.3f} dB at step {meta['best_step']}")
    else:
        summary = evaluate(a.config, a.common, a.lossnet, a.arch, a.layer, a.scale, a.run,
                           a.model, a.sr_test, a.per_image, a.summary)
        print(summary[["dataset", "variant", "metric", "value", "n"]].to_string(index=False))
    return 0
