"""The adaptation study's rankings and triplets (docs/adaptation.md).

**Rankings** (``rankings.json``): seeded random orders of the six distortions of
:mod:`workflow.distortions`, position 0 = least disruptive, stored as ids and names.

**Triplets**: a source image (ref) and two copies distorted by two distinct distortions,
each with its own parameters; under ranking r the label is 0 when p0's distortion comes
earlier in r (p0 is "closer", BAPPS judge semantics), else 1, so the images do not depend
on the ranking. A triplet file (``triplets/{dataset}.npz``) stores fixed sets as indices +
distortion ids + parameters: ``test_*`` (one triplet per test image, or a seeded subset),
for SVHN also ``train_index`` (the seeded training split) and ``val_*`` (one triplet per
validation image), and ``dataset``, its dataset's name, so commands take several files in
any order. :func:`distort_batch` turns a slice of a set into images.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workflow.datasets.bank import ImageBank
from workflow.distortions import (
    NAMES,
    apply_distortions,
    draw_pairs,
    random_rankings,
    sample_params,
)
from workflow.imaging import resize

__all__ = ["FIELDS", "TripletError", "TripletFiles", "build_triplet_file", "distort_batch",
           "load_rankings", "make_rankings", "make_triplets", "read_triplet_files",
           "split_indices", "triplet_set"]

FIELDS = ("index", "d0", "d1", "p0", "p1")  # the arrays of one triplet set


class TripletError(ValueError):
    """A rankings or triplet file that does not fit; the message names it and the fix."""


# ----------------------------------------------------------------------------- rankings


def make_rankings(count: int, seed: int) -> dict[str, Any]:
    """The seeded rankings as stored in ``rankings.json`` (ids and names, position 0 first)."""
    orders = random_rankings(count, seed)
    return {"seed": int(seed), "distortions": list(NAMES), "rankings": orders,
            "names": [[NAMES[i] for i in o] for o in orders]}


def load_rankings(path: str | os.PathLike) -> list[list[int]]:
    """The orders of ``rankings.json``; a file written for other distortions is an error."""
    data = json.loads(Path(path).read_text())
    if data.get("distortions") != list(NAMES):
        raise TripletError(f"{path}: written for distortions {data.get('distortions')}, this "
                           f"code has {list(NAMES)}; rerun the adaptation_rankings rule")
    return [list(map(int, r)) for r in data["rankings"]]


# ----------------------------------------------------------------------------- triplet files


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation split of ``n`` images (sorted index arrays)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"config key adaptation.val_fraction must be in (0, 1), got "
                         f"{val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_triplets(indices: np.ndarray, generator: torch.Generator, limit: int | None = None
                  ) -> dict[str, np.ndarray]:
    """One triplet per source image (a seeded subset of ``limit`` images if given)."""
    indices = np.asarray(indices, dtype=np.int64)
    if limit is not None and limit < len(indices):
        pick = torch.randperm(len(indices), generator=generator)[:limit].sort().values.numpy()
        indices = indices[pick]
    d0, d1 = draw_pairs(len(indices), generator)
    return {"index": indices, "d0": d0.numpy(), "d1": d1.numpy(),
            "p0": sample_params(d0, generator).numpy(), "p1": sample_params(d1, generator).numpy()}


def build_triplet_file(dataset: str, n_train: int | None, n_test: int,
                       config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of ``triplets/{dataset}.npz``: ``test_*``, and with ``n_train`` (SVHN)
    ``train_index`` and ``val_*``; ``config`` is the stage's (seeds, split, caps)."""
    # one generator per dataset, drawn in a fixed order: test, the training cap, validation
    g = torch.Generator().manual_seed(int(config["triplet_seed"]) * 1009
                                      + zlib.crc32(dataset.encode()))
    out: dict[str, np.ndarray] = {"dataset": np.array(dataset)}
    for k, v in make_triplets(np.arange(n_test), g, config["test_triplets"]).items():
        out[f"test_{k}"] = v
    if n_train is not None:
        train_idx, val_idx = split_indices(n_train, float(config["val_fraction"]),
                                           int(config["split_seed"]))
        limit = config["train_images"]
        if limit is not None and limit < len(train_idx):
            sub = torch.randperm(len(train_idx), generator=g)[:limit].sort().values.numpy()
            train_idx = train_idx[sub]
        out["train_index"] = train_idx
        for k, v in make_triplets(val_idx, g, config["val_triplets"]).items():
            out[f"val_{k}"] = v
    return out


class TripletFiles(dict):
    """``{dataset: arrays}``; a dataset without a file is an error naming it."""

    def __missing__(self, name: str) -> dict[str, np.ndarray]:
        raise TripletError(f"no triplet file of {name} was given (--triplets "
                           f"results/adaptation/triplets/{name}.npz); given: "
                           f"{', '.join(self) or 'none'}")


def read_triplet_files(paths: Iterable[str | os.PathLike]) -> TripletFiles:
    """``{dataset: arrays}`` of triplet files, by the dataset each file names."""
    out = TripletFiles()
    for path in paths:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if "dataset" not in arrays:
            raise TripletError(f"{path} names no dataset (an older triplet file): rerun the "
                               f"adaptation_triplets rule")
        name = str(arrays.pop("dataset"))
        if name in out:
            raise TripletError(f"two triplet files of {name} were given ({path} is the second)")
        out[name] = arrays
    return out


def triplet_set(arrays: Mapping[str, np.ndarray], split: str) -> dict[str, Tensor]:
    """The tensors ``index, d0, d1, p0, p1`` of set ``split`` (``test`` / ``val``)."""
    try:
        return {k: torch.from_numpy(np.asarray(arrays[f"{split}_{k}"])) for k in FIELDS}
    except KeyError as e:
        raise TripletError(f"the triplet file has no {split!r} set ({e}); rerun the "
                           f"adaptation_triplets rule") from None


# ----------------------------------------------------------------------------- images


def distort_batch(bank: ImageBank, trip: Mapping[str, Tensor], sl: slice | Tensor, size: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """ref, p0, p1: float ``[B, 3, size, size]`` on the bank's device for triplets ``sl``."""
    dev = bank.device
    ref = resize(bank.images(trip["index"][sl].to(dev)), size)
    p0 = apply_distortions(ref, trip["d0"][sl].to(dev), trip["p0"][sl].to(dev))
    p1 = apply_distortions(ref, trip["d1"][sl].to(dev), trip["p1"][sl].to(dev))
    return ref, p0, p1
