"""The downloader against a loopback server: resume, retries, checksums, disk check, mirrors,
weights. Expected hashes are computed here with hashlib, independently of the code."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import namedtuple

import pytest
from http_server import LoopbackServer

from workflow.datasets import RemoteFile
from workflow.datasets import fetch as dl

DATA = bytes(range(256)) * 97 + b"tail"  # 24,836 bytes, not a multiple of anything


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_mirror_url_replaces_scheme_and_host_keeps_path():
    up = "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"
    assert dl.mirror_url(up, None) == up
    assert (dl.mirror_url(up, "http://127.0.0.1:9/svhn/")
            == "http://127.0.0.1:9/svhn/housenumbers/train_32x32.mat")
    assert dl.mirror_url("https://h/a/b?x=1", "http://m") == "http://m/a/b?x=1"


def test_fetch_verifies_sha256_and_md5_and_places_atomically(tmp_path):
    with LoopbackServer({"/d/f.bin": DATA}) as srv:
        out = dl.fetch(f"{srv.url}/d/f.bin", tmp_path / "f.bin", sha256=sha(DATA), md5=md5(DATA),
                       progress=False)
        assert out.read_bytes() == DATA
        assert not (tmp_path / "f.bin.part").exists()
        # a second call finds the verified file and makes no request
        n = len(srv.requests)
        dl.fetch(f"{srv.url}/d/f.bin", out, sha256=sha(DATA), progress=False)
        assert len(srv.requests) == n


def test_dropped_connection_resumes_with_a_range_request(tmp_path):
    with LoopbackServer({"/f": DATA}) as srv:
        srv.drop["/f"] = (1, 5000)  # the first GET sends 5,000 bytes and hangs up
        out = dl.fetch(f"{srv.url}/f", tmp_path / "f", sha256=sha(DATA), retries=2,
                       backoff_s=0.01, progress=False)
        assert out.read_bytes() == DATA
        gets = [r for r in srv.requests if r[0] == "GET"]
        assert [g[2] for g in gets] == [None, "bytes=5000-"]
        assert srv.body_bytes["/f"] == len(DATA)  # 5,000 + the rest: nothing fetched twice


def test_interrupted_run_leaves_part_and_next_run_resumes(tmp_path):
    with LoopbackServer({"/f": DATA}) as srv:
        srv.drop["/f"] = (1, 7000)
        with pytest.raises(dl.DownloadError, match="rerun to resume"):
            dl.fetch(f"{srv.url}/f", tmp_path / "f", md5=md5(DATA), retries=0, progress=False)
        assert (tmp_path / "f.part").stat().st_size == 7000
        assert not (tmp_path / "f").exists()
        dl.fetch(f"{srv.url}/f", tmp_path / "f", md5=md5(DATA), retries=0, progress=False)
        assert (tmp_path / "f").read_bytes() == DATA
        assert srv.requests[-1][2] == "bytes=7000-"


def test_server_without_ranges_restarts_from_zero(tmp_path):
    (tmp_path / "f.part").write_bytes(b"x" * 3000)  # a stale prefix the server cannot resume
    with LoopbackServer({"/f": DATA}, no_ranges=True) as srv:
        dl.fetch(f"{srv.url}/f", tmp_path / "f", sha256=sha(DATA), progress=False)
    assert (tmp_path / "f").read_bytes() == DATA


def test_wrong_checksum_fails_names_url_and_hashes_and_leaves_no_file(tmp_path):
    wrong = "0" * 64
    with LoopbackServer({"/f": DATA}) as srv:
        url = f"{srv.url}/f"
        with pytest.raises(dl.ChecksumError) as e:
            dl.fetch(url, tmp_path / "f", sha256=wrong, progress=False)
    msg = str(e.value)
    assert url in msg and wrong in msg and sha(DATA) in msg
    assert list(tmp_path.iterdir()) == []


def test_unpublished_checksum_is_recorded_and_verified_later(tmp_path):
    book = dl.ChecksumBook(tmp_path / "checksums.json")
    with LoopbackServer({"/a/f": DATA}) as srv:
        dl.fetch(f"{srv.url}/a/f", tmp_path / "f", book=book, progress=False)
        book.save()
        rec = json.loads((tmp_path / "checksums.json").read_text())
        assert rec["f"]["sha256"] == sha(DATA) and rec["f"]["size"] == len(DATA)
        # the file gets damaged; the upstream now serves something else: the recorded hash wins
        (tmp_path / "f").write_bytes(b"damaged")
        srv.files["/a/f"] = DATA[::-1]
        book2 = dl.ChecksumBook(tmp_path / "checksums.json")
        with pytest.raises(dl.ChecksumError, match=sha(DATA)):
            dl.fetch(f"{srv.url}/a/f", tmp_path / "f", book=book2, progress=False)
        assert not (tmp_path / "f").exists()


Usage = namedtuple("Usage", "total used free")


def test_disk_shortfall_fails_before_any_request_when_size_is_known(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))
    with LoopbackServer({"/f": DATA}) as srv:
        with pytest.raises(dl.DiskSpaceError, match=f"disk full at {tmp_path}: not enough free"):
            dl.fetch_remote(RemoteFile(f"{srv.url}/f", size=len(DATA)), tmp_path, progress=False)
        assert srv.requests == []
    assert list(tmp_path.iterdir()) == []


def test_disk_shortfall_from_content_length_writes_nothing(tmp_path, monkeypatch):
    need = len(DATA) + dl.DISK_MARGIN
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: Usage(2 * need, need + 1, need - 1))
    with LoopbackServer({"/f": DATA}) as srv:
        with pytest.raises(dl.DiskSpaceError):
            dl.fetch(f"{srv.url}/f", tmp_path / "f", progress=False)
    assert list(tmp_path.iterdir()) == []
    # one byte more free space and it goes through
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: Usage(2 * need, need, need))
    with LoopbackServer({"/f": DATA}) as srv:
        dl.fetch(f"{srv.url}/f", tmp_path / "f", progress=False)
    assert (tmp_path / "f").read_bytes() == DATA


def test_404_fails_at_once_without_retries(tmp_path):
    with LoopbackServer({}) as srv:
        with pytest.raises(dl.DownloadError, match="HTTP 404"):
            dl.fetch(f"{srv.url}/missing", tmp_path / "m", retries=3, backoff_s=0.01,
                     progress=False)
        assert len(srv.requests) == 1


def test_read_range_returns_exact_bytes(tmp_path):
    with LoopbackServer({"/f": DATA}) as srv:
        f = dl.Fetcher(tmp_path, progress=False)
        assert f.read_range(f"{srv.url}/f", 1000, 1500) == DATA[1000:1500]
        assert srv.body_bytes["/f"] == 500
        assert f.head(f"{srv.url}/f") == (len(DATA), True)
    with LoopbackServer({"/f": DATA}, no_ranges=True) as srv:
        assert dl.Fetcher(tmp_path).head(f"{srv.url}/f") == (len(DATA), False)
        with pytest.raises(dl.RangeUnsupported):
            dl.Fetcher(tmp_path, retries=0).read_range(f"{srv.url}/f", 0, 10)


def test_weights_hash_prefix_check(tmp_path, monkeypatch):
    """torchvision's rule: the sha256 of a weight file starts with the hash in its name."""
    import workflow.datasets.weights as w

    good_name = f"tinynet-{sha(DATA)[:8]}.pth"
    bad_name = f"tinynet-{'f' * 8 if not sha(DATA).startswith('f' * 8) else '0' * 8}.pth"
    names = {"alexnet": good_name, "vgg11": bad_name}
    with LoopbackServer({f"/models/{n}": DATA for n in names.values()}) as srv:
        monkeypatch.setattr(w, "weights_filename", lambda a: names[a])
        monkeypatch.setattr(w, "weights_url",
                            lambda a: f"https://download.pytorch.org/models/{names[a]}")
        paths = w.fetch_weights(["alexnet"], tmp_path, mirror=srv.url, progress=False)
        assert paths == [tmp_path / good_name] and paths[0].read_bytes() == DATA
        with pytest.raises(dl.DownloadError, match="does not start with"):
            w.fetch_weights(["vgg11"], tmp_path, mirror=srv.url, progress=False)
    assert not (tmp_path / bad_name).exists()
    shutil.rmtree(tmp_path)


# --------------------------------------------------------------------------- lengths


def _book_entries(tmp_path):
    p = tmp_path / "checksums.json"
    return json.loads(p.read_text()) if p.exists() else {}


def test_short_body_without_checksum_is_refused_and_not_recorded(tmp_path):
    book = dl.ChecksumBook(tmp_path / "checksums.json")
    with LoopbackServer({"/f": DATA}) as srv:
        srv.drop["/f"] = (10, 6000)  # every GET: full Content-Length, 6,000 bytes, hang up
        with pytest.raises(dl.DownloadError, match="after 2 attempts"):
            dl.fetch(f"{srv.url}/f", tmp_path / "f", book=book, retries=1, backoff_s=0.01,
                     progress=False)
    book.save()
    assert not (tmp_path / "f").exists() and _book_entries(tmp_path) == {}


def test_short_content_length_without_checksum_is_refused(tmp_path):
    """A body that matches a too-short Content-Length (the file was cut upstream of us)."""
    book = dl.ChecksumBook(tmp_path / "checksums.json")
    with LoopbackServer({"/set5/img.png": DATA}) as srv:
        srv.short_length["/set5/img.png"] = 4000
        with pytest.raises(dl.LengthError, match=r"announced 4,000 bytes .* holds more"):
            dl.fetch(f"{srv.url}/set5/img.png", tmp_path / "img.png", book=book,
                     progress=False)
        book.save()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.json"]
        assert _book_entries(tmp_path) == {}
        # the next run, once the server is right again, gets and records the whole file
        del srv.short_length["/set5/img.png"]
        dl.fetch(f"{srv.url}/set5/img.png", tmp_path / "img.png", book=book, progress=False)
        book.save()
    assert (tmp_path / "img.png").read_bytes() == DATA
    assert _book_entries(tmp_path)["img.png"]["size"] == len(DATA)


def test_body_without_length_is_refused_without_checksum_and_kept_with_one(tmp_path):
    with LoopbackServer({"/f": DATA}, no_ranges=True) as srv:
        srv.no_length.add("/f")
        book = dl.ChecksumBook(tmp_path / "checksums.json")
        with pytest.raises(dl.LengthError, match="no Content-Length"):
            dl.fetch(f"{srv.url}/f", tmp_path / "f", book=book, progress=False)
        book.save()
        assert not (tmp_path / "f").exists() and _book_entries(tmp_path) == {}
        # a known checksum decides instead: accepted
        dl.fetch(f"{srv.url}/f", tmp_path / "g", sha256=sha(DATA), progress=False)
    assert (tmp_path / "g").read_bytes() == DATA


def test_recorded_size_is_checked_on_later_runs(tmp_path):
    book = dl.ChecksumBook(tmp_path / "checksums.json")
    with LoopbackServer({"/a/f": DATA}) as srv:
        dl.fetch(f"{srv.url}/a/f", tmp_path / "f", book=book, progress=False)
        book.save()
        # the file is lost and the server now serves a shorter one, consistently
        (tmp_path / "f").unlink()
        srv.files["/a/f"] = DATA[:10_000]
        book2 = dl.ChecksumBook(tmp_path / "checksums.json")
        with pytest.raises(dl.LengthError, match=r"received 10,000 bytes, but f was recorded "
                                                 r"with 24,836 bytes"):
            dl.fetch(f"{srv.url}/a/f", tmp_path / "f", book=book2, progress=False)
        assert not (tmp_path / "f").exists() and not (tmp_path / "f.part").exists()
        # a file on disk of another size than recorded is fetched again without hashing it
        srv.files["/a/f"] = DATA
        (tmp_path / "f").write_bytes(DATA[:-1])
        dl.fetch(f"{srv.url}/a/f", tmp_path / "f", book=book2, progress=False)
    assert (tmp_path / "f").read_bytes() == DATA
