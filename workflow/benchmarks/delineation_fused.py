"""Benchmark 3, fused: every road-delineation U-Net of one loss-network architecture (its
layers x runs) trained as one network (config ``delineation.fuse``, docs/delineation.md
"Fused training").

The members are one :class:`~workflow.models.unet.FusedUNet` (grouped convolutions); the loss
network runs once on all members' predictions and once on the distinct reference maps
(:func:`workflow.lossnets.fused_feature_loss`); the harness keeps each member's own model
selection. Each member is trained exactly as :func:`workflow.benchmarks.delineation.train`
trains it alone, and scored as its ``evaluate`` scores it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from workflow.archs import LossNet, weights_id
from workflow.benchmarks.delineation import (
    _check,
    _check_crop_fits,
    _load,
    evaluate,
    train_banks,
    train_config,
    train_crops,
    train_key,
    valid_scores,
)
from workflow.benchmarks.fused import check_group, finished_model, member_name, score_members
from workflow.datasets.bank import EpochSampler
from workflow.files import atomic_path, write_json
from workflow.job import Job, seed_everything
from workflow.lossnets import fused_feature_loss
from workflow.models.unet import FusedUNet, RefinementUNet
from workflow.training import Member, Trainer, key_fingerprint, make_adam, save_model

__all__ = ["make_fused_trainer", "member_losses", "train_fused"]


def member_losses(fused: FusedUNet, extractor: torch.nn.Module, taps: Sequence[Sequence[Any]],
                  images: Tensor, maps: Tensor, target_of: Sequence[int], feature_weight: float
                  ) -> Tensor:
    """The ``k`` members' training losses ``[k]`` of one step: member ``i`` sees batch
    ``target_of[i]`` of ``images`` ``[R, N, 3, c, c]`` and ``maps`` ``[R, N, 1, c, c]`` (its
    run's), one refinement pass from an empty map, and its loss is :func:`train`'s: the BCE
    of its logits (mean over its pixels) + ``feature_weight`` x the feature MSE at its own
    ``taps[i]`` of its prediction and its map (both repeated to 3 channels). The loss network
    runs once on all predictions and once, without gradient, on the ``R`` maps. Summed, the
    losses give each member its own gradient only."""
    x = torch.cat([images, torch.zeros_like(images[:, :, :1])], 2)  # K = 1: an empty map
    one = images.shape[0] == 1
    logits = fused.logits(x[0] if one else x[list(target_of)])  # [k, N, 1, c, c]
    bce = F.binary_cross_entropy_with_logits(_wide(logits), maps[list(target_of)],
                                             reduction="none").flatten(1).mean(1)
    perceptual = fused_feature_loss(extractor, taps,
                                    torch.sigmoid(logits).expand(-1, -1, 3, -1, -1),
                                    maps.expand(-1, -1, 3, -1, -1), target_of)
    return bce + feature_weight * _wide(perceptual)


def _wide(t: Tensor) -> Tensor:
    """At least fp32 (bf16 autocast's outputs are widened; fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def train_fused(job: Job, config: Mapping[str, Any], members: Sequence[Mapping[str, Any]],
                prepared: Mapping[str, Path], workdir: Path, out: Path,
                eval_config: Mapping[str, Any] | None = None, scores: Path | None = None
                ) -> dict[str, Any]:
    """Train every U-Net of one loss-network architecture as ONE network, then score each.

    ``members``: ``[{"net": "arch/layer", "run": r, "dir": folder}]``. Each member is the
    U-Net :func:`train` would train for ``(net, run)``: the same initialisation (seed + run),
    batches (its run's :class:`EpochSampler`, crops and flips from a generator seeded
    seed + run), Adam, epochs and loss (BCE + ``feature_weight`` x its own taps' feature
    MSE). The harness selects each member's best weights by its own validation quality into
    ``<dir>/train/best.pt``; its selected model goes to ``<dir>/train/final.pt`` (with
    :func:`train`'s meta plus ``key``, ``fused_with``, ``fused_wall_s``). A member whose
    ``final.pt`` (or a ``model.pt`` of ``fuse: false``) was trained with its exact config,
    identity and inputs is not trained again. ``out`` (a JSON listing) is written last.

    Given ``eval_config`` (the eval stage's config), every member is then scored in this
    process as :func:`evaluate` scores it, in a job of the eval stage's own config: its
    ``<dir>/model.pt``, ``<dir>/tiles.parquet``, ``<dir>/scores.parquet``; ``scores`` gets
    all members' rows.
    """
    nets = [LossNet.parse(str(m["net"])) for m in members]
    runs = [int(m.get("run") or 0) for m in members]
    names = check_group([n.id for n in nets], runs, [n.arch for n in nets], "delineation",
                        "delineation.fuse: arch")
    _check(config, job)
    train = _load(prepared, config, "train")
    ins = {"roads": prepared["roads"]}
    n_train = len(train["sat"])
    keys = [train_key(job, ins, n, r, n_train) for n, r in zip(nets, runs, strict=True)]
    exact = [key_fingerprint(train_key(job, ins, n, r, n_train, exact=True))
             for n, r in zip(nets, runs, strict=True)]
    dirs = [Path(m["dir"]) for m in members]
    finals = [d / "train" / "final.pt" for d in dirs]
    done = [finished_model([d / "train" / "final.pt", d / "model.pt"], e)
            for d, e in zip(dirs, exact, strict=True)]
    for i, d in enumerate(done):
        if d is not None:
            print(f"{names[i]}: {d} is this config's trained model; not training it again",
                  flush=True)
            if d != finals[i]:  # a model.pt of fuse: false
                with atomic_path(finals[i]) as tmp:
                    shutil.copyfile(d, tmp)
    todo = [i for i, d in enumerate(done) if d is None]
    if todo:
        _fit_fused(job, config, [nets[i] for i in todo], [runs[i] for i in todo], train,
                   _load(prepared, config, "valid"), Path(workdir), [dirs[i] for i in todo],
                   [keys[i] for i in todo], [exact[i] for i in todo])
    if eval_config is not None:
        for folder, final in zip(dirs, finals, strict=True):
            with atomic_path(folder / "model.pt") as tmp:
                shutil.copyfile(final, tmp)
        score_members(job, eval_config, scores, [
            lambda ej, n=n, r=r, d=d: evaluate(ej, eval_config, n.id, r, d / "model.pt",
                                               prepared, d / "tiles.parquet",
                                               d / "scores.parquet")
            for n, r, d in zip(nets, runs, dirs, strict=True)])
    listing = {"arch": nets[0].arch, "members": [
        {"net": n.id, "run": r, "final": str(f), "trained_now": d is None}
        for n, r, f, d in zip(nets, runs, finals, done, strict=True)]}
    write_json(listing, out)
    return listing


def make_fused_trainer(job: Job, config: Mapping[str, Any], nets: list[LossNet],
                       runs: list[int], train: Mapping[str, Any],
                       valid: Mapping[str, Any] | None, workdir: Path,
                       dirs: list[Path] | None = None, keys: list[dict[str, Any]] | None = None,
                       max_steps: int | None = None, log_every: int | None = None,
                       progress: bool = True) -> tuple[Trainer, FusedUNet, dict[str, Any]]:
    """The fused U-Nets, their losses and data wired into the harness (``valid`` None: no
    validation and no members, as the speed script trains). Returns ``(trainer, fused,
    info)``."""
    _check(config, job)
    device, crop, k = job.device, int(config["crop_size"]), len(nets)
    sat, maps = train_banks(job, config, train)
    streams = list(dict.fromkeys(runs))  # one data stream (sampler, crops) per run
    target_of = [streams.index(r) for r in runs]
    seeds = [int(config["seed"]) + r for r in streams]
    # alone, the crops come from the global RNG the harness seeds with seed + run; a
    # generator seeded so draws the same
    gens = {f"crops_run{r}": torch.Generator(device).manual_seed(s)
            for r, s in zip(streams, seeds, strict=True)}
    samplers = [EpochSampler(len(sat), int(config["batch_size"]), s, device) for s in seeds]
    models = []
    for r in runs:
        seed_everything(int(config["seed"]) + r)  # each member's initialisation is train's
        models.append(RefinementUNet())
    fused = FusedUNet.from_members(models)
    extractor = job.extractor(nets, config["normalize"])
    for n in nets:
        _check_crop_fits(extractor, n, crop, device)
    opt = make_adam(fused.parameters(), config["lr"], device)
    taps, weight = [n.taps for n in nets], float(config["feature_weight"])
    trainer: Trainer

    def step_fn(step: int):
        batches = [train_crops(sat, maps, s(step), crop, device, trainer.channels_last,
                               gens[f"crops_run{r}"])
                   for s, r in zip(samplers, streams, strict=True)]
        img = torch.stack([b[0] for b in batches])  # [R, N, 3, c, c]
        gt = torch.stack([b[1] for b in batches])  # [R, N, 1, c, c]
        losses = member_losses(fused, extractor, taps, img, gt, target_of, weight)
        return losses.sum(), gt.shape[1] * k

    # each member's validation runs as its own U-Net (placed as the harness places the fused)
    one = RefinementUNet()

    def eval_fn(step: int) -> dict[str, float]:
        out = {}
        for i, (n, r) in enumerate(zip(nets, runs, strict=True)):
            one.load_state_dict(fused.member_state_dict(i))
            for metric, v in valid_scores(job, one, valid, config).items():
                out[f"{member_name(n.id, r)}/{metric}"] = v
        return out

    def member(i: int) -> Member:
        return Member(member_name(nets[i].id, runs[i]), dirs[i] / "train",
                      state=lambda: {"model": fused.member_state_dict(i)},
                      load=lambda mods: fused.load_member(i, mods["model"]), key=keys[i])

    group_key = None if keys is None else {"members": {
        member_name(n.id, r): kk for n, r, kk in zip(nets, runs, keys, strict=True)}}
    spe = samplers[0].steps_per_epoch
    tc = train_config(config, spe, seeds[0], selecting=valid is not None, max_steps=max_steps,
                      log_every=log_every, progress=progress)
    trainer = Trainer(job, workdir, {"fused": fused}, opt, step_fn, tc,
                      eval_fn=eval_fn if valid is not None else None,
                      aux_modules={"lossnet": extractor, "eval_unet": one}, generators=gens,
                      key=group_key,
                      members=[member(i) for i in range(k)] if valid is not None else None,
                      description=f"delineation {nets[0].arch} fused {k}")
    return trainer, fused, {"steps_per_epoch": spe, "data_on_device": sat.where,
                            "train_tiles": len(sat)}


def _fit_fused(job: Job, config: Mapping[str, Any], nets: list[LossNet], runs: list[int],
               train: Mapping[str, Any], valid: Mapping[str, Any], workdir: Path,
               dirs: list[Path], keys: list[dict[str, Any]], exact: list[str]) -> None:
    k, device = len(nets), job.device
    trainer, fused, info = make_fused_trainer(job, config, nets, runs, train, valid, workdir,
                                              dirs, keys)
    spe = info["steps_per_epoch"]
    result = trainer.fit()
    wall = job.elapsed()
    for i, (n, r) in enumerate(zip(nets, runs, strict=True)):
        best = result.extra["members"][member_name(n.id, r)]
        if best["best_checkpoint"] is None:
            raise RuntimeError(f"{workdir}: no finite validation quality for {n.id} run{r} in "
                               f"{result.steps} steps; see {trainer.metrics_path}")
        meta = {"net": n.id, "run": r, "epochs": int(config["epochs"]), "steps_per_epoch": spe,
                "device": str(device), "precision": job.precision,
                "data_on_device": info["data_on_device"],
                "channels_last": trainer.channels_last, "train_tiles": info["train_tiles"],
                "weights_id": weights_id(n.arch, job.weights),
                "steps": result.steps, "best_step": best["best_step"],
                "best_valid_quality": best["best_metric"], "stop_reason": result.stop_reason,
                "valid_tiles": len(valid["sat"]),
                # the job's time, shared by the models it trained together
                "train_wall_s": wall / k, "fused_with": k, "fused_wall_s": wall,
                "resumed_from": result.resumed_from, "key": exact[i]}
        (dirs[i] / "train").mkdir(parents=True, exist_ok=True)
        save_model(dirs[i] / "train" / "final.pt", {"model": fused.member_state_dict(i)}, meta)
        print(f"trained {n.id} run{r} (fused, {k} models): best validation quality "
              f"{best['best_metric']:.4f} at step {best['best_step']}", flush=True)
