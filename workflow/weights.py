"""Fetch the torchvision IMAGENET1K_V1 weight files into ``{RES}/weights/`` (offline use).

``python -m workflow weights --dir resources/weights [--archs alexnet vgg16 ...]
[--mirror URL]`` downloads each file with the shared downloader (resume, retries,
progress, disk check, atomic placement) and then applies torchvision's own check: the
file's sha256 must start with the hash in its name (``workflow.lossnets.verify_weights_file``).
A file that fails is deleted. Benchmark jobs read the folder and never download.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from workflow.download import ChecksumBook, DownloadError, fetch, mirror_url
from workflow.lossnets import ARCHS, verify_weights_file, weights_filename, weights_url


def fetch_weights(archs: Iterable[str], weights_dir: str | Path, mirror: str | None = None,
                  progress: bool = True, retries: int = 5) -> list[Path]:
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    book = ChecksumBook(weights_dir / "checksums.json")
    out = []
    try:
        for arch in archs:
            url = mirror_url(weights_url(arch), mirror)
            dest = fetch(url, weights_dir / weights_filename(arch), book=book,
                         progress=progress, retries=retries)
            try:
                verify_weights_file(dest)
            except RuntimeError as e:
                dest.unlink(missing_ok=True)
                book.entries.pop(book.key(dest), None)
                raise DownloadError(f"{url}: {e} (deleted)") from None
            out.append(dest)
    finally:
        book.save()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow weights", description=__doc__)
    ap.add_argument("--dir", required=True, help="weights folder, e.g. resources/weights")
    ap.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--mirror", default="", help="base URL replacing download.pytorch.org")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        paths = fetch_weights(args.archs, args.dir, args.mirror or None,
                              progress=not args.no_progress)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.dir}: {len(paths)} weight files verified")
    return 0
