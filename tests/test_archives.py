"""Safe extraction: formats detected from content, hostile members refused with nothing
written, archives merged into one tree."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tarfile
import zipfile
from collections import namedtuple

import pytest

from workflow.datasets import archives
from workflow.datasets.archives import (
    ArchiveFormatError,
    ArchiveLimitError,
    ArchiveLimits,
    UnsafeArchiveError,
    extract_archive,
    scan_archive,
)
from workflow.files import DiskFullError

FILES = {"2afc/val/cnn/p0/000001.png": b"png-bytes", "2afc/val/cnn/judge/000001.npy": b"npy"}


def make_tar(path, members, mode="w:gz", links=()):
    with tarfile.open(path, mode) as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        for name, target, kind in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
            info.linkname = target
            tf.addfile(info)
    return path


def make_zip(path, members, symlinks=()):
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
        for name, target in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK
            zf.writestr(info, target)
    return path


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


# "w" with a .gz name: a plain tar under a .tar.gz name, as BAPPS may ship
@pytest.mark.parametrize("mode,name", [("w:gz", "a.tar.gz"), ("w", "a.tar.gz"),
                                       ("w:bz2", "a.tbz"), ("w:xz", "a.bin")])
def test_tar_any_compression_detected_from_content(tmp_path, mode, name):
    arc = make_tar(tmp_path / name, FILES, mode)
    out = tmp_path / "out"
    files = extract_archive(arc, out)
    assert tree(out) == FILES
    assert sorted(files) == sorted(FILES)


def test_zip_extracts(tmp_path):
    out = tmp_path / "out"
    extract_archive(make_zip(tmp_path / "a.zip", FILES), out)
    assert tree(out) == FILES


def test_archives_merge_into_one_tree_and_rerun_is_skipped(tmp_path):
    out = tmp_path / "out"
    extract_archive(make_tar(tmp_path / "val.tar", FILES, "w"), out)
    extract_archive(make_tar(tmp_path / "train.tar", {"2afc/train/mix/ref/1.png": b"t"}, "w"), out,
                    key="abc")
    assert tree(out) == {**FILES, "2afc/train/mix/ref/1.png": b"t"}
    (out / "2afc/train/mix/ref/1.png").write_bytes(b"edited")
    extract_archive(tmp_path / "train.tar", out, key="abc")  # same key: not unpacked again
    assert (out / "2afc/train/mix/ref/1.png").read_bytes() == b"edited"


@pytest.mark.parametrize("bad", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt"])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_escaping_and_absolute_members_are_refused_and_nothing_is_written(tmp_path, bad, kind):
    members = {**FILES, bad: b"x"}
    arc = (make_tar(tmp_path / "a.tar.gz", members) if kind == "tar"
           else make_zip(tmp_path / "a.zip", members))
    out = tmp_path / "sub" / "out"
    with pytest.raises(UnsafeArchiveError, match="outside|absolute") as e:
        extract_archive(arc, out)
    assert bad in str(e.value) and str(arc) in str(e.value)
    assert list(out.iterdir()) == []  # the good members were not left behind either
    assert not (tmp_path / "sub" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("name,target,kind", [("link", "../../etc/passwd", "sym"),
                                              ("d/link", "/etc/passwd", "sym"),
                                              ("d/link", "../../x", "sym"),
                                              ("hard", "../outside", "hard")])
def test_links_pointing_outside_are_refused(tmp_path, name, target, kind):
    arc = make_tar(tmp_path / "a.tar", FILES, "w", links=[(name, target, kind)])
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_archive(arc, out)
    assert list(out.iterdir()) == []


def test_zip_symlink_outside_is_refused(tmp_path):
    arc = make_zip(tmp_path / "a.zip", FILES, symlinks=[("evil", "../../outside")])
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_archive(arc, tmp_path / "out")


def test_link_inside_is_allowed(tmp_path):
    arc = make_tar(tmp_path / "a.tar", FILES, "w",
                   links=[("2afc/val/cnn/alias.png", "p0/000001.png", "sym")])
    out = tmp_path / "out"
    extract_archive(arc, out)
    assert (out / "2afc/val/cnn/alias.png").read_bytes() == b"png-bytes"


def test_not_an_archive_and_truncated_archive_fail_clearly(tmp_path):
    html = tmp_path / "a.tar.gz"
    html.write_bytes(b"<html>503 Service Unavailable</html>")
    with pytest.raises(ArchiveFormatError, match="neither a zip nor"):
        extract_archive(html, tmp_path / "out")
    big = {f"f{i}.bin": bytes([i % 256]) * 50_000 for i in range(8)}
    arc = make_tar(tmp_path / "t.tar", big, "w")
    arc.write_bytes(arc.read_bytes()[:200_000])  # cut mid-member
    out = tmp_path / "out2"
    with pytest.raises(ArchiveFormatError, match="truncated or corrupt"):
        extract_archive(arc, out)
    assert tree(out) == {}



# --------------------------------------------------------------------------- link chains


def _outside_files(tmp_path, out):
    return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.is_file() and out not in p.parents and p.suffix not in (".zip", ".tar"))


@pytest.mark.parametrize("order", [("e", "d", "l1", "file"), ("l1", "d", "e", "file"),
                                   ("l1", "d", "e")])
def test_zip_symlink_chain_is_refused_and_writes_nothing_outside(tmp_path, order):
    """Each link looks harmless on its own (e -> ".", d -> "e/..", l1 -> "d/.."), but
    together l1 resolves two folders above the target; a file written through it would
    land there."""
    links = {"e": ".", "d": "e/..", "l1": "d/.."}
    arc = tmp_path / "a.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        for name in order:
            if name == "file":
                zf.writestr("l1/evil.txt", b"escaped")
                continue
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, links[name])
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(UnsafeArchiveError, match="outside the target folder") as e:
        extract_archive(arc, out)
    assert str(arc) in str(e.value)
    assert list(out.iterdir()) == []
    assert _outside_files(tmp_path, out) == []  # no evil.txt anywhere


def test_tar_symlink_chain_is_refused(tmp_path):
    arc = make_tar(tmp_path / "a.tar", {}, "w",
                   links=[("l1", "d/..", "sym"), ("d", "e/..", "sym"), ("e", ".", "sym")])
    out = tmp_path / "a" / "out"
    with pytest.raises(UnsafeArchiveError, match="outside the target folder|link"):
        extract_archive(arc, out)
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- limits


def _many_members_tar(n: int) -> bytes:
    """A tar of ``n`` empty members, built in memory in a few ms (one header repeated)."""
    header = tarfile.TarInfo("d/empty").tobuf(tarfile.GNU_FORMAT)
    return header * n + b"\0" * 1024


def test_50k_member_archive_is_refused_unwritten_and_passes_with_the_override(tmp_path):
    arc = tmp_path / "many.tar"
    arc.write_bytes(_many_members_tar(50_000))
    out = tmp_path / "out"
    with pytest.raises(ArchiveLimitError) as e:
        extract_archive(arc, out)
    msg = str(e.value)
    assert msg.startswith(f"{arc}: more than 20,000 members")
    assert "data.<dataset>.archive_limits.max_members" in msg and "nothing was written" in msg
    assert list(out.iterdir()) == []
    assert scan_archive(arc, ArchiveLimits(max_members=50_000)).members == 50_000


def test_member_limit_and_override_end_to_end(tmp_path):
    members = {f"d/{i:03d}.txt": b"x" for i in range(30)}  # 30 files
    arc = make_zip(tmp_path / "a.zip", members)
    with pytest.raises(ArchiveLimitError, match="more than 29 members.* raise config key "
                                                "data.bapps.archive_limits.max_members"):
        extract_archive(arc, tmp_path / "out",
                        limits=ArchiveLimits(max_members=29, key="data.bapps.archive_limits"))
    files = extract_archive(arc, tmp_path / "out", limits=ArchiveLimits(max_members=30))
    assert sorted(files) == sorted(members) and tree(tmp_path / "out") == members


class _Zeros(io.RawIOBase):
    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def test_1000_to_1_member_is_refused_in_zip_and_tar(tmp_path):
    noise = os.urandom(300_000)  # keeps the total ratio under its limit
    arc = tmp_path / "bomb.zip"
    with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("noise.bin", noise)
        zf.writestr("zeros.bin", bytes(10_000_000))
    info = zipfile.ZipFile(arc).getinfo("zeros.bin")
    ratio = info.file_size / info.compress_size
    assert ratio > 1000 and 10_300_000 / arc.stat().st_size < 100
    out = tmp_path / "out"
    with pytest.raises(ArchiveLimitError, match=r"'zeros.bin' expands 10,000,000 bytes .*"
                                                r"max_member_ratio = 200"):
        extract_archive(arc, out)
    assert list(out.iterdir()) == []
    assert scan_archive(arc, ArchiveLimits(max_member_ratio=2000)).total == 10_300_000

    tgz = tmp_path / "bomb.tar.gz"
    noise = os.urandom(1_100_000)
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tf:
        noise_info = tarfile.TarInfo("noise.bin")
        noise_info.size = len(noise)
        tf.addfile(noise_info, io.BytesIO(noise))
        zeros = tarfile.TarInfo("zeros.bin")
        zeros.size = 100_000_000
        tf.addfile(zeros, io.BufferedReader(_Zeros(zeros.size)))
    assert 101_100_000 / tgz.stat().st_size < 100  # the total alone would pass
    with pytest.raises(ArchiveLimitError, match=r"'zeros.bin' expands 100,000,000 bytes"):
        extract_archive(tgz, out)
    assert list(out.iterdir()) == []


def test_total_expansion_ratio_is_limited(tmp_path):
    arc = make_tar(tmp_path / "a.tar.gz", {"z.bin": bytes(5_000_000)})
    with pytest.raises(ArchiveLimitError, match=r"expand to more than .*max_ratio = 100"):
        extract_archive(arc, tmp_path / "out")
    extract_archive(arc, tmp_path / "out", limits=ArchiveLimits(max_ratio=10_000,
                                                                max_member_ratio=10_000))
    assert (tmp_path / "out" / "z.bin").stat().st_size == 5_000_000


def test_limits_from_config_name_an_unknown_key():
    lim = ArchiveLimits.from_config({"max_members": 5}, key="data.bapps.archive_limits")
    assert lim.max_members == 5 and lim.max_ratio == ArchiveLimits().max_ratio
    with pytest.raises(ValueError, match=r"data.bapps.archive_limits: unknown \['members'\]"):
        ArchiveLimits.from_config({"members": 5}, key="data.bapps.archive_limits")


# --------------------------------------------------------------------------- disk


Usage = namedtuple("Usage", "total used free")


def test_free_space_is_checked_before_extracting(tmp_path, monkeypatch):
    big = {f"f{i}.bin": os.urandom(10_000) for i in range(3)}
    arc = make_tar(tmp_path / "a.tar.gz", big)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 7777, 7777))
    with pytest.raises(DiskFullError) as e:
        extract_archive(arc, out)
    need = 3 * 12_288  # three files of 10,000 bytes in whole 4 KiB blocks
    assert str(e.value).startswith(f"disk full at {out}: unpacking a.tar.gz (3 members) "
                                   f"needs 0.00 GB ({need:,} bytes)")
    assert "7,777 bytes) available" in str(e.value)
    assert list(out.iterdir()) == [] and arc.exists()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_enospc_while_extracting_is_disk_full_not_corruption(tmp_path, monkeypatch, kind):
    arc = (make_tar(tmp_path / "a.tar.gz", FILES) if kind == "tar"
           else make_zip(tmp_path / "a.zip", FILES))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile if kind == "tar" else archives.shutil, "copyfileobj", full)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError) as e:
        extract_archive(arc, out)
    msg = str(e.value)
    assert msg.startswith(f"disk full at {out} while writing unpacking {arc.name}")
    assert "corrupt" not in msg and "Delete it" not in msg
    assert arc.exists() and list(out.iterdir()) == []
