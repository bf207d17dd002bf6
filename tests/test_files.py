"""Atomic writers (workflow/files.py): nothing half-written under a final name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import namedtuple

import numpy as np
import pandas as pd
import pytest

from workflow import files
from workflow.files import (
    DiskFullError,
    atomic_path,
    disk_full_errors,
    ensure_free,
    file_hashes,
    save_npy,
    save_npz,
    sha256_file,
    write_json,
    write_parquet,
)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]


def test_writers_replace_atomically_and_are_readable_by_others(tmp_path):
    p = write_json({"b": 1, "a": [1, 2]}, tmp_path / "sub" / "x.json")
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert oct(os.stat(p).st_mode & 0o777) == "0o644"
    df = pd.DataFrame({"v": [1.5, 2.5]})
    assert pd.read_parquet(write_parquet(df, tmp_path / "d.parquet")).equals(df)
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(np.load(save_npy(tmp_path / "a.npy", a)), a)
    with np.load(save_npz(tmp_path / "z.npz", {"a": a, "b": a * 2})) as z:
        assert np.array_equal(z["b"], a * 2)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.npy", "d.parquet", "sub", "z.npz"]


def test_hashes_match_hashlib(tmp_path):
    blob = os.urandom(3 << 20)  # several read chunks
    p = tmp_path / "blob"
    p.write_bytes(blob)
    assert sha256_file(p) == hashlib.sha256(blob).hexdigest()
    assert file_hashes(p, ("md5", "sha256")) == {"md5": hashlib.md5(blob).hexdigest(),
                                                 "sha256": hashlib.sha256(blob).hexdigest()}


Usage = namedtuple("Usage", "total used free")


def _free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * free + 1, 9 * free + 1, free))


def test_ensure_free_names_path_needed_and_available(tmp_path, monkeypatch):
    _free_space(monkeypatch, 50_000_000)
    need = 50_000_000 - files.HEADROOM  # exactly enough with the headroom
    assert ensure_free(tmp_path / "new" / "x.npy", need, "x") == 50_000_000
    with pytest.raises(DiskFullError) as e:
        ensure_free(tmp_path / "new" / "x.npy", need + 1, "the prepared arrays")
    msg = str(e.value)
    assert msg.startswith(f"disk full at {tmp_path / 'new' / 'x.npy'}: the prepared arrays")
    assert f"{need + 1:,} bytes" in msg and "50,000,000 bytes" in msg and "available" in msg
    assert e.value.errno == errno.ENOSPC


def test_save_npy_checks_free_space_first_and_writes_nothing(tmp_path, monkeypatch):
    a = np.zeros((1000, 1000), np.uint8)  # 1,000,000 bytes
    _free_space(monkeypatch, files.HEADROOM + 999_999)
    with pytest.raises(DiskFullError, match=r"disk full at .*1,000,000 bytes"):
        save_npy(tmp_path / "a.npy", a)
    assert list(tmp_path.iterdir()) == []
    _free_space(monkeypatch, files.HEADROOM + 1_000_000)
    assert np.array_equal(np.load(save_npy(tmp_path / "a.npy", a)), a)


def test_enospc_in_a_write_is_disk_full_not_corruption(tmp_path):
    target = tmp_path / "ckpt" / "last.pt"
    target.parent.mkdir()
    target.write_text("old")
    with pytest.raises(DiskFullError) as e, atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith(f"disk full at {target} while writing last.pt")
    assert "corrupt" not in str(e.value) and "delete" not in str(e.value).lower()
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]
    with pytest.raises(DiskFullError, match=f"disk full at {tmp_path}"), \
            disk_full_errors(tmp_path, "the archive's members"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError), disk_full_errors(tmp_path):
        raise PermissionError(errno.EACCES, "denied")  # other errors pass unchanged


def test_writer_without_errno_on_a_full_disk_is_disk_full(tmp_path, monkeypatch):
    """torch's C++ stream loses errno: "basic_ios::clear: iostream error"."""
    target = tmp_path / "last.pt"
    _free_space(monkeypatch, 4096)
    with pytest.raises(DiskFullError, match=f"disk full at {target}.*iostream error"), \
            atomic_path(target):
        raise RuntimeError("basic_ios::clear: iostream error")
    assert list(tmp_path.iterdir()) == []
    _free_space(monkeypatch, 10**12)  # with space left the same error is not blamed on it
    with pytest.raises(RuntimeError, match="iostream") as e, atomic_path(target):
        raise RuntimeError("basic_ios::clear: iostream error")
    assert not isinstance(e.value, DiskFullError)


def test_payload_bytes_counts_arrays_in_nested_state():
    state = {"model": {"w": np.zeros((10, 10), np.float32), "b": np.zeros(10, np.float64)},
             "opt": [np.zeros(3, np.uint8), 5, "x"]}
    assert files.payload_bytes(state) == 400 + 80 + 3
