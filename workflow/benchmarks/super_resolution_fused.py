"""Benchmark 2, fused: every SR network of one loss-network architecture and scale trained as
one network (config ``super_resolution.fuse``, docs/super_resolution.md "Fused training").

The members are one :class:`~workflow.models.srnet.FusedSRNet` (grouped convolutions); the
loss network runs once on all outputs and once on the distinct targets
(:func:`workflow.lossnets.fused_feature_loss`); the harness keeps each member's own model
selection. Each member is trained exactly as :func:`workflow.benchmarks.super_resolution.train`
trains it alone, and scored as its ``evaluate`` scores it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from workflow.archs import LossNet, weights_id
from workflow.benchmarks.fused import check_group, finished_model, member_name, score_members
from workflow.benchmarks.super_resolution import (
    _CONTINUES,
    _train_data,
    evaluate,
    target_cache,
    train_batches,
)
from workflow.datasets.bank import EpochSampler
from workflow.files import atomic_path, write_json
from workflow.imaging import center_crop, degrade, quantize
from workflow.job import Job, seed_everything
from workflow.lossnets import fused_feature_loss
from workflow.metrics.image import psnr
from workflow.models.srnet import FusedSRNet, SRNet
from workflow.training import (
    Member,
    TrainConfig,
    Trainer,
    key_fingerprint,
    make_adam,
    resume_key,
    save_model,
)

__all__ = ["train_fused"]


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
    names = check_group([n.id for n in nets], runs, [n.arch for n in nets], "SR",
                        "super_resolution.fuse: arch and scale")
    arch = nets[0].arch
    ins = {"coco": prepared["coco"]}
    keys = [resume_key(job, ins, continues=_CONTINUES, arch=arch, net=n.id, scale=scale, run=r)
            for n, r in zip(nets, runs, strict=True)]
    exact = [key_fingerprint(resume_key(job, ins, arch=arch, net=n.id, scale=scale, run=r))
             for n, r in zip(nets, runs, strict=True)]
    finals = [Path(m["dir"]) / "train" / "final.pt" for m in members]
    done = [finished_model([f], e) is not None for f, e in zip(finals, exact, strict=True)]
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
        for m in members:
            with atomic_path(Path(m["dir"]) / "model.pt") as tmp:
                shutil.copyfile(Path(m["dir"]) / "train" / "final.pt", tmp)
        score_members(job, eval_config, scores, [
            lambda ej, n=n, r=r, d=Path(m["dir"]): evaluate(
                ej, eval_config, n.id, scale, r, d / "model.pt", prepared, d / "images.parquet",
                d / "scores.parquet")
            for m, n, r in zip(members, nets, runs, strict=True)])
    listing = {"scale": scale, "arch": arch, "members": [
        {"net": n.id, "run": r, "final": str(f), "trained_now": not d}
        for n, r, f, d in zip(nets, runs, finals, done, strict=True)]}
    write_json(listing, out)
    return listing


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
    samplers = [EpochSampler(len(bank), int(config["batch_size"]), s, device) for s in seeds]
    batches = [train_batches(bank, sampler, config["crop_size"], gens[f"crops_run{r}"])
               for r, sampler in zip(streams, samplers, strict=True)]
    models = []
    for r in runs:
        seed_everything(int(config["seed"]) + r)  # each member's initialisation is train's
        models.append(SRNet(scale))
    fused = FusedSRNet.from_members(models)
    extractor = job.extractor(nets, config["normalize"])
    opt = make_adam(fused.parameters(), config["lr"], device)
    taps = [n.taps for n in nets]
    k = len(nets)
    cache = target_cache(job, config, extractor, bank,
                         sorted({t for ts in taps for t in ts}, key=str))

    def step_fn(step: int):
        with torch.autocast(device.type, enabled=False):  # the degradation stays fp32
            hr = torch.stack([b(step) for b in batches])
            lr = degrade(hr.flatten(0, 1), scale, sigma).unflatten(0, hr.shape[:2])
        x = job.to_device(lr[0]) if len(streams) == 1 else job.to_device(lr[target_of])
        targets = (cache.stacked([sampler(step) for sampler in samplers]) if cache
                   else job.to_device(hr))
        losses = fused_feature_loss(extractor, taps, fused(x), targets, target_of)
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
