"""Safe extraction: formats detected from content, hostile members refused with nothing
written, archives merged into one tree."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from workflow.datasets.archives import ArchiveFormatError, UnsafeArchiveError, extract_archive

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
