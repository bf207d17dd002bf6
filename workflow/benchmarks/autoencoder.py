"""Benchmark 4: dimensionality reduction with an autoencoder trained on a deep perceptual loss.

For one loss network (or the pixel-MSE baseline, net id ``pixel``), one dataset and one run:

``train``     the convolutional autoencoder of ``workflow.models.autoencoder`` on SVHN ``extra``
              (reflect-padded by 16 to 64x64) or STL-10 ``unlabeled`` (96x96); loss = MSE of
              the loss network's features at one layer on raw [0, 1] input (config
              ``train.normalize: none``), or pixel MSE for the baseline. Adam, batch 256, up to
              50 epochs, early stopping (patience 10) on the loss of a seeded 20% validation
              split; the best epoch's weights are kept. -> ``autoencoder.pt``, ``train.json``.
``encode``    the labelled ``train`` and ``test`` splits to 64-d codes, once. -> ``codes.npz``
              (also the test reconstructions' pixel MSE, a loss-independent sanity figure).
``fit-mlps``  the seven MLPs of ``workflow.models.mlp`` on the codes, all at once, each with its
              own early stopping on a seeded 20% validation split of ``train``. -> ``scores.parquet``
              (scores schema) and ``mlps.parquet`` (one row per MLP).

Scores rows (benchmark ``autoencoder``, dataset ``svhn`` / ``stl10``, metric ``accuracy``):
variant ``best-val-mlp`` is the reported score, the test accuracy of the MLP with the highest
validation accuracy (ties: the first in the grid); variant ``mlp[64,32]`` etc. are every MLP's
val and test accuracies. The pixel baseline has ``arch == layer == ""`` (its files live under
``autoencoder/pixel/``). Splits are seeded with the config's ``seed`` (the reference left them
unseeded) and are the same for every loss network; ``run`` shifts only the training seed.

All training goes through ``workflow.training.Trainer`` (resume, NaN guard, autocast).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from workflow import runtime
from workflow.config import json_arg
from workflow.datasets.common import load_arrays
from workflow.lossnets import (
    LossNet,
    UnknownLossNetError,
    build_extractor,
    feature_loss,
    weights_id,
)
from workflow.models.autoencoder import ConvAutoencoder
from workflow.models.mlp import HIDDEN_GRID, GridSelection, MLPGrid, select_best
from workflow.results import atomic_path, config_hash, score_frame, write_json, write_parquet
from workflow.training import TrainConfig, Trainer

PIXEL = "pixel"  # net id of the pixel-MSE baseline (arch == layer == "" in the scores table)
BEST_VARIANT = "best-val-mlp"


@dataclass(frozen=True)
class DatasetSpec:
    """Which prepared splits a dataset contributes and how its images are shaped."""

    name: str
    ae_split: str  # unlabelled images the autoencoder trains on
    mlp_split: str  # labelled images the MLPs train (and validate) on
    test_split: str
    side: int  # stored image side
    pad: int  # reflection padding on each side before the autoencoder
    n_classes: int = 10

    @property
    def size(self) -> int:
        return self.side + 2 * self.pad


DATASETS: dict[str, DatasetSpec] = {
    "svhn": DatasetSpec("svhn", "extra", "train", "test", side=32, pad=16),
    "stl10": DatasetSpec("stl10", "unlabeled", "train", "test", side=96, pad=0),
}


# the config keys each stage depends on (its rule's params: editing the MLP settings refits the
# MLPs and never retrains an autoencoder)
STAGE_KEYS = {
    "train": ("seed", "val_fraction", "eval_batch_size", "train"),
    "encode": ("seed", "encode"),
    "mlp": ("seed", "val_fraction", "mlp"),
}


def stage_config(cfg: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The part of config section ``autoencoder`` that stage ``train`` / ``encode`` / ``mlp`` reads."""
    return {k: cfg[k] for k in STAGE_KEYS[stage] if k in cfg}


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown autoencoder dataset {name!r} (config key autoencoder.datasets); "
                         f"known: {', '.join(DATASETS)}") from None


# ----------------------------------------------------------------------------- data


def seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded draw of ``limit`` of ``n`` items (all when ``limit`` is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 0x5EB5E7])
    return np.sort(rng.choice(n, size=int(limit), replace=False))


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``1 - val_fraction`` / ``val_fraction`` split of ``range(n)`` (both sorted)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"config key autoencoder.val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 2:
        raise ValueError(f"{n} items are too few for a {val_fraction:.0%} validation split")
    perm = np.random.default_rng([seed, 0x5B117]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_split(prepared: str | Path, spec: DatasetSpec, split: str, limit: int | None = None,
               seed: int = 0, labelled: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (uint8 [N, side, side, 3]) and labels (int64 [N]) of one prepared split.

    ``limit`` draws a seeded subset (the demo's small runs); the shapes are checked so a wrong
    or stale array fails here with its file name rather than deep inside a convolution.
    """
    names = {"images": f"{split}_images.npy"}
    if labelled:
        names["labels"] = f"{split}_labels.npy"
    arrays = load_arrays(prepared, names)
    images = arrays["images"]
    path = Path(prepared) / names["images"]
    want = (spec.side, spec.side, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != want or images.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 [N, {spec.side}, {spec.side}, 3], got "
                         f"{images.dtype} {list(images.shape)}; rerun the prepare_dataset rule")
    idx = seeded_subset(len(images), limit, seed)
    out_images = np.ascontiguousarray(images[idx])
    labels = None
    if labelled:
        lab = arrays["labels"]
        if lab.shape != (len(images),):
            raise ValueError(f"{Path(prepared) / names['labels']}: {lab.shape[0]} labels for "
                             f"{len(images)} images; rerun the prepare_dataset rule")
        labels = np.asarray(lab[idx], dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= spec.n_classes):
            raise ValueError(f"{Path(prepared) / names['labels']}: labels outside 0..{spec.n_classes - 1}")
    if len(out_images) == 0:
        raise ValueError(f"{path} holds no images")
    return out_images, labels


def _fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.4 * free  # leave room for the model, the loss network and activations


class ImageBank:
    """uint8 NHWC images kept on the device when they fit (else pinned host memory);
    ``batch(idx)`` gathers, converts to float [0, 1] NCHW and reflect-pads on the device."""

    def __init__(self, images: np.ndarray, pad: int, device: torch.device,
                 channels_last: bool = False):
        data = torch.from_numpy(np.ascontiguousarray(images))
        if _fits_on(device, data.numel()):
            data = data.to(device)
        elif device.type == "cuda":
            data = data.pin_memory()
        self.data = data
        self.pad = int(pad)
        self.device = device
        self.channels_last = channels_last

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def batch(self, idx: Tensor) -> Tensor:
        x = self.data[idx.to(self.data.device)].to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if self.pad:
            x = nn.functional.pad(x, (self.pad,) * 4, mode="reflect")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def epoch_order(n: int, epoch: int, seed: int) -> Tensor:
    """The shuffled order of epoch ``epoch``: a function of (seed, epoch) only, so a resumed
    run draws the same batches without any generator state."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; a trailing batch of one image is dropped (BatchNorm cannot train on it)."""
    if n < 2:
        raise ValueError(f"{n} training item(s) are too few")
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 else 0)


class EpochBatches:
    """Index batches of shuffled epochs for a step-based harness (step -> batch indices)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.steps_per_epoch = steps_per_epoch(self.n, self.batch_size)
        self._epoch = -1
        self._order: Tensor | None = None

    def __call__(self, step: int) -> Tensor:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.n, epoch, self.seed)
        assert self._order is not None
        return self._order[i * self.batch_size:(i + 1) * self.batch_size]


# ----------------------------------------------------------------------------- loss


def parse_net(net: str) -> LossNet | None:
    """``"pixel"`` -> None (the baseline); ``"alexnet/2"`` -> its LossNet."""
    if net == PIXEL:
        return None
    try:
        return LossNet.parse(net)
    except UnknownLossNetError as e:
        raise UnknownLossNetError(f"config key autoencoder.lossnets: {e}") from None


def make_loss(net: str, lossnet: Mapping[str, Any], normalize: str = "none"
              ) -> tuple[Callable[[Tensor, Tensor], Tensor], nn.Module | None]:
    """The reconstruction loss ``loss(output, target)`` and the loss network (None for pixel)."""
    ln = parse_net(net)
    if ln is None:
        return (lambda out, x: torch.mean((out.float() - x.float()) ** 2)), None
    extractor = build_extractor(
        ln.arch, lossnets=[ln], weights=str(lossnet.get("weights", "imagenet")),
        weights_dir=lossnet.get("weights_dir", "resources/weights"), normalize=normalize,
        seed=int(lossnet.get("seed", 0)))
    taps = ln.taps
    return (lambda out, x: feature_loss(extractor, taps, out, x)), extractor


def net_columns(net: str, lossnet: Mapping[str, Any]) -> dict[str, str]:
    """arch / layer / weights_id columns of the scores table for a net id."""
    ln = parse_net(net)
    if ln is None:
        return {"arch": "", "layer": "", "weights_id": "none"}
    return {"arch": ln.arch, "layer": ln.layer,
            "weights_id": weights_id(ln.arch, str(lossnet.get("weights", "imagenet")))}


# ----------------------------------------------------------------------------- train


def _train_config(common: Mapping[str, Any], max_steps: int, spe: int, patience: int,
                  select_metric: str, select_mode: str, seed: int,
                  checkpoint_every: int | None, progress: bool = True,
                  threads: int | None = None) -> TrainConfig:
    return TrainConfig(
        max_steps=max_steps, eval_every=spe, checkpoint_every=checkpoint_every or spe,
        precision=str(common.get("precision", "auto")), seed=seed, select_metric=select_metric,
        select_mode=select_mode, patience=patience, device=str(common.get("device", "auto")),
        log_every=max(1, min(100, spe)),
        threads=threads or runtime.job_threads(torch.get_num_threads()), progress=progress)


def train_autoencoder(job_dir: str | Path, dataset: str, prepared: str | Path, net: str, run: int,
                      cfg: Mapping[str, Any], common: Mapping[str, Any],
                      lossnet: Mapping[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train one autoencoder; write ``train.json`` then ``autoencoder.pt`` into ``job_dir``."""
    job_dir = Path(job_dir)
    spec = dataset_spec(dataset)
    tcfg = cfg["train"]
    seed = int(cfg.get("seed", 0))
    images, _ = load_split(prepared, spec, spec.ae_split, tcfg.get("max_images"), seed,
                           labelled=False)
    tr_idx, va_idx = seeded_split(len(images), float(cfg.get("val_fraction", 0.2)), seed)
    runtime.seed_everything(seed + int(run))  # the initial weights (the harness reseeds itself)
    model = ConvAutoencoder(spec.size, int(tcfg.get("code_size", 64)))
    loss_fn, extractor = make_loss(net, lossnet, str(tcfg.get("normalize", "none")))
    opt = torch.optim.Adam(model.parameters(), lr=float(tcfg.get("lr", 1e-3)))
    bs = int(tcfg.get("batch_size", 256))
    batches = EpochBatches(len(tr_idx), bs, seed + int(run))
    spe = batches.steps_per_epoch
    tr_idx_t, va_idx_t = torch.from_numpy(tr_idx), torch.from_numpy(va_idx)
    eval_bs = int(cfg.get("eval_batch_size", 512))
    holder: dict[str, Any] = {}

    def step_fn(step: int):
        x = holder["bank"].batch(tr_idx_t[batches(step)])
        return loss_fn(model(x), x), x.shape[0]

    def eval_fn(step: int) -> dict[str, float]:
        total, n = 0.0, 0
        with holder["trainer"].autocast():
            for i in range(0, len(va_idx_t), eval_bs):
                x = holder["bank"].batch(va_idx_t[i:i + eval_bs])
                total += float(loss_fn(model(x), x)) * x.shape[0]
                n += x.shape[0]
        return {"val_loss": total / n}

    fingerprint = config_hash({"net": net, "dataset": dataset, "run": int(run), "cfg": {
        k: cfg.get(k) for k in ("seed", "val_fraction", "train")}, "lossnet": dict(lossnet),
        "precision": common.get("precision")})
    trainer = Trainer(
        job_dir / "train", modules={"autoencoder": model}, optimizer=opt, step_fn=step_fn,
        eval_fn=eval_fn, aux_modules={"lossnet": extractor} if extractor is not None else None,
        config=_train_config(common, int(tcfg.get("epochs", 50)) * spe, spe,
                             int(tcfg.get("patience", 10)), "val_loss", "min", seed + int(run),
                             tcfg.get("checkpoint_every"), progress),
        fingerprint=fingerprint, description=f"autoencoder {net} {dataset} run{run}")
    holder["trainer"] = trainer
    holder["bank"] = ImageBank(images, spec.pad, trainer.device, trainer.channels_last)
    result = trainer.fit()  # restores the best epoch's weights
    summary = {
        "net": net, "dataset": dataset, "run": int(run), "size": spec.size,
        "code_size": model.code_size, "n_train": len(tr_idx), "n_val": len(va_idx),
        "steps_per_epoch": spe, "steps": result.steps, "stop_reason": result.stop_reason,
        "best_val_loss": result.best_metric,
        "best_epoch": None if result.best_step is None else result.best_step // spe,
        "epochs_run": -(-result.steps // spe), "wall_time_s": result.wall_time_s,
        "device": str(trainer.device), "precision": trainer.precision,
        "columns": net_columns(net, lossnet),
    }
    write_json(summary, job_dir / "train.json")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(job_dir / "autoencoder.pt") as tmp:
        torch.save({"state_dict": state, "size": spec.size, "code_size": model.code_size,
                    "net": net, "dataset": dataset}, tmp)
    return summary


def load_autoencoder(path: str | Path, map_location: str | torch.device = "cpu") -> ConvAutoencoder:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the train_autoencoder rule first")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = ConvAutoencoder(int(ckpt["size"]), int(ckpt["code_size"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


# ----------------------------------------------------------------------------- encode


@torch.no_grad()
def encode_bank(model: ConvAutoencoder, bank: ImageBank, batch_size: int, precision: str,
                with_pixel_mse: bool = False) -> tuple[np.ndarray, float | None]:
    """Codes (float32 [N, z]) of every image, each encoded once; optionally the pixel MSE of
    the reconstructions."""
    codes, sq, count = [], 0.0, 0
    for i in range(0, len(bank), batch_size):
        x = bank.batch(torch.arange(i, min(i + batch_size, len(bank))))
        with runtime.autocast(bank.device, precision):
            z = model.encode(x)
            if with_pixel_mse:
                sq += float(torch.sum((model.decode(z).float() - x) ** 2))
                count += x.numel()
        codes.append(z.float().cpu())
    mse = sq / count if with_pixel_mse else None
    return torch.cat(codes).numpy(), mse


def encode_codes(job_dir: str | Path, dataset: str, prepared: str | Path,
                 cfg: Mapping[str, Any], common: Mapping[str, Any]) -> Path:
    """Encode the labelled train and the test split once; write ``codes.npz``."""
    t0 = time.perf_counter()
    job_dir = Path(job_dir)
    spec = dataset_spec(dataset)
    ecfg = cfg.get("encode", {})
    seed = int(cfg.get("seed", 0))
    device = runtime.pick_device(str(common.get("device", "auto")))
    precision = runtime.resolve_precision(str(common.get("precision", "auto")), device)
    runtime.configure(device, precision, runtime.job_threads(torch.get_num_threads()))
    model = load_autoencoder(job_dir / "autoencoder.pt").to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bs = int(ecfg.get("batch_size", 1024))
    out: dict[str, np.ndarray] = {}
    for key, split, limit in (("train", spec.mlp_split, ecfg.get("max_train_images")),
                              ("test", spec.test_split, ecfg.get("max_test_images"))):
        images, labels = load_split(prepared, spec, split, limit, seed)
        bank = ImageBank(images, spec.pad, device, channels_last)
        codes, mse = encode_bank(model, bank, bs, precision, with_pixel_mse=key == "test")
        out[f"{key}_codes"], out[f"{key}_labels"] = codes, labels  # type: ignore[assignment]
        if mse is not None:
            out["test_pixel_mse"] = np.float64(mse)  # type: ignore[assignment]
        del bank
    out["wall_time_s"] = np.float64(time.perf_counter() - t0)  # type: ignore[assignment]
    out["precision"] = np.str_(precision)  # type: ignore[assignment]
    path = job_dir / "codes.npz"
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    return path


# ----------------------------------------------------------------------------- MLPs


def fit_mlp_grid(train_z: Tensor, train_y: Tensor, val_z: Tensor, val_y: Tensor, workdir: Path,
                 mcfg: Mapping[str, Any], common: Mapping[str, Any], seed: int,
                 n_classes: int = 10, fingerprint: str | None = None,
                 progress: bool = True) -> tuple[GridSelection, int, str]:
    """Train every MLP of the grid together; return the selection state (best weights and
    validation accuracies of each net), steps per epoch and the precision used."""
    hidden = [tuple(h) for h in mcfg.get("hidden", HIDDEN_GRID)]
    threads_before = torch.get_num_threads()
    torch.manual_seed(seed)  # initialisation; the harness reseeds the training RNGs itself
    grid = MLPGrid(train_z.shape[1], n_classes, hidden)
    selection = GridSelection(grid, int(mcfg.get("patience", 25)))
    opt = torch.optim.Adam(grid.parameters(), lr=float(mcfg.get("lr", 1e-3)))
    batches = EpochBatches(len(train_z), int(mcfg.get("batch_size", 256)), seed)
    spe = batches.steps_per_epoch
    state: dict[str, Any] = {"active": None, "epoch": -1}
    data: dict[str, Tensor] = {}

    def step_fn(step: int):
        epoch = step // spe
        if state["epoch"] != epoch:  # nets stop only at evaluations, i.e. at epoch ends
            state["active"], state["epoch"] = selection.active.tolist(), epoch
        idx = batches(step).to(data["train_z"].device)
        return grid.loss(data["train_z"][idx], data["train_y"][idx], state["active"]), len(idx)

    def eval_fn(step: int) -> dict[str, float]:
        acc = grid.accuracy(data["val_z"], data["val_y"])
        selection.update(grid, acc, step)
        return {"improvements": float(selection.improvements),
                "active": float(selection.active.sum()), "best_val_accuracy": float(acc.max())}

    trainer = Trainer(
        workdir, modules={"grid": grid, "selection": selection}, optimizer=opt, step_fn=step_fn,
        eval_fn=eval_fn,
        # every net improving counts, so the harness's patience stops exactly when the last
        # net has gone `patience` epochs without improving (see GridSelection)
        config=_train_config(common, int(mcfg.get("epochs", 500)) * spe, spe,
                             int(mcfg.get("patience", 25)), "improvements", "max", seed,
                             mcfg.get("checkpoint_every"), progress,
                             # on CPU one thread: ops on 64-d codes and <= 128 units are too
                             # small for a thread pool, which only adds synchronisation
                             threads=1 if runtime.pick_device(str(common.get("device", "auto"))).type == "cpu" else None),
        fingerprint=fingerprint, description=workdir.name)
    # the codes are tiny: all of them live on the device for the whole fit
    data.update(train_z=train_z.float().to(trainer.device), train_y=train_y.long().to(trainer.device),
                val_z=val_z.float().to(trainer.device), val_y=val_y.long().to(trainer.device))
    try:
        trainer.fit()  # restores the selection state of the last improvement (all nets final)
    finally:
        torch.set_num_threads(threads_before)  # the harness set them process-wide
    return selection, spe, trainer.precision


def fit_mlps(job_dir: str | Path, dataset: str, run: int, cfg: Mapping[str, Any],
             common: Mapping[str, Any], progress: bool = True) -> pd.DataFrame:
    """Fit the MLP grid on ``codes.npz``; write ``mlps.parquet`` and ``scores.parquet``.

    The loss network's columns (arch, layer, weights_id) come from ``train.json``."""
    t0 = time.perf_counter()
    job_dir = Path(job_dir)
    spec = dataset_spec(dataset)
    mcfg = cfg["mlp"]
    seed = int(cfg.get("seed", 0))
    codes_path = job_dir / "codes.npz"
    if not codes_path.exists():
        raise FileNotFoundError(f"{codes_path} is missing: run the encode rule first")
    with np.load(codes_path) as f:
        codes = {k: f[k] for k in f.files}
    device = runtime.pick_device(str(common.get("device", "auto")))
    z_all = torch.from_numpy(codes["train_codes"]).float()
    y_all = torch.from_numpy(codes["train_labels"]).long()
    tr, va = seeded_split(len(z_all), float(cfg.get("val_fraction", 0.2)), seed)
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    fingerprint = config_hash({"mlp": dict(mcfg), "seed": seed, "run": int(run),
                               "val_fraction": cfg.get("val_fraction"),
                               "precision": common.get("precision")})
    selection, spe, precision = fit_mlp_grid(
        z_all[tr_t].to(device), y_all[tr_t].to(device), z_all[va_t].to(device),
        y_all[va_t].to(device), job_dir / "mlps", mcfg, common, seed + int(run),
        spec.n_classes, fingerprint, progress)
    test_z = torch.from_numpy(codes["test_codes"]).float().to(device)
    test_y = torch.from_numpy(codes["test_labels"]).long().to(device)
    test_acc = selection.best.accuracy(test_z, test_y).cpu().tolist()
    val_acc = selection.best_acc.cpu().tolist()
    chosen = select_best(val_acc)
    names = selection.best.names
    per_mlp = pd.DataFrame({
        "mlp": names, "hidden": [json.dumps(list(h)) for h in selection.best.hidden_grid],
        "val_accuracy": val_acc, "test_accuracy": test_acc,
        "best_epoch": [int(s) // spe if s >= 0 else -1 for s in selection.best_step.tolist()],
        "selected": [k == chosen for k in range(len(names))],
        "n_train": len(tr), "n_val": len(va), "n_test": len(test_y)})
    write_parquet(per_mlp, job_dir / "mlps.parquet")

    train_info = json.loads((job_dir / "train.json").read_text())
    cols = train_info["columns"]
    rows: list[dict[str, Any]] = [
        {"split": "test", "variant": BEST_VARIANT, "metric": "accuracy",
         "value": test_acc[chosen], "n": len(test_y)},
        {"split": "val", "variant": BEST_VARIANT, "metric": "accuracy",
         "value": val_acc[chosen], "n": len(va)},
        {"split": "test", "variant": "autoencoder", "metric": "pixel_mse",
         "value": float(codes["test_pixel_mse"]), "n": len(test_y)},
    ]
    for k, name in enumerate(names):
        rows += [{"split": "val", "variant": name, "metric": "accuracy", "value": val_acc[k],
                  "n": len(va)},
                 {"split": "test", "variant": name, "metric": "accuracy", "value": test_acc[k],
                  "n": len(test_y)}]
    wall = float(train_info["wall_time_s"]) + float(codes["wall_time_s"]) + time.perf_counter() - t0
    df = score_frame(
        rows, benchmark="autoencoder", dataset=dataset, comparison="", run=int(run),
        arch=cols["arch"], layer=cols["layer"], weights_id=cols["weights_id"],
        config_hash=config_hash(dict(cfg)), device=str(device), precision=precision,
        wall_time_s=wall)
    write_parquet(df, job_dir / "scores.parquet")
    return df


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m workflow benchmarks.autoencoder",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "encode", "fit-mlps"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True, help="the job folder (autoencoder/<net>/<dataset>/run<k>)")
        p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
        p.add_argument("--config", type=json_arg, required=True,
                       help="the autoencoder config section (JSON or @file)")
        p.add_argument("--common", type=json_arg, default={}, help="device / precision (JSON)")
        p.add_argument("--no-progress", action="store_true")
        if name in ("train", "encode"):
            p.add_argument("--prepared", required=True, help="{RES}/prepared/<dataset>")
        if name in ("train", "fit-mlps"):
            p.add_argument("--run", type=int, default=0)
        if name == "train":
            p.add_argument("--net", required=True, help="arch/layer, or 'pixel' for the baseline")
            p.add_argument("--lossnet", type=json_arg, default={},
                           help="weights / weights_dir / seed of the loss network (JSON)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = not args.no_progress
    if args.cmd == "train":
        s = train_autoencoder(args.dir, args.dataset, args.prepared, args.net, args.run,
                              args.config, args.common, args.lossnet, progress)
        print(f"{args.dir}: best epoch {s['best_epoch']} val loss {s['best_val_loss']:.6g} "
              f"({s['stop_reason']}, {s['wall_time_s']:.1f}s)")
    elif args.cmd == "encode":
        path = encode_codes(args.dir, args.dataset, args.prepared, args.config, args.common)
        print(f"{path}: written")
    else:
        df = fit_mlps(args.dir, args.dataset, args.run, args.config, args.common, progress)
        best = df[(df["variant"] == BEST_VARIANT) & (df["split"] == "test")]["value"].iloc[0]
        print(f"{args.dir}: test accuracy of the best-validation MLP {best:.4f}")
    return 0
