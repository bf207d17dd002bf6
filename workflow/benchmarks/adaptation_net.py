"""Adaptation by fine-tuning the loss network itself: the adapted net (config
``adaptation.adapt_net``; the adaptation paper's Table 3; docs/adaptation.md).

The channel-weight adaptation (:mod:`workflow.benchmarks.adaptation`) learns per-channel
scalars on a frozen backbone, every metric of a loss network and run at once. An adapted
net instead trains the loss network's own parameters (every layer up to the deepest tap:
:class:`workflow.models.backbone.TrainableBackbone`) for one (comparison, ranking) metric,
so each metric is its own copy of the network and its own job. Everything else is the
channel-weight adaptation's: the SVHN training split and its per-epoch permutations, fresh
distortion pairs and parameters every step, dropout on the per-channel differences, the
LPIPS ranking net G with BCE plus the sync loss, batch, epochs and schedule, the validation
rows, the evaluation (:func:`workflow.benchmarks.adaptation.evaluate`, variant
``adapted_net``). The channel weights stay 1 (the baseline metric: only the network adapts);
G trains at ``adaptation.lr``, the backbone at ``adaptation.adapt_net.lr``. BatchNorm
statistics stay frozen (eval mode), as in the loss network's every other use.

Commands (rules/adaptation.smk): ``python -m workflow adaptation train_net | evaluate_net``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workflow.archs import LossNet
from workflow.benchmarks import adaptation as ada
from workflow.compare import Variant
from workflow.datasets.bank import EpochSampler
from workflow.datasets.triplets import load_rankings, read_triplet_files, triplet_set
from workflow.distortions import positions
from workflow.job import Job
from workflow.lossnets import build_extractor
from workflow.models.adapter import FusedAdapter, load_adapter, tap_channels
from workflow.models.backbone import TrainableBackbone, trainable_parameters
from workflow.training import (
    TrainConfig,
    Trainer,
    constant_then_linear,
    make_adam,
    resume_key,
    save_model,
)

__all__ = ["VARIANT", "evaluate_net", "net_adapter", "net_optimizer", "train_net"]

VARIANT = "adapted_net"


def _ranking(ranking: int, count: int, rankings: Path) -> int:
    r = int(ranking)
    if not 0 <= r < count:
        raise ada.AdaptationError(f"--ranking {r}: {rankings} holds rankings 0..{count - 1} "
                                  f"(config key adaptation.adapt_net.rankings)")
    return r


def net_adapter(backbone: TrainableBackbone, variant: Variant, ranking: int, seed: int,
                config: Mapping[str, Any], size: int, device: torch.device) -> FusedAdapter:
    """The one-metric adapter of an adapted net: G initialised as the fused adaptation's
    metric (same seed), channel weights fixed at 1 (no gradient)."""
    adapter = FusedAdapter(tap_channels(backbone, size, device), [variant], [ranking],
                           seed=seed, dropout=float(config["dropout"]),
                           sync_weight=float(config["sync_weight"])).to(device)
    adapter.channel_weights.requires_grad_(False)
    return adapter


def net_optimizer(backbone: TrainableBackbone, adapter: FusedAdapter,
                  config: Mapping[str, Any], device: torch.device) -> torch.optim.Adam:
    """One Adam: the backbone's parameters at ``adapt_net.lr``, G's at ``lr``, ``betas``."""
    return make_adam([{"params": trainable_parameters(backbone),
                       "lr": float(config["adapt_net"]["lr"])},
                      {"params": trainable_parameters(adapter)}],
                     config["lr"], device, config["betas"])


def train_net(job: Job, config: Mapping[str, Any], net: str, run: int, comparison: str,
              channel_norm: bool, ranking: int, rankings: Path, triplets: Sequence[Path],
              prepared: Mapping[str, Path], workdir: Path, out: Path) -> dict[str, Any]:
    """Fine-tune ``net`` for the metric (``comparison``, ``channel_norm``) under ranking
    ``ranking``, run ``run`` (seed + run), on SVHN train; write the backbone and the
    one-metric adapter (:func:`workflow.training.save_model`); return the file's meta.
    ``triplets``: [the SVHN triplet file]; ``prepared``: {"svhn": folder}."""
    lossnet, size = LossNet.parse(net), int(config["image_size"])
    seed = int(config["seed"]) + int(run)
    orders = load_rankings(rankings)
    r = _ranking(ranking, len(orders), rankings)
    variant = Variant(comparison, bool(channel_norm))
    pos = positions(orders)[r:r + 1].to(job.device)
    files = read_triplet_files(triplets)
    train_idx = torch.from_numpy(files["svhn"]["train_index"])
    val = triplet_set(files["svhn"], "val")
    bank = ada._bank(job, prepared, "svhn", "train", torch.cat([train_idx, val["index"]]))
    backbone = TrainableBackbone(job.extractor(lossnet, config["normalize"]), train_mode=False)
    adapter = net_adapter(backbone, variant, r, seed, config, size, job.device)
    opt = net_optimizer(backbone, adapter, config, job.device)
    # the channel-weight adaptation's sampler and schedule (adaptation.train)
    sampler = EpochSampler(train_idx, int(config["batch_size"]), seed, job.device,
                           seed_stride=ada.SEED_STRIDE)
    per_epoch = sampler.steps_per_epoch
    total = per_epoch * (int(config["epochs_constant"]) + int(config["epochs_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, constant_then_linear(total, per_epoch * int(config["epochs_constant"])))
    gen = torch.Generator(device=job.device).manual_seed(seed)

    def eval_fn(step: int) -> dict[str, float]:
        acc = ada.triplet_2afc(job, backbone, adapter, [variant], bank, val, pos, size)
        return {"val_2afc_mean": float(acc.mean()), "val_2afc_min": float(acc.min())}

    tc = TrainConfig(max_steps=total, checkpoint_every=per_epoch, seed=seed,
                     eval_every=per_epoch * int(job.setting("eval_every_epochs")),
                     log_every=max(1, min(50, per_epoch)))
    modules = {"adapter": adapter, "backbone": backbone}
    trainer = Trainer(job, workdir, modules, opt,
                      lambda step: ada.adaptation_step(job, backbone, adapter, bank,
                                                       sampler(step), pos, size, gen),
                      tc, sched, eval_fn, generators={"triplets": gen},
                      key=resume_key(job, {"rankings": rankings, "prepared_svhn": prepared["svhn"],
                                           **{f"triplets_{i}": t for i, t in enumerate(triplets)}},
                                     arch=lossnet.arch, net=net, run=int(run),
                                     comparison=variant.name, ranking=r),
                      description=f"adapted net {lossnet.id} {variant.name} ranking {r} run {run}")
    result = trainer.fit()
    meta = {**adapter.describe(), "variant": VARIANT, "net": lossnet.id, "run": int(run),
            "seed": seed, "comparison": variant.name, "ranking": r,
            "net_lr": float(config["adapt_net"]["lr"]),
            "backbone_parameters": sum(p.numel() for p in trainable_parameters(backbone)),
            "steps": result.steps, "wall_time_s": result.wall_time_s,
            "precision": job.precision, "device": str(job.device)}
    save_model(out, modules, meta)
    print(f"{out}: {lossnet.id} {variant.name} ranking {r}, {meta['backbone_parameters']} "
          f"backbone parameters, {result.steps} steps")
    return meta


def evaluate_net(job: Job, config: Mapping[str, Any], net: str, run: int, model: Path,
                 rankings: Path, triplets: Sequence[Path], prepared: Mapping[str, Path],
                 scores: Path) -> pd.DataFrame:
    """Score one adapted net (its backbone from ``model``: no weights file is read) as
    :func:`workflow.benchmarks.adaptation.evaluate` scores an adapted run, on its ranking;
    rows of variant ``adapted_net``."""
    lossnet = LossNet.parse(net)
    built: dict[str, TrainableBackbone] = {}

    def extra(meta: dict[str, Any]) -> dict[str, TrainableBackbone]:
        if meta.get("variant") != VARIANT or meta.get("net") != lossnet.id:
            raise ada.AdaptationError(f"{model} is not an adapted net of {lossnet.id} (it "
                                      f"holds {meta.get('variant')} of {meta.get('net')}): "
                                      f"rerun adaptation_train_net")
        built["backbone"] = TrainableBackbone(build_extractor(
            lossnet.arch, lossnets=[lossnet], weights="random", weights_dir=job.weights_dir,
            normalize=config["normalize"]), train_mode=False)
        return dict(built)

    adapter, _ = load_adapter(model, job.device, extra)
    _ranking(adapter.rankings[0], len(load_rankings(rankings)), rankings)
    return ada.evaluate(job, config, net, run, None, rankings, triplets, prepared, scores,
                        tuned=(built["backbone"], adapter))
