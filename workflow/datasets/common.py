"""Helpers the dataset modules share: parallel image decoding straight into memory-mapped
``.npy`` files, atomic array writes, the manifest, and the per-module command line.

Decoding uses threads: Pillow releases the GIL while it decodes and resizes, so threads
scale with cores without pickling every image back from a worker process (and without
``fork`` after torch started its thread pools). ``python -m workflow bench prepare``
measures the scaling.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from workflow.config import json_arg
from workflow.results import atomic_path, write_json


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
    with atomic_path(path, suffix=".npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(items), *shape))

        def one(i: int) -> None:
            a = decode(items[i])
            if a.shape != tuple(shape):
                raise CorruptFileError(f"{items[i]}: decoded shape {a.shape}, expected {shape}")
            arr[i] = a

        parallel_map(one, range(len(items)), workers, desc)
        arr.flush()
    return np.load(path, mmap_mode="r")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` under a temporary name, then rename."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


def array_entry(path: Path) -> dict[str, Any]:
    a = np.load(path, mmap_mode="r")
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest.json`` (written last: it is the rule output benchmarks depend on)."""
    write_json(manifest, Path(out_dir) / "manifest.json")
    return manifest


def raw_checksums(raw_dir: Path) -> dict[str, Any]:
    """The recorded checksums of the raw files (``checksums.json`` of the download),
    for the manifest's provenance; empty for synthetic data."""
    import json

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


def dataset_main(module: Any, argv: list[str] | None, prog: str) -> int:
    """``synthesize --raw DIR [--seed N] [--options JSON]`` / ``prepare --raw DIR --out DIR
    [--options JSON]`` for one dataset module (the rules use ``python -m workflow download``,
    which calls the same functions)."""
    from workflow.download import prepare_dataset, synthesize_dataset

    name = module.__name__.rsplit(".", 1)[-1]
    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthesize", help="write a small fake in the exact raw upstream layout")
    s.add_argument("--raw", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--options", type=json_arg, default={}, help="sizes as JSON")
    p = sub.add_parser("prepare", help="raw files -> arrays + manifest.json")
    p.add_argument("--raw", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--options", type=json_arg, default={}, help="options as JSON")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "synthesize":
            synthesize_dataset(name, args.raw, seed=args.seed, **args.options)
        else:
            m = prepare_dataset(name, args.raw, args.out, **args.options)
            print(f"{args.out}: {m.get('counts')}")
    except CorruptFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def pattern_images(rng: np.random.Generator, labels: np.ndarray, size: int,
                   n_classes: int = 10) -> np.ndarray:
    """Synthetic uint8 [N, size, size, 3] images whose content depends on the label (an
    oriented grating per class, random phase, colour and noise), so a demo classifier
    trained on the fakes has something to learn."""
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = np.pi * labels.astype(np.float32) / n_classes
    freq = 2.0 + (labels % 3).astype(np.float32) * 1.5
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    proj = (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
    colour = rng.uniform(0.3, 1.0, (n, 1, 1, 3)).astype(np.float32)
    img = wave[..., None] * colour + rng.normal(0, 0.08, (n, size, size, 3)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
