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

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from workflow.archs import LossNet, weights_id
from workflow.datasets import coco, sr_test
from workflow.datasets.bank import EpochSampler, ImageBank, crop_grid, random_crops
from workflow.files import atomic_path, write_json, write_parquet
from workflow.imaging import (
    center_crop,
    crop_to_multiple,
    degrade,
    quantize,
    reference_target,
    to_images,
)
from workflow.job import Job, seed_everything
from workflow.lossnets import feature_loss, fused_feature_loss
from workflow.metrics.image import psnr, rgb_to_y, shave, ssim
from workflow.models.srnet import FusedSRNet, SRNet
from workflow.results import score_frame
from workflow.training import (
    Member,
    TrainConfig,
    Trainer,
    key_fingerprint,
    load_model,
    make_adam,
    resume_key,
    save_model,
)

__all__ = ["PROTOCOLS", "evaluate", "evaluate_image", "super_resolve", "train",
           "train_batches", "train_fused", "validation_psnr"]

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
    device, seed, sigma = job.device, int(config["seed"]) + run, float(config["blur_sigma"])
    bank, val = _train_data(job, config, prepared, scale)

    seed_everything(seed)  # the network's initialisation depends on the run
    model = SRNet(scale)
    extractor = job.extractor(lossnet, config["normalize"])
    opt = make_adam(model.parameters(), config["lr"], device)
    batch = train_batches(bank, EpochSampler(len(bank), int(config["batch_size"]), seed, device),
                          config["crop_size"])

    def step_fn(step: int):
        with torch.autocast(device.type, enabled=False):  # the degradation stays fp32
            hr = batch(step)
            lr = degrade(hr, scale, sigma)
        output = model(job.to_device(lr))
        return feature_loss(extractor, lossnet.taps, output, job.to_device(hr)), hr.shape[0]

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


def member_name(net: str, run: int) -> str:
    """A fused member's name: its metrics are ``eval_<name>/psnr`` in metrics.csv."""
    return f"{net} run{int(run)}"


def train_fused(job: Job, config: Mapping[str, Any], members: Sequence[Mapping[str, Any]],
                scale: int, prepared: Mapping[str, Path], workdir: Path, out: Path,
                eval_config: Mapping[str, Any] | None = None, scores: Path | None = None
                ) -> dict[str, Any]:
    """Train every SR network of one loss-network architecture and scale as ONE network.

    ``members``: ``[{"net": "arch/layer", "run": r, "dir": folder}]``. Each member is the
    network :func:`train` would train for ``(net, scale, run)``: the same initialisation
    (seed + run), batches (its run's :class:`EpochSampler` and crops), Adam and steps. The
    members are one :class:`FusedSRNet` (grouped convolutions), the loss network runs once on
    all outputs and once on the distinct targets (:func:`fused_feature_loss`), and the
    harness selects each member's best weights by its own validation PSNR into
    ``<dir>/train/best.pt``. Each member's selected model goes to ``<dir>/train/final.pt``
    (the model file format of :func:`train`); ``out`` lists them, written last. A member
    whose ``final.pt`` was trained with its exact config, identity and inputs is not trained
    again (another member joining the group retrains nobody; a rerun for an eval-only key
    trains no step). The group's checkpoints in ``workdir`` carry every member's resume key.

    Given ``eval_config`` (the eval stage's config; ``prepared`` then holds ``sr_test``
    too), every member is then scored in this process, as the separate ``eval`` command
    would: its model goes to ``<dir>/model.pt``, :func:`evaluate` runs in a job of the eval
    stage's own config and precision and writes ``<dir>/images.parquet`` and
    ``<dir>/scores.parquet``; ``scores`` gets all members' rows (the gathered file).
    """
    nets = [LossNet.parse(str(m["net"])) for m in members]
    runs = [int(m.get("run") or 0) for m in members]
    archs = sorted({n.arch for n in nets})
    if len(archs) != 1:
        raise ValueError(f"a fused SR job trains one loss-network architecture, got {archs}; "
                         f"the plan groups members by arch and scale (super_resolution.fuse)")
    names = [member_name(n.id, r) for n, r in zip(nets, runs, strict=True)]
    if len(set(names)) != len(names):
        raise ValueError(f"fused members repeat: {names}")
    arch = archs[0]
    ins = {"coco": prepared["coco"]}
    keys = [resume_key(job, ins, continues=_CONTINUES, arch=arch, net=n.id, scale=scale, run=r)
            for n, r in zip(nets, runs, strict=True)]
    exact = [key_fingerprint(resume_key(job, ins, arch=arch, net=n.id, scale=scale, run=r))
             for n, r in zip(nets, runs, strict=True)]
    finals = [Path(m["dir"]) / "train" / "final.pt" for m in members]
    done = [_finished(f, e) for f, e in zip(finals, exact, strict=True)]
    todo = [i for i, d in enumerate(done) if not d]
    for i in range(len(members)):
        if done[i]:
            print(f"{names[i]} x{scale}: {finals[i]} is this config's finished model; "
                  f"not training it again", flush=True)
    if todo:
        _fit_fused(job, config, [nets[i] for i in todo], [runs[i] for i in todo], scale,
                   prepared, Path(workdir), [Path(members[i]["dir"]) for i in todo],
                   [keys[i] for i in todo], [exact[i] for i in todo])
    if eval_config is not None:
        if scores is None:
            raise ValueError("train_fused with an eval config needs --scores (the group's "
                             "summary file)")
        frames = []
        for m, n, r, final in zip(members, nets, runs, finals, strict=True):
            folder = Path(m["dir"])
            with atomic_path(folder / "model.pt") as tmp:
                shutil.copyfile(final, tmp)
            # a job of the eval stage's own config (precision, provenance, its own clock)
            frames.append(evaluate(Job.create(eval_config, job.settings), eval_config, n.id,
                                   scale, r, folder / "model.pt", prepared,
                                   folder / "images.parquet", folder / "scores.parquet"))
        write_parquet(pd.concat(frames, ignore_index=True), scores)
    listing = {"scale": scale, "arch": arch, "members": [
        {"net": n.id, "run": r, "final": str(f), "trained_now": not d}
        for n, r, f, d in zip(nets, runs, finals, done, strict=True)]}
    write_json(listing, out)
    return listing


def _finished(final: Path, exact: str) -> bool:
    if not final.exists():
        return False
    try:
        meta = load_model(final, {}, map_location="cpu")
    except Exception:  # unreadable: train it again (atomic writes make this rare)
        return False
    return meta.get("key") == exact


def _fit_fused(job: Job, config: Mapping[str, Any], nets: list[LossNet], runs: list[int],
               scale: int, prepared: Mapping[str, Path], workdir: Path, dirs: list[Path],
               keys: list[dict[str, Any]], exact: list[str]) -> None:
    device, sigma = job.device, float(config["blur_sigma"])
    bank, val = _train_data(job, config, prepared, scale)
    streams = list(dict.fromkeys(runs))  # one data stream (sampler, crops) per run
    target_of = [streams.index(r) for r in runs]
    seeds = [int(config["seed"]) + r for r in streams]
    gens = {f"crops_run{r}": torch.Generator(device).manual_seed(s)
            for r, s in zip(streams, seeds, strict=True)}
    batches = [train_batches(bank, EpochSampler(len(bank), int(config["batch_size"]), s, device),
                             config["crop_size"], gens[f"crops_run{r}"])
               for r, s in zip(streams, seeds, strict=True)]
    models = []
    for r in runs:
        seed_everything(int(config["seed"]) + r)  # each member's initialisation is train's
        models.append(SRNet(scale))
    fused = FusedSRNet.from_members(models)
    extractor = job.extractor(nets, config["normalize"])
    opt = make_adam(fused.parameters(), config["lr"], device)
    taps = [n.taps for n in nets]
    k = len(nets)

    def step_fn(step: int):
        with torch.autocast(device.type, enabled=False):  # the degradation stays fp32
            hr = torch.stack([b(step) for b in batches])
            lr = degrade(hr.flatten(0, 1), scale, sigma).unflatten(0, hr.shape[:2])
        x = job.to_device(lr[0]) if len(streams) == 1 else job.to_device(lr[target_of])
        losses = fused_feature_loss(extractor, taps, fused(x), job.to_device(hr), target_of)
        return losses.sum(), hr.shape[1] * k

    def eval_fn(step: int) -> dict[str, float]:
        bs, crop, vals = int(job.setting("eval_batch_size")), config["crop_size"], []
        for i in range(0, len(val), bs):
            hr = val.images(torch.arange(i, min(i + bs, len(val))))
            if crop and crop < min(hr.shape[-2:]):
                hr = center_crop(hr, crop)
            lr = degrade(hr, scale, sigma)
            if job.channels_last:
                lr = lr.contiguous(memory_format=torch.channels_last)
            vals.append(torch.stack([psnr(quantize(y.float()), hr) for y in fused(lr)]))
        per_member = torch.cat(vals, dim=1).mean(dim=1)
        return {f"{member_name(n.id, r)}/psnr": float(v)
                for n, r, v in zip(nets, runs, per_member, strict=True)}

    def member(i: int) -> Member:
        return Member(member_name(nets[i].id, runs[i]), dirs[i] / "train",
                      state=lambda: {"model": fused.member_state_dict(i)},
                      load=lambda mods: fused.load_member(i, mods["model"]), key=keys[i])

    group_key = {"members": {member_name(n.id, r): kk for n, r, kk in
                             zip(nets, runs, keys, strict=True)}}
    tcfg = TrainConfig(max_steps=int(config["iterations"]), eval_every=int(config["eval_every"]),
                       checkpoint_every=int(job.setting("checkpoint_every")),
                       log_every=int(job.setting("log_every")),
                       compile=bool(job.setting("compile")), seed=seeds[0],
                       select_metric="psnr", select_mode="max")
    trainer = Trainer(job, workdir, {"fused": fused}, opt, step_fn, tcfg, eval_fn=eval_fn,
                      aux_modules={"lossnet": extractor}, generators=gens, key=group_key,
                      members=[member(i) for i in range(k)],
                      description=f"sr {nets[0].arch} x{scale} fused {k}")
    result = trainer.fit()
    wall = job.elapsed()
    for i, (n, r) in enumerate(zip(nets, runs, strict=True)):
        best = result.extra["members"][member_name(n.id, r)]
        if best["best_checkpoint"] is None:
            raise RuntimeError(f"{workdir}: no finite validation PSNR for {n.id} run{r} in "
                               f"{result.steps} steps; see {trainer.metrics_path}")
        meta = {"net": n.id, "scale": scale, "run": r, "seed": int(config["seed"]) + r,
                "best_step": best["best_step"], "best_val_psnr": best["best_metric"],
                "steps": result.steps, "stop_reason": result.stop_reason,
                "precision": job.precision, "weights_id": weights_id(n.arch, job.weights),
                # the job's time, shared by the models it trained together
                "train_wall_time_s": wall / k, "fused_with": k, "fused_wall_time_s": wall,
                "resumed_from": result.resumed_from, "key": exact[i]}
        (dirs[i] / "train").mkdir(parents=True, exist_ok=True)
        save_model(dirs[i] / "train" / "final.pt", {"model": fused.member_state_dict(i)}, meta)
        print(f"trained {n.id} x{scale} run{r} (fused, {k} models): best val PSNR "
              f"{best['best_metric']:.3f} dB at step {best['best_step']}", flush=True)


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
