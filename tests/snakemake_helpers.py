"""Running the real workflow from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str, workdir: Path | None = None, timeout: int = 900,
              check: bool = True, env: dict[str, str | None] | None = None
              ) -> subprocess.CompletedProcess:
    """Run snakemake on this repository's Snakefile (cwd = repo root unless ``workdir``);
    ``env`` changes its environment (a ``None`` value removes the variable)."""
    cmd = [*SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), *args]
    env = {k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}.items()
           if v is not None}
    proc = subprocess.run(cmd, cwd=workdir or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def demo_args(tmp: Path, *extra: str) -> list[str]:
    """The demo config with results and resources redirected into ``tmp``; relative to the
    repository when ``tmp`` is inside it (Snakemake keys its metadata by the output paths as
    written, so a run of the README's command, ``demo/...``, is only found under those)."""
    return ["--configfile", str(ROOT / "config" / "demo.yaml"),
            "--config", f"results_dir={as_written(tmp / 'results')}",
            f"resources_dir={as_written(tmp / 'resources')}", *extra]


def as_written(path: Path) -> Path:
    """``path`` as a config value: relative to the repository (Snakemake's working
    directory) when it lies inside it, as the README's demo command writes it."""
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
