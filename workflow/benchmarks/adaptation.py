"""Benchmark 5: adaptation of deep perceptual similarity to random rankings of six distortions.

Protocol (Pihlgren et al. 2023; docs/adaptation.md): triplets of a source image at 64x64 and
two distinct distortions of it (:mod:`workflow.datasets.triplets`), labelled by each ranking.
Every (comparison, ranking) metric of one loss network and run is adapted at once
(:class:`workflow.models.adapter.FusedAdapter`) on one extractor pass per batch. The
baseline (weights 1), each run and each adapted net (``adaptation_net.py``) are scored on
the fixed triplet sets (2AFC per ranking) and BAPPS val through :func:`set_distances`.
Commands (rules/adaptation.smk): ``python -m workflow adaptation rankings | triplets | train
| evaluate | train_net | evaluate_net``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workflow.archs import LossNet
from workflow.compare import Variant, all_variants, per_channel_diffs
from workflow.datasets import bapps, registry
from workflow.datasets.bank import EpochSampler, ImageBank
from workflow.datasets.triplets import (
    build_triplet_file,
    distort_batch,
    load_rankings,
    make_rankings,
    read_triplet_files,
    triplet_set,
)
from workflow.distortions import draw_pairs, positions, ranking_labels, sample_params
from workflow.files import save_npz, write_json, write_parquet
from workflow.imaging import to_images
from workflow.job import Job
from workflow.lossnets import FeatureExtractor
from workflow.metrics.similarity import bapps_rows, twoafc_rate
from workflow.models.adapter import (
    FusedAdapter,
    baseline_distances,
    load_adapter,
    make_optimizer,
    tap_channels,
    terms,
)
from workflow.results import score_frame
from workflow.training import TrainConfig, Trainer, constant_then_linear, resume_key, save_model

__all__ = ["AdaptationError", "adaptation_step", "bapps_scores", "evaluate", "feature_diffs",
           "rankings", "set_distances", "train", "triplet_2afc", "triplets"]

BENCHMARK = "adaptation"
EVAL_DATASETS = ("svhn", "stl10")
# the epoch permutation of run seed s, epoch e is seeded s * 100_003 + e (the study's runs)
SEED_STRIDE = 100_003


class AdaptationError(ValueError):
    """Inputs of a command that do not fit together; the message names them and the fix."""


def rankings(config: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Write ``rankings.json`` (``config["rankings"]`` orders seeded by ``ranking_seed``);
    return what was written (``make_rankings``)."""
    data = make_rankings(int(config["rankings"]), int(config["ranking_seed"]))
    write_json(data, out)
    return data


def triplets(config: Mapping[str, Any], prepared: Mapping[str, Path], out: Path
             ) -> dict[str, np.ndarray]:
    """Write the fixed triplet file of one dataset.

    Args: ``prepared``: ``{"svhn" or "stl10": folder}``, the one dataset of the file.
    Returns: its arrays (``test_*``; for SVHN also ``train_index`` and ``val_*``).
    """
    if len(prepared) != 1 or next(iter(prepared)) not in EVAL_DATASETS:
        raise AdaptationError(f"triplets takes one prepared folder of {' or '.join(EVAL_DATASETS)}"
                              f", got {', '.join(prepared) or 'none'} (--prepared)")
    (dataset, folder), = prepared.items()
    load = registry.module(dataset).load
    # only SVHN has a training split in the study (the adapted metrics train on it)
    n_train = len(load(folder, "train")["images"]) if dataset == "svhn" else None
    arrays = build_triplet_file(dataset, n_train, len(load(folder, "test")["images"]), config)
    save_npz(out, arrays)
    print(f"{out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()
                                 if k.endswith("index")))
    return arrays


def _bank(job: Job, prepared: Mapping[str, Path], dataset: str, split: str, index: Tensor
          ) -> ImageBank:
    """The source images of ``split``, checked against the triplet indices into it."""
    bank = ImageBank(registry.module(dataset).load(prepared[dataset], split)["images"],
                     job.device)
    if int(index.max()) >= len(bank):
        raise AdaptationError(f"the {dataset} triplet file indexes {int(index.max()) + 1} "
                              f"{split} images, {prepared[dataset]} has {len(bank)}: rerun the "
                              f"adaptation_triplets rule")
    return bank


def feature_diffs(job: Job, extractor: FeatureExtractor, variants: Sequence[Variant],
                  images: Sequence[Tensor], grad: bool = False) -> list[dict]:
    """One extractor pass over the concatenated image sets; the per-channel differences of
    set 0 against each other set (with a graph only when ``grad``: a trained backbone), per
    variant (the adapter takes its :func:`~workflow.models.adapter.terms`)."""
    n = images[0].shape[0]
    with torch.set_grad_enabled(grad):
        with job.autocast():
            feats = extractor(torch.cat(list(images), 0))
        parts = [{t: f[j * n:(j + 1) * n] for t, f in feats.items()} for j in range(len(images))]
        return [per_channel_diffs(parts[0], p, variants) for p in parts[1:]]


def set_distances(job: Job, extractor: FeatureExtractor, adapter: FusedAdapter | None,
                  variants: Sequence[Variant], n: int, batch: int,
                  images_of: Callable[[slice], Sequence[Tensor]]) -> list[Tensor]:
    """Distances of set 0 to each other set of ``images_of(batch slice)`` over ``n`` items:
    ``[N, V, R]`` (``[N, V, 1]`` for the baseline) on the CPU, for triplets and BAPPS alike."""
    out: list[list[Tensor]] = []
    with torch.no_grad():
        for s in range(0, n, batch):
            diffs = feature_diffs(job, extractor, terms(variants),
                                  images_of(slice(s, min(n, s + batch))))
            out = out or [[] for _ in diffs]
            for part, d in zip(out, diffs, strict=True):
                part.append((adapter.distances(d) if adapter is not None
                             else baseline_distances(d, variants)).cpu())
    return [torch.cat(p) for p in out]


def triplet_2afc(job: Job, extractor: FeatureExtractor, adapter: FusedAdapter | None,
                 variants: Sequence[Variant], bank: ImageBank, trip: Mapping[str, Tensor],
                 pos: Tensor, size: int) -> Tensor:
    """``[V, R]`` 2AFC (ties count half) of a triplet set under the rankings ``pos``."""
    d0, d1 = set_distances(job, extractor, adapter, variants, len(trip["index"]),
                           int(job.setting("eval_batch_size")),
                           lambda sl: distort_batch(bank, trip, sl, size))
    return twoafc_rate(d0, d1, ranking_labels(trip["d0"], trip["d1"], pos.cpu()).unsqueeze(1))


def adaptation_step(job: Job, extractor: FeatureExtractor, adapter: FusedAdapter,
                    bank: ImageBank, idx: Tensor, pos: Tensor, size: int,
                    gen: torch.Generator) -> tuple[Tensor, int]:
    """One step's summed loss of every metric of ``adapter`` on source images ``idx``: fresh
    distortion pairs and parameters, then the dropout masks, from ``gen``; ``pos`` ([R, 6], on
    the device): the adapter's rankings."""
    n, dev = idx.shape[0], job.device
    d0, d1 = draw_pairs(n, gen, dev)
    trip = {"index": idx, "d0": d0, "d1": d1, "p0": sample_params(d0, gen),
            "p1": sample_params(d1, gen)}
    diffs0, diffs1 = feature_diffs(job, extractor, adapter.terms,  # a graph: a tuned backbone
                                   distort_batch(bank, trip, slice(None), size),
                                   grad=any(p.requires_grad for p in extractor.parameters()))
    return adapter.batch_loss(diffs0, diffs1, ranking_labels(d0, d1, pos), gen), n


def train(job: Job, config: Mapping[str, Any], net: str, run: int, rankings: Path,
          triplets: Sequence[Path], prepared: Mapping[str, Path], workdir: Path, out: Path
          ) -> dict[str, Any]:
    """Adapt every (comparison, ranking) metric of ``net`` for run ``run`` (seed + run) on
    SVHN train; write the adapter (:func:`workflow.training.save_model`), return its meta.
    ``triplets``: [the SVHN triplet file]; ``prepared``: {"svhn": folder}."""
    lossnet, size = LossNet.parse(net), int(config["image_size"])
    seed = int(config["seed"]) + int(run)
    orders = load_rankings(rankings)
    pos = positions(orders).to(job.device)
    variants = all_variants(config["comparisons"], config["channel_norm"])
    files = read_triplet_files(triplets)
    train_idx = torch.from_numpy(files["svhn"]["train_index"])
    val = triplet_set(files["svhn"], "val")
    bank = _bank(job, prepared, "svhn", "train", torch.cat([train_idx, val["index"]]))
    extractor = job.extractor(lossnet, config["normalize"])
    adapter = FusedAdapter(tap_channels(extractor, size, job.device), variants,
                           range(len(orders)), seed=seed, dropout=float(config["dropout"]),
                           sync_weight=float(config["sync_weight"])).to(job.device)
    opt = make_optimizer(adapter, config["lr"], config["betas"])
    sampler = EpochSampler(train_idx, int(config["batch_size"]), seed, job.device,
                           seed_stride=SEED_STRIDE)
    per_epoch = sampler.steps_per_epoch
    total = per_epoch * (int(config["epochs_constant"]) + int(config["epochs_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, constant_then_linear(total, per_epoch * int(config["epochs_constant"])))
    gen = torch.Generator(device=job.device).manual_seed(seed)

    def eval_fn(step: int) -> dict[str, float]:
        acc = triplet_2afc(job, extractor, adapter, variants, bank, val, pos, size)
        return {"val_2afc_mean": float(acc.mean()), "val_2afc_min": float(acc.min())}

    tc = TrainConfig(max_steps=total, checkpoint_every=per_epoch, seed=seed,
                     eval_every=per_epoch * int(job.setting("eval_every_epochs")),
                     log_every=max(1, min(50, per_epoch)))
    trainer = Trainer(job, workdir, {"adapter": adapter}, opt,
                      lambda step: adaptation_step(job, extractor, adapter, bank, sampler(step),
                                                   pos, size, gen),
                      tc, sched, eval_fn, post_step=lambda _s: adapter.clamp_(),
                      aux_modules={"lossnet": extractor}, generators={"triplets": gen},
                      key=resume_key(job, {"rankings": rankings, "prepared_svhn": prepared["svhn"],
                                           **{f"triplets_{i}": t for i, t in enumerate(triplets)}},
                                     arch=lossnet.arch, net=net, run=int(run)),
                      description=f"adaptation {lossnet.id} run {run}")
    result = trainer.fit()
    meta = {**adapter.describe(), "net": lossnet.id, "run": int(run), "seed": seed,
            "steps": result.steps, "wall_time_s": result.wall_time_s,
            "precision": job.precision, "device": str(job.device)}
    save_model(out, {"adapter": adapter}, meta)
    print(f"{out}: {len(variants)} comparisons x {len(orders)} rankings, {result.steps} steps")
    return meta


def bapps_scores(job: Job, extractor: FeatureExtractor, adapter: FusedAdapter | None,
           variants: Sequence[Variant], config: Mapping[str, Any], folder: Path) -> list[dict]:
    """BAPPS val rows per (comparison ``_v``, ranking ``_r``) (``bapps_rows``) of the baseline
    (``adapter`` None) or an adapter; ``config``: ``image_size``, ``bapps_2afc_subsets``,
    ``bapps_jnd_subsets`` (the adaptation's and the calibration's keys)."""
    size, batch = int(config["image_size"]), int(job.setting("eval_batch_size"))

    def dists(parts: Sequence[np.ndarray]) -> list[Tensor]:
        return set_distances(job, extractor, adapter, variants, len(parts[0]), batch,
                             lambda sl: [to_images(p[sl], job.device, size) for p in parts])

    twoafc, jnd = {}, {}
    for s in config["bapps_2afc_subsets"]:
        a = bapps.load(folder, "2afc", "val", s)
        twoafc[s] = (*dists([a["ref"], a["p0"], a["p1"]]),
                     torch.from_numpy(np.array(a["judge"], dtype=np.float32)))
    for s in config["bapps_jnd_subsets"]:
        a = bapps.load(folder, "jnd", "val", s)
        jnd[s] = (dists([a["p0"], a["p1"]])[0],
                  torch.from_numpy(np.array(a["same"], dtype=np.float32)))
    v_count, r_count = len(variants), (len(adapter.rankings) if adapter is not None else 1)
    return [{**row, "_v": v, "_r": r}
            for v in range(v_count) for r in range(r_count)
            for row in bapps_rows({s: (d0[:, v, r], d1[:, v, r], j)
                                   for s, (d0, d1, j) in twoafc.items()},
                                  {s: (d[:, v, r], same) for s, (d, same) in jnd.items()})]


def evaluate(job: Job, config: Mapping[str, Any], net: str, run: int | None, model: Path | None,
             rankings: Path, triplets: Sequence[Path], prepared: Mapping[str, Path],
             scores: Path, tuned: tuple[Any, FusedAdapter] | None = None) -> pd.DataFrame:
    """Score the baseline (``model`` None), one run's adapted metrics, or (``tuned``: an
    adapted net's backbone and adapter) the rankings of ``tuned[1]``, variant ``adapted_net``;
    write ``scores``. ``triplets``: the files of ``eval_datasets`` (any order); ``prepared``:
    their datasets (SVHN's train split holds the validation triplets) and ``bapps`` when
    ``config["bapps"]``. Returns the rows (per dataset and split, comparison and ranking).
    """
    lossnet, size = LossNet.parse(net), int(config["image_size"])
    pos = positions(load_rankings(rankings))
    if tuned is not None:
        extractor, adapter = tuned
        variants, pos = adapter.variants, pos[adapter.rankings]
    else:
        extractor = job.extractor(lossnet, config["normalize"])
        adapter, variants = None, all_variants(config["comparisons"], config["channel_norm"])
    if model is not None and tuned is None:
        adapter, _ = load_adapter(model, job.device)
        variants = adapter.variants
        if adapter.rankings != list(range(len(pos))):
            raise AdaptationError(f"{model} was trained for rankings {adapter.rankings}, "
                                  f"{rankings} has {len(pos)}: rerun adaptation_train")
    files = read_triplet_files(triplets)
    rows: list[dict] = []
    for dataset in config["eval_datasets"]:
        for split in ["test"] + (["val"] if "val_index" in files[dataset] else []):
            trip = triplet_set(files[dataset], split)
            # the validation triplets come from the training split of the dataset
            bank = _bank(job, prepared, dataset, "test" if split == "test" else "train",
                         trip["index"])
            acc = triplet_2afc(job, extractor, adapter, variants, bank, trip, pos, size)
            del bank
            rows += [{"dataset": dataset, "split": split, "_v": v, "_r": r, "metric": "2afc",
                      "value": float(acc[v, r]), "n": len(trip["index"])}
                     for v in range(acc.shape[0]) for r in range(acc.shape[1])]
    if config["bapps"]:
        rows += bapps_scores(job, extractor, adapter, variants, config, prepared["bapps"])
    out = []
    for row in rows:
        v, r = variants[row.pop("_v")], row.pop("_r")
        if adapter is not None:
            ranking = adapter.rankings[r]
        else:  # baseline BAPPS distances do not depend on a ranking; its triplet scores do
            ranking = None if row["dataset"].startswith("bapps") else r
        out.append({**row, "comparison": v.method, "channel_norm": v.channel_norm,
                    "ranking": ranking, "run": run,
                    "variant": ("baseline" if adapter is None else
                                "adapted" if tuned is None else "adapted_net")})
    df = score_frame(out, benchmark=BENCHMARK, arch=lossnet.arch, layer=lossnet.layer,
                     **job.provenance(lossnet.arch))
    write_parquet(df, scores)
    print(f"{scores}: {len(df)} rows")
    return df
