"""Writing files so that nothing half-written is ever taken as finished, and hashing them.

Every writer goes through :func:`atomic_path`: the bytes land under a temporary name next to
the target, which is renamed onto it only when the write succeeded (a rename within one
folder is atomic on POSIX file systems). A killed job therefore leaves either the old file or
none, never a truncated one under the final name. Temporary files are made readable by
others (0644), since results are shared on clusters.

A full disk is reported as such, never as a damaged file: :func:`ensure_free` checks the free
space before a large write (needed and available bytes and the path in the message), and
every writer here turns ``ENOSPC`` (or a failed write on a file system with no space left,
such as torch's ``basic_ios::clear: iostream error``) into :class:`DiskFullError`, whose
message starts ``disk full at <path>``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["DiskFullError", "atomic_path", "content_id", "disk_full_errors", "ensure_free",
           "file_hashes", "payload_bytes", "reserve", "save_npy", "save_npz", "sha256_file",
           "write_json", "write_parquet", "write_text"]

CHUNK = 1 << 20
# Free space kept on top of what a write needs: a file system filled to the last byte breaks
# more than the job that filled it (logs, Snakemake's metadata, other users' jobs).
HEADROOM = 16 << 20
# Below this many free bytes a failed write is taken to be the disk filling up (writers that
# lose errno, like torch's C++ stream: "basic_ios::clear: iostream error").
NEARLY_FULL = 1 << 20
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(OSError):
    """No space left for a write: the message names the path, what was being written, the
    bytes needed and available, and what to do. Never a sign of a damaged input."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(errno.ENOSPC, message, None if path is None else str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB ({int(n):,} bytes)"


def _free(path: Path) -> int:
    """Free bytes (for unprivileged users) of the file system ``path`` is, or will be, on."""
    for p in (path, *path.parents):
        if p.exists():
            return int(shutil.disk_usage(p).free)
    return int(shutil.disk_usage(".").free)


def ensure_free(path: str | os.PathLike, needed: int, what: str,
                headroom: int = HEADROOM) -> int:
    """Raise :class:`DiskFullError` unless the file system of ``path`` has ``needed`` bytes
    (plus ``headroom``) free; return the free bytes. ``what`` says what is to be written."""
    path = Path(path)
    free = _free(path)
    if free < needed + headroom:
        raise DiskFullError(
            f"disk full at {path}: {what} needs {_gb(needed)} (+{headroom >> 20} MiB "
            f"headroom), {_gb(free)} available. Free space there or point resources_dir "
            f"(results_dir) at a larger file system, then rerun.", path)
    return free


def _full_error(path: Path, what: str, e: BaseException) -> DiskFullError:
    try:
        free = f"{_gb(_free(path))} available now"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"disk full at {path} while writing {what} ({type(e).__name__}: {e}; {free}). "
        f"Nothing was written under the final name. Free space there or point "
        f"resources_dir (results_dir) at a larger file system, then rerun.", path)


def _is_full(e: BaseException, path: Path) -> bool:
    if isinstance(e, DiskFullError):
        return False  # already says so
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return True
    if isinstance(e, RuntimeError) or (isinstance(e, OSError) and e.errno is None):
        # a writer that lost errno on the way up: judge by what is left on the disk
        try:
            return _free(path) < NEARLY_FULL
        except OSError:
            return False
    return False


@contextmanager
def disk_full_errors(path: str | os.PathLike, what: str | None = None):
    """Run the block; an ``ENOSPC`` (or quota) error inside it becomes :class:`DiskFullError`
    naming ``path`` (other errors pass unchanged)."""
    path = Path(path)
    try:
        yield
    except (OSError, RuntimeError) as e:
        if _is_full(e, path):
            raise _full_error(path, what or path.name, e) from e
        raise


def reserve(path: str | os.PathLike) -> None:
    """Allocate the blocks of an existing (sparse) file, such as a fresh ``np.memmap``, so a
    full disk fails here with :class:`DiskFullError` instead of a SIGBUS when the pages are
    written back. A file system without ``posix_fallocate`` is left as it is."""
    path = Path(path)
    if not hasattr(os, "posix_fallocate"):
        return
    with disk_full_errors(path), open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno in _FULL_ERRNOS:
                    raise
                # EOPNOTSUPP / EINVAL: not supported here; the free-space check has to do


def payload_bytes(obj: Any) -> int:
    """Bytes of the arrays / tensors in a nested dict / list (what a checkpoint will take on
    disk, roughly: serialisation adds little)."""
    if isinstance(obj, Mapping):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    n = getattr(obj, "nbytes", None)
    return int(n) if isinstance(n, int) else 0


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, need: int | None = None):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched. ``need``: the
    bytes the write will take, checked against the free space first (:func:`ensure_free`).
    A write that fails because the disk is full raises :class:`DiskFullError` naming
    ``path``.
    """
    path = Path(path)
    if need is not None:
        ensure_free(path.parent, need, path.name)
    from workflow.recovery import tmp_prefix  # the writer's host and pid: swept when dead

    with disk_full_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name),
                                   suffix=suffix or path.suffix or ".tmp", dir=path.parent)
        os.close(fd)
    try:
        yield Path(tmp)
        if Path(tmp).is_file():  # mkstemp makes 0600 files
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, (OSError, RuntimeError)) and _is_full(e, path)  # before unlinking
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise _full_error(path, path.name, e) from e
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

    array = np.asanyarray(array)
    with atomic_path(path, suffix=".npy", need=array.nbytes) as tmp:
        np.save(tmp, array)
    return Path(path)


def save_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> Path:
    import numpy as np

    need = sum(int(getattr(a, "nbytes", 0)) for a in arrays.values())
    with atomic_path(path, suffix=".npz", need=need) as tmp, open(tmp, "wb") as f:
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
