"""Writing files so that nothing half-written is ever taken as finished, and hashing them.

Every writer goes through :func:`atomic_path`: the bytes land under a temporary name next to
the target, which is renamed onto it only when the write succeeded (a rename within one
folder is atomic on POSIX file systems). A killed job therefore leaves either the old file or
none, never a truncated one under the final name. Temporary files are made readable by
others (0644), since results are shared on clusters.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "file_hashes", "save_npy", "save_npz", "sha256_file", "write_json",
           "write_parquet", "write_text"]

CHUNK = 1 << 20


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if Path(tmp).is_file():  # mkstemp makes 0600 files
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def write_parquet(df: Any, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as Parquet (no index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def save_npy(path: str | os.PathLike, array: Any) -> Path:
    """``np.save`` under a temporary name, then rename."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def save_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> Path:
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def file_hashes(path: str | os.PathLike, algos: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Hex digests of a file for each algorithm, in one read."""
    hs = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            for h in hs.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hs.items()}


def sha256_file(path: str | os.PathLike) -> str:
    return file_hashes(path)["sha256"]
