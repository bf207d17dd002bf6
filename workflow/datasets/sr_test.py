"""Super-resolution test sets: Set5 (5 images), Set14 (14), BSD100 (the 100 test images of
BSDS300).

Raw layout (what the download + extraction leave and ``synthesize`` writes),
``{RES}/raw/sr_test/``:
``Set5/img_00N_SRF_2_HR.png`` and ``Set14/img_0NN_SRF_2_HR.png`` (the HR images of
jbhuang0604/SelfExSR, fetched one by one from raw.githubusercontent.com),
``BSDS300-images.tgz`` and its extraction ``BSDS300/{iids_train.txt, iids_test.txt,
images/{train,test}/<id>.jpg}``. No checksums are published for any of them: the sha256
of what was fetched is recorded in ``checksums.json`` and verified on later runs.

Prepared (``{RES}/prepared/sr_test/``): ``set5.npz``, ``set14.npz``, ``bsd100.npz``, one
uint8 HWC RGB array per image (full size; keys ``img_001``.. and the BSDS image ids).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from workflow.datasets import sources
from workflow.datasets.arrays import (
    CorruptFileError,
    decode_image,
    parallel_map,
    raw_checksums,
    write_manifest,
)
from workflow.datasets.fakes import photo
from workflow.files import atomic_path, save_npz

FILES = sources.SR_TEST
SET_SIZES = sources.SR_SETS
SETS = ("set5", "set14", "bsd100")
_hr_name = sources.sr_hr_name


def synthesize(raw_dir: Path, seed: int, set5: int, set14: int, bsd100: int) -> None:
    """PNG HR images of assorted sizes, and a BSDS300-like .tgz (JPEGs + id lists)."""
    from PIL import Image

    from workflow.datasets.archives import extract_archive

    raw_dir = Path(raw_dir)
    rng = np.random.default_rng(seed)
    for folder, n in (("Set5", set5), ("Set14", set14)):
        (raw_dir / folder).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            h, w = int(rng.integers(60, 140)), int(rng.integers(60, 140))
            with atomic_path(raw_dir / folder / _hr_name(i)) as tmp:
                Image.fromarray(photo(rng, h, w)).save(tmp, format="PNG")
    ids = sorted(rng.choice(np.arange(100000, 999999), bsd100 + 2, replace=False).tolist())
    test_ids, train_ids = ids[:bsd100], ids[bsd100:]
    archive = raw_dir / "BSDS300-images.tgz"
    with atomic_path(archive, suffix=".tmp") as tmp, tarfile.open(tmp, "w:gz") as tf:
        def add(name: str, blob: bytes) -> None:
            info = tarfile.TarInfo(f"BSDS300/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))

        for split, split_ids in (("test", test_ids), ("train", train_ids)):
            add(f"iids_{split}.txt", "".join(f"{i}\n" for i in split_ids).encode())
            for i in split_ids:
                buf = io.BytesIO()
                # BSDS300 images are 481x321 or 321x481 (portrait); keep both orientations
                hw = (81, 121) if rng.random() < 0.5 else (121, 81)
                Image.fromarray(photo(rng, *hw)).save(buf, format="JPEG", quality=90)
                add(f"images/{split}/{i}.jpg", buf.getvalue())
    extract_archive(archive, raw_dir)


def _downloaded(raw_dir: Path) -> bool:
    """Whether ``raw_dir`` holds the real download (READY says so), not a synthetic fake."""
    import json

    try:
        return json.loads((raw_dir / "READY").read_text()).get("source") == "download"
    except (OSError, ValueError, AttributeError):
        return False


def _set_paths(raw_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    out: dict[str, list[tuple[str, Path]]] = {}
    for folder in SET_SIZES:
        files = sorted((raw_dir / folder).glob("img_*_SRF_2_HR.png"))
        if not files:
            raise CorruptFileError(f"{raw_dir / folder}: no img_*_SRF_2_HR.png images; "
                                   f"download sr_test again")
        out[folder.lower()] = [(p.name.split("_SRF")[0], p) for p in files]
    ids_file = raw_dir / "BSDS300" / "iids_test.txt"
    if not ids_file.exists():
        raise CorruptFileError(f"{ids_file} is missing: BSDS300-images.tgz was not extracted; "
                               f"download sr_test again")
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    if len(set(ids)) != len(ids) or not all(i.isdigit() for i in ids):
        raise CorruptFileError(f"{ids_file}: expected distinct numeric image ids, one a line; "
                               f"download sr_test again")
    if _downloaded(raw_dir):  # the real sets have exactly these sizes
        want = {**{f.lower(): n for f, n in SET_SIZES.items()}, "bsd100": 100}
        have = {**{k: len(v) for k, v in out.items()}, "bsd100": len(ids)}
        for name, n in want.items():
            if have[name] != n:
                where = ids_file if name == "bsd100" else raw_dir / name.capitalize()
                raise CorruptFileError(f"{where}: {have[name]} images of {name}, the real set "
                                       f"has {n}; download sr_test again")
    out["bsd100"] = [(i, raw_dir / "BSDS300" / "images" / "test" / f"{i}.jpg") for i in ids]
    return out


def prepare(raw_dir: Path, out_dir: Path, workers: int | None = None) -> dict[str, Any]:
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, shapes, sources = {}, {}, {}
    for name, items in _set_paths(raw_dir).items():
        def dec(item: tuple[str, Path]) -> np.ndarray:
            if not item[1].exists():
                raise CorruptFileError(f"{item[1]} is missing (listed in BSDS300/iids_test.txt)")
            return decode_image(item[1])

        images = parallel_map(dec, items, workers)
        save_npz(out_dir / f"{name}.npz", {k: a for (k, _), a in zip(items, images, strict=True)})
        counts[name] = len(items)
        shapes[name] = {k: list(a.shape) for (k, _), a in zip(items, images, strict=True)}
        sources[name] = [str(p.relative_to(raw_dir)) for _, p in items]
    return write_manifest(out_dir, {
        "dataset": "sr_test", "counts": counts, "shapes": shapes, "sources": sources,
        "checksums": raw_checksums(raw_dir),
    })


def load(prepared_dir: Path, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """``split``: set5 | set14 | bsd100 -> {image name: uint8 HxWx3 array}, in name order
    (the first ``limit`` images when given). Grayscale images come back as 3 equal channels."""
    p = Path(prepared_dir) / f"{split.lower()}.npz"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: test set {split!r} was not prepared "
                                f"(config key super_resolution.test_sets; `snakemake --cores 1 "
                                f"{Path(prepared_dir)}/manifest.json`)")
    with np.load(p) as z:
        names = sorted(z.files)[: limit or None]
        images = {k: z[k] for k in names}
    for k, im in images.items():
        if im.dtype != np.uint8 or im.ndim not in (2, 3):
            raise CorruptFileError(f"{p}: image {k!r} must be uint8 HxW[x3], got {im.dtype} "
                                   f"{im.shape}; rerun the sr_test prepare step")
        if im.ndim == 2:
            im = im[..., None]
        if im.shape[-1] == 1:  # grayscale test images are scored as RGB with equal channels
            im = np.repeat(im, 3, axis=-1)
        images[k] = im
    return images
