"""A RAR 4 archive of stored (uncompressed) members, written by hand for the tests: the
format of TID2013's archive, which ``rarfile`` reads in pure Python when nothing is
compressed (the header layout: RAR 4.x technote, ``technote.txt`` of the RAR distribution)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

MARKER = b"Rar!\x1a\x07\x00"


def _block(head_type: int, flags: int, body: bytes) -> bytes:
    head = struct.pack("<BHH", head_type, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(head) & 0xFFFF) + head


def write_stored_rar(path: Path, members: dict[str, bytes]) -> Path:
    """``members``: archive name (``/``-separated) -> content; folders are implied."""
    out = [MARKER, _block(0x73, 0, b"\x00" * 6)]
    dos_time = (45 << 25) | (1 << 21) | (1 << 16)  # 2025-01-01 00:00
    for name, data in members.items():
        raw = name.encode()
        body = struct.pack("<IIBIIBBHI", len(data), len(data), 3, zlib.crc32(data),
                           dos_time, 20, 0x30, len(raw), 0o100644) + raw
        out += [_block(0x74, 0x8000, body), data]
    out.append(_block(0x7B, 0x4000, b""))
    Path(path).write_bytes(b"".join(out))
    return Path(path)
