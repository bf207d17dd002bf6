"""Adaptation of deep perceptual similarity to random rankings of six distortions.

Protocol (Pihlgren et al. 2023, "Deep Perceptual Similarity is Adaptable to
Ambiguous Contexts"; facts in REFERENCE.md): a triplet is a source image
(resized to 64x64) and two copies distorted by two distinct distortions of
:mod:`workflow.distortions`; under ranking r the label is 0 when p0's
distortion comes earlier in r (p0 is "closer", BAPPS judge semantics) else 1.
A metric is adapted by training non-negative per-channel weights plus an LPIPS
ranking net G with BCE, the sync loss ``sync_weight * BCE(sigmoid(d0 - d1), label)``
while its batch 2AFC is <= 0.5, Adam, and a 5 constant + 5 linearly decaying epochs.

Fused training (DESIGN principle 1): the images of a triplet batch do not depend
on the ranking, so one extractor pass over ref / p0 / p1 and one set of
per-channel differences per comparison serve every (ranking, comparison)
metric. :class:`FusedAdapter` holds a ``[rankings x channels]`` weight matrix
per comparison and tap and K = comparisons x rankings ranking nets evaluated in
one einsum; the total loss is the *sum* of the metrics' losses, and their
parameters are disjoint, so each metric follows exactly the trajectory it would
follow alone (Adam is elementwise; tests check it).

Deviations from the reference code (also in docs/adaptation.md):
* all three images are ImageNet-normalised (the reference left the reference
  image raw);
* Dropout(0.5) acts on the position-averaged per-channel differences (one mask
  per image, tap and channel, shared by the metrics of a batch, drawn
  independently for the (ref, p0) and (ref, p1) sides), not per spatial position;
* channel weights start at 1 (the baseline metric), so training starts from it.

Subcommands (what rules/adaptation.smk calls): ``rankings``, ``triplets``,
``train``, ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflow import runtime
from workflow.compare import Variant, all_variants, per_channel_diffs, reduce_channels
from workflow.config import json_arg
from workflow.datasets.common import load_arrays
from workflow.distortions import (
    NAMES,
    apply_distortions,
    draw_pairs,
    positions,
    random_rankings,
    ranking_labels,
    resize,
    sample_params,
)
from workflow.lossnets import FeatureExtractor, LossNet, build_extractor, weights_id
from workflow.models.ranking import BatchedRankingNet
from workflow.results import atomic_path, config_hash, score_frame, write_json, write_parquet

BENCHMARK = "adaptation"
EVAL_DATASETS = ("svhn", "stl10")


# the defaults of workflow/schemas/adaptation.schema.yaml (a section may leave keys out)
DEFAULTS: dict[str, Any] = {
    "comparisons": ["spatial", "mean", "sort", "spatial+mean", "spatial+sort"], "channel_norm": [True],
    "rankings": 20, "ranking_seed": 0, "runs": 4, "seed": 0, "normalize": "imagenet", "image_size": 64,
    "batch_size": 1024, "eval_batch_size": 512, "epochs_constant": 5, "epochs_decay": 5,
    "eval_every_epochs": 1, "lr": 1e-3, "betas": [0.5, 0.999], "dropout": 0.5, "sync_weight": 10.0,
    "val_fraction": 0.2, "split_seed": 0, "triplet_seed": 0, "train_images": None, "val_triplets": None,
    "test_triplets": None, "eval_datasets": list(EVAL_DATASETS), "bapps": True,
    "bapps_2afc_subsets": ["traditional", "cnn", "superres", "deblur", "color", "frameinterp"],
    "bapps_jnd_subsets": ["traditional", "cnn"],
}


class AdaptationError(RuntimeError):
    pass


def with_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(cfg) - set(DEFAULTS) - {"lossnets"}
    if unknown:
        raise AdaptationError(f"unknown keys in config section adaptation: {sorted(unknown)}")
    return {**DEFAULTS, **cfg}


# the keys each rule depends on (its params, hence its rerun trigger): changing the list of
# loss networks or the number of runs never retrains a finished run
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "rankings": ("rankings", "ranking_seed"),
    "triplets": ("triplet_seed", "val_fraction", "split_seed", "train_images", "val_triplets",
                 "test_triplets"),
}
NOT_FOR_RUNS = ("lossnets", "runs")


def stage_config(section: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The part of config section ``adaptation`` that rule ``stage`` depends on."""
    full = with_defaults(section)
    if stage in STAGE_KEYS:
        return {k: full[k] for k in STAGE_KEYS[stage]}
    if stage == "train":  # evaluation-only keys do not change a training run
        skip = (*NOT_FOR_RUNS, "eval_datasets", "bapps", "bapps_2afc_subsets", "bapps_jnd_subsets")
        return {k: v for k, v in full.items() if k not in skip}
    if stage == "evaluate":
        return {k: v for k, v in full.items() if k not in NOT_FOR_RUNS}
    raise ValueError(f"unknown stage {stage!r}")


def select_nets(config: Mapping[str, Any], section: str) -> list[LossNet]:
    """Loss networks of ``config[section]["lossnets"]``: ``lpips_sets``, ``all`` or a list of ids."""
    chosen = config[section].get("lossnets", "lpips_sets")
    lpips = [LossNet(a, "lpips") for a in config["lossnets"].get("lpips_sets", [])]
    if chosen == "lpips_sets":
        return lpips
    if chosen == "all":
        from workflow.config import study_lossnets

        return list(dict.fromkeys(study_lossnets(config) + lpips))
    try:
        return list(dict.fromkeys(LossNet.parse(str(s)) for s in chosen))
    except ValueError as e:
        raise AdaptationError(f"config key {section}.lossnets: {e}") from None


def rule_eval_inputs(config: Mapping[str, Any], res: str, out: str) -> dict[str, str]:
    """Named inputs of the evaluation rules: triplet files, prepared manifests (+ BAPPS)."""
    ada = with_defaults(config["adaptation"])
    files = {f"triplets_{d}": f"{out}/adaptation/triplets/{d}.npz" for d in ada["eval_datasets"]}
    files |= {f"prepared_{d}": f"{res}/prepared/{d}/manifest.json" for d in ada["eval_datasets"]}
    if ada["bapps"]:
        files["bapps"] = f"{res}/prepared/bapps/manifest.json"
    return files


def rule_eval_args(config: Mapping[str, Any], res: str, inputs: Mapping[str, str]) -> str:
    """The ``--triplets / --prepared / --bapps`` arguments of ``evaluate`` for those inputs."""
    import shlex

    ada = with_defaults(config["adaptation"])
    q = shlex.quote
    args = []
    if ada["eval_datasets"]:
        args += ["--triplets", *(q(f"{d}={inputs[f'triplets_{d}']}") for d in ada["eval_datasets"])]
        args += ["--prepared", *(q(f"{d}={res}/prepared/{d}") for d in ada["eval_datasets"])]
    if ada["bapps"]:
        args += ["--bapps", q(f"{res}/prepared/bapps")]
    return " ".join(args)


# ----------------------------------------------------------------------------- rankings, triplets


def make_rankings(count: int, seed: int) -> dict[str, Any]:
    """The seeded rankings as stored in ``rankings.json`` (ids and names, position 0 first)."""
    orders = random_rankings(count, seed)
    return {"seed": int(seed), "distortions": list(NAMES), "rankings": orders,
            "names": [[NAMES[i] for i in o] for o in orders]}


def load_rankings(path: str | Path) -> list[list[int]]:
    data = json.loads(Path(path).read_text())
    if data.get("distortions") != list(NAMES):
        raise AdaptationError(f"{path}: written for distortions {data.get('distortions')}, this code "
                              f"has {list(NAMES)}; rerun the adaptation_rankings rule")
    return [list(map(int, r)) for r in data["rankings"]]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation split of ``n`` images (sorted index arrays)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"config key adaptation.val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_triplets(indices: np.ndarray, generator: torch.Generator, limit: int | None = None) -> dict[str, np.ndarray]:
    """One triplet per source image (a seeded subset of ``limit`` images if given)."""
    indices = np.asarray(indices, dtype=np.int64)
    if limit is not None and limit < len(indices):
        pick = torch.randperm(len(indices), generator=generator)[:limit].sort().values.numpy()
        indices = indices[pick]
    n = len(indices)
    d0, d1 = draw_pairs(n, generator)
    return {"index": indices, "d0": d0.numpy(), "d1": d1.numpy(),
            "p0": sample_params(d0, generator).numpy(), "p1": sample_params(d1, generator).numpy()}


def build_triplet_file(dataset: str, n_train: int | None, n_test: int, cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Arrays of ``{dataset}_triplets.npz``: fixed ``test_*`` (and for SVHN ``val_*`` + ``train_index``)."""
    g = torch.Generator().manual_seed(int(cfg["triplet_seed"]) * 1009 + zlib.crc32(dataset.encode()))
    out: dict[str, np.ndarray] = {}
    for k, v in make_triplets(np.arange(n_test), g, cfg.get("test_triplets")).items():
        out[f"test_{k}"] = v
    if n_train is not None:
        train_idx, val_idx = split_indices(n_train, float(cfg["val_fraction"]), int(cfg["split_seed"]))
        limit = cfg.get("train_images")
        if limit is not None and limit < len(train_idx):
            sub = torch.randperm(len(train_idx), generator=g)[:limit].sort().values.numpy()
            train_idx = train_idx[sub]
        out["train_index"] = train_idx
        for k, v in make_triplets(val_idx, g, cfg.get("val_triplets")).items():
            out[f"val_{k}"] = v
    return out


def triplet_set(arrays: Mapping[str, np.ndarray], split: str) -> dict[str, Tensor]:
    try:
        return {k: torch.from_numpy(np.asarray(arrays[f"{split}_{k}"])) for k in ("index", "d0", "d1", "p0", "p1")}
    except KeyError as e:
        raise AdaptationError(f"the triplet file has no {split!r} set ({e}); rerun adaptation_triplets") from None


# ----------------------------------------------------------------------------- data


def load_images(prepared_dir: str | Path, split: str) -> np.ndarray:
    """``{prepared_dir}/{split}_images.npy`` (uint8 [N, H, W, 3]), memory-mapped."""
    path = Path(prepared_dir) / f"{split}_images.npy"
    arr = load_arrays(prepared_dir, {"images": path.name})["images"]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise AdaptationError(f"{path}: expected uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def distort_batch(images: Tensor, trip: Mapping[str, Tensor], sl: slice | Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """ref, p0, p1 float [B, 3, size, size] on ``images``' device for the triplets ``sl``."""
    idx = trip["index"][sl].to(images.device)
    ref = resize(images[idx], size)
    dev = images.device
    p0 = apply_distortions(ref, trip["d0"][sl].to(dev), trip["p0"][sl].to(dev))
    p1 = apply_distortions(ref, trip["d1"][sl].to(dev), trip["p1"][sl].to(dev))
    return ref, p0, p1


def triplet_diffs(extractor: FeatureExtractor, ref: Tensor, p0: Tensor, p1: Tensor,
                  variants: Sequence[Variant], ac) -> tuple[dict, dict]:
    """One extractor pass over ref / p0 / p1; per-channel differences of both pairs (no grad)."""
    n = ref.shape[0]
    with torch.no_grad():
        with ac:
            feats = extractor(torch.cat([ref, p0, p1], 0))
        fr = {t: f[:n] for t, f in feats.items()}
        f0 = {t: f[n:2 * n] for t, f in feats.items()}
        f1 = {t: f[2 * n:] for t, f in feats.items()}
        return per_channel_diffs(fr, f0, variants), per_channel_diffs(fr, f1, variants)


def tap_channels(extractor: FeatureExtractor, size: int, device: torch.device) -> dict[int, int]:
    with torch.no_grad():
        feats = extractor(torch.zeros(1, 3, size, size, device=device))
    return {t: int(f.shape[1]) for t, f in feats.items()}


# ----------------------------------------------------------------------------- the fused adapter


def metric_seed(seed: int, ranking: int, variant: Variant) -> int:
    """Initialisation seed of one (ranking, comparison) metric, the same fused or alone."""
    return zlib.crc32(f"{seed}/{ranking}/{variant.name}".encode())


class FusedAdapter(nn.Module):
    """Every (comparison, ranking) metric of one loss network and run, trained together.

    ``channel_weights[f"{v}_{tap}"]``: ``[R, C]`` non-negative weights of comparison
    ``variants[v]`` at ``tap`` for the R rankings; ``rank_net``: K = V x R ranking
    nets, metric ``k = v * R + r``.
    """

    def __init__(self, channels: Mapping[int, int], variants: Sequence[Variant], rankings: Sequence[int],
                 seed: int = 0, dropout: float = 0.5, sync_weight: float = 10.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"config key adaptation.dropout must be in [0, 1), got {dropout}")
        self.variants = list(variants)
        self.rankings = [int(r) for r in rankings]
        self.taps = sorted(int(t) for t in channels)
        self.dropout = float(dropout)
        self.sync_weight = float(sync_weight)
        r = len(self.rankings)
        self.channel_weights = nn.ParameterDict({
            f"{v}_{t}": nn.Parameter(torch.ones(r, int(channels[t])))
            for v in range(len(self.variants)) for t in self.taps
        })
        self.rank_net = BatchedRankingNet([metric_seed(seed, rk, var) for var in self.variants for rk in self.rankings])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.variants), len(self.rankings)

    def weights(self, v: int) -> dict[int, Tensor]:
        return {t: self.channel_weights[f"{v}_{t}"] for t in self.taps}

    def dropout_masks(self, n: int, generator: torch.Generator | None, device: torch.device) -> dict[int, Tensor] | None:
        if not self.training or self.dropout == 0.0:
            return None
        keep = 1.0 - self.dropout
        return {t: (torch.rand(n, self.channel_weights[f"0_{t}"].shape[1], generator=generator, device=device)
                    < keep).float() / keep for t in self.taps}

    def distances(self, diffs: Mapping[Variant, Mapping[int, Tensor]], masks: Mapping[int, Tensor] | None = None) -> Tensor:
        """``[N, V, R]`` adapted distances from per-channel differences."""
        out = []
        for v, var in enumerate(self.variants):
            d = diffs[var]
            if masks is not None:
                d = {t: d[t] * masks[t] for t in self.taps}
            else:
                d = {t: d[t] for t in self.taps}
            out.append(reduce_channels(d, self.weights(v)))
        return torch.stack(out, dim=1)

    def loss(self, d0: Tensor, d1: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Summed loss, per-metric losses ``[V, R]`` and per-metric batch 2AFC ``[V, R]``."""
        n, v, r = d0.shape
        if labels.shape != (n, r):
            raise ValueError(f"labels must be [N, R] = [{n}, {r}], got {tuple(labels.shape)}")
        target = labels.unsqueeze(1).expand(n, v, r).float()
        logits = self.rank_net(d0.reshape(n, v * r), d1.reshape(n, v * r)).view(n, v, r)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0)
        with torch.no_grad():
            acc = ((d0 < d1).float() * (1 - target) + (d1 < d0).float() * target
                   + 0.5 * (d0 == d1).float()).mean(0)
        sync = F.binary_cross_entropy_with_logits(d0 - d1, target, reduction="none").mean(0)
        per = bce + self.sync_weight * sync * (acc <= 0.5).float()
        return per.sum(), per.detach(), acc

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.channel_weights.values():
            p.clamp_(min=0.0)

    def describe(self) -> dict[str, Any]:
        return {"variants": [[v.method, v.channel_norm] for v in self.variants], "rankings": self.rankings,
                "taps": {str(t): int(self.channel_weights[f"0_{t}"].shape[1]) for t in self.taps},
                "dropout": self.dropout, "sync_weight": self.sync_weight}


def lr_lambda(total_steps: int, constant_steps: int):
    """LR factor: 1 for ``constant_steps``, then linear to 0 at ``total_steps``."""
    decay = max(1, total_steps - constant_steps)

    def f(step: int) -> float:
        return 1.0 if step < constant_steps else max(0.0, (total_steps - step) / decay)

    return f


def make_optimizer(adapter: FusedAdapter, cfg: Mapping[str, Any]) -> torch.optim.Adam:
    return torch.optim.Adam(adapter.parameters(), lr=float(cfg["lr"]), betas=tuple(cfg["betas"]))


# ----------------------------------------------------------------------------- training


def variants_of(cfg: Mapping[str, Any]) -> list[Variant]:
    return all_variants(cfg["comparisons"], cfg["channel_norm"])


def _extractor(net: LossNet, lossnet: Mapping[str, Any], cfg: Mapping[str, Any], device: torch.device) -> FeatureExtractor:
    ext = build_extractor(net.arch, lossnets=[net], weights=lossnet["weights"], weights_dir=lossnet["weights_dir"],
                          seed=int(lossnet.get("seed", 0)), normalize=cfg.get("normalize", "imagenet"))
    return ext.to(device)


def _to_device_images(arr: np.ndarray, device: torch.device) -> Tensor:
    # the whole split as uint8 on the device (SVHN train is 0.2 GB): no loader in the loop
    return torch.from_numpy(np.array(arr)).to(device)


def adaptation_step(extractor: FeatureExtractor, adapter: FusedAdapter, images: Tensor, idx: Tensor,
                    pos: Tensor, size: int, gen: torch.Generator, ac) -> tuple[Tensor, int]:
    """One training step's loss for every metric of ``adapter`` on source images ``idx``.

    Fresh distortion pairs and parameters are drawn from ``gen``; one extractor pass over
    ref / p0 / p1 serves all metrics; ``pos`` ([R, 6]) holds the adapter's rankings.
    """
    device = images.device
    n = idx.shape[0]
    d0, d1 = draw_pairs(n, gen, device)
    trip = {"index": idx, "d0": d0, "d1": d1, "p0": sample_params(d0, gen), "p1": sample_params(d1, gen)}
    ref, x0, x1 = distort_batch(images, trip, slice(None), size)
    diffs0, diffs1 = triplet_diffs(extractor, ref, x0, x1, adapter.variants, ac)
    with torch.autocast(device.type, enabled=False):  # channel weights and G in fp32
        dist0 = adapter.distances(diffs0, adapter.dropout_masks(n, gen, device))
        dist1 = adapter.distances(diffs1, adapter.dropout_masks(n, gen, device))
        total, _, _ = adapter.loss(dist0, dist1, ranking_labels(d0, d1, pos))
    return total, n


def train(net: LossNet, run: int, cfg: Mapping[str, Any], lossnet: Mapping[str, Any], common: Mapping[str, Any],
          rankings_path: Path, triplets_path: Path, prepared: Path, workdir: Path, out: Path) -> dict[str, Any]:
    """Fused adaptation of every (comparison, ranking) metric of ``net`` for one run."""
    from workflow.training import TrainConfig, Trainer

    device = runtime.pick_device(common.get("device", "auto"))
    precision = runtime.resolve_precision(common.get("precision", "auto"), device)
    runtime.configure(device, precision, runtime.job_threads())
    seed = int(cfg["seed"]) + int(run)
    orders = load_rankings(rankings_path)
    pos = positions(orders).to(device)
    variants = variants_of(cfg)
    size = int(cfg["image_size"])
    arrays = np.load(triplets_path)
    train_idx = torch.from_numpy(arrays["train_index"]).to(device)
    val = triplet_set(arrays, "val")
    images = _to_device_images(load_images(prepared, "train"), device)
    if int(train_idx.max()) >= images.shape[0]:
        raise AdaptationError(f"{triplets_path} indexes {int(train_idx.max()) + 1} SVHN train images, "
                              f"{prepared} has {images.shape[0]}: rerun adaptation_triplets")
    extractor = _extractor(net, lossnet, cfg, device)
    adapter = FusedAdapter(tap_channels(extractor, size, device), variants, range(len(orders)), seed=seed,
                           dropout=float(cfg["dropout"]), sync_weight=float(cfg["sync_weight"])).to(device)
    opt = make_optimizer(adapter, cfg)
    batch = int(cfg["batch_size"])
    steps_per_epoch = math.ceil(len(train_idx) / batch)
    total = steps_per_epoch * (int(cfg["epochs_constant"]) + int(cfg["epochs_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, steps_per_epoch * int(cfg["epochs_constant"])))
    gen = torch.Generator(device=device).manual_seed(seed)
    perms: dict[int, Tensor] = {}
    ac = runtime.autocast(device, precision)

    def epoch_perm(epoch: int) -> Tensor:
        # derived from (seed, epoch) alone, so a resumed run sees the same epoch order
        if epoch not in perms:
            perms.clear()
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(len(train_idx), generator=g).to(device)
        return perms[epoch]

    def step_fn(step: int):
        epoch, i = divmod(step, steps_per_epoch)
        idx = train_idx[epoch_perm(epoch)[i * batch:(i + 1) * batch]]
        return adaptation_step(extractor, adapter, images, idx, pos, size, gen, ac)

    def eval_fn(step: int) -> dict[str, float]:
        d0, d1 = adapted_distances(extractor, adapter, images, val, variants, size,
                                   int(cfg["eval_batch_size"]), ac)
        acc = twoafc_per_ranking(d0, d1, ranking_labels(val["d0"], val["d1"], pos).cpu())
        return {"val_2afc_mean": float(acc.mean()), "val_2afc_min": float(acc.min())}

    tc = TrainConfig(max_steps=total, eval_every=steps_per_epoch * int(cfg.get("eval_every_epochs", 1)),
                     checkpoint_every=steps_per_epoch, precision=precision, seed=seed,
                     device=str(device), log_every=max(1, min(50, steps_per_epoch)))
    trainer = Trainer(workdir, modules={"adapter": adapter}, optimizer=opt, scheduler=sched, step_fn=step_fn,
                      eval_fn=eval_fn, post_step=lambda _s: adapter.clamp_(), config=tc,
                      aux_modules={"lossnet": extractor}, generators={"triplets": gen},
                      fingerprint=config_hash({"cfg": dict(cfg), "lossnet": dict(lossnet), "run": run}),
                      description=f"adaptation {net.id} run {run}")
    result = trainer.fit()
    state = {"adapter": {k: v.detach().cpu() for k, v in adapter.state_dict().items()},
             "meta": {**adapter.describe(), "net": net.id, "run": int(run), "seed": seed, "steps": result.steps,
                      "wall_time_s": result.wall_time_s, "precision": precision, "device": str(device)}}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return state["meta"]


def load_adapter(path: str | Path, device: torch.device) -> tuple[FusedAdapter, dict[str, Any]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    meta = state["meta"]
    adapter = FusedAdapter({int(t): c for t, c in meta["taps"].items()},
                           [Variant(m, bool(n)) for m, n in meta["variants"]], meta["rankings"],
                           dropout=meta["dropout"], sync_weight=meta["sync_weight"])
    adapter.load_state_dict(state["adapter"])
    return adapter.to(device).eval(), meta


# ----------------------------------------------------------------------------- evaluation


def _batches(n: int, batch: int) -> Iterator[slice]:
    for s in range(0, n, batch):
        yield slice(s, min(n, s + batch))


def adapted_distances(extractor: FeatureExtractor, adapter: FusedAdapter | None, images: Tensor,
                      trip: Mapping[str, Tensor], variants: Sequence[Variant], size: int, batch: int,
                      ac) -> tuple[Tensor, Tensor]:
    """``d0, d1``: ``[N, V, R]`` with an adapter, ``[N, V, 1]`` for the baseline (weights 1)."""
    out0, out1 = [], []
    with torch.no_grad():
        for sl in _batches(int(trip["index"].shape[0]), batch):
            ref, x0, x1 = distort_batch(images, trip, sl, size)
            diffs0, diffs1 = triplet_diffs(extractor, ref, x0, x1, variants, ac)
            out0.append(_reduce(diffs0, adapter, variants).cpu())
            out1.append(_reduce(diffs1, adapter, variants).cpu())
    return torch.cat(out0), torch.cat(out1)


def _reduce(diffs: Mapping[Variant, Mapping[int, Tensor]], adapter: FusedAdapter | None,
            variants: Sequence[Variant]) -> Tensor:
    if adapter is not None:
        return adapter.distances(diffs)
    return torch.stack([reduce_channels(diffs[v]) for v in variants], dim=1).unsqueeze(-1)


def twoafc_per_ranking(d0: Tensor, d1: Tensor, labels: Tensor) -> Tensor:
    """``[V, R]`` 2AFC (ties count half) of distances ``[N, V, R or 1]`` against labels ``[N, R]``."""
    t = labels.unsqueeze(1).float()
    s = (d0 < d1).float() * (1 - t) + (d1 < d0).float() * t + 0.5 * (d0 == d1).float()
    return s.mean(0)


def bapps_scores(extractor: FeatureExtractor, adapter: FusedAdapter | None, prepared: Path,
                 variants: Sequence[Variant], cfg: Mapping[str, Any], device: torch.device, ac) -> list[dict]:
    """2AFC per val subset + mean, JND AP per subset + pooled, per (variant, ranking)."""
    from workflow.datasets import bapps
    from workflow.metrics.similarity import jnd_average_precision, score_2afc

    batch, size = int(cfg["eval_batch_size"]), int(cfg["image_size"])
    rows: list[dict] = []
    twoafc: dict[tuple[int, int], list[float]] = {}

    def load(kind: str, subset: str) -> dict[str, np.ndarray]:
        return bapps.load(prepared, kind, "val", subset)

    def dists(parts: Sequence[np.ndarray], n: int) -> list[Tensor]:
        outs: list[list[Tensor]] = [[] for _ in parts[1:]]
        with torch.no_grad():
            for sl in _batches(n, batch):
                xs = [resize(torch.from_numpy(np.asarray(p[sl])).to(device), size) for p in parts]
                with ac:
                    feats = extractor(torch.cat(xs, 0))
                m = sl.stop - sl.start
                fr = {t: f[:m] for t, f in feats.items()}
                for j in range(1, len(parts)):
                    fj = {t: f[j * m:(j + 1) * m] for t, f in feats.items()}
                    outs[j - 1].append(_reduce(per_channel_diffs(fr, fj, variants), adapter, variants).cpu())
        return [torch.cat(o) for o in outs]

    for subset in cfg["bapps_2afc_subsets"]:
        a = load("2afc", subset)
        d0, d1 = dists([a["ref"], a["p0"], a["p1"]], len(a["judge"]))
        judge = torch.from_numpy(np.asarray(a["judge"], dtype=np.float32))
        for v in range(d0.shape[1]):
            for r in range(d0.shape[2]):
                s = score_2afc(d0[:, v, r], d1[:, v, r], judge).mean
                twoafc.setdefault((v, r), []).append(s)
                rows.append({"dataset": "bapps-2afc", "split": subset, "_v": v, "_r": r, "metric": "2afc",
                             "value": s, "n": len(judge)})
    for (v, r), vals in twoafc.items():
        rows.append({"dataset": "bapps-2afc", "split": "mean", "_v": v, "_r": r, "metric": "2afc",
                     "value": float(np.mean(vals)), "n": len(vals)})
    pooled: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
    for subset in cfg["bapps_jnd_subsets"]:
        a = load("jnd", subset)
        (d,) = dists([a["p0"], a["p1"]], len(a["same"]))
        same = torch.from_numpy(np.asarray(a["same"], dtype=np.float32))
        for v in range(d.shape[1]):
            for r in range(d.shape[2]):
                pooled.setdefault((v, r), []).append((d[:, v, r], same))
                rows.append({"dataset": "bapps-jnd", "split": subset, "_v": v, "_r": r, "metric": "jnd_ap",
                             "value": jnd_average_precision(d[:, v, r], same), "n": len(same)})
    if len(cfg["bapps_jnd_subsets"]) > 1:
        for (v, r), parts in pooled.items():
            d = torch.cat([p[0] for p in parts])
            s = torch.cat([p[1] for p in parts])
            rows.append({"dataset": "bapps-jnd", "split": "pooled", "_v": v, "_r": r, "metric": "jnd_ap",
                         "value": jnd_average_precision(d, s), "n": len(s)})
    return rows


def evaluate(net: LossNet, run: int | None, cfg: Mapping[str, Any], lossnet: Mapping[str, Any],
             common: Mapping[str, Any], rankings_path: Path, triplets: Mapping[str, Path],
             prepared: Mapping[str, Path], bapps_dir: Path | None, adapter_path: Path | None) -> pd.DataFrame:
    """Scores of the baseline (``adapter_path`` None) or of one run's adapted metrics."""
    t0 = time.perf_counter()
    device = runtime.pick_device(common.get("device", "auto"))
    precision = runtime.resolve_precision(common.get("precision", "auto"), device)
    runtime.configure(device, precision, runtime.job_threads())
    ac = runtime.autocast(device, precision)
    pos = positions(load_rankings(rankings_path))
    extractor = _extractor(net, lossnet, cfg, device)
    size, batch = int(cfg["image_size"]), int(cfg["eval_batch_size"])
    adapter = None
    variants = variants_of(cfg)
    if adapter_path is not None:
        adapter, _meta = load_adapter(adapter_path, device)
        variants = adapter.variants
        if adapter.rankings != list(range(len(pos))):
            raise AdaptationError(f"{adapter_path} was trained for rankings {adapter.rankings}, "
                                  f"{rankings_path} has {len(pos)}: rerun adaptation_train")
    rows: list[dict] = []
    for dataset in cfg["eval_datasets"]:
        if dataset not in triplets or dataset not in prepared:
            raise AdaptationError(f"config key adaptation.eval_datasets lists {dataset!r} but no triplet file "
                                  f"or prepared folder was given for it")
        arrays = np.load(triplets[dataset])
        for split in ["test"] + (["val"] if "val_index" in arrays else []):
            trip = triplet_set(arrays, split)
            # the validation triplets come from the training split of the dataset
            src = _to_device_images(load_images(prepared[dataset], "test" if split == "test" else "train"), device)
            if int(trip["index"].max()) >= src.shape[0]:
                raise AdaptationError(f"{triplets[dataset]} does not fit {prepared[dataset]}: "
                                      f"rerun adaptation_triplets")
            d0, d1 = adapted_distances(extractor, adapter, src, trip, variants, size, batch, ac)
            del src
            acc = twoafc_per_ranking(d0, d1, ranking_labels(trip["d0"], trip["d1"], pos))
            for v in range(acc.shape[0]):
                for r in range(acc.shape[1]):
                    rows.append({"dataset": dataset, "split": split, "_v": v, "_r": r, "metric": "2afc",
                                 "value": float(acc[v, r]), "n": int(trip["index"].shape[0])})
    bapps_rows = []
    if bapps_dir is not None:
        bapps_rows = bapps_scores(extractor, adapter, bapps_dir, variants, cfg, device, ac)
    wall = time.perf_counter() - t0
    out = []
    for row in rows + bapps_rows:
        v, r = row.pop("_v"), row.pop("_r")
        var = variants[v]
        if adapter is not None:
            ranking = adapter.rankings[r]
        else:  # baseline BAPPS distances do not depend on a ranking; its triplet scores do (labels)
            ranking = None if row["dataset"].startswith("bapps") else r
        out.append({**row, "comparison": var.method, "channel_norm": var.channel_norm, "ranking": ranking,
                    "run": run, "variant": "baseline" if adapter is None else "adapted"})
    return score_frame(out, benchmark=BENCHMARK, arch=net.arch, layer=net.layer,
                       config_hash=config_hash(dict(cfg)), weights_id=weights_id(net.arch, lossnet["weights"]),
                       device=str(device), precision=precision, wall_time_s=wall)


# ----------------------------------------------------------------------------- CLI


def _pairs(items: Sequence[str], what: str) -> dict[str, Path]:
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--{what} takes NAME=PATH items, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = Path(v)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow benchmarks.adaptation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rankings", help="write the seeded random rankings")
    r.add_argument("--config", type=json_arg, required=True)
    r.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("triplets", help="fixed evaluation (and SVHN validation) triplets of one dataset")
    t.add_argument("--config", type=json_arg, required=True)
    t.add_argument("--dataset", choices=EVAL_DATASETS, required=True)
    t.add_argument("--prepared", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    for name in ("train", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--config", type=json_arg, required=True)
        p.add_argument("--lossnet", type=json_arg, required=True)
        p.add_argument("--common", type=json_arg, required=True)
        p.add_argument("--net", required=True, help="loss network id, e.g. alexnet/lpips")
        p.add_argument("--rankings", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--run", type=int, default=None)
        if name == "train":
            p.add_argument("--triplets", type=Path, required=True, help="svhn triplet file")
            p.add_argument("--prepared", type=Path, required=True, help="prepared SVHN folder")
            p.add_argument("--workdir", type=Path, required=True)
        else:
            p.add_argument("--triplets", nargs="+", default=[], help="DATASET=PATH")
            p.add_argument("--prepared", nargs="+", default=[], help="DATASET=DIR")
            p.add_argument("--bapps", type=Path, default=None, help="prepared BAPPS folder")
            p.add_argument("--adapter", type=Path, default=None, help="adapter.pt (omit for the baseline)")
    args = ap.parse_args(argv)
    cfg = with_defaults(args.config)
    if args.cmd == "rankings":
        write_json(make_rankings(int(cfg["rankings"]), int(cfg["ranking_seed"])), args.out)
        return 0
    if args.cmd == "triplets":
        test = load_images(args.prepared, "test")
        n_train = load_images(args.prepared, "train").shape[0] if args.dataset == "svhn" else None
        arrays = build_triplet_file(args.dataset, n_train, test.shape[0], cfg)
        with atomic_path(args.out, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        print(f"{args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items() if k.endswith("index")))
        return 0
    net = LossNet.parse(args.net)
    if args.cmd == "train":
        if args.run is None:
            raise SystemExit("train needs --run")
        meta = train(net, args.run, cfg, args.lossnet, args.common, args.rankings, args.triplets, args.prepared,
                     args.workdir, args.out)
        print(json.dumps(meta))
        return 0
    df = evaluate(net, args.run, cfg, args.lossnet, args.common, args.rankings, _pairs(args.triplets, "triplets"),
                  _pairs(args.prepared, "prepared"), args.bapps, args.adapter)
    write_parquet(df, args.out)
    print(f"{args.out}: {len(df)} rows")
    return 0


__all__ = ["FusedAdapter", "evaluate", "main", "make_rankings", "make_triplets", "train"]
