"""Safe archive extraction: zip and tar (any compression, detected from the content).

Every member is checked before it is written: absolute paths, members that would land
outside the target folder (``../``), links (symbolic or hard) whose target leaves the
folder, and device / FIFO members are refused with an error naming the archive and the
member. Extraction goes into a temporary folder inside the target; only when the whole
archive extracted cleanly are its files moved into place (merged with what is there:
BAPPS's train and val archives both unpack into ``2afc/``), so a refused or truncated
archive leaves nothing behind.

A marker ``.<archive name>.extracted`` (JSON: the archive's sha256 when given, the member
count) lets a rerun skip an archive that is already unpacked.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path


class UnsafeArchiveError(ValueError):
    """An archive member would escape the target folder (or is not a plain file/dir/link)."""


class ArchiveFormatError(ValueError):
    pass


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
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ArchiveFormatError(
        f"{path} is neither a zip nor a (compressed) tar archive; it is probably an HTML "
        f"error page or a truncated download. Delete it and download it again."
    )


def _marker(archive: Path, dest: Path) -> Path:
    return dest / f".{archive.name}.extracted"


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike,
                    key: str | None = None) -> list[str]:
    """Safely unpack ``archive`` into ``dest``; return the member paths (files) written.

    ``key`` (e.g. the archive's sha256): skip when a marker from a previous extraction of
    the same archive exists.
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
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{archive.name}.", dir=dest))
    try:
        files = _extract_zip(archive, tmp) if kind == "zip" else _extract_tar(archive, tmp)
        _merge_move(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from workflow.files import write_json

    write_json({"key": key, "archive": archive.name, "files": files}, marker)
    return files


def _extract_zip(archive: Path, into: Path) -> list[str]:
    files = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # check all before writing any
            name = check_member_name(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                check_link(archive, name, zf.read(info).decode("utf-8", "replace"), hard=False)
        for info in infos:
            name = check_member_name(archive, info.filename)
            target = into / name
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISLNK(info.external_attr >> 16):
                os.symlink(zf.read(info).decode(), target)
            else:
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            files.append(name)
    return files


def _extract_tar(archive: Path, into: Path) -> list[str]:
    """One streaming pass (a 5 GB .tar.gz is read once); each member is checked before it
    is written, and a refusal discards the temporary folder, so nothing partial remains."""
    files = []
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
                # filter="data" repeats these checks inside tarfile (defence in depth) and
                # drops set-uid bits and foreign ownership.
                tf.extract(m, into, filter="data")
                if not m.isdir():
                    files.append(name)
    except (tarfile.ReadError, EOFError, OSError) as e:
        raise ArchiveFormatError(
            f"{archive}: cannot read the archive ({e}); it is truncated or corrupt. Delete it "
            f"and download it again."
        ) from None
    except tarfile.FilterError as e:
        raise UnsafeArchiveError(f"{archive}: {e}; refusing to extract this archive.") from None
    return files


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
