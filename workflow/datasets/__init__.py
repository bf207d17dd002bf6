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
