"""One module per dataset: download spec, ``synthesize`` (a small fake in the exact raw
upstream format), ``prepare`` (raw files -> compact arrays + manifest) and ``load``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    """One file a dataset's ``download`` fetches.

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


def mark_ready(raw_dir, info: dict | None = None) -> None:
    """Write ``raw_dir/READY`` (JSON) last, once the raw tree is complete.

    Rules depend on this marker, never on the folder, so a half-downloaded or
    half-synthesized tree is never taken as done.
    """
    from pathlib import Path

    from workflow.results import write_json

    write_json(info or {}, Path(raw_dir) / "READY")
