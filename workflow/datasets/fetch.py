"""The one HTTP client every dataset and the weights download with.

``fetch(url, dest, ...)`` downloads one file over HTTP(S) with ``urllib`` (no extra
dependency):

* resume: bytes land in ``<dest>.part``; a rerun (or a retry after a dropped connection)
  asks for the rest with a ``Range`` request. A server that ignores ranges (answers 200)
  makes us start over, which is still correct.
* retries with exponential backoff on network errors and 5xx / 408 / 429 answers; other
  4xx answers fail at once (retrying a 404 only wastes time).
* a tqdm progress bar with size and rate.
* checksums: sha256 and/or md5 where published; where none is, the sha256 and the size we
  saw are recorded in ``checksums.json`` in the dataset's raw folder and later runs verify
  against them. A mismatch deletes the bad file and raises ``ChecksumError`` naming the URL,
  the expected and the actual hash.
* lengths, checksum or not: the bytes received must be what the server announced
  (Content-Length, or the total of a resumed answer's Content-Range; a chunked body must end
  with its last chunk), and a recorded size must match. Where no checksum is known, a body
  without any announced length is refused (it cannot be told from a truncated one), and a
  ranged probe past the last byte checks that the server holds nothing more (a short
  Content-Length, as from a proxy that cut the file). A refused download is never placed
  under its final name nor recorded.
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
from workflow.files import DiskFullError, disk_full_errors, file_hashes, write_json

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


class DiskSpaceError(DownloadError, DiskFullError):
    def __init__(self, message: str, path: str | os.PathLike | None = None):
        DiskFullError.__init__(self, message, path)


class LengthError(DownloadError):
    """A download whose length is wrong or cannot be confirmed; never placed or recorded."""


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
            f"disk full at {folder}: not enough free disk for {url}: {need / 1e9:.2f} GB "
            f"({need:,} bytes) needed (+{DISK_MARGIN >> 20} MiB headroom), {free / 1e9:.2f} GB "
            f"({free:,} bytes) available. Free space or point resources_dir at a larger file "
            f"system.", folder)


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

    want_size = recorded.get("size") if recorded and not (sha256 or md5) else None
    if dest.exists() and want_size is not None and dest.stat().st_size != want_size:
        print(f"{dest}: {dest.stat().st_size:,} bytes != the recorded {want_size:,}; "
              f"fetching again", file=sys.stderr)
        dest.unlink()
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
            total, trusted = _download_part(url, part, timeout_s, progress, dest.name)
            break
        except (DiskSpaceError, LengthError):
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

    _check_length(url, part, dest, total, trusted, want_size, bool(expected), timeout_s)
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


def _check_length(url: str, part: Path, dest: Path, total: int | None, trusted: bool,
                  want_size: int | None, checksum: bool, timeout_s: float) -> None:
    """Refuse ``part`` (deleting it, unless the bytes may still be good) when its length is
    wrong or, without a checksum to decide, cannot be confirmed."""
    size = part.stat().st_size
    fix = ("Nothing was kept under its final name nor recorded. Rerun the download; if it "
           "keeps failing, check the URL or mirror (config data.mirrors), or pin the file's "
           "sha256 in data.<dataset>.checksums once you have confirmed a copy.")
    if total is not None and size != total:
        part.unlink(missing_ok=True)
        raise LengthError(f"{url}: received {size:,} bytes, the server announced {total:,}. "
                          + fix)
    if want_size is not None and size != want_size:
        part.unlink(missing_ok=True)
        raise LengthError(f"{url}: received {size:,} bytes, but {dest.name} was recorded with "
                          f"{want_size:,} bytes (checksums.json of {dest.parent}): a "
                          f"truncated or changed file. " + fix)
    if checksum or want_size is not None:
        return
    if not trusted:
        raise LengthError(
            f"{url}: the server sent no Content-Length (and no chunked encoding), so a "
            f"truncated transfer cannot be told from a complete one, and no checksum is known. "
            f"The {size:,} bytes are kept in {part} only. " + fix)
    if _more_beyond(url, size, timeout_s):
        part.unlink(missing_ok=True)
        raise LengthError(
            f"{url}: the server announced {size:,} bytes (Content-Length) but holds more "
            f"beyond them (a ranged request past the end got data): a short Content-Length, "
            f"e.g. from a proxy that cut the file. " + fix)


def _more_beyond(url: str, size: int, timeout_s: float) -> bool:
    """Whether the server has bytes past ``size`` (a ranged probe; False when it cannot
    tell, e.g. no range support and the same Content-Length again)."""
    try:
        resp = _open(url, size, timeout_s) if size else None
    except urllib.error.HTTPError:
        return False  # 416 (nothing beyond: the length holds) or an error: cannot tell more
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False  # inconclusive: the announced length was received in full
    if resp is None:
        return False
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            start = _content_range(resp.headers.get("Content-Range"))[0]
            return start == size and (length is None or int(length) > 0)
        # 200: the range was ignored; a whole body longer than what we got says it all
        return length is not None and int(length) > size


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) of a ``Content-Range: bytes a-b/total`` header."""
    if not value:
        return None, None
    try:
        unit, _, rest = value.strip().partition(" ")
        span, _, total = rest.partition("/")
        first = int(span.split("-")[0]) if span and span != "*" else None
        return first, (int(total) if total and total != "*" else None)
    except ValueError:
        return None, None


def _download_part(url: str, part: Path, timeout_s: float, progress: bool, label: str
                   ) -> tuple[int | None, bool]:
    """Fetch (the rest of) ``url`` into ``part``; return (the total length the server
    announced or None, whether the body's length was confirmed)."""
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
        announced = None
        if have and resp.status == 206:
            first, announced = _content_range(resp.headers.get("Content-Range"))
            if first != have:  # not the bytes we asked for: start over
                part.unlink()
                raise _Truncated(f"asked for bytes {have}-, got Content-Range "
                                 f"{resp.headers.get('Content-Range')!r}; restarting")
            mode = "ab"
        else:  # 200: the server ignored the range (or there was none): whole body
            have, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        if remaining is not None:
            check_disk(part.parent, remaining, url)
        total = have + remaining if remaining is not None else None
        if announced is not None and total is not None and announced != total:
            part.unlink()
            raise _Truncated(f"Content-Range total {announced} != {have} + Content-Length "
                             f"{remaining}; restarting")
        trusted = remaining is not None or bool(getattr(resp, "chunked", False))
        with open(part, mode) as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label[:40], disable=not progress, mininterval=1.0, file=sys.stderr,
        ) as bar:
            got = 0
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                with disk_full_errors(part, f"the download of {url}"):  # .part kept
                    f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if remaining is not None and got < remaining:
        raise _Truncated(f"connection closed after {have + got} of {total} bytes")
    return (announced if announced is not None else total), trusted


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
