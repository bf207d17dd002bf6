"""Bring your own folders: config ``data.paths: {dataset: folder}``.

A dataset the user already holds, extracted in its upstream layout (docs/data.md says, per
dataset, which layout and where it comes from), replaces the download: the ``link_dataset``
rule verifies the folder like a download (the files present, their counts and layout, the
published checksums where there are any) and records the sha256, size and mtime of every
file ``prepare`` will read in the raw folder's ``checksums.json``. The raw folder then holds
links to the user's entries (``{RES}/raw/svhn/train_32x32.mat -> <folder>/train_32x32.mat``,
``{RES}/raw/bapps/2afc -> <folder>/2afc``), ``checksums.json`` and ``READY``; ``prepare``
reads through the links. Nothing is ever written into the user's folder.

Changes are caught twice: the rule's ``fingerprint`` param (:func:`fingerprint`: the paths,
sizes and mtimes of the files, computed when the DAG is built) reruns the link, and so
prepare, when a file is added, removed or rewritten; and ``prepare`` refuses a file whose
size or mtime differ from what the link verified (:func:`check_unchanged`).

Only the standard library is imported at module level: the plan calls :func:`fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workflow.datasets import sources

__all__ = ["UserFolderError", "check_unchanged", "fingerprint", "forget", "layout", "link"]

COCO_ZIPS = tuple(rf.name for rf in sources.COCO)


class UserFolderError(ValueError):
    """A ``data.paths`` folder that cannot stand in for the download; the message names the
    config key, the folder and what is missing."""


def resolve(folder: str | os.PathLike) -> Path:
    """The folder with ``~`` expanded and every symlink resolved."""
    return Path(os.path.expanduser(str(folder))).resolve()


class _Layout:
    """What a user folder provides: raw entry name -> the user's path (linked into the raw
    folder), and the files prepare reads, as raw-relative paths."""

    def __init__(self, name: str, folder: Path):
        self.name, self.folder = name, folder
        self.entries: dict[str, Path] = {}
        self.files: list[str] = []

    def fail(self, what: str) -> UserFolderError:
        return UserFolderError(f"config key data.paths.{self.name} ({self.folder}): {what}")

    def source(self, rel: str) -> Path:
        """The user's file behind the raw-relative path ``rel``."""
        head, _, tail = rel.partition("/")
        return self.entries[head] / tail if tail else self.entries[head]


def _names(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.name.lower().endswith(suffix) and not p.name.startswith("."))


def _svhn(lay: _Layout) -> None:
    names = [f.name for f in sources.SVHN]
    missing = [n for n in names if not (lay.folder / n).is_file()]
    if missing:
        raise lay.fail(f"missing {', '.join(missing)}; a torchvision SVHN root holds "
                       f"{', '.join(names)} (torchvision.datasets.SVHN(root, split) with split "
                       f"train, test and extra: all three are prepared)")
    lay.entries = {n: lay.folder / n for n in names}
    lay.files = names


def _stl10(lay: _Layout) -> None:
    d = lay.folder / "stl10_binary"
    if not d.is_dir() and (lay.folder / "train_X.bin").is_file():
        d = lay.folder  # the stl10_binary folder itself
    if not d.is_dir():
        raise lay.fail("no stl10_binary/ folder; give a torchvision STL10 root (the folder "
                       "holding stl10_binary/) or the stl10_binary folder itself")
    missing = [n for n in sources.STL10_MEMBERS if not (d / n).is_file()]
    if missing:
        raise lay.fail(f"{d} lacks {', '.join(missing)}; stl10_binary.tar.gz extracts to "
                       f"{', '.join(sources.STL10_MEMBERS)}")
    lay.entries = {"stl10_binary": d}
    lay.files = [f"stl10_binary/{n}" for n in sources.STL10_MEMBERS]


def _sr_test(lay: _Layout) -> None:
    for s, n in sources.SR_SETS.items():
        want = [sources.sr_hr_name(i) for i in range(1, n + 1)]
        # a copy of SelfExSR's data/ folder holds them in <set>/image_SRF_2/
        cands = [lay.folder / s / "image_SRF_2", lay.folder / s]
        d = next((c for c in cands if c.is_dir() and (c / want[0]).is_file()), None)
        if d is None:
            raise lay.fail(f"no {s}/{want[0]} (nor {s}/image_SRF_2/{want[0]}); the folder "
                           f"must hold Set5/, Set14/ (img_00N_SRF_2_HR.png) and BSDS300/")
        missing = [w for w in want if not (d / w).is_file()]
        if missing:
            raise lay.fail(f"{d} holds {n - len(missing)} of the {n} {s} images; missing "
                           f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        lay.entries[s] = d
        lay.files += [f"{s}/{w}" for w in want]
    bsds = lay.folder / "BSDS300"
    ids_file = bsds / "iids_test.txt"
    if not ids_file.is_file():
        raise lay.fail(f"no {ids_file}; BSDS300-images.tgz extracts to BSDS300/"
                       f"{{iids_train.txt,iids_test.txt,images/{{train,test}}/<id>.jpg}}")
    ids = [x.strip() for x in ids_file.read_text().splitlines() if x.strip()]
    if len(ids) != 100 or len(set(ids)) != 100 or not all(i.isdigit() for i in ids):
        raise lay.fail(f"{ids_file} lists {len(ids)} ids ({len(set(ids))} distinct); "
                       f"BSDS300's test split has 100 distinct numeric ids")
    missing = [i for i in ids if not (bsds / "images" / "test" / f"{i}.jpg").is_file()]
    if missing:
        raise lay.fail(f"{len(missing)} test images listed in {ids_file} are missing, e.g. "
                       f"{bsds / 'images' / 'test' / (missing[0] + '.jpg')}")
    lay.entries["BSDS300"] = bsds
    lay.files += ["BSDS300/iids_test.txt", *(f"BSDS300/images/test/{i}.jpg" for i in ids)]


def _roads(lay: _Layout) -> None:
    for split in sources.ROADS_SPLITS:
        stems = {}
        for kind, suffix in sources.ROADS_KINDS.items():
            d = lay.folder / split / kind
            if not d.is_dir():
                raise lay.fail(f"no {split}/{kind}/ folder; the tree must hold "
                               f"{{train,valid,test}}/sat/<tile>.tiff and .../map/<tile>.tif")
            stems[kind] = {n[: -len(suffix)] for n in _names(d, suffix)}
            if (d / "index.html").is_file():
                lay.files.append(f"{split}/{kind}/index.html")
        if not stems["sat"]:
            raise lay.fail(f"{lay.folder / split / 'sat'} holds no *.tiff tiles")
        if stems["sat"] != stems["map"]:
            odd = sorted(stems["sat"] ^ stems["map"])[:3]
            raise lay.fail(f"the sat and map tiles of {split}/ do not pair up (e.g. {odd})")
        lay.entries[split] = lay.folder / split
        lay.files += [f"{split}/{k}/{s}{sfx}" for k, sfx in sources.ROADS_KINDS.items()
                      for s in sorted(stems[k])]


def _bapps_roots(lay: _Layout) -> dict[str, Path]:
    """``2afc/`` and ``jnd/`` under the folder (the ``dataset/`` of the PerceptualSimilarity
    repository's download script, or a folder up to three levels above it; links
    followed)."""
    found: dict[str, list[Path]] = {"2afc": [], "jnd": []}
    for dirpath, dirnames, _ in os.walk(lay.folder, followlinks=True):
        depth = len(Path(dirpath).relative_to(lay.folder).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in list(dirnames):
            if name in found:
                found[name].append(Path(dirpath) / name)
                dirnames.remove(name)
        if depth >= 3:
            dirnames[:] = []
    for kind, paths in found.items():
        if not paths:
            raise lay.fail(f"no {kind}/ folder in it (nor up to three levels down); give the "
                           f"dataset/ folder that scripts/download_dataset.sh of the "
                           f"PerceptualSimilarity (lpips) repository leaves (dataset/2afc, "
                           f"dataset/jnd)")
        if len(paths) > 1:
            raise lay.fail(f"several {kind}/ folders: {', '.join(map(str, paths))}; keep one")
    return {k: v[0] for k, v in found.items()}


def _bapps(lay: _Layout) -> None:
    roots = _bapps_roots(lay)
    lay.entries = dict(roots)
    for kind, splits in (("2afc", sources.BAPPS_2AFC_SUBSETS),
                         ("jnd", {"val": sources.BAPPS_JND_SUBSETS})):
        parts = sources.BAPPS_PARTS[kind]
        for split, subsets in splits.items():
            d = roots[kind] / split
            have = sorted(s.name for s in d.iterdir() if s.is_dir()
                          and not s.name.startswith(".")) if d.is_dir() else []
            missing = [s for s in subsets if s not in have]
            if missing:
                raise lay.fail(f"{d} lacks the subset folder(s) {', '.join(missing)} (BAPPS "
                               f"{kind}/{split} has {', '.join(subsets)})")
            for subset in have:  # prepare reads every subset present
                stems: dict[str, set[str]] = {}
                for part, suffix in parts.items():
                    pd = d / subset / part
                    if not pd.is_dir():
                        raise lay.fail(f"no {pd} (each {kind} subset holds "
                                       f"{', '.join(parts)})")
                    stems[part] = {n[: -len(suffix)] for n in _names(pd, suffix)}
                union = set().union(*stems.values())
                if not union:
                    raise lay.fail(f"{d / subset} holds no items")
                for part, got in stems.items():
                    if got != union:
                        stem = sorted(union - got)[0]
                        raise lay.fail(f"{d / subset / part} has no {stem}{parts[part]} "
                                       f"({len(union - got)} of the {len(union)} items lack "
                                       f"their {part}); is the extraction complete?")
                lay.files += [f"{kind}/{split}/{subset}/{part}/{s}{sfx}"
                              for part, sfx in parts.items() for s in sorted(union)]


def _coco(lay: _Layout) -> None:
    missing = [n for n in COCO_ZIPS if not (lay.folder / n).is_file()]
    if missing:
        raise lay.fail(f"missing {', '.join(missing)}; the folder must hold the zips as "
                       f"images.cocodataset.org ships them ({', '.join(COCO_ZIPS)}): their "
                       f"member lists decide the draw and their sha256 is published (an "
                       f"extracted train2014/ is not accepted)")
    lay.files = list(COCO_ZIPS)
    lay.entries = {n: lay.folder / n for n in COCO_ZIPS}


# the human-judgement datasets: label file, image folders (relative to the label file's
# folder; "*" one level of subfolders) and their image suffix, where the tree comes from
_LABELLED = {
    "tid2013": ("mos_with_names.txt", ("reference_images", "distorted_images"), ".bmp",
                "the folder tid2013.rar extracts to (reference_images/, distorted_images/, "
                "mos_with_names.txt, mos_std.txt)", ("mos_std.txt",)),
    "kadid10k": ("dmos.csv", ("images",), ".png",
                 "the kadid10k/ folder kadid10k.zip extracts to (images/, dmos.csv)", ()),
    "csiq": ("csiq.DMOS.xlsx", ("src_imgs", "dst_imgs/*"), ".png",
             "the folder holding CSIQ's src_imgs/, dst_imgs/<type>/ and csiq.DMOS.xlsx", ()),
    "nights": ("data.csv", ("ref/*", "distort/*"), ".png",
               "the nights/ folder nights.zip extracts to (ref/, distort/, data.csv)", ()),
}


def _labelled(lay: _Layout) -> None:
    marker, folders, suffix, what, extra = _LABELLED[lay.name]
    found = []
    for dirpath, dirnames, filenames in os.walk(lay.folder, followlinks=True):
        depth = len(Path(dirpath).relative_to(lay.folder).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if marker in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
        if depth >= 2:
            dirnames[:] = []
    if not found:
        raise lay.fail(f"no {marker} in it (nor two levels down); give {what}")
    if len(found) > 1:
        raise lay.fail(f"several {marker}: {', '.join(map(str, found))}; keep one")
    root = found[0]
    lay.entries = {lay.name: root}
    lay.files = [f"{lay.name}/{n}" for n in (marker, *extra)]
    for n in extra:
        if not (root / n).is_file():
            raise lay.fail(f"no {root / n}; give {what}")
    for pattern in folders:
        base, _, star = pattern.partition("/")
        d = root / base
        subs = (sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith("."))
                if star and d.is_dir() else [d])
        if not d.is_dir() or not subs:
            raise lay.fail(f"no {d}{'/<folder>' if star else ''}; give {what}")
        for sub in subs:
            names = _names(sub, suffix) if sub.is_dir() else []
            if not names:
                raise lay.fail(f"{sub} holds no *{suffix} images; give {what}")
            rel = sub.relative_to(root).as_posix()
            lay.files += [f"{lay.name}/{rel}/{n}" for n in names]


_LAYOUTS = {"svhn": _svhn, "stl10": _stl10, "sr_test": _sr_test, "roads": _roads,
            "bapps": _bapps, "coco": _coco, **dict.fromkeys(_LABELLED, _labelled)}


def layout(name: str, folder: str | os.PathLike) -> _Layout:
    """Check the user folder of dataset ``name``; its entries and the files prepare reads."""
    if name not in _LAYOUTS:
        raise UserFolderError(f"config key data.paths: unknown dataset {name!r}; known: "
                              f"{', '.join(_LAYOUTS)}")
    given = Path(os.path.expanduser(str(folder)))
    lay = _Layout(name, resolve(folder))
    if not lay.folder.is_dir():
        what = "is not a folder" if lay.folder.exists() else "does not exist"
        raise UserFolderError(f"config key data.paths.{name}: the folder {given} {what}"
                              + (f" (it resolves to {lay.folder})" if given != lay.folder
                                 else ""))
    _LAYOUTS[name](lay)
    return lay


def _stat(lay: _Layout, rel: str) -> tuple[int, int]:
    st = lay.source(rel).stat()
    return st.st_size, st.st_mtime_ns


def fingerprint(name: str, folder: str | os.PathLike) -> str:
    """A short hash of the folder's resolved path and the names, sizes and mtimes of the files
    prepare reads (a stat of each, no reading): the link rule's rerun trigger. A folder that
    cannot be used gives a text that says so, so the link job runs and reports it."""
    try:
        lay = layout(name, folder)
        rows = [(rel, *_stat(lay, rel)) for rel in lay.files]
    except (UserFolderError, OSError) as e:
        return f"unusable: {e}"
    blob = json.dumps([str(lay.folder), rows], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- linking


def _published(name: str) -> dict[str, tuple[str, str]]:
    """Raw-relative path -> (algorithm, checksum) published for a file of the user folder."""
    if name == "svhn":
        return {f.name: ("md5", f.md5) for f in sources.SVHN if f.md5}
    if name == "stl10":
        return {f"stl10_binary/{n}": ("md5", h) for n, h in sources.STL10_MEMBERS.items()}
    if name == "coco":
        return {f.name: ("sha256", f.sha256) for f in sources.COCO if f.sha256}
    return {}


def _hashes(path: Path, md5: bool) -> dict[str, str]:
    from workflow.files import file_hashes

    return file_hashes(path, ["sha256", "md5"] if md5 else ["sha256"])


def forget(raw: str | os.PathLike) -> list[Path]:
    """Remove what a link left in ``raw`` (the links, its ``checksums.json`` and ``READY``)
    before a download or synthesize writes there, so nothing is written through a link into
    the user's folder. Removing a link never touches what it points at."""
    raw = Path(raw)
    removed = []
    if not raw.is_dir():
        return removed
    try:
        user = json.loads((raw / "READY").read_text()).get("source") == "user"
    except (OSError, ValueError, AttributeError):
        user = False
    for p in sorted(raw.iterdir()):
        if p.is_symlink():
            p.unlink()
            removed.append(p)
    if user:
        for p in (raw / "checksums.json", raw / "READY"):
            if p.exists():
                p.unlink()
                removed.append(p)
    return removed


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def link(name: str, folder: str | os.PathLike, raw: str | os.PathLike,
         options: Mapping[str, Any] | None = None, workers: int = 8) -> dict[str, Any]:
    """Verify the user folder of ``name`` and make ``raw`` a raw tree that reads it.

    ``options``: config ``data.<name>`` (``checksums`` pins replace the published checksums;
    COCO's draw ``n_train`` / ``n_val`` / ``seed``). Returns what ``READY`` records.
    """
    from concurrent.futures import ThreadPoolExecutor

    from workflow.datasets import mark_ready
    from workflow.files import write_json

    opts = dict(options or {})
    key = f"data.paths.{name}"
    raw = Path(raw)
    where, raw_res = resolve(folder), raw.resolve()
    if _inside(raw_res, where) or _inside(where, raw_res):
        raise UserFolderError(
            f"config key {key} ({where}): it and the workflow's raw folder {raw} overlap; "
            f"the folder must lie outside {{resources_dir}}/raw/{name} and hold no "
            f"resources_dir (remove {key} to keep using a download already there)")
    lay = layout(name, folder)
    raw.mkdir(parents=True, exist_ok=True)
    forget(raw)
    (raw / "READY").unlink(missing_ok=True)
    pins = dict(opts.get("checksums") or {})
    published = _published(name)

    def one(rel: str) -> dict[str, Any]:
        src = lay.source(rel)
        before = src.stat()
        if rel in pins:
            algo, want = "sha256", pins[rel]
        else:
            algo, want = published.get(rel, (None, None))
        got = _hashes(src, md5=algo == "md5")
        if src.stat().st_mtime_ns != before.st_mtime_ns:
            raise lay.fail(f"{src} changed while it was being verified; rerun")
        if want and got[algo] != want.lower():
            raise lay.fail(
                f"{src}: {algo} {got[algo]} is not the expected {want}"
                + (f" (pinned in data.{name}.checksums)" if rel in pins else
                   " (published upstream)")
                + f"; the file is damaged or another version: replace it, or pin its sha256 "
                  f"in data.{name}.checksums.{rel} once you have confirmed it")
        # (no path per entry: BAPPS has about a million; READY names the folder)
        return {"sha256": got["sha256"], "size": before.st_size, "mtime_ns": before.st_mtime_ns}

    with ThreadPoolExecutor(max(1, workers)) as pool:
        book = dict(zip(lay.files, pool.map(one, lay.files), strict=True))
    info: dict[str, Any] = {"dataset": name, "source": "user", "config_key": key,
                            "folder": str(lay.folder), "files": len(book)}
    if name == "coco":
        info["selection"] = _coco_draw(lay, raw, opts)
    else:
        # the raw folder becomes links only: an earlier download or twin there (the
        # workflow's own files) would be read beside them (two BAPPS 2afc/ trees)
        for p in sorted(raw.iterdir()):
            print(f"{key}: removing {p} (an earlier download or synthetic twin)")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        for entry, src in lay.entries.items():
            (raw / entry).symlink_to(src, target_is_directory=src.is_dir())
        info["links"] = {e: str(s) for e, s in lay.entries.items()}
    write_json(book, raw / "checksums.json")
    mark_ready(raw, info)
    print(f"{key}: {len(book)} files of {lay.folder} verified; {raw} reads them")
    return info


def _coco_draw(lay: _Layout, raw: Path, opts: Mapping[str, Any]) -> dict[str, Any]:
    """The seeded draw from the user's zips, extracted into ``raw`` (the zips only read)."""
    from workflow.datasets.coco import extract_members_local
    from workflow.files import write_json

    selection = {}
    for split, zname in (("train", COCO_ZIPS[0]), ("val", COCO_ZIPS[1])):
        n_key = f"n_{split}"
        selection[split] = extract_members_local(
            lay.folder / zname, raw, int(opts.get(n_key, 10000 if split == "train" else 100)),
            int(opts.get("seed", 0)), split, n_key)
    write_json(selection, raw / "selection.json")
    return {s: {k: v for k, v in sel.items() if k not in ("members", "crc32")}
            for s, sel in selection.items()}


def check_unchanged(name: str, raw: str | os.PathLike) -> None:
    """Before ``prepare`` reads a linked folder: the files it will read are exactly those the
    link verified, with the same sizes and mtimes (else the error says how to re-verify)."""
    raw = Path(raw)
    ready = json.loads((raw / "READY").read_text())
    book = json.loads((raw / "checksums.json").read_text())
    key = ready.get("config_key", f"data.paths.{name}")
    fix = (f"the link verifies it again when Snakemake next builds the DAG (or run "
           f"`snakemake --cores 1 -R link_dataset {raw}/READY`)")
    try:
        lay = layout(name, ready["folder"])
    except UserFolderError as e:
        raise UserFolderError(f"{e} (it was verified before; {fix})") from None
    new = sorted(set(lay.files) - set(book))
    if new:
        raise UserFolderError(f"config key {key}: {lay.source(new[0])} ({len(new)} file(s)) "
                              f"appeared after {lay.folder} was verified; {fix}")
    for rel, entry in book.items():
        src = lay.source(rel) if rel.partition("/")[0] in lay.entries else lay.folder / rel
        try:
            st = src.stat()
        except OSError:
            raise UserFolderError(f"config key {key}: {src} was verified but is gone; "
                                  f"{fix}") from None
        if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
            raise UserFolderError(
                f"config key {key}: {src} changed after it was verified (size {st.st_size:,} "
                f"bytes, was {entry['size']:,}; mtime changed: "
                f"{st.st_mtime_ns != entry['mtime_ns']}); {fix}")
