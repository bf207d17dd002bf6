"""STL-10 (Coates et al. 2011), binary version: train 5,000, test 8,000, unlabeled 100,000.

Raw layout (what the download + extraction leave and ``synthesize`` writes),
``{RES}/raw/stl10/``: ``stl10_binary.tar.gz`` and ``stl10_binary/`` with ``train_X.bin``,
``train_y.bin``, ``test_X.bin``, ``test_y.bin``, ``unlabeled_X.bin``, ``class_names.txt``,
``fold_indices.txt``. ``*_X.bin``: uint8, per image 3 x 96 x 96 in column-major order;
``*_y.bin``: uint8 labels 1..10. URL and md5 exactly as ``torchvision.datasets.STL10``.

Prepared (``{RES}/prepared/stl10/``): ``{split}_images.npy`` uint8 [N, 96, 96, 3],
``{split}_labels.npy`` int64 (0..9; -1 for unlabeled). Images derive from ImageNet:
non-commercial research use.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from workflow.datasets import sources
from workflow.datasets.arrays import CorruptFileError, raw_checksums, save_split, write_manifest
from workflow.datasets.fakes import pattern_images
from workflow.datasets.svhn import labelled_split
from workflow.files import atomic_path

FOLDER = "stl10_binary"
SPLITS = ("train", "test", "unlabeled")
CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
FILES = sources.STL10
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE


def to_bin(images: np.ndarray) -> bytes:
    """uint8 [N, 96, 96, 3] -> the .bin layout (per image C, then column-major W x H)."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def read_images(path: Path) -> np.ndarray:
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % IMAGE_BYTES:
        raise CorruptFileError(
            f"{path}: {data.size} bytes is not a whole number of 3x96x96 images; the file is "
            f"truncated. Delete {path.parent.parent} and download STL-10 again.")
    # stored as [N, C, W, H] (column-major per channel) -> [N, H, W, C]
    return np.ascontiguousarray(data.reshape(-1, 3, SIDE, SIDE).transpose(0, 3, 2, 1))


def read_labels(path: Path, n: int) -> np.ndarray:
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if y.size != n or (y.size and (y.min() < 1 or y.max() > 10)):
        raise CorruptFileError(f"{path}: expected {n} labels in 1..10, got {y.size} "
                               f"(range {y.min() if y.size else '-'}.."
                               f"{y.max() if y.size else '-'})")
    return y - 1


def synthesize(raw_dir: Path, seed: int, train: int, test: int, unlabeled: int) -> None:
    """A small stl10_binary.tar.gz in the upstream layout, and its extraction."""
    from workflow.datasets.archives import extract_archive

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    for split, n in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        labels = rng.integers(0, 10, n)
        members[f"{split}_X.bin"] = to_bin(pattern_images(rng, labels, SIDE))
        if split != "unlabeled":
            members[f"{split}_y.bin"] = (labels + 1).astype(np.uint8).tobytes()
    members["class_names.txt"] = ("\n".join(CLASSES) + "\n").encode()
    folds = [" ".join(map(str, rng.permutation(train)[: max(1, train // 5)])) for _ in range(10)]
    members["fold_indices.txt"] = ("\n".join(folds) + "\n").encode()
    archive = raw_dir / FILES[0].name
    with atomic_path(archive, suffix=".tmp") as tmp:
        with tarfile.open(tmp, "w:gz") as tf:
            for name, blob in members.items():
                info = tarfile.TarInfo(f"{FOLDER}/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    extract_archive(archive, raw_dir)


def prepare(raw_dir: Path, out_dir: Path, splits: list[str] | tuple[str, ...] = SPLITS
            ) -> dict[str, Any]:
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    src = raw_dir / FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, arrays, sources = {}, {}, []
    for split in splits:
        xp = src / f"{split}_X.bin"
        if not xp.exists():
            raise CorruptFileError(f"{xp} is missing; download STL-10 again")
        x = read_images(xp)
        sources.append(f"{FOLDER}/{xp.name}")
        if split == "unlabeled":
            y = np.full(len(x), -1, dtype=np.int64)
        else:
            yp = src / f"{split}_y.bin"
            y = read_labels(yp, len(x))
            sources.append(f"{FOLDER}/{yp.name}")
        arrays |= save_split(out_dir, split, {"images": x, "labels": y})
        counts[split] = int(len(x))
        del x, y
    return write_manifest(out_dir, {
        "dataset": "stl10", "counts": counts, "arrays": arrays, "sources": sources,
        "checksums": raw_checksums(raw_dir), "classes": list(CLASSES),
    })


def load(prepared_dir: Path, split: str) -> dict[str, np.ndarray]:
    """Memory-mapped ``images`` uint8 [N, 96, 96, 3] and ``labels`` int64 (0..9; -1 for
    ``unlabeled``) of a prepared split."""
    return labelled_split(prepared_dir, split, SIDE, unlabelled="unlabeled")
