"""Benchmark 4: an autoencoder trained on a deep perceptual loss, scored by MLPs on its codes.

Per loss network (or the pixel-MSE baseline, net ``pixel``), dataset and run (docs/autoencoder.md):
``train`` the autoencoder on the unlabelled split, keeping its best epoch; then, in one
process, ``encode`` the labelled ``train`` and ``test`` splits (kept while model, data and
encode config stay the same) and ``fit_mlps`` the MLP grid on the codes (the score: the test
accuracy of the MLP with the best validation accuracy). Splits are seeded with ``seed``, the
same for every loss network; ``run`` shifts only the training seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from workflow.archs import LossNet, UnknownLossNetError
from workflow.datasets import stl10, svhn
from workflow.datasets.bank import EpochSampler, ImageBank
from workflow.files import content_id, save_npz, write_parquet
from workflow.job import Job, seed_everything
from workflow.lossnets import feature_loss
from workflow.models.autoencoder import ConvAutoencoder
from workflow.models.mlp import BEST_VARIANT, fit_grid, score_rows
from workflow.results import score_frame
from workflow.training import TrainConfig, Trainer, load_model, make_adam, resume_key, save_model

__all__ = ["BEST_VARIANT", "DATASETS", "MIN_BATCH", "PIXEL", "DatasetSpec", "encode",
           "fit_mlps", "inputs", "load_autoencoder", "load_split", "parse_net",
           "read_codes", "reconstruction_loss", "seeded_split", "seeded_subset", "train"]

PIXEL = "pixel"  # net id of the pixel-MSE baseline (arch == layer == "" in the scores table)
MIN_BATCH = 2  # a trailing training batch of one item is dropped: BatchNorm cannot train on it
CODES = ("train_codes", "train_labels", "test_codes", "test_labels", "test_pixel_mse")


class DatasetSpec(NamedTuple):
    """A dataset's checked reader, the unlabelled split the autoencoder trains on, the reflection
    padding on each side, the autoencoder's input side. The MLPs use ``train`` and ``test``."""

    load: Callable[[Path, str], dict[str, np.ndarray]]
    ae_split: str
    pad: int
    size: int


DATASETS = {"svhn": DatasetSpec(svhn.load, "extra", 16, svhn.SIDE + 32),
            "stl10": DatasetSpec(stl10.load, "unlabeled", 0, stl10.SIDE)}
N_CLASSES = 10


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown autoencoder dataset {name!r} (--dataset, config key "
                         f"autoencoder.datasets); known: {', '.join(DATASETS)}")
    return DATASETS[name]


def parse_net(net: str) -> LossNet | None:
    """``"pixel"`` -> None (the baseline); ``"alexnet/2"`` -> its LossNet."""
    try:
        return None if net == PIXEL else LossNet.parse(net)
    except UnknownLossNetError as e:
        raise UnknownLossNetError(f"--net (config key autoencoder.lossnets): {e}") from None


def seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded draw of ``limit`` of ``n`` items (all when ``limit`` is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 0x5EB5E7])
    return np.sort(rng.choice(n, size=int(limit), replace=False))


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``1 - val_fraction`` / ``val_fraction`` split of ``range(n)`` (both sorted)."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 2:
        raise ValueError(f"{n} items are too few for a {val_fraction:.0%} validation split "
                         f"(config keys autoencoder.val_fraction and the max_* caps)")
    perm = np.random.default_rng([seed, 0x5B117]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_split(prepared: Mapping[str, Path], dataset: str, split: str, limit: int | None,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 [N, side, side, 3]) and labels (int64) of a seeded draw of one split,
    read (and checked) by the dataset's own ``load``."""
    arrays = _spec(dataset).load(prepared[dataset], split)
    idx = seeded_subset(len(arrays["images"]), limit, seed)
    return (np.ascontiguousarray(arrays["images"][idx]),
            np.asarray(arrays["labels"][idx], dtype=np.int64))


def inputs(job: Job, images: np.ndarray, spec: DatasetSpec) -> Callable[[Tensor], Tensor]:
    """``fn(idx)``: the autoencoder's float input [B, 3, size, size] of items ``idx`` of an
    :class:`ImageBank` of ``images`` (reflect-padded; channels_last where the job uses it)."""
    return partial(ImageBank(images, job.device).images, pad=spec.pad,
                   channels_last=job.channels_last)


def _key(job: Job, net: str, dataset: str, run: int, inputs: Mapping[str, Path]) -> dict:
    # what a checkpoint belongs to: the stage config, the job and its inputs' content
    arch = getattr(parse_net(net), "arch", None)
    return resume_key(job, inputs, arch=arch, net=net, dataset=dataset, run=run)


def reconstruction_loss(job: Job, net: LossNet | None, normalize: str
                        ) -> tuple[Callable[[Tensor, Tensor], Tensor], nn.Module | None]:
    """``loss(output, target)`` and the loss network (None for the pixel baseline)."""
    if net is None:
        return (lambda out, x: torch.mean((out.float() - x.float()) ** 2)), None
    extractor, taps = job.extractor(net, normalize), net.taps
    return (lambda out, x: feature_loss(extractor, taps, out, x)), extractor


def train(job: Job, config: Mapping[str, Any], net: str, dataset: str, run: int | None,
          prepared: Mapping[str, Path], workdir: Path, out: Path) -> dict[str, Any]:
    """Train one autoencoder (resuming from ``workdir``), save its best epoch to ``out`` and
    return its meta; ``net``: ``arch/layer`` or ``pixel``, ``prepared``: ``{dataset: dir}``."""
    spec, lossnet, run = _spec(dataset), parse_net(net), int(run or 0)
    tcfg, seed = config["train"], int(config["seed"])
    images, _ = load_split(prepared, dataset, spec.ae_split, tcfg["max_images"], seed)
    tr, va = seeded_split(len(images), float(config["val_fraction"]), seed)
    seed_everything(seed + run)  # the initial weights (the harness reseeds itself)
    model = ConvAutoencoder(spec.size, int(tcfg["code_size"]))
    loss_fn, extractor = reconstruction_loss(job, lossnet, tcfg["normalize"])
    opt = make_adam(model.parameters(), tcfg["lr"], job.device)
    sampler = EpochSampler(torch.from_numpy(tr), int(tcfg["batch_size"]), seed + run,
                           job.device, min_batch=MIN_BATCH)
    spe, batch = sampler.steps_per_epoch, inputs(job, images, spec)
    val, eval_bs = torch.from_numpy(va), int(job.setting("eval_batch_size"))

    def step_fn(step: int):
        x = batch(sampler(step))
        return loss_fn(model(x), x), x.shape[0]

    def eval_fn(step: int) -> dict[str, float]:
        total = 0.0
        with job.autocast():
            for i in range(0, len(val), eval_bs):
                x = batch(val[i:i + eval_bs])
                total += float(loss_fn(model(x), x)) * x.shape[0]
        return {"val_loss": total / len(val)}

    trainer = Trainer(
        job, workdir, modules={"autoencoder": model}, optimizer=opt, step_fn=step_fn,
        eval_fn=eval_fn, aux_modules={"lossnet": extractor} if extractor is not None else None,
        # one evaluation (and by default one checkpoint) per epoch
        config=TrainConfig(max_steps=int(tcfg["epochs"]) * spe, eval_every=spe,
                           checkpoint_every=job.setting("train")["checkpoint_every"] or spe,
                           seed=seed + run, select_metric="val_loss", select_mode="min",
                           patience=int(tcfg["patience"]), log_every=max(1, min(100, spe))),
        key=_key(job, net, dataset, run, {dataset: prepared[dataset]}),
        description=f"autoencoder {net} {dataset} run{run}")
    result = trainer.fit()  # restores the best epoch's weights
    best = None if result.best_step is None else result.best_step // spe
    meta = {"size": spec.size, "code_size": model.code_size, "net": net, "dataset": dataset,
            "run": run, "n_train": len(tr), "n_val": len(va), "steps_per_epoch": spe,
            "steps": result.steps, "stop_reason": result.stop_reason, "best_epoch": best,
            "best_val_loss": result.best_metric, "epochs_run": -(-result.steps // spe),
            "key": trainer.fingerprint,  # the fused job's test of a finished model
            **job.provenance(lossnet and lossnet.arch, result.wall_time_s)}
    save_model(out, {"autoencoder": model}, meta)
    print(f"{out}: best epoch {best}, val loss {result.best_metric} ({result.stop_reason}, "
          f"{result.wall_time_s:.1f}s)", flush=True)
    return meta


def load_autoencoder(path: Path) -> tuple[ConvAutoencoder, dict[str, Any]]:
    """The autoencoder of a ``train`` model file (on the CPU, eval mode) and its meta."""
    built: dict[str, nn.Module] = {}

    def build(meta: dict[str, Any]) -> dict[str, nn.Module]:
        if "size" not in meta or "code_size" not in meta:
            raise ValueError(f"{path} is not an autoencoder model file (its meta has no size "
                             f"and code_size); rerun the train_autoencoder rule")
        built["autoencoder"] = ConvAutoencoder(int(meta["size"]), int(meta["code_size"]))
        return built

    meta = load_model(path, build)
    return built["autoencoder"].eval(), meta


@torch.no_grad()
def encode(job: Job, config: Mapping[str, Any], dataset: str, model: Path,
           prepared: Mapping[str, Path], out: Path) -> Path:
    """Encode the labelled ``train`` and the ``test`` split, each image once, with ``model``
    (the file of ``train``; ``config`` the ``encode`` stage's) into ``out``, a ``codes.npz``:
    ``{train,test}_{codes,labels}``, ``test_pixel_mse`` (of the test reconstructions) and
    ``key`` (what they were made from)."""
    spec = _spec(dataset)
    ae, meta = load_autoencoder(model)
    if meta.get("dataset") != dataset:
        raise ValueError(f"{model} was trained on {meta.get('dataset')!r}, not --dataset "
                         f"{dataset!r}; pass the model of the same job folder")
    ae = ae.to(job.device, memory_format=torch.channels_last if job.channels_last
               else torch.preserve_format)
    bs, arrays, sq, count = int(job.setting("encode")["batch_size"]), {}, 0.0, 0
    for split in ("train", "test"):
        images, arrays[f"{split}_labels"] = load_split(
            prepared, dataset, split, config["encode"][f"max_{split}_images"],
            int(config["seed"]))
        batch, codes = inputs(job, images, spec), []
        for i in range(0, len(images), bs):
            x = batch(torch.arange(i, min(i + bs, len(images))))
            with job.autocast():
                z = ae.encode(x)
                if split == "test":  # a sanity figure comparable across loss networks
                    sq += float(torch.sum((ae.decode(z).float() - x) ** 2))
                    count += x.numel()
            codes.append(z.float().cpu())
        arrays[f"{split}_codes"] = torch.cat(codes).numpy()
    arrays["test_pixel_mse"] = np.float64(sq / count)
    arrays["key"] = np.array(_codes_key(job, dataset, model, prepared))
    save_npz(out, arrays)
    print(f"{out}: {len(arrays['train_codes'])} train, {len(arrays['test_codes'])} test codes, "
          f"test pixel MSE {sq / count:.6g}", flush=True)
    return Path(out)


def _codes_key(job: Job, dataset: str, model: Path, prepared: Mapping[str, Path]) -> str:
    # what codes are made from: the encode config (with its precision), model and data
    return json.dumps({"config": dict(job.config), "dataset": dataset, "model": content_id(
        model), "data": content_id(prepared[dataset])}, sort_keys=True, default=str)


def _codes_fresh(job: Job, dataset: str, model: Path, prepared: Mapping, codes: Path) -> bool:
    try:
        with np.load(codes) as f:
            fresh = str(f["key"]) == _codes_key(job, dataset, model, prepared)
    except (OSError, ValueError, KeyError):  # missing, unreadable or without a key
        return False
    print(f"{codes}: the codes of {model}{'' if fresh else ' no more: encoding'}", flush=True)
    return fresh


def read_codes(path: Path) -> dict[str, np.ndarray]:
    """The arrays of ``codes.npz``, checked (a stale file names itself and the fix)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing: pass --model to encode first")
    with np.load(path) as f:
        codes = {k: f[k] for k in f.files}
    if any(k not in codes for k in CODES) or any(
            len(codes[f"{s}_codes"]) != len(codes[f"{s}_labels"]) for s in ("train", "test")):
        raise ValueError(f"{path}: expected arrays {', '.join(CODES)} (codes and labels of "
                         f"equal length), got {sorted(codes)}; delete it to encode again")
    return codes


def fit_mlps(job: Job, config: Mapping[str, Any], net: str, dataset: str, run: int | None,
             codes: Path, workdir: Path, samples: Path, scores: Path, model: Path | None = None,
             prepared: Mapping[str, Path] | None = None,
             encode_config: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Fit the MLP grid on ``codes`` (resuming from ``workdir``); write both tables. Given
    ``model`` (the rule's call), first :func:`encode` into ``codes`` (a job of the encode
    stage's ``encode_config``) unless they are the codes of this model, data and config.
    ``config``: the ``mlp`` stage's. Returns the scores rows (net and job give arch, layer,
    weights_id)."""
    _spec(dataset)
    if model is not None:
        enc = Job.create(encode_config, job.settings)
        if not _codes_fresh(enc, dataset, model, prepared or {}, codes):
            encode(enc, encode_config, dataset, model, prepared or {}, codes)
    lossnet, run, seed, dev = parse_net(net), int(run or 0), int(config["seed"]), job.device
    data = read_codes(codes)
    z_all, y_all = (torch.from_numpy(data[f"train_{k}"]) for k in ("codes", "labels"))
    tr, va = (torch.from_numpy(i) for i in
              seeded_split(len(z_all), float(config["val_fraction"]), seed))
    mcfg = config["mlp"]
    selection, spe = fit_grid(
        job, (z_all[tr].to(dev), y_all[tr].to(dev)), (z_all[va].to(dev), y_all[va].to(dev)),
        mcfg["hidden"], epochs=mcfg["epochs"], patience=mcfg["patience"],
        batch_size=mcfg["batch_size"], lr=mcfg["lr"], seed=seed + run, workdir=workdir,
        n_classes=N_CLASSES, checkpoint_every=job.setting("mlp")["checkpoint_every"],
        key=_key(job, net, dataset, run, {"codes": codes}))
    per = selection.report(torch.from_numpy(data["test_codes"]).float().to(dev),
                           torch.from_numpy(data["test_labels"]).long().to(dev), spe)
    n_val, n_test, chosen = len(va), len(data["test_labels"]), per["selected"].index(True)
    write_parquet(pd.DataFrame({**per, "n_train": len(tr), "n_val": n_val, "n_test": n_test}),
                  samples)
    rows = score_rows(per, n_val, n_test)
    rows.insert(2, {"split": "test", "variant": "autoencoder", "metric": "pixel_mse",
                    "value": float(data["test_pixel_mse"]), "n": n_test})
    arch = None if lossnet is None else lossnet.arch
    df = score_frame(rows, benchmark="autoencoder", dataset=dataset, comparison="",
                     run=run, arch=arch or "", layer="" if lossnet is None else lossnet.layer,
                     **job.provenance(arch))
    write_parquet(df, scores)
    print(f"{scores}: test accuracy of the best-validation MLP ({per['mlp'][chosen]}) "
          f"{per['test_accuracy'][chosen]:.4f}", flush=True)
    return df

