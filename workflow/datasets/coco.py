"""MS-COCO 2014 images for super-resolution training: a seeded draw of ``n_train`` (10,000)
train2014 and ``n_val`` (100) val2014 images.

Download: the member list of each zip is sorted, then ``n`` members are drawn with
``numpy.random.default_rng([seed, split_index])`` (reproducible, unlike the reference).
Where the server accepts byte ranges, only the zip's central directory and the drawn
members are fetched (one ranged request each, CRC-32 checked), not the 13.5 GB archive;
otherwise the whole zip is downloaded, verified against its sha256, and the drawn members
extracted from it.

Raw layout (the same whichever way it was fetched; ``synthesize`` writes small zips and
then runs the local-zip path), ``{RES}/raw/coco/``: ``train2014/COCO_train2014_*.jpg`` and
``val2014/COCO_val2014_*.jpg`` (the drawn members only), ``selection.json`` (per split:
archive, member count, n, seed, the drawn names and their CRC-32) and, when fetched whole
or synthesized, ``train2014.zip`` / ``val2014.zip``.

Prepared (``{RES}/prepared/coco/``): ``{train,val}_images.npy`` uint8 [N, 288, 288, 3]
(short side resized to 288, bilinear; centre crop), ``{train,val}_names.npy``.
Licence: the images are Flickr photos under Creative Commons licences (mostly CC-BY
variants, per image); the annotations (not used) are CC-BY 4.0.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from workflow.datasets import sources
from workflow.datasets.arrays import (
    CorruptFileError,
    array_entry,
    decode_image,
    decode_into_npy,
    expect,
    load_arrays,
    parallel_map,
    resize_short_center_crop,
    write_manifest,
)
from workflow.datasets.fetch import RangeUnsupported
from workflow.files import atomic_path, save_npy, write_json

FILES = sources.COCO
SPLITS = {"train": FILES[0], "val": FILES[1]}
SIZE = sources.COCO_SIZE


# ----------------------------------------------------------------------------- the draw


def image_members(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.lower().endswith(".jpg") and not n.endswith("/"))


def draw(members: list[str], n: int, seed: int, split: str, config_key: str) -> list[str]:
    """``n`` of the sorted ``members``, reproducibly; an impossible ``n`` names the key."""
    members = image_members(members)
    if n > len(members):
        raise ValueError(f"config key data.coco.{config_key} = {n}, but the {split} archive "
                         f"holds only {len(members)} images; lower it")
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    return [members[i] for i in sorted(rng.choice(len(members), n, replace=False))]


# ----------------------------------------------------------------------------- remote zip


class _RangeFile:
    """A read-only, seekable view of a remote file through HTTP range requests, enough for
    ``zipfile.ZipFile`` to read the end-of-central-directory records and the central
    directory (a few requests; the directory itself is read in one)."""

    def __init__(self, fetcher: Any, url: str, size: int):
        self.fetcher, self.url, self.size, self.pos = fetcher, url, size, 0
        self._cache: tuple[int, bytes] = (0, b"")

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        start0, blob = self._cache
        if not (start0 <= self.pos and end <= start0 + len(blob)):
            # read at least 64 KiB: zipfile probes the tail in small steps
            lo = self.pos if end - self.pos >= 65536 else max(0, min(self.pos, self.size - 65536))
            hi = max(end, min(self.size, lo + 65536))
            blob = self.fetcher.read_range(self.url, lo, hi)
            self._cache = (start0, blob) = (lo, blob)
        out = blob[self.pos - start0: end - start0]
        self.pos = end
        return out


def _member_bytes(blob: bytes, info: zipfile.ZipInfo, where: str) -> bytes:
    """The uncompressed member from its local header + data, CRC-32 checked."""
    if blob[:4] != b"PK\x03\x04":
        raise CorruptFileError(f"{where}: no local file header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", blob[26:30])
    start = 30 + name_len + extra_len
    data = blob[start: start + info.compress_size]
    if len(data) != info.compress_size:
        raise CorruptFileError(f"{where}: {info.filename} is truncated")
    if info.compress_type == zipfile.ZIP_STORED:
        out = data
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        out = zlib.decompressobj(-15).decompress(data)
    else:
        raise CorruptFileError(f"{where}: {info.filename} uses compression {info.compress_type}")
    if zlib.crc32(out) != info.CRC or len(out) != info.file_size:
        raise CorruptFileError(f"{where}: CRC-32 mismatch for {info.filename}; rerun the download")
    return out


def _write_member(raw_dir: Path, name: str, data: bytes) -> None:
    from workflow.datasets.archives import check_member_name

    rel = check_member_name(raw_dir, name)
    with atomic_path(raw_dir / rel) as tmp:
        tmp.write_bytes(data)


def _have(raw_dir: Path, info: zipfile.ZipInfo) -> bool:
    """Already fetched and intact (same size and CRC-32): a rerun skips it."""
    p = raw_dir / info.filename
    return (p.exists() and p.stat().st_size == info.file_size
            and zlib.crc32(p.read_bytes()) == info.CRC)


def fetch_members_remote(fetcher: Any, url: str, size: int, raw_dir: Path, n: int, seed: int,
                         split: str, config_key: str, workers: int = 8) -> dict[str, Any]:
    with zipfile.ZipFile(_RangeFile(fetcher, url, size)) as zf:  # type: ignore[arg-type]
        infos = zf.infolist()
        cd_start = zf.start_dir  # where the last member's bytes end
    names = [i.filename for i in infos]
    chosen = draw(names, n, seed, split, config_key)
    # each member's bytes run from its local header to the next header (or the directory)
    offsets = sorted({i.header_offset for i in infos})
    by_name = {i.filename: i for i in infos}

    def next_offset(off: int) -> int:
        k = int(np.searchsorted(offsets, off, side="right"))
        return offsets[k] if k < len(offsets) else cd_start

    def one(name: str) -> None:
        info = by_name[name]
        if _have(raw_dir, info):
            return
        blob = fetcher.read_range(url, info.header_offset, next_offset(info.header_offset))
        _write_member(raw_dir, name, _member_bytes(blob, info, url))

    parallel_map(one, chosen, workers, desc=f"coco {split} members")
    return _selection(split, url, names, chosen, by_name, n, seed, "ranges")


def extract_members_local(zip_path: Path, raw_dir: Path, n: int, seed: int, split: str,
                          config_key: str) -> dict[str, Any]:
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        chosen = draw(names, n, seed, split, config_key)
        by_name = {i.filename: i for i in infos}
        for name in chosen:
            if not _have(raw_dir, by_name[name]):
                _write_member(raw_dir, name, zf.read(name))  # zipfile checks the CRC
    return _selection(split, zip_path.name, names, chosen, by_name, n, seed, "zip")


def _selection(split: str, source: str, names: list[str], chosen: list[str],
               by_name: dict[str, zipfile.ZipInfo], n: int, seed: int, how: str) -> dict:
    return {"archive": source, "members_total": len(image_members(names)), "n": n,
            "seed": seed, "fetched_by": how, "members": chosen,
            "crc32": [by_name[c].CRC for c in chosen]}


def download(raw_dir: Path, fetcher: Any, n_train: int, n_val: int, seed: int
             ) -> dict[str, Any]:
    raw_dir = Path(raw_dir)
    selection = {}
    for split, rf in SPLITS.items():
        n, key = (n_train, "n_train") if split == "train" else (n_val, "n_val")
        url = fetcher.url(rf.url)
        size, ranges = fetcher.head(url)
        if ranges and size:
            print(f"{url}: the server accepts ranges; fetching {n} of its members only")
            try:
                selection[split] = fetch_members_remote(fetcher, url, size, raw_dir, n, seed,
                                                        split, key)
                continue
            except RangeUnsupported as e:  # HEAD advertised ranges, GET ignored them
                print(f"{e}; falling back to the whole archive")
        print(f"{url}: no range support; downloading the whole archive")
        path = fetcher.fetch(rf)
        selection[split] = extract_members_local(path, raw_dir, n, seed, split, key)
    write_json(selection, raw_dir / "selection.json")
    return {"selection": {s: {k: v for k, v in sel.items() if k not in ("members", "crc32")}
                          for s, sel in selection.items()}}


# ----------------------------------------------------------------------------- synthetic


def synthesize(raw_dir: Path, seed: int, train: int, val: int, n_train: int, n_val: int) -> None:
    """COCO-like train2014.zip / val2014.zip (JPEGs of assorted sizes, upstream names),
    then the same draw + extraction as a whole-zip download."""
    import io

    from PIL import Image

    from workflow.datasets.fakes import photo

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    selection = {}
    for split, count in (("train", train), ("val", val)):
        folder = f"{split}2014"
        ids = sorted(rng.choice(np.arange(1, 600000), count, replace=False).tolist())
        zpath = raw_dir / f"{folder}.zip"
        with atomic_path(zpath, suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr(zipfile.ZipInfo(f"{folder}/"), b"")
            for i in ids:
                h, w = int(rng.integers(180, 400)), int(rng.integers(180, 400))
                buf = io.BytesIO()
                Image.fromarray(photo(rng, h, w)).save(buf, format="JPEG", quality=90)
                # JPEGs are stored, as in the real archives (deflate gains nothing)
                zf.writestr(f"{folder}/COCO_{folder}_{i:012d}.jpg", buf.getvalue())
        n, key = (n_train, "n_train") if split == "train" else (n_val, "n_val")
        selection[split] = extract_members_local(zpath, raw_dir, n, seed, split, key)
    write_json(selection, raw_dir / "selection.json")


# ----------------------------------------------------------------------------- prepare


def _target(path: Path) -> np.ndarray:
    return resize_short_center_crop(decode_image(path), SIZE)


def prepare(raw_dir: Path, out_dir: Path, n_train: int | None = None, n_val: int | None = None,
            seed: int | None = None, workers: int | None = None) -> dict[str, Any]:
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    sel_path = raw_dir / "selection.json"
    if not sel_path.exists():
        raise CorruptFileError(f"{sel_path} is missing; download (or synthesize) coco again")
    selection = json.loads(sel_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, arrays = {}, {}
    for split, (n, key) in {"train": (n_train, "n_train"), "val": (n_val, "n_val")}.items():
        sel = selection[split]
        for want, have, name in ((n, sel["n"], key), (seed, sel["seed"], "seed")):
            if want is not None and int(want) != int(have):
                raise ValueError(f"{raw_dir} holds a draw with {name}={have}, but config key "
                                 f"data.coco.{name} is {want}; rerun the download "
                                 f"(`snakemake --cores 1 -R download_dataset {raw_dir}/READY`)")
        if not (len(sel["members"]) == len(sel["crc32"]) == int(sel["n"])
                and len(set(sel["members"])) == len(sel["members"])):
            raise CorruptFileError(
                f"{sel_path}: the {split} draw lists {len(sel['members'])} members "
                f"({len(set(sel['members']))} distinct) and {len(sel['crc32'])} CRC-32s for "
                f"n = {sel['n']}; rerun the download "
                f"(`snakemake --cores 1 -R download_dataset {raw_dir}/READY`)")
        paths = [raw_dir / m for m in sel["members"]]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise CorruptFileError(f"{len(missing)} drawn images are missing, e.g. "
                                   f"{missing[0]}; rerun the coco download")
        p = out_dir / f"{split}_images.npy"
        decode_into_npy(p, paths, _target, (SIZE, SIZE, 3), workers, desc=f"coco {split}")
        arrays[p.name] = array_entry(p)
        names = np.array([Path(m).name for m in sel["members"]])
        p = save_npy(out_dir / f"{split}_names.npy", names)
        arrays[p.name] = array_entry(p)
        counts[split] = len(paths)
    return write_manifest(out_dir, {
        "dataset": "coco", "counts": counts, "arrays": arrays, "size": SIZE,
        "draw": {s: {k: v for k, v in sel.items() if k not in ("members", "crc32")}
                 for s, sel in selection.items()},
        "sources": {s: sel["members"] for s, sel in selection.items()},
        "crc32": {s: sel["crc32"] for s, sel in selection.items()},
    })


def load(prepared_dir: Path, split: str) -> dict[str, np.ndarray]:
    """``images`` uint8 [N, 288, 288, 3] (memory-mapped) and ``names`` of a prepared split."""
    arrays = load_arrays(prepared_dir, {"images": f"{split}_images.npy",
                                        "names": f"{split}_names.npy"})
    path = Path(prepared_dir) / f"{split}_images.npy"
    expect(arrays["images"], path, np.uint8, (len(arrays["names"]), None, None, 3), "images")
    if len(arrays["images"]) == 0:
        raise CorruptFileError(f"{path} holds no images; rerun the coco download and prepare")
    return arrays
