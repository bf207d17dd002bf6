"""The torchvision IMAGENET1K_V1 weight files, fetched into ``{RES}/weights/`` for offline jobs.

Each file is downloaded with the shared client (resume, retries, progress, disk check, atomic
placement), then checked the way torchvision checks it: the file's sha256 must start with the
hash in its name. A file that fails is deleted. Benchmark jobs read the folder and never
download.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from workflow.archs import weights_filename, weights_url
from workflow.datasets.fetch import ChecksumBook, DownloadError, fetch, mirror_url
from workflow.files import sha256_file

__all__ = ["fetch_weights", "verify_weights_file"]


def _hash_prefix(name: str) -> str | None:
    stem = name.rsplit(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1]
    return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None


def verify_weights_file(path: Path) -> None:
    """torchvision's check: the file's sha256 starts with the hash in its name."""
    prefix = _hash_prefix(path.name)
    if prefix is None:
        return
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise RuntimeError(
            f"{path}: sha256 {digest[:16]}... does not start with {prefix}; the file is "
            f"corrupt. Delete it and fetch it again with `snakemake --cores 1 download_weights`.")


def fetch_weights(archs: Iterable[str], out: str | Path, mirror: str | None = None,
                  progress: bool = True, retries: int = 5) -> list[Path]:
    """Download and verify the weight files of ``archs`` into the folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    book = ChecksumBook(out / "checksums.json")
    paths = []
    try:
        for arch in archs:
            url = mirror_url(weights_url(arch), mirror)
            dest = fetch(url, out / weights_filename(arch), book=book, progress=progress,
                         retries=retries)
            try:
                verify_weights_file(dest)
            except RuntimeError as e:
                dest.unlink(missing_ok=True)
                book.entries.pop(book.key(dest), None)
                raise DownloadError(f"{url}: {e} (deleted)") from None
            paths.append(dest)
    finally:
        book.save()
    return paths
