"""Atomic writers (workflow/files.py): nothing half-written under a final name."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest

from workflow.files import (
    atomic_path,
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
