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
    """The demo config with results and resources redirected into ``tmp``."""
    return ["--configfile", str(ROOT / "config" / "demo.yaml"),
            "--config", f"results_dir={tmp / 'results'}", f"resources_dir={tmp / 'resources'}",
            *extra]
