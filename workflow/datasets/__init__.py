"""The data: one module per dataset, and the machinery they share.

Each dataset module (``bapps``, ``coco``, ``sr_test``, ``roads``, ``svhn``, ``stl10``, and the
human-judgement datasets ``tid2013``, ``kadid10k``, ``csiq``, ``nights``) holds its
download spec (``FILES``: :class:`RemoteFile` rows; optionally its own ``download``),
``synthesize`` (a small fake in the exact raw upstream layout), ``prepare`` (raw files ->
compact arrays + ``manifest.json``) and ``load`` (the one reader of its prepared arrays,
with the shape and value checks). :mod:`workflow.datasets.registry` drives them by name.

Shared parts: ``fetch`` (the HTTP client), ``archives`` (safe zip / tar / RAR extraction),
``arrays`` (parallel decoding into memory-mapped ``.npy``, manifests, checks), ``fakes``
(what the synthetic datasets draw), ``bank`` (image banks on the device and the epoch
sampler), ``weights`` (the ImageNet weight files), ``triplets`` and ``probes`` (the distorted
triplets and probe images the adaptation and probe benchmarks are scored on),
``user_folders`` (config ``data.paths``: the user's own copy of a dataset, verified and
linked in place of the download), ``mos`` (what the MOS / DMOS datasets share: label rows,
prepared arrays, the reader).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RemoteFile:
    """One file a dataset's download fetches.

    ``sha256`` / ``md5``: the expected checksum where one is published (verified after the
    download); where none is, the downloader records the sha256 it saw next to the data and
    later runs verify against that. ``size`` in bytes, if known (free-disk check, progress).
    ``filename``: the local name (default: the URL's last component). ``extract``: unpack it
    (zip / tar, compression detected from content) into the dataset's raw folder.
    """

    url: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    filename: str | None = None
    extract: bool = False

    @property
    def name(self) -> str:
        return self.filename or self.url.rsplit("/", 1)[-1]


def mark_ready(raw_dir: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write ``raw_dir/READY`` (JSON) last, once the raw tree is complete.

    Rules depend on this marker, never on the folder, so a half-downloaded or
    half-synthesized tree is never taken as done.
    """
    from workflow.files import write_json

    write_json(info or {}, Path(raw_dir) / "READY")
