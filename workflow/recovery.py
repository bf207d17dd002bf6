"""Running the same command again after an interruption: stale locks, litter, liveness.

Snakemake killed with SIGKILL (or a machine that went down) leaves three things behind:

* its locks in ``.snakemake/locks/``, which make the next run stop with a
  ``LockException`` until someone runs ``snakemake --unlock``;
* temporary files of atomic writes (``workflow.files.atomic_path``) and staging folders of
  ``prepare`` that were never renamed into place;
* jobs still running (a trainer; see ``workflow.training``, which checkpoints and exits
  when the Snakemake process named by ``LOSSNET_OWNER_PID`` is gone).

:func:`claim` is called by the Snakefile in Snakemake's main process. Every living main
process holds a shared ``flock`` on ``.snakemake/lossnet-alive.lock`` (the kernel drops it
when the process dies, however it dies). A new run that can take that lock exclusively
knows that no other Snakemake of this working directory is alive, so any lock left in
``.snakemake/locks/`` is stale and is removed, with a message; when another run is alive,
nothing is touched and Snakemake's own lock check applies as always.

Temporary names carry their writer: ``.<name>.tmp~<host>~<pid>~<random><suffix>`` (and
``.prepare~...``, ``.synth~...``, ``.extract~...`` for staging folders). :func:`sweep`
removes those whose writer is a dead process of this host, and those of other hosts that
nobody has modified for a day (a cluster node that died), and leaves everything else alone.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["claim", "mkdtemp", "sweep", "tmp_prefix"]

HOST = socket.gethostname().replace("~", "-")
_TAG = re.compile(r"^\.(?:.+\.tmp|prepare|synth|extract)~(?P<host>[^~/]+)~(?P<pid>\d+)~")
_ALIVE_FD: int | None = None
OTHER_HOST_GRACE_S = 24 * 3600


def tmp_prefix(name: str) -> str:
    """The prefix of a temporary file that becomes ``name`` (see the module docstring)."""
    return f".{name}.tmp~{HOST}~{os.getpid()}~"


def mkdtemp(parent: str | os.PathLike, kind: str = "prepare") -> Path:
    """A staging folder in ``parent`` named after its writer (swept when it is dead);
    ``kind``: ``prepare``, ``synth`` or ``extract``."""
    if kind not in ("prepare", "synth", "extract"):
        raise ValueError(f"staging folder kind {kind!r}: prepare, synth or extract")
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{kind}~{HOST}~{os.getpid()}~", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(path: Path, now: float) -> bool:
    m = _TAG.match(path.name)
    if m is None:
        return False
    if m["host"] == HOST:
        return not _alive(int(m["pid"]))
    try:
        return now - path.lstat().st_mtime > OTHER_HOST_GRACE_S
    except FileNotFoundError:
        return False


def sweep(roots: Iterable[str | os.PathLike], say=print,
          shallow: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Remove the temporary files and staging folders of dead writers under ``roots``.

    Below a ``shallow`` folder only its children's own entries are looked at (the raw
    datasets: writers leave litter next to ``raw/<dataset>/``'s files, never inside an
    extracted tree of a million BAPPS patches). Symlinked folders are not followed."""
    now, removed = time.time(), []
    stops = {os.path.realpath(p) for p in shallow}
    for root in roots:
        if not Path(root).is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if os.path.realpath(os.path.dirname(dirpath)) in stops:
                # staging folders only: no descent into the extracted tree
                dirnames[:] = [d for d in dirnames if _TAG.match(d)]
            for name in [*filenames, *dirnames]:
                p = Path(dirpath) / name
                if not _dead(p, now):
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    dirnames.remove(name)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        say(f"removed {len(removed)} temporary file(s) left by interrupted jobs "
            f"(e.g. {removed[0]})")
    return removed


def claim(snakemake_dir: str | os.PathLike = ".snakemake", say=None) -> list[Path]:
    """Mark this Snakemake main process alive; remove locks of dead runs. Returns them."""
    global _ALIVE_FD
    say = say or (lambda msg: print(msg, file=sys.stderr))
    d = Path(snakemake_dir)
    d.mkdir(parents=True, exist_ok=True)
    if _ALIVE_FD is not None:
        return []
    fd = os.open(d / "lossnet-alive.lock", os.O_RDWR | os.O_CREAT, 0o644)
    removed: list[Path] = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # another Snakemake of this folder is alive: its locks are real
    else:
        locks = sorted((d / "locks").glob("*.lock")) if (d / "locks").is_dir() else []
        for p in locks:
            p.unlink(missing_ok=True)
            removed.append(p)
        if removed:
            say(f"removed {len(removed)} stale lock(s) in {d / 'locks'}: the Snakemake run "
                f"that held them is no longer alive")
    fcntl.flock(fd, fcntl.LOCK_SH)  # held until this process exits
    _ALIVE_FD = fd
    return removed
