"""What the three MOS / DMOS datasets share (TID2013, KADID-10k, CSIQ): the rows their label
files give, the image decoding at the scoring resolution, the prepared arrays, and the one
reader of them with its checks.

Prepared layout (``{RES}/prepared/<dataset>/``)::

    ref.npy        uint8 [R, H, W, 3]  the reference images, in the order of their names
    dist.npy       uint8 [N, H, W, 3]  the distorted images, in the label file's order
    ref_index.npy  int64 [N]           row of ``ref`` each distorted image belongs to
    mos.npy        float64 [N]         the published score, as published (MOS or DMOS)
    dist_type.npy  unicode [N]         the publisher's distortion type (id or name)
    level.npy      int64 [N]           the distortion level
    names.npy      unicode [N]         the distorted image's file name
    manifest.json  written last: dataset, higher_is_better, size [H, W], counts, sources

Scoring resolution: the datasets' native sizes (TID2013 and KADID-10k 384 x 512, CSIQ
512 x 512, H x W); ``prepare`` keeps the size of the first reference and resizes any image
of another size to it (bicubic, counted in the manifest's ``resized``), so the small
synthetic twins keep their own size. Each dataset module parses its label file into
:class:`Row` s and calls :func:`write`; its ``load`` is :func:`load`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workflow import recovery
from workflow.datasets.arrays import (
    CorruptFileError,
    decode_into_npy,
    default_workers,
    expect,
    load_arrays,
    read_manifest,
)
from workflow.files import save_npy, sha256_file, write_json

__all__ = ["MosError", "Row", "case_index", "find_root", "load", "load_manifest", "loader",
           "number", "prepare", "read_image", "write"]

ARRAYS = ("ref", "dist", "ref_index", "mos", "dist_type", "level", "names")


class MosError(CorruptFileError):
    """A MOS dataset's raw tree that cannot be prepared; the message names the file (and line)
    and the fix."""


@dataclass(frozen=True)
class Row:
    """One distorted image of a label file: its reference's and its own file (resolved on
    disk), the published score, the distortion type and level, and where the row came from
    (``file:line``, for the messages)."""

    ref: Path
    dist: Path
    mos: float
    dist_type: str
    level: int
    where: str


def install_staged(stage: Path, raw_dir: Path) -> None:
    """Move a synthesized fake's staged entries into ``raw_dir`` (replacing older ones)."""
    for p in stage.iterdir():
        target = raw_dir / p.name
        if target.is_dir():
            shutil.rmtree(target)
        p.replace(target)


def number(text: str, where: str, what: str = "score") -> float:
    """``text`` as a finite float, or an error naming ``where`` (``file:line``)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise MosError(f"{where}: {what} {text!r} is not a finite number; the label file is "
                       f"damaged or not the published one: fetch or synthesize the dataset "
                       f"again")
    return value


def case_index(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Lower-cased file name -> file of ``folder`` (TID2013 mixes ``I01.BMP`` with
    ``i01_01_1.bmp``; a label file's names match the disk only case-insensitively)."""
    if not folder.is_dir():
        raise MosError(f"{folder} is missing: the raw tree is incomplete; fetch or synthesize "
                       f"the dataset again (or check data.paths)")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.lower().endswith(tuple(suffixes)):
            continue
        key = p.name.lower()
        if key in out:
            raise MosError(f"{folder}: {out[key].name} and {p.name} differ only in case; keep "
                           f"one")
        out[key] = p
    return out


def find_root(raw_dir: Path, marker: str, dataset: str, depth: int = 3) -> Path:
    """The folder under ``raw_dir`` (itself or up to ``depth`` levels down, links followed)
    holding ``marker`` (the label file), wherever the archive or a user's folder put it."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise MosError(f"{dataset} raw folder {raw_dir} does not exist; download or "
                       f"synthesize it first")
    found = []
    for dirpath, dirnames, filenames in os.walk(raw_dir, followlinks=True):
        level = len(Path(dirpath).relative_to(raw_dir).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if marker in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
        if level >= depth:
            dirnames[:] = []
    if not found:
        raise MosError(f"no {marker} under {raw_dir} (nor {depth} levels down): is the "
                       f"{dataset} download complete? (docs/data.md has the layout)")
    if len(found) > 1:
        raise MosError(f"several {marker} under {raw_dir}: {', '.join(map(str, found))}; "
                       f"keep one {dataset} tree")
    return found[0]


def read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 RGB [H, W, 3]; resized (bicubic) to ``size`` (H, W) if it differs."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise MosError(f"{path}: cannot decode the image ({type(e).__name__}: {e}); the raw "
                       f"file is damaged: fetch or synthesize the dataset again") from None


def _native_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, SyntaxError, ValueError) as e:
        raise MosError(f"{path}: cannot decode the image ({type(e).__name__}: {e}); the raw "
                       f"file is damaged: fetch or synthesize the dataset again") from None


def write(out_dir: Path, dataset: str, rows: Sequence[Row], higher_is_better: bool,
          extra: dict[str, Any] | None = None, workers: int | None = None) -> dict[str, Any]:
    """Decode every image of ``rows`` into the prepared arrays; ``manifest.json`` last.

    Built in a staging folder and moved in only when every image decoded, so a failure
    leaves neither a manifest nor a half-written array.
    """
    out_dir = Path(out_dir)
    if not rows:
        raise MosError(f"{dataset}: the label file lists no images")
    for r in rows:
        if not r.dist.is_file():
            raise MosError(f"{r.dist} is missing ({r.where} names it); the raw tree is "
                           f"incomplete: fetch or synthesize the dataset again")
        if not r.ref.is_file():
            raise MosError(f"{r.ref} is missing (the reference of {r.where}); the raw tree is "
                           f"incomplete: fetch or synthesize the dataset again")
    refs = sorted({r.ref for r in rows}, key=lambda p: p.name.lower())
    index = {p: i for i, p in enumerate(refs)}
    size = _native_size(refs[0])
    workers = workers or default_workers()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    stage = recovery.mkdtemp(out_dir)
    t0 = time.perf_counter()
    resized: list[str] = []

    def decode(path: Path) -> np.ndarray:
        a = read_image(path, size)
        if _native_size(path) != size:
            resized.append(path.name)
        return a

    try:
        decode_into_npy(stage / "ref.npy", refs, decode, (*size, 3), workers)
        decode_into_npy(stage / "dist.npy", [r.dist for r in rows], decode, (*size, 3),
                        workers)
        save_npy(stage / "ref_index.npy", np.array([index[r.ref] for r in rows], np.int64))
        save_npy(stage / "mos.npy", np.array([r.mos for r in rows], np.float64))
        save_npy(stage / "dist_type.npy", np.array([r.dist_type for r in rows], dtype=np.str_))
        save_npy(stage / "level.npy", np.array([r.level for r in rows], np.int64))
        save_npy(stage / "names.npy", np.array([r.dist.name for r in rows], dtype=np.str_))
        arrays = {}
        for name in ARRAYS:
            p = stage / f"{name}.npy"
            a = np.load(p, mmap_mode="r")
            arrays[p.name] = {"shape": list(a.shape), "dtype": str(a.dtype),
                              "sha256": sha256_file(p)}
            del a
        for name in ARRAYS:
            os.replace(stage / f"{name}.npy", out_dir / f"{name}.npy")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    types = sorted({r.dist_type for r in rows})
    manifest = {
        "dataset": dataset,
        "higher_is_better": bool(higher_is_better),
        "size": [int(size[0]), int(size[1])],
        "counts": {"references": len(refs), "distorted": len(rows),
                   "distortion_types": len(types), "levels": len({r.level for r in rows})},
        "distortion_types": types,
        "references": [p.name for p in refs],
        "resized": sorted(resized),
        "arrays": arrays,
        "seconds": round(time.perf_counter() - t0, 2),
        **(extra or {}),
    }
    write_json(manifest, out_dir / "manifest.json")
    return manifest


def prepare(raw_dir: Path, out_dir: Path, dataset: str, title: str, labels: str,
            read_rows: Callable[[Path], list[Row]], higher_is_better: bool, score: str,
            checksums: dict[str, str], workers: int | None = None) -> dict[str, Any]:
    """The whole ``prepare`` of a MOS dataset: find the raw tree's root by its label file
    ``labels``, read its rows with the dataset's own ``read_rows`` and :func:`write` them;
    the manifest records the raw folder, the root, what ``score`` means and ``checksums``."""
    raw_dir = Path(raw_dir)
    root = find_root(raw_dir, labels, title)
    return write(out_dir, dataset, read_rows(root), higher_is_better=higher_is_better,
                 extra={"source": str(raw_dir), "root": str(root.relative_to(raw_dir)),
                        "score": score, "checksums": checksums},
                 workers=workers)


def load_manifest(prepared_dir: str | os.PathLike) -> dict[str, Any]:
    return read_manifest(prepared_dir)


def load(prepared_dir: str | os.PathLike, dataset: str | None = None) -> dict[str, np.ndarray]:
    """The prepared arrays (memory-mapped), checked: ``ref``, ``dist``, ``ref_index``,
    ``mos``, ``dist_type``, ``level``, ``names`` (module docstring); ``dataset``: the name the
    manifest must carry."""
    d = Path(prepared_dir)
    manifest = read_manifest(d)
    if dataset and manifest.get("dataset") != dataset:
        raise MosError(f"{d}/manifest.json holds {manifest.get('dataset')!r}, not {dataset}; "
                       f"pass the prepared {dataset} folder")
    a = load_arrays(d, {k: f"{k}.npy" for k in ARRAYS})
    ref = expect(a["ref"], d / "ref.npy", np.uint8, (None, None, None, 3), "images")
    h, w = ref.shape[1:3]
    n = len(a["dist"])
    expect(a["dist"], d / "dist.npy", np.uint8, (n, h, w, 3), "images")
    expect(a["ref_index"], d / "ref_index.npy", np.int64, (n,), "reference indices")
    expect(a["mos"], d / "mos.npy", np.float64, (n,), "scores")
    expect(a["level"], d / "level.npy", np.int64, (n,), "levels")
    for k in ("dist_type", "names"):
        if a[k].dtype.kind != "U" or a[k].shape != (n,):
            raise MosError(f"{d / (k + '.npy')}: expected unicode [{n}], got {a[k].dtype} "
                           f"{list(a[k].shape)}; rerun the prepare_dataset rule")
    if n == 0 or len(ref) == 0:
        raise MosError(f"{d}: holds no images; rerun the prepare_dataset rule")
    idx = np.asarray(a["ref_index"])
    if idx.min() < 0 or idx.max() >= len(ref):
        raise MosError(f"{d / 'ref_index.npy'}: indices outside 0..{len(ref) - 1}; rerun the "
                       f"prepare_dataset rule")
    if not np.isfinite(a["mos"]).all():
        raise MosError(f"{d / 'mos.npy'}: holds non-finite scores; rerun the prepare_dataset "
                       f"rule")
    if list(manifest.get("size", [])) != [h, w]:
        raise MosError(f"{d}/manifest.json: size {manifest.get('size')} is not the arrays' "
                       f"[{h}, {w}]; rerun the prepare_dataset rule")
    return a


def loader(dataset: str) -> Callable[[str | os.PathLike], dict[str, np.ndarray]]:
    """The ``load`` of one MOS dataset's module: :func:`load` checked against ``dataset``."""
    def load_dataset(prepared_dir: str | os.PathLike) -> dict[str, np.ndarray]:
        return load(prepared_dir, dataset)

    load_dataset.__doc__ = (f"The prepared {dataset} arrays: ``ref, dist, ref_index, mos, "
                            f"dist_type, level, names`` (:func:`workflow.datasets.mos.load`).")
    load_dataset.__name__ = load_dataset.__qualname__ = "load"
    return load_dataset


def image_files(folder: Path, suffixes: Iterable[str]) -> list[str]:
    """Names of the image files directly in ``folder`` (for the user-folder checks)."""
    suffixes = tuple(suffixes)
    return sorted(p.name for p in folder.iterdir()
                  if p.name.lower().endswith(suffixes) and not p.name.startswith("."))
