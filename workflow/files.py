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

__all__ = ["atomic_path", "content_id", "file_hashes", "save_npy", "save_npz", "sha256_file",
           "write_json", "write_parquet", "write_text"]

CHUNK = 1 << 20


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from workflow.recovery import tmp_prefix  # the writer's host and pid: swept when dead

    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=suffix or path.suffix or ".tmp",
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


def content_id(path: str | os.PathLike) -> str:
    """A digest of what ``path`` holds, not of how it was written: a prepared folder by its
    ``manifest.json`` (deterministic JSON naming every source, count and checksum), an
    ``.npz`` by its arrays (NumPy stamps each write with the time), a model file of
    :func:`workflow.training.save_model` by its tensors (its meta holds wall times), any
    other file by its bytes. Used by resume keys (:func:`workflow.training.resume_key`)."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: it is an input of this job; rerun the rule "
                                f"that makes it")
    h = hashlib.sha256()
    if p.suffix == ".npz":
        import numpy as np

        with np.load(p, allow_pickle=False) as z:
            for name in sorted(z.files):
                a = np.ascontiguousarray(z[name])
                h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
                h.update(a.tobytes())
        return "npz:" + h.hexdigest()[:16]
    if p.suffix == ".pt":
        import torch

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # not a plain tensor file: its bytes identify it
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("modules"), dict):
            for mod in sorted(obj["modules"]):
                for name, t in sorted(obj["modules"][mod].items()):
                    t = t.detach().contiguous().cpu()
                    h.update(f"{mod}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
                    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel()
                             else b"")
            return "model:" + h.hexdigest()[:16]
    return "sha256:" + sha256_file(p)[:16]
