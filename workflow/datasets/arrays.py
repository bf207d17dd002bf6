"""Prepared arrays: parallel image decoding straight into memory-mapped ``.npy`` files, the
manifest, and reading them back with checks.

Decoding uses threads: Pillow releases the GIL while it decodes and resizes, so threads
scale with cores without pickling every image back from a worker process (and without
``fork`` after torch started its thread pools). ``python -m workflow perf prepare``
measures the scaling.

Reading: :func:`load_arrays` memory-maps named files of a prepared folder and
:func:`expect` checks one array's dtype and shape, so a wrong or stale array fails with its
file name and the rule that rebuilds it, not deep inside a convolution. Each dataset's
``load`` is built from the two.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from workflow.files import atomic_path, reserve, write_json


class CorruptFileError(ValueError):
    """A raw file that cannot be decoded; the message names it and the fix."""


def default_workers() -> int:
    """Worker threads for decoding: the job's CPU allowance (Snakemake sets threads via
    the affinity mask / OMP_NUM_THREADS), at least 1."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def decode_image(source: str | os.PathLike | bytes, name: str | None = None,
                 mode: str = "RGB") -> np.ndarray:
    """Decode one image file (path or bytes) to a uint8 array (HWC for RGB, HW for L).

    Fails with ``CorruptFileError`` naming the file on anything unreadable.
    """
    from PIL import Image, UnidentifiedImageError

    label = name or str(source if not isinstance(source, bytes) else "<bytes>")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as im:
            im.load()
            return np.asarray(im.convert(mode) if im.mode != mode else im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptFileError(
            f"{label}: cannot decode the image ({type(e).__name__}: {e}). The file is corrupt "
            f"or truncated: delete the dataset's raw folder (or this file) and download it again."
        ) from None


def resize_short_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Short side to ``size`` (bilinear, antialiased), then the central ``size`` x ``size``
    crop: the super-resolution target protocol (Johnson et al.), with torchvision's
    ``Resize(size)`` + ``CenterCrop(size)`` rounding (long side truncated, offsets rounded)
    so targets match a PyTorch reference pipeline pixel for pixel."""
    from PIL import Image

    h, w = img.shape[:2]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    im = Image.fromarray(img)
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)))


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int | None = None,
                 desc: str | None = None) -> list[Any]:
    """``[fn(x) for x in items]`` on ``workers`` threads, in order, with a progress bar."""
    from tqdm import tqdm

    workers = workers or default_workers()
    bar = tqdm(total=len(items), desc=desc, disable=desc is None, mininterval=2.0,
               file=sys.stderr)
    try:
        if workers <= 1:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out
        with ThreadPoolExecutor(workers) as ex:
            out = []
            for r in ex.map(fn, items):
                out.append(r)
                bar.update()
            return out
    finally:
        bar.close()


def decode_into_npy(path: str | os.PathLike, items: Sequence[Any],
                    decode: Callable[[Any], np.ndarray], shape: tuple[int, ...],
                    workers: int | None = None, desc: str | None = None) -> np.ndarray:
    """Decode ``items`` (each to an array of ``shape``) in parallel, straight into a
    memory-mapped ``.npy`` at a temporary name, renamed onto ``path`` when complete.

    Returns the finished array (memory-mapped, read-only). A shape mismatch names the item.
    """
    path = Path(path)
    workers = workers or default_workers()
    need = len(items) * int(np.prod(shape, dtype=np.int64))
    with atomic_path(path, suffix=".npy", need=need) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(items), *shape))
        reserve(tmp)  # a full disk fails here (DiskFullError), not as a SIGBUS mid-decode

        def one(i: int) -> None:
            a = decode(items[i])
            if a.shape != tuple(shape):
                raise CorruptFileError(f"{items[i]}: decoded shape {a.shape}, expected {shape}")
            arr[i] = a

        parallel_map(one, range(len(items)), workers, desc)
        arr.flush()
    return np.load(path, mmap_mode="r")


def array_entry(path: Path) -> dict[str, Any]:
    a = np.load(path, mmap_mode="r")
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


def save_split(out_dir: str | os.PathLike, split: str, arrays: dict[str, np.ndarray]
               ) -> dict[str, Any]:
    """``{split}_{key}.npy`` for every array (atomically); their manifest entries by file."""
    from workflow.files import save_npy

    entries = {}
    for key, arr in arrays.items():
        p = save_npy(Path(out_dir) / f"{split}_{key}.npy", arr)
        entries[p.name] = array_entry(p)
    return entries


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest.json`` (written last: it is the rule output benchmarks depend on)."""
    write_json(manifest, Path(out_dir) / "manifest.json")
    return manifest


def raw_checksums(raw_dir: Path) -> dict[str, Any]:
    """The recorded checksums of the raw files (``checksums.json`` of the download),
    for the manifest's provenance; empty for synthetic data."""
    p = Path(raw_dir) / "checksums.json"
    if not p.exists():
        return {}
    return {k: v.get("sha256") for k, v in json.loads(p.read_text()).items()}


def load_arrays(prepared_dir: str | os.PathLike, names: dict[str, str]) -> dict[str, np.ndarray]:
    """``{key: np.load(prepared_dir/file, mmap_mode="r")}``; a missing file names the rule."""
    d = Path(prepared_dir)
    out = {}
    for key, fname in names.items():
        p = d / fname
        if not p.exists():
            raise FileNotFoundError(
                f"{p} is missing: prepare the dataset first "
                f"(`snakemake --cores 1 {d}/manifest.json`)."
            )
        out[key] = np.load(p, mmap_mode="r")
    return out



def expect(arr: np.ndarray, path: str | os.PathLike, dtype: str | np.dtype,
           shape: Sequence[int | None], what: str = "array") -> np.ndarray:
    """``arr`` (read from ``path``) if it has ``dtype`` and ``shape`` (``None``: any size)."""
    ok = arr.dtype == np.dtype(dtype) and arr.ndim == len(shape) and all(
        want is None or got == want for got, want in zip(arr.shape, shape, strict=True))
    if not ok:
        want = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
        raise CorruptFileError(
            f"{path}: expected {what} {np.dtype(dtype)} {want}, got {arr.dtype} "
            f"{list(arr.shape)}; the prepared array is stale or damaged: rerun the "
            f"prepare_dataset rule (`snakemake --cores 1 -R prepare_dataset "
            f"{Path(path).parent}/manifest.json`)")
    return arr


def read_manifest(prepared: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared folder (``prepared`` may be the folder or the file)."""
    p = Path(prepared)
    p = p / "manifest.json" if p.is_dir() or p.suffix != ".json" else p
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: prepare the dataset first "
                                f"(`snakemake --cores 1 {p}`)")
    return json.loads(p.read_text())


class Prepared(dict):
    """``{dataset name: prepared folder}``; a missing dataset is an error naming it."""

    def __missing__(self, name: str) -> Path:
        raise FileNotFoundError(
            f"this command needs the prepared {name} dataset: pass its folder with --prepared "
            f"(e.g. resources/prepared/{name}); given: {', '.join(self) or 'none'}")


def prepared_folders(paths: Iterable[str | os.PathLike]) -> Prepared:
    """``{dataset name: folder}`` of prepared folders (or their manifests): each manifest
    says which dataset it holds, so commands take them in any order."""
    out = Prepared()
    for path in paths:
        p = Path(path)
        folder = p.parent if p.name == "manifest.json" else p
        name = read_manifest(folder).get("dataset")
        if not name:
            raise CorruptFileError(f"{folder}/manifest.json names no dataset; rerun its "
                                   f"prepare_dataset rule")
        out[str(name)] = folder
    return out
