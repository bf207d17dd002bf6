"""SVHN (Netzer et al. 2011), cropped digits: train (73,257), test (26,032), extra (531,131).

Raw layout (what the download leaves and ``synthesize`` writes), ``{RES}/raw/svhn/``:
``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat`` (MATLAB v5: ``X`` uint8
[32, 32, 3, N], ``y`` uint8 [N, 1] with 10 meaning digit 0). URLs and md5 exactly as
``torchvision.datasets.SVHN`` declares them.

Prepared (``{RES}/prepared/svhn/``): ``{split}_images.npy`` uint8 [N, 32, 32, 3],
``{split}_labels.npy`` int64 (0..9). Licence: non-commercial use only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workflow.datasets import sources
from workflow.datasets.arrays import (
    CorruptFileError,
    expect,
    load_arrays,
    raw_checksums,
    save_split,
    write_manifest,
)
from workflow.datasets.fakes import pattern_images
from workflow.files import atomic_path

SPLITS = ("train", "test", "extra")
FILES = sources.SVHN


def synthesize(raw_dir: Path, seed: int, train: int, test: int, extra: int) -> None:
    """Small .mat files in the upstream format (scipy.io.savemat, MATLAB v5)."""
    from scipy.io import savemat

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test), ("extra", extra)):
        digits = rng.integers(0, 10, n)
        x = pattern_images(rng, digits, 32)                      # [N, 32, 32, 3]
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]  # SVHN: 0 is 10
        with atomic_path(raw_dir / f"{split}_32x32.mat") as tmp:
            savemat(tmp, {"X": np.ascontiguousarray(x.transpose(1, 2, 3, 0)), "y": y})


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat -> (uint8 [N, 32, 32, 3], int64 labels 0..9)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise CorruptFileError(f"{path}: cannot read the .mat file ({e}); delete it and "
                               f"download it again") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) \
            or y.size != x.shape[3]:
        raise CorruptFileError(
            f"{path}: expected X [32, 32, 3, N] and y [N, 1]; got X "
            f"{None if x is None else x.shape}, y {None if y is None else y.shape}"
        )
    if x.dtype != np.uint8:
        raise CorruptFileError(f"{path}: X must be uint8 pixels, got {x.dtype}; delete it and "
                               f"download it again")
    y = y.reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) and not (
            np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all()
            and (y == np.round(y)).all()):
        raise CorruptFileError(f"{path}: y must hold whole digit labels 1..10, got {y.dtype} "
                               f"values such as {y[:3].tolist()}; delete it and download it again")
    labels = y.astype(np.int64)
    if labels.size == 0:
        raise CorruptFileError(f"{path}: holds no images; delete it and download it again")
    if labels.min() < 1 or labels.max() > 10:
        raise CorruptFileError(f"{path}: labels outside 1..10 ({labels.min()}..{labels.max()})")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8), labels % 10


def prepare(raw_dir: Path, out_dir: Path, splits: list[str] | tuple[str, ...] = SPLITS
            ) -> dict[str, Any]:
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, arrays = {}, {}
    for split in splits:
        src = raw_dir / f"{split}_32x32.mat"
        if not src.exists():
            raise CorruptFileError(f"{src} is missing; download the dataset again")
        x, y = read_mat(src)
        arrays |= save_split(out_dir, split, {"images": x, "labels": y})
        counts[split] = int(len(y))
        del x, y
    return write_manifest(out_dir, {
        "dataset": "svhn", "counts": counts, "arrays": arrays,
        "sources": [f"{s}_32x32.mat" for s in splits], "checksums": raw_checksums(raw_dir),
        "md5": {f.name: f.md5 for f in FILES},
    })


SIDE = 32


def load(prepared_dir: Path, split: str) -> dict[str, np.ndarray]:
    """Memory-mapped ``images`` uint8 [N, 32, 32, 3] and ``labels`` int64 (0..9) of a split."""
    return labelled_split(prepared_dir, split, SIDE)


def labelled_split(prepared_dir: Path, split: str, side: int, unlabelled: str | None = None
                   ) -> dict[str, np.ndarray]:
    """``images`` uint8 [N, side, side, 3] and ``labels`` int64 [N] (0..9; -1 in the
    ``unlabelled`` split) of SVHN / STL-10, checked."""
    arrays = load_arrays(prepared_dir, {"images": f"{split}_images.npy",
                                        "labels": f"{split}_labels.npy"})
    d = Path(prepared_dir)
    images = expect(arrays["images"], d / f"{split}_images.npy", np.uint8,
                    (None, side, side, 3), "images")
    labels = expect(arrays["labels"], d / f"{split}_labels.npy", np.int64, (len(images),),
                    "labels")
    if len(images) == 0:
        raise CorruptFileError(f"{d / f'{split}_images.npy'} holds no images")
    low = -1 if split == unlabelled else 0
    if labels.size and (labels.min() < low or labels.max() > 9):
        raise CorruptFileError(f"{d / f'{split}_labels.npy'}: labels outside {low}..9; rerun "
                               f"the prepare_dataset rule")
    return arrays
