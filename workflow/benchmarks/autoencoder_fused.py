"""Benchmark 4, fused: every autoencoder of one loss-network architecture and dataset (its
layers and runs; or the pixel baseline's runs) trained as one network (config
``autoencoder.fuse``, docs/autoencoder.md "Fused training").

The members are one :class:`~workflow.models.autoencoder.FusedAutoencoder` (grouped
convolutions, the code layers as one batched matmul); the loss network runs once on all
outputs and once on the distinct inputs, which are the targets
(:func:`workflow.lossnets.fused_feature_loss`); the harness keeps each member's own model
selection and early stopping. Each member is trained exactly as
:func:`workflow.benchmarks.autoencoder.train` trains it alone and saved in its file format,
so the ``fit_mlps`` rule reads it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workflow.archs import LossNet
from workflow.benchmarks.autoencoder import (
    MIN_BATCH,
    PIXEL,
    _key,
    _spec,
    inputs,
    load_split,
    parse_net,
    seeded_split,
)
from workflow.benchmarks.fused import check_group, finished_model, member_name
from workflow.datasets.bank import EpochSampler
from workflow.files import write_json
from workflow.job import Job, seed_everything
from workflow.lossnets import fused_feature_loss
from workflow.models.autoencoder import ConvAutoencoder, FusedAutoencoder
from workflow.training import Member, TrainConfig, Trainer, key_fingerprint, make_adam, save_model

__all__ = ["train_fused"]


def train_fused(job: Job, config: Mapping[str, Any], members: Sequence[Mapping[str, Any]],
                dataset: str, prepared: Mapping[str, Path], workdir: Path, out: Path
                ) -> dict[str, Any]:
    """Train every autoencoder of one loss-network architecture (or every run of the pixel
    baseline) on ``dataset`` as ONE network.

    ``members``: ``[{"net": "arch/layer" | "pixel", "run": r, "dir": folder}]``. Each member
    is the autoencoder :func:`~workflow.benchmarks.autoencoder.train` would train for
    ``(net, dataset, run)``: the same initialisation (seed + run), batches (its run's
    :class:`EpochSampler`), Adam, validation loss, model selection and early stopping
    (``patience`` per member: a member that stops leaves the loss, the others train on). Each
    member's model goes to ``<dir>/autoencoder.pt`` (train's file format and meta, plus
    ``key``, ``fused_with`` and ``fused_wall_time_s``), its best weights to
    ``<dir>/train/best.pt``; ``out`` lists them, written last. A member whose
    ``autoencoder.pt`` was trained under its exact resume key (fused or alone) is not trained
    again. The group's checkpoints in ``workdir`` carry every member's resume key.
    """
    _spec(dataset)
    nets = [parse_net(str(m["net"])) for m in members]
    runs = [int(m.get("run") or 0) for m in members]
    ids = [PIXEL if n is None else n.id for n in nets]
    group = [PIXEL if n is None else n.arch for n in nets]
    names = check_group(ids, runs, group, "autoencoder",
                "autoencoder.fuse: arch (or the pixel baseline) and dataset")
    ins = {dataset: prepared[dataset]}
    keys = [_key(job, i, dataset, r, ins) for i, r in zip(ids, runs, strict=True)]
    exact = [key_fingerprint(k) for k in keys]
    files = [Path(m["dir"]) / "autoencoder.pt" for m in members]
    done = [finished_model([f], e) is not None for f, e in zip(files, exact, strict=True)]
    for name, f, d in zip(names, files, done, strict=True):
        if d:
            print(f"{name} {dataset}: {f} is this config's finished model; not training it "
                  f"again", flush=True)
    todo = [i for i, d in enumerate(done) if not d]
    if todo:
        _fit_fused(job, config, dataset, [ids[i] for i in todo], [nets[i] for i in todo],
                   [runs[i] for i in todo], prepared, Path(workdir),
                   [Path(members[i]["dir"]) for i in todo], [keys[i] for i in todo],
                   [exact[i] for i in todo])
    listing = {"dataset": dataset, "arch": group[0], "members": [
        {"net": i, "run": r, "model": str(f), "trained_now": not d}
        for i, r, f, d in zip(ids, runs, files, done, strict=True)]}
    write_json(listing, out)
    return listing


def member_losses(extractor: torch.nn.Module | None, nets: Sequence[LossNet | None],
                  outputs: Tensor, targets: Tensor, target_of: Sequence[int]) -> Tensor:
    """``[K]`` reconstruction losses of ``outputs`` ``[K, N, 3, s, s]`` against their targets
    ``targets[target_of[k]]`` (``[R, N, 3, s, s]``): the pixel MSE for the baseline (no
    ``extractor``), else :func:`fused_feature_loss` (one pass each way), each member's value
    :func:`~workflow.benchmarks.autoencoder.reconstruction_loss` computes alone."""
    if extractor is None:
        return torch.stack([torch.mean((outputs[i].float() - targets[t].float()) ** 2)
                            for i, t in enumerate(target_of)])
    return fused_feature_loss(extractor, [n.taps for n in nets], outputs, targets, target_of)


def _fit_fused(job: Job, config: Mapping[str, Any], dataset: str, ids: list[str],
               nets: list[LossNet | None], runs: list[int], prepared: Mapping[str, Path],
               workdir: Path, dirs: list[Path], keys: list[dict[str, Any]],
               exact: list[str]) -> None:
    spec, tcfg, seed = _spec(dataset), config["train"], int(config["seed"])
    images, _ = load_split(prepared, dataset, spec.ae_split, tcfg["max_images"], seed)
    tr, va = seeded_split(len(images), float(config["val_fraction"]), seed)
    members = []
    for r in runs:
        seed_everything(seed + r)  # each member's initial weights are train's
        members.append(ConvAutoencoder(spec.size, int(tcfg["code_size"])))
    fused, k = FusedAutoencoder.from_members(members), len(members)
    extractor = (None if nets[0] is None else
                 job.extractor([n for n in nets if n is not None], tcfg["normalize"]))
    opt = make_adam(fused.parameters(), tcfg["lr"], job.device)
    streams = list(dict.fromkeys(runs))  # one data stream (sampler) per run
    target_of = [streams.index(r) for r in runs]
    samplers = [EpochSampler(torch.from_numpy(tr), int(tcfg["batch_size"]), seed + r,
                             job.device, min_batch=MIN_BATCH) for r in streams]
    spe, batch = samplers[0].steps_per_epoch, inputs(job, images, spec)
    val, eval_bs = torch.from_numpy(va), int(job.setting("eval_batch_size"))
    names = [member_name(i, r) for i, r in zip(ids, runs, strict=True)]

    def active() -> list[int]:
        still = set(trainer.active_members())
        return [i for i, name in enumerate(names) if name in still]

    def step_fn(step: int):
        x = torch.stack([batch(s(step)) for s in samplers])  # [R, N, 3, s, s]
        out, act = fused(x[0] if len(streams) == 1 else x[target_of]), active()
        if len(act) < k:  # stopped members leave the loss (and the loss network's batch)
            out = out[act]
        losses = member_losses(extractor, [nets[i] for i in act], out, x,
                               [target_of[i] for i in act])
        return losses.sum(), x.shape[1] * len(act)

    def eval_fn(step: int) -> dict[str, float]:
        act, totals = active(), [0.0] * k
        with job.autocast():
            for i in range(0, len(val), eval_bs):
                x = batch(val[i:i + eval_bs])
                out = fused(x)[act] if len(act) < k else fused(x)
                losses = member_losses(extractor, [nets[j] for j in act], out, x[None],
                                       [0] * len(act))
                for j, v in zip(act, losses, strict=True):  # as train sums them alone
                    totals[j] += float(v) * x.shape[0]
        return {f"{names[j]}/val_loss": totals[j] / len(val) for j in act}

    def member(i: int) -> Member:
        return Member(names[i], dirs[i] / "train",
                      state=lambda: {"autoencoder": fused.member_state_dict(i)},
                      load=lambda mods: fused.load_member(i, mods["autoencoder"]), key=keys[i])

    trainer = Trainer(
        job, workdir, {"fused": fused}, opt, step_fn,
        TrainConfig(max_steps=int(tcfg["epochs"]) * spe, eval_every=spe,
                    checkpoint_every=job.setting("train")["checkpoint_every"] or spe,
                    seed=seed + streams[0], select_metric="val_loss", select_mode="min",
                    patience=int(tcfg["patience"]), log_every=max(1, min(100, spe))),
        eval_fn=eval_fn, aux_modules={"lossnet": extractor} if extractor is not None else None,
        key={"members": dict(zip(names, keys, strict=True))},
        members=[member(i) for i in range(k)],
        description=f"autoencoder {ids[0].split('/')[0]} {dataset} fused {k}")
    result = trainer.fit()  # each member holds its best epoch's weights
    wall = job.elapsed()
    arch = None if nets[0] is None else nets[0].arch
    for i in range(k):
        best = result.extra["members"][names[i]]
        stopped = best["stopped_step"]
        steps = result.steps if stopped is None else stopped
        reason = ("early_stop" if stopped is not None and result.stop_reason != "already_done"
                  else result.stop_reason)
        epoch = None if best["best_step"] is None else best["best_step"] // spe
        meta = {"size": spec.size, "code_size": fused.code_size, "net": ids[i],
                "dataset": dataset, "run": runs[i], "n_train": len(tr), "n_val": len(va),
                "steps_per_epoch": spe, "steps": steps, "stop_reason": reason,
                "best_epoch": epoch, "best_val_loss": best["best_metric"],
                "epochs_run": -(-steps // spe),
                # the job's time, shared by the models it trained together
                **job.provenance(arch, wall / k), "key": exact[i], "fused_with": k,
                "fused_wall_time_s": wall, "resumed_from": result.resumed_from}
        save_model(dirs[i] / "autoencoder.pt", {"autoencoder": fused.member_state_dict(i)},
                   meta)
        print(f"{dirs[i] / 'autoencoder.pt'}: {names[i]} best epoch {epoch}, val loss "
              f"{best['best_metric']} ({reason}; fused, {k} models)", flush=True)
