"""The one HTTP client every dataset and the weights download with.

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
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from workflow.datasets import RemoteFile
from workflow.files import file_hashes, write_json

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
                        raise RangeUnsupported(
                            f"{url} ignored a Range request (HTTP {resp.status})")
                    data = resp.read()
                if len(data) != end - start:
                    raise _Truncated(f"{len(data)} of {end - start} bytes")
                return data
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                    _Truncated) as e:
                if isinstance(e, urllib.error.HTTPError) and e.code not in RETRY_STATUS:
                    raise DownloadError(f"HTTP {e.code} for a range of {url}") from None
                if attempt >= self.retries:
                    raise DownloadError(
                        f"could not read bytes {start}-{end} of {url}: {e}") from None
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
