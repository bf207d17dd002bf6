"""NIGHTS (Fu et al. 2023, the DreamSim dataset): 20,019 triplets of Stable Diffusion images, a
reference and two variations, with two-alternative forced-choice human votes.

Raw layout (what ``nights.zip`` extracts to; ``dataset/README.md`` of ssundaram21/dreamsim)::

    nights/ref/<000..099>/<000..999>.png
    nights/distort/<000..099>/<000..999>_0.png, ..._1.png
    nights/data.csv   columns id, left_vote, right_vote, votes, ref_path, left_path,
                      right_path, prompt, split (train | val | test), is_imagenet (True | False)

DreamSim's loader (``dataset/dataset.py``) keeps the rows with ``votes >= 6`` and takes
``right_vote`` as the target p, scoring a metric with ``(d0 < d1) (1 - p) + (d1 < d0) p +
(d0 == d1) / 2`` (``evaluation/score.py``): the BAPPS convention with p0 = left, p1 = right.
``prepare`` keeps the rows with ``votes >= min_votes`` (config ``data.nights.min_votes``,
6 as DreamSim), takes ``judge = right_vote / (left_vote + right_vote)`` (``right_vote``
itself when the two are 0/1, as in the release), and resizes every image to
``size`` x ``size`` (224, bicubic: DreamSim's ``Resize((224, 224), BICUBIC)``).

Prepared: ``{split}_{ref,p0,p1}.npy`` uint8 [N, S, S, 3], ``{split}_judge.npy`` float64,
``{split}_subset.npy`` unicode ("imagenet" / "no_imagenet" from ``is_imagenet``, "all"
where the column is absent), ``{split}_ids.npy``; ``manifest.json`` last.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workflow import recovery
from workflow.datasets import mos, sources
from workflow.datasets.arrays import (
    decode_into_npy,
    default_workers,
    expect,
    load_arrays,
    raw_checksums,
    read_manifest,
)
from workflow.datasets.fakes import distort, photo
from workflow.files import save_npy, sha256_file, write_json

FILES = sources.NIGHTS
TOP = "nights"
LABELS = "data.csv"
SPLITS = ("train", "val", "test")
COLUMNS = ("id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path",
           "prompt", "split", "is_imagenet")
REQUIRED = ("id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path",
            "split")
SIZE = 224
MIN_VOTES = 6
PARTS = ("ref", "p0", "p1")


class NightsError(mos.MosError):
    """A NIGHTS raw tree that cannot be prepared; the message names the file (and line)."""


def synthesize(raw_dir: Path, seed: int, train: int = 6, val: int = 4, test: int = 8,
               side: int = 48) -> None:
    """A small NIGHTS in the upstream layout (``nights/{ref,distort}/000/*.png``, ``data.csv``).

    The two variations are distortions of the reference of different strengths; the votes
    (6 raters, some rows with 5 so the ``min_votes`` filter has work) favour the weaker one.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stage = recovery.mkdtemp(raw_dir, "synth")
    try:
        top = stage / TOP
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        i = 0
        for split, n in (("train", train), ("val", val), ("test", test)):
            for _ in range(n):
                folder, stem = f"{i // 1000:03d}", f"{i % 1000:03d}"
                for part in ("ref", "distort"):
                    (top / part / folder).mkdir(parents=True, exist_ok=True)
                img = photo(rng, side, side)
                s0, s1 = (float(x) for x in rng.random(2))
                kind = int(rng.integers(4))
                Image.fromarray(img).save(top / "ref" / folder / f"{stem}.png")
                Image.fromarray(distort(img, kind, s0, rng)).save(
                    top / "distort" / folder / f"{stem}_0.png")
                Image.fromarray(distort(img, kind, s1, rng)).save(
                    top / "distort" / folder / f"{stem}_1.png")
                votes = 5 if i % 5 == 4 else 6
                right = int(s1 < s0)  # the release's votes: 0/1, unanimous among `votes`
                w.writerow([i, 1 - right, right, votes, f"ref/{folder}/{stem}.png",
                            f"distort/{folder}/{stem}_0.png", f"distort/{folder}/{stem}_1.png",
                            f"an image of a thing {i}", split, i % 2 == 0])
                i += 1
        (top / LABELS).write_text(buf.getvalue())
        final = raw_dir / TOP
        if final.exists():
            shutil.rmtree(final)
        top.rename(final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _flag(text: str, where: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1"):
        return True
    if t in ("false", "0"):
        return False
    raise NightsError(f"{where}: is_imagenet {text!r} is not True or False; the label file "
                      f"is damaged: fetch or synthesize it again")


def read_rows(root: Path, min_votes: int) -> dict[str, list[dict[str, Any]]]:
    """The kept rows of ``data.csv`` per split: id, judge, subset and the three files."""
    labels = root / LABELS
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    with open(labels, newline="", errors="replace") as f:
        reader = csv.DictReader(f)
        have = [c for c in (reader.fieldnames or []) if c]
        missing = [c for c in REQUIRED if c not in have]
        if missing:
            raise NightsError(f"{labels}:1: no column {', '.join(missing)} (have "
                              f"{', '.join(have) or 'none'}); the label file is damaged")
        for i, rec in enumerate(reader, 2):
            where = f"{labels}:{i}"
            if None in rec or any(rec.get(c) is None for c in REQUIRED):
                raise NightsError(f"{where}: expected {len(have)} fields; the label file is "
                                  f"damaged: fetch or synthesize it again")
            left = mos.number(rec["left_vote"], where, "left_vote")
            right = mos.number(rec["right_vote"], where, "right_vote")
            votes = mos.number(rec["votes"], where, "votes")
            if left < 0 or right < 0 or left + right <= 0:
                raise NightsError(f"{where}: left_vote {left:g} and right_vote {right:g} are "
                                  f"not votes (non-negative, not both 0)")
            split = rec["split"].strip()
            if split not in out:
                raise NightsError(f"{where}: split {split!r} is none of {', '.join(SPLITS)}")
            if votes < min_votes:
                continue
            subset = ("all" if rec.get("is_imagenet") in (None, "") else
                      "imagenet" if _flag(rec["is_imagenet"], where) else "no_imagenet")
            files = [root / rec[c].strip() for c in ("ref_path", "left_path", "right_path")]
            for p, c in zip(files, ("ref_path", "left_path", "right_path"), strict=True):
                rel = Path(rec[c].strip())
                if rel.is_absolute() or ".." in rel.parts:
                    raise NightsError(f"{where}: {c} {rec[c]!r} leaves the dataset folder")
                if not p.is_file():
                    raise NightsError(f"{p} is missing ({where} names it as {c}); the raw "
                                      f"tree is incomplete: fetch or synthesize it again")
            out[split].append({"id": rec["id"].strip(), "judge": right / (left + right),
                               "subset": subset, "files": files})
    return out


def prepare(raw_dir: Path, out_dir: Path, size: int = SIZE, min_votes: int = MIN_VOTES,
            workers: int | None = None) -> dict[str, Any]:
    """Decode every kept triplet at ``size`` x ``size``; ``manifest.json`` last (staged)."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    root = mos.find_root(raw_dir, LABELS, "NIGHTS")
    rows = read_rows(root, int(min_votes))
    if not any(rows.values()):
        raise NightsError(f"{root / LABELS}: no row has votes >= {min_votes} (config "
                          f"data.nights.min_votes)")
    workers = workers or default_workers()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    stage = recovery.mkdtemp(out_dir)
    t0 = time.perf_counter()

    def decode(path: Path) -> np.ndarray:
        return mos.read_image(path, (size, size))

    arrays: dict[str, Any] = {}
    try:
        for split, items in rows.items():
            if not items:
                continue
            for k, part in enumerate(PARTS):
                decode_into_npy(stage / f"{split}_{part}.npy", [r["files"][k] for r in items],
                                decode, (size, size, 3), workers)
            save_npy(stage / f"{split}_judge.npy",
                     np.array([r["judge"] for r in items], np.float64))
            save_npy(stage / f"{split}_subset.npy",
                     np.array([r["subset"] for r in items], dtype=np.str_))
            save_npy(stage / f"{split}_ids.npy", np.array([r["id"] for r in items], np.str_))
        for p in sorted(stage.iterdir()):
            a = np.load(p, mmap_mode="r")
            arrays[p.name] = {"shape": list(a.shape), "dtype": str(a.dtype),
                              "sha256": sha256_file(p)}
            del a
        for name in arrays:
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest = {
        "dataset": "nights",
        "size": [int(size), int(size)],
        "min_votes": int(min_votes),
        "judge": "right_vote / (left_vote + right_vote): P(p1 = right is closer to ref)",
        "counts": {s: len(v) for s, v in rows.items()},
        "subsets": {s: sorted({r["subset"] for r in v}) for s, v in rows.items()},
        "source": str(raw_dir),
        "root": str(root.relative_to(raw_dir)),
        "checksums": raw_checksums(raw_dir),
        "arrays": arrays,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(manifest, out_dir / "manifest.json")
    return manifest


def load(prepared_dir: Path, split: str) -> dict[str, np.ndarray]:
    """``ref, p0, p1`` uint8 [N, S, S, 3], ``judge`` float64 [N] (fraction preferring p1),
    ``subset`` and ``ids`` unicode [N] of one split (memory-mapped, checked)."""
    if split not in SPLITS:
        raise ValueError(f"NIGHTS split must be one of {', '.join(SPLITS)}, got {split!r}")
    d = Path(prepared_dir)
    manifest = read_manifest(d)
    if manifest.get("dataset") != "nights":
        raise NightsError(f"{d}/manifest.json holds {manifest.get('dataset')!r}, not nights")
    if not manifest.get("counts", {}).get(split):
        raise NightsError(f"{d}: NIGHTS {split} holds no triplet with votes >= "
                          f"{manifest.get('min_votes')} (config data.nights.min_votes)")
    names = [*PARTS, "judge", "subset", "ids"]
    a = load_arrays(d, {k: f"{split}_{k}.npy" for k in names})
    s = int(manifest["size"][0])
    n = len(a["judge"])
    for part in PARTS:
        expect(a[part], d / f"{split}_{part}.npy", np.uint8, (n, s, s, 3), "images")
    judge = expect(a["judge"], d / f"{split}_judge.npy", np.float64, (n,), "judgements")
    for k in ("subset", "ids"):
        if a[k].dtype.kind != "U" or a[k].shape != (n,):
            raise NightsError(f"{d / f'{split}_{k}.npy'}: expected unicode [{n}]; rerun the "
                              f"prepare_dataset rule")
    if not (np.isfinite(judge).all() and (judge >= 0).all() and (judge <= 1).all()):
        raise NightsError(f"{d / f'{split}_judge.npy'}: judgements outside [0, 1]; rerun the "
                          f"prepare_dataset rule")
    return a


def load_manifest(prepared_dir: Path) -> dict[str, Any]:
    return read_manifest(prepared_dir)


__all__ = ["FILES", "SPLITS", "NightsError", "load", "load_manifest", "prepare", "synthesize"]
