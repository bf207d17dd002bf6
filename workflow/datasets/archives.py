"""Safe archive extraction: zip, tar (any compression, detected from the content) and RAR.

Before anything is written, a scan of the member list (a zip's central directory; one read
of a tar's headers) refuses, with an error naming the archive and the member: absolute
paths, members that would land outside the target folder (``../``), links (symbolic or
hard) whose target leaves the folder, device / FIFO members, and archives over the limits
of :class:`ArchiveLimits` (member count, total expansion ratio, one member's expansion
ratio; config ``data.<dataset>.archive_limits``). The scan's total also sizes the free-disk
check. While extracting, every path is resolved through the links already on disk (for zip
as tarfile's ``data`` filter does for tar), and every link is resolved again once all are
written, so no chain of links can place or point a file outside the target. Extraction goes
into a temporary folder inside the target; only when the whole archive extracted cleanly
are its files moved into place (merged with what is there: BAPPS's train and val archives
both unpack into ``2afc/``), so a refused or truncated archive leaves nothing behind. A full
disk is reported as :class:`workflow.files.DiskFullError` ("disk full at <path>"), never as
a damaged archive.

RAR (TID2013 ships one) is read with ``rarfile`` (PyPI) under the same checks: its stored
(uncompressed) members in pure Python; compressed members need an ``unrar``, ``unar``,
``bsdtar`` or ``7z`` binary, and an archive that has some and finds none is refused before
anything is written, with a message naming what to install (or the ``data.paths`` way round).

A marker ``.<archive name>.extracted`` (JSON: the archive's sha256 when given, the member
count) lets a rerun skip an archive that is already unpacked.
"""

from __future__ import annotations

import json
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from workflow import recovery
from workflow.files import disk_full_errors, ensure_free

# Expansion is judged only above this many bytes: a small file that compresses well is no
# threat (the smallest a ratio limit looks at).
RATIO_FLOOR = 1 << 20
# A tar stream's compressed position moves in read-ahead blocks: a member's compressed size
# is known to within this many bytes, added to it so the estimate never overstates a ratio.
STREAM_SLACK = 64 << 10
BLOCK = 4096  # disk space of a file is counted in whole blocks
RAR_MAGIC = (b"Rar!\x1a\x07\x00", b"Rar!\x1a\x07\x01")  # RAR 1.5-4.x, RAR 5


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold before it is refused unread (config
    ``data.<dataset>.archive_limits``; defaults in ``workflow/schemas/data.schema.yaml``)."""

    max_members: int = 20_000
    max_ratio: float = 100.0          # total uncompressed bytes / archive bytes
    max_member_ratio: float = 200.0   # one member's uncompressed / compressed bytes
    key: str = "data.<dataset>.archive_limits"  # the config key, for the messages

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, key: str | None = None
                    ) -> ArchiveLimits:
        known = {f.name for f in fields(cls)} - {"key"}
        extra = set(cfg or {}) - known
        if extra:
            raise ValueError(f"config key {key or cls.key}: unknown {sorted(extra)}; "
                             f"known: {sorted(known)}")
        return cls(**{k: v for k, v in (cfg or {}).items()}, **({"key": key} if key else {}))


@dataclass
class ArchiveStats:
    """What the scan found: members, uncompressed bytes of the files, archive bytes, and the
    disk space extraction needs (whole blocks)."""

    members: int = 0
    total: int = 0
    compressed: int = 0
    disk: int = 0


class UnsafeArchiveError(ValueError):
    """An archive member would escape the target folder (or is not a plain file/dir/link)."""


class ArchiveFormatError(ValueError):
    pass


class ArchiveLimitError(UnsafeArchiveError):
    """An archive over :class:`ArchiveLimits`; the message names the config key to raise."""


def _over(archive: Path, what: str, limits: ArchiveLimits, field: str) -> ArchiveLimitError:
    return ArchiveLimitError(
        f"{archive}: {what}, over the limit {field} = {getattr(limits, field):g}; refusing "
        f"to extract it (nothing was written). If this archive is what the dataset really "
        f"ships (its checksum matches), raise config key {limits.key}.{field}.")


def _check_member_ratio(archive: Path, name: str, size: int, compressed: float,
                        limits: ArchiveLimits) -> None:
    if size > RATIO_FLOOR and size > limits.max_member_ratio * max(compressed, 1):
        raise _over(archive, f"member {name!r} expands {size:,} bytes from about "
                    f"{int(compressed):,} ({size / max(compressed, 1):.0f}:1)", limits,
                    "max_member_ratio")


def _count(archive: Path, st: ArchiveStats, limits: ArchiveLimits, size: int,
           kind: str) -> None:
    st.members += 1
    if st.members > limits.max_members:
        raise _over(archive, f"more than {limits.max_members:,} members", limits,
                    "max_members")
    if kind == "file":
        st.total += size
        st.disk += -(-size // BLOCK) * BLOCK
    elif kind == "dir":
        st.disk += BLOCK
    if st.total > RATIO_FLOOR and st.total > limits.max_ratio * max(st.compressed, 1):
        raise _over(archive, f"its members expand to more than {st.total:,} bytes from "
                    f"{st.compressed:,} ({st.total / max(st.compressed, 1):.0f}:1)", limits,
                    "max_ratio")


def scan_archive(archive: str | os.PathLike, limits: ArchiveLimits | None = None
                 ) -> ArchiveStats:
    """Check every member's name, type and link target and the archive against ``limits``
    without writing anything; return the counts (refusals raise ``UnsafeArchiveError``)."""
    archive = Path(archive)
    limits = limits or ArchiveLimits()
    st = ArchiveStats(compressed=archive.stat().st_size)
    kind = archive_kind(archive)
    if kind == "rar":
        for info in _rar_members(archive):
            name = check_member_name(archive, info.filename)
            if info.is_symlink() or getattr(info, "file_redir", None):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a link or "
                                         f"redirection; refusing to extract this RAR archive.")
            _count(archive, st, limits, info.file_size, "dir" if info.is_dir() else "file")
            _check_member_ratio(archive, name, info.file_size, info.compress_size, limits)
        return st
    if kind == "zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    name = check_member_name(archive, info.filename)
                    is_link = stat.S_ISLNK(info.external_attr >> 16)
                    if is_link:
                        check_link(archive, name, zf.read(info).decode("utf-8", "replace"),
                                   hard=False)
                    _count(archive, st, limits, info.file_size,
                           "dir" if info.is_dir() else "link" if is_link else "file")
                    _check_member_ratio(archive, name, info.file_size, info.compress_size,
                                        limits)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise _corrupt(archive, e) from None
        return st
    pending: tuple[str, int, int] | None = None  # (name, size, position after its header)
    try:
        with open(archive, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:  # in a stream, reaching a header skips (reads) the data before it
                if pending:
                    _check_member_ratio(archive, pending[0], pending[1],
                                        f.tell() - pending[2] + STREAM_SLACK, limits)
                name = check_member_name(archive, m.name)
                if m.issym() or m.islnk():
                    check_link(archive, name, m.linkname, hard=m.islnk())
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(
                        f"{archive}: member {m.name!r} is a device or FIFO; refusing to "
                        f"extract.")
                _count(archive, st, limits, m.size if m.isfile() else 0,
                       "file" if m.isfile() else "dir" if m.isdir() else "link")
                pending = (m.name, m.size, f.tell()) if m.isfile() else None
            if pending:
                _check_member_ratio(archive, pending[0], pending[1],
                                    f.tell() - pending[2] + STREAM_SLACK, limits)
    except (tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise _corrupt(archive, e) from None
    except OSError as e:
        if e.errno is not None:
            raise
        raise _corrupt(archive, e) from None  # gzip.BadGzipFile, bz2's "Invalid data stream"
    return st


def _corrupt(archive: Path, e: BaseException) -> ArchiveFormatError:
    return ArchiveFormatError(
        f"{archive}: cannot read the archive ({type(e).__name__}: {e}); it is truncated or "
        f"corrupt. Delete it and download it again.")


def _inside_real(root_real: str, path: str | os.PathLike) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def _resolved_inside(archive: Path, root_real: str, into: Path, name: str) -> Path:
    """``into / name`` if its folder, resolved through the links already written, stays
    inside the target (tarfile's ``data`` filter does the same for tar members)."""
    target = into / name
    if not _inside_real(root_real, target.parent):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the target folder through "
            f"a symbolic link; refusing to extract this archive.")
    return target


def _verify_links(archive: Path, into: Path, links: list[str]) -> None:
    """Every link, resolved now that all are written, points inside the target: a chain
    of links that each looked harmless when written cannot escape either."""
    root_real = os.path.realpath(into)
    for name in links:
        if not _inside_real(root_real, into / name):
            raise UnsafeArchiveError(
                f"{archive}: the link {name!r} resolves (through other links of the archive) "
                f"to {os.path.realpath(into / name)}, outside the target folder; refusing to "
                f"extract this archive.")


def _inside(name: str) -> bool:
    """True when the relative POSIX path ``name`` stays inside its root."""
    norm = posixpath.normpath(name)
    return norm != ".." and not norm.startswith("../") and not posixpath.isabs(norm)


def check_member_name(archive: Path, name: str) -> str:
    name_posix = name.replace("\\", "/")
    if name_posix.startswith("/") or (len(name_posix) > 1 and name_posix[1] == ":"):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} has an absolute path; refusing to extract this archive. "
            f"Delete it and download it again from a trusted source."
        )
    if not _inside(name_posix):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the target folder; refusing "
            f"to extract this archive. Delete it and download it again from a trusted source."
        )
    return posixpath.normpath(name_posix)


def check_link(archive: Path, name: str, target: str, hard: bool) -> None:
    """A symlink's target is relative to the link's folder, a hard link's to the root."""
    target = target.replace("\\", "/")
    resolved = target if hard else posixpath.join(posixpath.dirname(name), target)
    if target.startswith("/") or not _inside(resolved):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} is a {'hard' if hard else 'symbolic'} link to "
            f"{target!r}, outside the target folder; refusing to extract this archive."
        )


def archive_kind(path: Path) -> str:
    """``zip`` or ``tar`` from the file's content (not its name: BAPPS's .tar.gz may be
    plain tar)."""
    with open(path, "rb") as f:
        if f.read(7) in RAR_MAGIC:
            return "rar"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ArchiveFormatError(
        f"{path} is neither a zip nor a (compressed) tar or RAR archive; it is probably an HTML "
        f"error page or a truncated download. Delete it and download it again."
    )


def _marker(archive: Path, dest: Path) -> Path:
    return dest / f".{archive.name}.extracted"


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike,
                    key: str | None = None, limits: ArchiveLimits | None = None) -> list[str]:
    """Safely unpack ``archive`` into ``dest``; return the member paths (files) written.

    ``key`` (e.g. the archive's sha256): skip when a marker from a previous extraction of
    the same archive exists. ``limits``: what the archive may hold (defaults:
    :class:`ArchiveLimits`).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    marker = _marker(archive, dest)
    if key and marker.exists():
        try:
            done = json.loads(marker.read_text())
            if done.get("key") == key:
                return list(done.get("files", []))
        except json.JSONDecodeError:
            pass
    kind = archive_kind(archive)
    stats = scan_archive(archive, limits)  # refusals happen here, before any byte is written
    what = f"unpacking {archive.name} ({stats.members:,} members)"
    ensure_free(dest, stats.disk, what)
    with disk_full_errors(dest, what):
        tmp = recovery.mkdtemp(dest, "extract")
        try:
            files, links = (_extract_zip(archive, tmp) if kind == "zip"
                            else _extract_rar(archive, tmp) if kind == "rar"
                            else _extract_tar(archive, tmp))
            _verify_links(archive, tmp, links)
            _merge_move(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        from workflow.files import write_json

        write_json({"key": key, "archive": archive.name, "files": files}, marker)
    return files


def _extract_zip(archive: Path, into: Path) -> tuple[list[str], list[str]]:
    files, links = [], []
    root_real = os.path.realpath(into)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:  # check all before writing any
                name = check_member_name(archive, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    check_link(archive, name, zf.read(info).decode("utf-8", "replace"),
                               hard=False)
            for info in infos:
                name = check_member_name(archive, info.filename)
                target = _resolved_inside(archive, root_real, into, name)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    if not _inside_real(root_real, target):
                        raise UnsafeArchiveError(
                            f"{archive}: folder {name!r} lies outside the target folder "
                            f"through a symbolic link; refusing to extract this archive.")
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink():  # replace a link, never write through it
                    target.unlink()
                if stat.S_ISLNK(info.external_attr >> 16):
                    link = zf.read(info).decode("utf-8", "replace")
                    if not _inside_real(root_real, target.parent / link):
                        raise UnsafeArchiveError(
                            f"{archive}: member {name!r} is a symbolic link to {link!r}, "
                            f"which resolves outside the target folder; refusing to extract "
                            f"this archive.")
                    os.symlink(link, target)
                    links.append(name)
                else:
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                files.append(name)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise _corrupt(archive, e) from None
    return files, links


def _rar_members(archive: Path) -> list[Any]:
    """The member list of a RAR archive (``rarfile`` reads the headers in pure Python)."""
    import rarfile

    try:
        with rarfile.RarFile(archive) as rf:
            infos = rf.infolist()
    except (rarfile.Error, EOFError) as e:
        raise _corrupt(archive, e) from None
    for info in infos:
        if info.needs_password():
            raise ArchiveFormatError(f"{archive}: member {info.filename!r} is encrypted; "
                                     f"this is not the published archive.")
    return infos


def _extract_rar(archive: Path, into: Path) -> tuple[list[str], list[str]]:
    """Stored members are read by ``rarfile`` itself; compressed ones need a binary, checked
    for before the first byte is written."""
    import rarfile

    infos = _rar_members(archive)
    if any(i.compress_type != rarfile.RAR_M0 for i in infos if not i.is_dir()):
        try:
            rarfile.tool_setup()
        except rarfile.RarCannotExec:
            raise ArchiveFormatError(
                f"{archive}: its members are compressed and no RAR extractor is installed; "
                f"install one of unrar, unar, bsdtar (libarchive-tools) or 7z (p7zip-full), "
                f"e.g. `apt-get install unrar-free libarchive-tools`, and rerun; or extract "
                f"the archive yourself and give its folder as config data.paths.<dataset>"
            ) from None
    files: list[str] = []
    root_real = os.path.realpath(into)
    try:
        with rarfile.RarFile(archive) as rf:
            for info in infos:
                name = check_member_name(archive, info.filename)
                target = _resolved_inside(archive, root_real, into, name)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with rf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                files.append(name)
    except (rarfile.Error, EOFError) as e:
        raise _corrupt(archive, e) from None
    return files, []


def _extract_tar(archive: Path, into: Path) -> tuple[list[str], list[str]]:
    """One streaming pass; each member is checked before it is written, and a refusal
    discards the temporary folder, so nothing partial remains."""
    files, links = [], []
    try:
        with tarfile.open(archive, mode="r|*") as tf:
            for m in tf:
                name = check_member_name(archive, m.name)
                if m.issym() or m.islnk():
                    check_link(archive, name, m.linkname, hard=m.islnk())
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(
                        f"{archive}: member {m.name!r} is a device or FIFO; refusing to extract."
                    )
                # filter="data" repeats these checks inside tarfile (defence in depth),
                # resolves links already written, and drops set-uid bits and foreign ownership.
                tf.extract(m, into, filter="data")
                if m.issym():
                    links.append(name)
                if not m.isdir():
                    files.append(name)
    except (tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise _corrupt(archive, e) from None
    except tarfile.FilterError as e:
        raise UnsafeArchiveError(f"{archive}: {e}; refusing to extract this archive.") from None
    except OSError as e:
        if e.errno is not None:  # ENOSPC (disk_full_errors reports it), permissions, ...
            raise
        raise _corrupt(archive, e) from None  # gzip.BadGzipFile, bz2's "Invalid data stream"
    return files, links


def _merge_move(src_root: Path, dest: Path) -> None:
    """Move the extracted tree into ``dest``, merging folders and replacing files."""
    for dirpath, dirnames, filenames in os.walk(src_root):
        rel = Path(dirpath).relative_to(src_root)
        for d in list(dirnames):
            s = Path(dirpath) / d
            if s.is_symlink():  # a link to a folder: move the link itself
                dirnames.remove(d)
                filenames.append(d)
            else:
                (dest / rel / d).mkdir(parents=True, exist_ok=True)
        for f in filenames:
            target = dest / rel / f
            if target.is_dir() and not target.is_symlink():
                raise UnsafeArchiveError(f"{target} is a folder; the archive has a file there")
            os.replace(Path(dirpath) / f, target)
