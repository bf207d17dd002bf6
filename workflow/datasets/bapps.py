"""BAPPS (Zhang et al. 2018), the data of Benchmark 1: 2AFC triplets and JND pairs.

Raw layout (what the upstream archives extract to, possibly under a top folder
such as ``dataset/``)::

    2afc/{train,val}/<subset>/{ref,p0,p1}/<stem>.png   judge/<stem>.npy  (fraction choosing p1)
    jnd/val/<subset>/{p0,p1}/<stem>.png                 same/<stem>.npy   (fraction saying "same")

``prepare`` decodes every patch once, resized to 64x64 with PIL's antialiased
bilinear filter (what the LPIPS data loader does), into uint8 NHWC arrays named
``2afc_<split>_<subset>_{ref,p0,p1,judge,names}.npy`` and
``jnd_val_<subset>_{p0,p1,same,names}.npy``; ``manifest.json`` is written last.
Files are paired by stem, never by listing order.

Checked while preparing, each failure naming the file: every judgement file holds exactly
one finite value in [0, 1] (the fraction of observers who chose p1, or who said "same"), every
patch decodes, every stem has all its parts; the free space for the arrays is checked
before the first one is written.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from workflow import recovery
from workflow.datasets import sources
from workflow.datasets.arrays import CorruptFileError, default_workers, expect
from workflow.files import (
    disk_full_errors,
    ensure_free,
    reserve,
    sha256_file,
    write_json,
)

FILES = sources.BAPPS

IMAGE_SIZE = 64
TWOAFC_SUBSETS = sources.BAPPS_2AFC_SUBSETS
JND_SUBSETS = sources.BAPPS_JND_SUBSETS
# folder -> file suffix, per kind; the first folder with images names the pair
PARTS = sources.BAPPS_PARTS
LABEL = {"2afc": "judge", "jnd": "same"}
MEANING = {"judge": "the fraction of observers who chose p1",
           "same": "the fraction of observers who said the pair looks the same"}


class BappsError(CorruptFileError):
    """A BAPPS raw tree that cannot be prepared; the message names the file and the fix."""


# ----------------------------------------------------------------------------- synthesize


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field with a sharp rectangle: structure a CNN responds to."""
    low = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32) / 255
    y0, x0 = rng.integers(0, size // 2, 2)
    h, w = rng.integers(size // 6, size // 2, 2)
    img[y0:y0 + h, x0:x0 + w] = rng.random(3)
    return img


def _distort(img: np.ndarray, strength: float, kind: int, rng: np.random.Generator) -> np.ndarray:
    """Distortion whose visibility grows with ``strength`` in [0, 1]."""
    if kind == 0:  # additive noise
        out = img + rng.normal(0, 0.3 * strength, img.shape)
    elif kind == 1:  # blur
        pil = Image.fromarray((img * 255).astype(np.uint8))
        blurred = pil.filter(ImageFilter.GaussianBlur(float(4 * strength)))
        out = np.asarray(blurred, np.float32) / 255
    else:  # colour cast
        out = img + 0.5 * strength * (rng.random(3) - 0.5)
    return np.clip(out, 0, 1)


def _save_png(img: np.ndarray, path: Path) -> None:
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path)


def synthesize(raw_dir: Path, seed: int, n_val: int, n_train: int, n_jnd: int, size: int) -> None:
    """A small fake BAPPS in the upstream layout, under ``raw_dir/dataset/``.

    p0 and p1 are distortions of the reference of different strengths; the
    judgement is a vote of simulated humans (5 in val, 2 in train, 3 for JND)
    that favours the weaker distortion, so any sensible metric scores above
    chance. Patches are ``size`` pixels so ``prepare``'s resize is exercised.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stage = recovery.mkdtemp(raw_dir, "synth")
    try:
        for split, subsets in TWOAFC_SUBSETS.items():
            n, votes = (n_val, 5) if split == "val" else (n_train, 2)
            for subset in subsets:
                d = stage / "2afc" / split / subset
                for part in PARTS["2afc"]:
                    (d / part).mkdir(parents=True)
                for i in range(n):
                    ref = _texture(rng, size)
                    s0, s1 = (float(x) for x in rng.random(2))
                    kind = int(rng.integers(3))
                    p_p1 = 1 / (1 + np.exp(-10 * (s0 - s1)))  # p1 chosen when it is less distorted
                    _save_png(ref, d / "ref" / f"{i:06d}.png")
                    _save_png(_distort(ref, s0, kind, rng), d / "p0" / f"{i:06d}.png")
                    _save_png(_distort(ref, s1, kind, rng), d / "p1" / f"{i:06d}.png")
                    np.save(d / "judge" / f"{i:06d}.npy",
                            np.array([rng.binomial(votes, p_p1) / votes], dtype=np.float32))
        for subset in JND_SUBSETS:
            d = stage / "jnd" / "val" / subset
            for part in PARTS["jnd"]:
                (d / part).mkdir(parents=True)
            for i in range(n_jnd):
                p0 = _texture(rng, size)
                s = float(rng.random())
                _save_png(p0, d / "p0" / f"{i:06d}.png")
                _save_png(_distort(p0, s, int(rng.integers(3)), rng), d / "p1" / f"{i:06d}.png")
                np.save(d / "same" / f"{i:06d}.npy",
                        np.array([rng.binomial(3, np.exp(-3 * s)) / 3], dtype=np.float32))
        final = raw_dir / "dataset"
        if final.exists():
            shutil.rmtree(final)
        stage.rename(final)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


# ----------------------------------------------------------------------------- prepare


def find_roots(raw_dir: Path) -> dict[str, Path]:
    """The ``2afc`` and ``jnd`` folders under ``raw_dir``, wherever the archives put them."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise BappsError(f"BAPPS raw folder {raw_dir} does not exist; download or synthesize "
                         f"it first")
    found: dict[str, list[Path]] = {"2afc": [], "jnd": []}
    # followlinks: a raw folder may hold a link to the tree (config data.paths.bapps)
    for dirpath, dirnames, _ in os.walk(raw_dir, followlinks=True):
        depth = len(Path(dirpath).relative_to(raw_dir).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in list(dirnames):
            if name in found:
                found[name].append(Path(dirpath) / name)
                dirnames.remove(name)  # do not descend into the data itself
        if depth >= 3:
            dirnames[:] = []
    roots = {}
    for kind, paths in found.items():
        if len(paths) > 1:
            raise BappsError(f"several BAPPS {kind}/ folders under {raw_dir}: {paths}; keep one")
        if paths:
            roots[kind] = paths[0]
    if "2afc" not in roots:
        raise BappsError(f"no 2afc/ folder under {raw_dir}: is the BAPPS download complete?")
    return roots


def _pairs(subset_dir: Path, kind: str) -> list[str]:
    """Stems present in every part folder; a stem missing from one folder is an error."""
    stems: dict[str, dict[str, Path]] = {}
    for part, suffix in PARTS[kind].items():
        folder = subset_dir / part
        if not folder.is_dir():
            raise BappsError(f"{folder} is missing (expected {', '.join(PARTS[kind])} "
                             f"under {subset_dir})")
        stems[part] = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == suffix}
    union = set().union(*stems.values())
    for part, have in stems.items():
        for stem in sorted(union - set(have)):
            other = next(p[stem] for p in stems.values() if stem in p)
            raise BappsError(
                f"{other} has no partner in {subset_dir / part}/ "
                f"(expected {stem}{PARTS[kind][part]}); "
                f"the raw tree is incomplete: fetch or synthesize it again"
            )
    return sorted(union)


def _read_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                # PIL's bilinear resize antialiases when shrinking, as the LPIPS loader's does
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise BappsError(f"{path}: unreadable image ({type(e).__name__}: {e}); the raw file is "
                         f"damaged: fetch or synthesize the dataset again") from None


def _read_label(path: Path, data: bytes | None = None) -> float:
    """The one judgement of a ``.npy`` file (or of its bytes, ``data``), checked: finite
    and in [0, 1].

    Call it from one thread only: ``np.load`` parses the header with ``ast``, and
    CPython 3.11.7's AST converter keeps its recursion depth in global state, so two
    threads parsing at once can fail with "AST constructor recursion depth mismatch"
    (CPython gh-106905). ``prepare`` reads the bytes on its pool and parses them here.
    """
    try:
        a = np.load(io.BytesIO(data) if data is not None else path)
        if a.size != 1:
            raise ValueError(f"expected one value, got shape {a.shape}")
        value = float(a.reshape(-1)[0])
    except Exception as e:
        raise BappsError(f"{path}: unreadable judgement ({type(e).__name__}: {e}); the raw "
                         f"file is damaged: fetch or synthesize the dataset again") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise BappsError(
            f"{path}: judgement {value!r} is not a fraction in [0, 1] ({MEANING[path.parent.name]}"
            f"); the raw file is damaged or not from BAPPS: fetch or synthesize the dataset "
            f"again")
    return value


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes, or None when it cannot be read (``_read_label`` then names why)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def _subsets(roots: dict[str, Path]) -> list[tuple[str, str, str, Path]]:
    out = []
    for kind, splits in (("2afc", ("train", "val")), ("jnd", ("val",))):
        if kind not in roots:
            continue
        for split in splits:
            d = roots[kind] / split
            if d.is_dir():
                out += [(kind, split, s.name, s) for s in sorted(d.iterdir())
                        if s.is_dir() and not s.name.startswith(".")]
    return out


def prepare(raw_dir: Path, out_dir: Path, workers: int | None = None,
            size: int = IMAGE_SIZE) -> dict:
    """Decode the raw tree into arrays in ``out_dir``; ``manifest.json`` is written last.

    Everything is built in a staging folder and moved in only when every file
    decoded, so a failure leaves no manifest and no half-written array.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    roots = find_roots(raw_dir)
    workers = workers or max(2, default_workers())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    items = []
    for kind, split, subset, sdir in _subsets(roots):
        stems = _pairs(sdir, kind)
        if not stems:
            raise BappsError(f"{sdir} holds no {kind} items")
        items.append((kind, split, subset, sdir, stems))
    n_images = sum(len(st) * sum(sfx == ".png" for sfx in PARTS[k].values())
                   for k, _, _, _, st in items)
    # images, plus a float32 judgement and a short name per item
    ensure_free(out_dir, n_images * size * size * 3 + sum(len(i[4]) for i in items) * 64,
                f"the prepared BAPPS arrays ({n_images:,} patches of {size}x{size})")
    stage = recovery.mkdtemp(out_dir)
    t0 = time.perf_counter()
    counts: dict[str, int] = {}
    try:
        with ThreadPoolExecutor(workers) as pool, \
                disk_full_errors(out_dir, "the prepared BAPPS arrays"):
            for kind, split, subset, sdir, stems in items:
                prefix = f"{kind}_{split}_{subset}"
                for part, suffix in PARTS[kind].items():
                    paths = [sdir / part / f"{s}{suffix}" for s in stems]
                    if suffix == ".npy":
                        # the reads on the pool, the parsing here (see _read_label)
                        labels = np.array([_read_label(p, b) for p, b in
                                           zip(paths, pool.map(_read_bytes, paths), strict=True)],
                                          dtype=np.float32)
                        np.save(stage / f"{prefix}_{part}.npy", labels)
                        continue
                    arr = np.lib.format.open_memmap(
                        stage / f"{prefix}_{part}.npy", mode="w+", dtype=np.uint8,
                        shape=(len(paths), size, size, 3))
                    reserve(stage / f"{prefix}_{part}.npy")  # ENOSPC now, not SIGBUS later

                    def fill(i: int, arr=arr, paths=paths) -> None:
                        arr[i] = _read_image(paths[i], size)

                    for _ in pool.map(fill, range(len(paths))):
                        pass
                    arr.flush()
                    del arr
                np.save(stage / f"{prefix}_names.npy", np.array(stems))
                counts[f"{kind}/{split}/{subset}"] = len(stems)
                print(f"{kind}/{split}/{subset}: {len(stems)} items "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
            arrays = {}
            for p in sorted(stage.iterdir()):
                a = np.load(p, mmap_mode="r")
                arrays[p.name] = {"shape": list(a.shape), "dtype": str(a.dtype),
                                  "sha256": sha256_file(p)}
                del a
                os.replace(p, out_dir / p.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    ready = raw_dir / "READY"
    manifest = {
        "dataset": "bapps",
        "image_size": size,
        "source": str(raw_dir),
        "roots": {k: str(v.relative_to(raw_dir)) for k, v in roots.items()},
        "raw_ready": ready.read_text() if ready.exists() else None,
        "counts": counts,
        "arrays": arrays,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(manifest, out_dir / "manifest.json")
    return manifest


# ----------------------------------------------------------------------------- load


def load(prepared_dir: Path, kind: str, split: str, subset: str) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one subset: ``ref, p0, p1, judge, names`` (2AFC) or
    ``p0, p1, same, names`` (JND); images uint8 [N, S, S, 3], labels float32 [N]."""
    if kind not in PARTS:
        raise ValueError(f"kind must be '2afc' or 'jnd', got {kind!r}")
    prepared_dir = Path(prepared_dir)
    prefix = f"{kind}_{split}_{subset}"
    out = {}
    for part in [*PARTS[kind], "names"]:
        p = prepared_dir / f"{prefix}_{part}.npy"
        if not p.exists():
            have = sorted({"_".join(f.name.split("_")[:3])
                           for f in prepared_dir.glob("*_names.npy")})
            raise BappsError(f"{p} not found: BAPPS {kind}/{split}/{subset} was not prepared "
                             f"(prepared: {', '.join(have) or 'nothing'})")
        out[part] = np.load(p, mmap_mode="r")
    n = len(out["names"])
    for part, suffix in PARTS[kind].items():
        p = prepared_dir / f"{prefix}_{part}.npy"
        if suffix == ".npy":
            expect(out[part], p, np.float32, (n,), "judgements")
        else:
            expect(out[part], p, np.uint8, (n, None, None, 3), "images")
    return out
