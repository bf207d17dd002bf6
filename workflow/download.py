"""The one downloader every dataset and the weights use, and the data rules' entry point.

``fetch(url, dest, ...)`` downloads one file over HTTP(S) with ``urllib`` (no extra
dependency):

* resume: bytes land in ``<dest>.part``; a rerun (or a retry after a dropped connection)
  asks for the rest with a ``Range`` request. A server that ignores ranges (answers 200)
  makes us start over, which is still correct.
* retries with exponential backoff on network errors and 5xx / 408 / 429 answers; other
  4xx answers fail at once (retrying a 404 only wastes time).
* a tqdm progress bar with size and rate.
* checksums: sha256 and/or md5 where published; where none is, the sha256 we saw is
  recorded in ``checksums.json`` in the dataset's raw folder and later runs verify against
  it. A mismatch deletes the bad file and raises ``ChecksumError`` naming the URL, the
  expected and the actual hash.
* a free-disk check before any byte is written (``shutil.disk_usage`` against the declared
  size or the Content-Length).
* atomic placement: only a complete, verified file is renamed onto ``dest``.

Mirrors (config ``data.mirrors``: dataset -> base URL) replace the scheme and host of the
upstream URL and are prefixed to its path: upstream
``http://ufldl.stanford.edu/housenumbers/train_32x32.mat`` with mirror
``http://127.0.0.1:8000/svhn`` is fetched from
``http://127.0.0.1:8000/svhn/housenumbers/train_32x32.mat``. A mirror is a copy of the
upstream path tree (``wget -x`` without the host folder), and it is how the tests point the
real rules at a loopback server.

``python -m workflow download {fetch,synthesize,prepare} DATASET ...`` is what the rules in
``rules/data.smk`` call; it drives the dataset modules through the contract of
docs/DEVELOPING.md (``FILES``, optional ``download``, ``synthesize``, ``prepare``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import importlib
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from workflow.datasets import RemoteFile, mark_ready
from workflow.results import write_json

CHUNK = 1 << 20
USER_AGENT = "lossnet-bench-downloader/1.0 (+urllib)"
# Disk headroom on top of the file itself: a full disk corrupts more than this download.
DISK_MARGIN = 64 << 20
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A download that cannot complete (after retries); the message names URL and fix."""


class ChecksumError(DownloadError):
    def __init__(self, url: str, algo: str, expected: str, actual: str, dest: Path):
        super().__init__(
            f"checksum mismatch for {url}: expected {algo} {expected}, got {actual}. The file "
            f"was deleted ({dest}). A mirror serving a different file, a truncated transfer or "
            f"a changed upstream file causes this; check the URL, then rerun the download."
        )
        self.url, self.algo, self.expected, self.actual = url, algo, expected, actual


class DiskSpaceError(DownloadError):
    pass


# ----------------------------------------------------------------------------- mirrors


def mirror_url(url: str, mirror: str | None) -> str:
    """``url`` as served by ``mirror`` (scheme+host replaced, mirror path prefixed)."""
    if not mirror:
        return url
    parts = urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


# ----------------------------------------------------------------------------- checksums


def file_hashes(path: Path, algos: Iterable[str] = ("sha256",)) -> dict[str, str]:
    hs = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            for h in hs.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hs.items()}


def sha256_file(path: str | os.PathLike) -> str:
    return file_hashes(Path(path))["sha256"]


class ChecksumBook:
    """``checksums.json`` of a raw folder: relative path -> {sha256, url, size}.

    Written next to the data so a later run verifies files that have no published
    checksum. Thread-safe; saves at most every ``every_s`` seconds (roads records
    thousands of tiles) and on ``save()``.
    """

    def __init__(self, path: str | os.PathLike, every_s: float = 2.0):
        self.path = Path(path)
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last = 0.0
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.entries = {}
        except json.JSONDecodeError as e:
            raise DownloadError(
                f"{self.path} is not valid JSON ({e}); delete it to re-record the checksums"
            ) from None

    def key(self, dest: Path) -> str:
        try:
            return dest.resolve().relative_to(self.path.parent.resolve()).as_posix()
        except ValueError:
            return dest.name

    def get(self, dest: Path) -> dict[str, Any] | None:
        with self._lock:
            return self.entries.get(self.key(dest))

    def set(self, dest: Path, **entry: Any) -> None:
        with self._lock:
            self.entries[self.key(dest)] = entry
            if time.monotonic() - self._last >= self.every_s:
                self._save_locked()

    def save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        write_json(self.entries, self.path)
        self._last = time.monotonic()


# ----------------------------------------------------------------------------- one file


def _expected(sha256: str | None, md5: str | None, recorded: dict | None) -> dict[str, str]:
    exp: dict[str, str] = {}
    if sha256:
        exp["sha256"] = sha256.lower()
    if md5:
        exp["md5"] = md5.lower()
    if not exp and recorded and recorded.get("sha256"):
        exp["sha256"] = recorded["sha256"]
    return exp


def check_disk(folder: Path, need: int, url: str) -> None:
    """Fail before downloading when ``folder``'s file system cannot hold ``need`` bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need + DISK_MARGIN:
        raise DiskSpaceError(
            f"not enough free disk for {url}: {need / 1e9:.2f} GB needed (+{DISK_MARGIN >> 20} MiB "
            f"headroom), {free / 1e9:.2f} GB free in {folder}. Free space or point "
            f"resources_dir at a larger file system."
        )


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    book: ChecksumBook | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, verified, atomic); return ``dest``.

    An existing ``dest`` that verifies is kept (no network access); one that does not
    is deleted and fetched again.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    recorded = book.get(dest) if book else None
    expected = _expected(sha256, md5, recorded)
    algos = sorted(set(expected) | {"sha256"})

    if dest.exists():
        got = file_hashes(dest, algos)
        bad = [a for a in expected if got[a] != expected[a]]
        if not bad:
            if book and not recorded:
                book.set(dest, sha256=got["sha256"], url=url, size=dest.stat().st_size)
            return dest
        print(f"{dest}: {bad[0]} {got[bad[0]]} != expected {expected[bad[0]]}; fetching again",
              file=sys.stderr)
        dest.unlink()

    if size is not None:  # known size: fail before the first request
        have = part.stat().st_size if part.exists() else 0
        check_disk(dest.parent, max(size - have, 0), url)

    attempt = 0
    while True:
        try:
            _download_part(url, part, timeout_s, progress, dest.name)
            break
        except DiskSpaceError:
            raise
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_STATUS or attempt >= retries:
                raise DownloadError(
                    f"HTTP {e.code} {e.reason} for {url}"
                    + (" after retries" if attempt else "")
                    + ". Check the URL (or the mirror in config data.mirrors) and your network."
                ) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                _Truncated) as e:
            if attempt >= retries:
                raise DownloadError(
                    f"could not download {url} after {retries + 1} attempts: {e}. The partial "
                    f"file {part} is kept; rerun to resume."
                ) from None
        attempt += 1
        delay = backoff_s * 2 ** (attempt - 1)
        print(f"{url}: attempt {attempt} failed; retrying in {delay:.1f} s (resuming)",
              file=sys.stderr)
        time.sleep(delay)

    got = file_hashes(part, algos)
    for algo, exp in expected.items():
        if got[algo] != exp:
            part.unlink(missing_ok=True)
            raise ChecksumError(url, algo, exp, got[algo], dest)
    os.replace(part, dest)
    if book:
        book.set(dest, sha256=got["sha256"], url=url, size=dest.stat().st_size)
    return dest


class _Truncated(Exception):
    """The server closed the connection before Content-Length bytes arrived."""


def _download_part(url: str, part: Path, timeout_s: float, progress: bool, label: str) -> None:
    from tqdm import tqdm

    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, have, timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our .part is not a prefix the server knows: start over
            part.unlink()
            raise _Truncated(f"range {have}- not satisfiable; restarting") from None
        raise
    with resp:
        if have and resp.status == 206:
            mode = "ab"
        else:  # 200: the server ignored the range (or there was none): whole body
            have, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        if remaining is not None:
            check_disk(part.parent, remaining, url)
        total = have + remaining if remaining is not None else None
        with open(part, mode) as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label[:40], disable=not progress, mininterval=1.0, file=sys.stderr,
        ) as bar:
            got = 0
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if remaining is not None and got < remaining:
        raise _Truncated(f"connection closed after {have + got} of {total} bytes")


def fetch_remote(
    rf: RemoteFile, raw_dir: Path, *, mirror: str | None = None, book: ChecksumBook | None = None,
    progress: bool = True, **kwargs: Any,
) -> Path:
    """Fetch one ``RemoteFile`` of a dataset into ``raw_dir/<rf.name>``."""
    return fetch(mirror_url(rf.url, mirror), Path(raw_dir) / rf.name, sha256=rf.sha256,
                 md5=rf.md5, size=rf.size, book=book, progress=progress, **kwargs)


# ----------------------------------------------------------------------------- datasets


class Fetcher:
    """What a dataset's own ``download(raw_dir, fetcher, **opts)`` gets: fetch with the
    dataset's mirror and checksum book, and ranged reads for partial archives."""

    def __init__(self, raw_dir: str | os.PathLike, mirror: str | None = None,
                 progress: bool = True, retries: int = 5, backoff_s: float = 1.0,
                 checksums: Mapping[str, str] | None = None):
        self.raw_dir = Path(raw_dir)
        # config data.<dataset>.checksums: file name -> sha256 pinned by the user; replaces
        # the built-in checksum (e.g. after confirming BAPPS's third-party hashes, or for a
        # mirror that serves other bytes, like the tests' synthetic twins)
        self.checksums = dict(checksums or {})
        self.mirror = mirror
        self.progress = progress
        self.retries = retries
        self.backoff_s = backoff_s
        self.book = ChecksumBook(self.raw_dir / "checksums.json")

    def url(self, url: str) -> str:
        return mirror_url(url, self.mirror)

    def fetch(self, rf: RemoteFile, progress: bool | None = None) -> Path:
        if rf.name in self.checksums:
            rf = dataclasses.replace(rf, sha256=self.checksums[rf.name], md5=None)
        return fetch_remote(rf, self.raw_dir, mirror=self.mirror, book=self.book,
                            progress=self.progress if progress is None else progress,
                            retries=self.retries, backoff_s=self.backoff_s)

    def read_range(self, url: str, start: int, end: int, timeout_s: float = 60.0) -> bytes:
        """Bytes ``start..end-1`` of ``url`` (already mirrored); retried like ``fetch``."""
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(url, headers={
                    "User-Agent": USER_AGENT, "Range": f"bytes={start}-{end - 1}",
                    "Accept-Encoding": "identity"})
                with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                    if resp.status != 206:
                        raise RangeUnsupported(f"{url} ignored a Range request (HTTP {resp.status})")
                    data = resp.read()
                if len(data) != end - start:
                    raise _Truncated(f"{len(data)} of {end - start} bytes")
                return data
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                    _Truncated) as e:
                if isinstance(e, urllib.error.HTTPError) and e.code not in RETRY_STATUS:
                    raise DownloadError(f"HTTP {e.code} for a range of {url}") from None
                if attempt >= self.retries:
                    raise DownloadError(f"could not read bytes {start}-{end} of {url}: {e}") from None
                time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def head(self, url: str, timeout_s: float = 60.0) -> tuple[int | None, bool]:
        """(Content-Length, whether the server accepts byte ranges) of ``url``."""
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                n = resp.headers.get("Content-Length")
                ranges = resp.headers.get("Accept-Ranges", "").lower() == "bytes"
                return (int(n) if n is not None else None), ranges
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            return None, False


class RangeUnsupported(DownloadError):
    pass


def dataset_module(name: str):
    try:
        return importlib.import_module(f"workflow.datasets.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"workflow.datasets.{name}":
            raise SystemExit(
                f"unknown dataset {name!r}: no module workflow/datasets/{name}.py") from None
        raise


def download_dataset(name: str, raw_dir: str | os.PathLike, mirror: str | None = None,
                     progress: bool = True, **opts: Any) -> dict[str, Any]:
    """Fetch (and extract) a dataset into ``raw_dir``, then write ``raw_dir/READY``.

    A module with its own ``download(raw_dir, fetcher, **opts)`` (COCO's partial zip,
    the roads index pages) uses it; every other module is driven by its ``FILES``.
    """
    from workflow.extract import extract_archive

    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "READY").unlink(missing_ok=True)
    module = dataset_module(name)
    fetcher = Fetcher(raw, mirror=mirror, progress=progress,
                      checksums=opts.pop("checksums", None))
    try:
        if hasattr(module, "download"):
            info = dict(module.download(raw, fetcher, **opts) or {})
        else:
            files = {}
            for rf in module.FILES:
                path = fetcher.fetch(rf)
                entry = fetcher.book.get(path) or {}
                if rf.extract:
                    extract_archive(path, raw, key=entry.get("sha256"))
                files[rf.name] = entry
            info = {"files": files}
    finally:
        fetcher.book.save()
    info.update(dataset=name, source="download", mirror=mirror)
    mark_ready(raw, info)
    return info


def synthesize_dataset(name: str, raw_dir: str | os.PathLike, seed: int = 0,
                       **opts: Any) -> None:
    raw = Path(raw_dir)
    (raw / "READY").unlink(missing_ok=True)
    dataset_module(name).synthesize(raw, seed=seed, **opts)
    mark_ready(raw, {"dataset": name, "source": "synthetic", "seed": seed, "options": opts})


def prepare_dataset(name: str, raw_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    **opts: Any) -> dict[str, Any]:
    raw, out = Path(raw_dir), Path(out_dir)
    if not (raw / "READY").exists():
        raise SystemExit(f"{raw}/READY is missing: the raw tree of {name} is incomplete. Run "
                         f"`snakemake --cores 1 {raw}/READY` (download or synthesize) first.")
    (out / "manifest.json").unlink(missing_ok=True)
    manifest = dataset_module(name).prepare(raw, out, **opts)
    if not (out / "manifest.json").exists():  # the contract says prepare writes it; be lenient
        write_json(manifest, out / "manifest.json")
    return manifest


def split_options(opts: Mapping[str, Any]) -> tuple[dict, dict]:
    """config ``data.<dataset>`` -> (prepare/download options, synthetic sizes)."""
    o = dict(opts)
    return o, dict(o.pop("synthetic", {}) or {})


def _params(name: str, function: str) -> set[str]:
    import inspect

    return set(inspect.signature(getattr(dataset_module(name), function)).parameters)


def _synth_kwargs(name: str, opts: dict, sizes: dict) -> dict:
    """Synthetic sizes, plus those dataset options ``synthesize`` names as parameters
    (COCO's synthesize draws n_train / n_val like its download does)."""
    params = _params(name, "synthesize")
    return {**{k: v for k, v in opts.items() if k in params and k not in ("raw_dir", "seed")},
            **sizes}


def main(argv: list[str] | None = None) -> int:
    from workflow.datasets.common import CorruptFileError, json_arg
    from workflow.extract import ArchiveFormatError, UnsafeArchiveError

    ap = argparse.ArgumentParser(prog="python -m workflow download",
                                 description="fetch / synthesize / prepare one dataset")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("fetch", "synthesize", "prepare"):
        p = sub.add_parser(cmd)
        p.add_argument("dataset")
        p.add_argument("--raw", required=True, help="the dataset's raw folder")
        p.add_argument("--options", type=json_arg, default={},
                       help="config data.<dataset> as JSON")
        if cmd == "fetch":
            p.add_argument("--mirror", default="", help="base URL replacing the upstream host")
            p.add_argument("--no-progress", action="store_true")
        if cmd == "synthesize":
            p.add_argument("--seed", type=int, default=0)
        if cmd == "prepare":
            p.add_argument("--out", required=True)
            p.add_argument("--workers", type=int, default=0,
                           help="decoding threads (the rule's threads; 0: all cores)")
    args = ap.parse_args(argv)
    opts, sizes = split_options(args.options or {})
    try:
        if args.cmd == "fetch":
            info = download_dataset(args.dataset, args.raw, mirror=args.mirror or None,
                                    progress=not args.no_progress, **opts)
            print(f"{args.raw}: {args.dataset} downloaded ({len(info.get('files', {}))} files)")
        elif args.cmd == "synthesize":
            synthesize_dataset(args.dataset, args.raw, seed=args.seed,
                               **_synth_kwargs(args.dataset, opts, sizes))
            print(f"{args.raw}: synthetic {args.dataset} written")
        else:
            opts.pop("checksums", None)  # download-only
            if args.workers and "workers" in _params(args.dataset, "prepare"):
                opts["workers"] = args.workers
            m = prepare_dataset(args.dataset, args.raw, args.out, **opts)
            print(f"{args.out}: {args.dataset} prepared: {json.dumps(m.get('counts', {}))}")
    except (DownloadError, CorruptFileError, UnsafeArchiveError, ArchiveFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- rule helpers
# Used by rules/data.smk (kept here so the rules file holds rules only).

BENCH_DATASETS: dict[str, list[str]] = {
    "similarity": ["bapps"],
    "super_resolution": ["coco", "sr_test"],
    "delineation": ["roads"],
    "autoencoder": ["svhn", "stl10"],
    "adaptation": ["svhn", "stl10", "bapps"],
    "probes": [],
}


def needed_datasets(config: Mapping[str, Any]) -> list[str]:
    """Datasets the enabled benchmarks read."""
    return sorted({d for b in config["benchmarks"] for d in BENCH_DATASETS.get(b, [])})


def rule_options(config: Mapping[str, Any], dataset: str, purpose: str) -> str:
    """config ``data.<dataset>`` as a rule param (JSON) with only the keys ``purpose``
    (synthesize | download | prepare) depends on: the synthetic sizes reach synthesize
    only, pinned checksums download only, so resizing the fakes or pinning a hash never
    re-prepares real data."""
    opts = dict(config["data"].get(dataset) or {})
    if purpose != "synthesize":
        opts.pop("synthetic", None)
    if purpose != "download":
        opts.pop("checksums", None)
    return json.dumps(opts, sort_keys=True, separators=(",", ":"))


def dataset_urls(dataset: str) -> str:
    """The upstream URLs of a dataset, space-separated (what `snakemake -n download` shows)."""
    try:
        files = importlib.import_module(f"workflow.datasets.{dataset}").FILES
    except (ImportError, AttributeError) as e:
        return f"(workflow.datasets.{dataset}.FILES unavailable: {e})"
    return " ".join(f.url for f in files)


def imagenet_weight_archs(config: Mapping[str, Any]) -> list[str]:
    """Configured architectures (grid + LPIPS sets) whose weights are ``imagenet``."""
    from workflow.config import weights_for

    ln = config["lossnets"]
    archs = list(dict.fromkeys([*ln["archs"], *ln.get("lpips_sets", [])]))
    return [a for a in archs if weights_for(config, a) == "imagenet"]


def weight_files(config: Mapping[str, Any], archs: Iterable[str] | None = None) -> list[str]:
    from workflow.lossnets import weights_filename

    res = config["resources_dir"]
    archs = imagenet_weight_archs(config) if archs is None else archs
    return [f"{res}/weights/{weights_filename(a)}" for a in archs]


def weights_input(config: Mapping[str, Any], arch: str) -> list[str]:
    """A job's input for ``arch``: the file its loss-network weights are read from, if any.

    ``imagenet``: the torchvision file under ``resources_dir/weights`` (``download_weights``
    makes it); a state_dict path: that file; ``random``: nothing."""
    from workflow.config import weights_for

    weights = weights_for(config, arch)
    if weights == "imagenet":
        return weight_files(config, [arch])
    return [] if weights == "random" else [weights]
