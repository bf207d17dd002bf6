"""``python -m workflow perf dag``: CPU time of ``snakemake -n`` on the full study.

Builds the DAG of the full config (``config.yaml``: every benchmark, the 56 loss networks and
the LPIPS sets, with nothing on disk yet, so every job is planned) with this checkout and
with an earlier commit (default: the last one before the planning module, 49daa64), both in
this Python environment, interleaved, and reports the CPU time (user + system of the
Snakemake process) of each. The earlier commit is checked out into a temporary git worktree
and removed afterwards. Writes the ``dag`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "49daa64"


def python_env(bytecode: bool, scratch: Path) -> dict[str, str]:
    """This environment; without ``bytecode`` Python neither writes nor reads ``.pyc`` files
    (an empty ``PYTHONPYCACHEPREFIX``: the ``__pycache__`` folders a warm-up or an earlier
    run left are not looked at), so every imported module is compiled again."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONPYCACHEPREFIX"] = str(scratch / "no-pycache")  # stays empty
    return env


def dry_run(checkout: Path, scratch: Path, bytecode: bool) -> tuple[float, float, int]:
    """CPU seconds and wall seconds of one ``snakemake -n`` in ``checkout``; jobs planned."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1",
           "--config", f"results_dir={scratch / 'results'}", f"resources_dir={scratch / 'res'}"]
    env = python_env(bytecode, scratch)
    env["PYTHONPATH"] = str(checkout)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed in {checkout}:\n{proc.stderr[-3000:]}")
    jobs = 0
    for line in (proc.stdout + proc.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            jobs = int(parts[1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, jobs


def import_only(bytecode: bool, scratch: Path) -> float:
    """CPU seconds of ``snakemake --version``: Snakemake importing itself (and its plugins),
    the part of any dry run that no workflow can make smaller."""
    env = python_env(bytecode, scratch)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "snakemake", "--version"], env=env, check=True,
                   capture_output=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(baseline: str, repeats: int, bytecode: bool) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="perf-dag-"))
    worktree = scratch / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), baseline], cwd=ROOT,
                   check=True, capture_output=True)
    try:
        rows: dict[str, list[tuple[float, float, int]]] = {"baseline": [], "this": []}
        floor = []
        for checkout in (worktree, ROOT):  # warm-up: file caches (and .pyc files)
            dry_run(checkout, scratch / "warm", bytecode)
        for i in range(repeats):
            for name, checkout in (("baseline", worktree), ("this", ROOT)):
                rows[name].append(dry_run(checkout, scratch / f"{name}{i}", bytecode))
            floor.append(import_only(bytecode, scratch))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    out = {name: {"cpu": statistics.median(r[0] for r in runs),
                  "wall": statistics.median(r[1] for r in runs), "jobs": runs[0][2]}
           for name, runs in rows.items()}
    out["import"] = {"cpu": statistics.median(floor)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf dag", description=__doc__)
    ap.add_argument("--baseline", default=BASELINE, help="the commit to compare against")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-bytecode", action="store_true",
                    help="compile every module on every run (no .pyc read or written), as "
                         "machines without writable .pyc caches do")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    from workflow.perf.report import update_section

    r = measure(args.baseline, args.repeats, not args.no_bytecode)
    pyc = ("Python compiled every imported module on every run (`--no-bytecode`)"
           if args.no_bytecode else "Python's bytecode cache on (`.pyc` files written by the "
           "warm-up)")
    base = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip() or args.baseline
    ratio = r["this"]["cpu"] / r["baseline"]["cpu"]
    md = "\n".join([
        "## dag: `snakemake -n` on the full study"
        + (" (no bytecode cache)" if args.no_bytecode else ""),
        "",
        f"Command: `python -m workflow perf dag{' '.join([''] + list(argv or []))}`. "
        f"`snakemake -n --cores 1` on `config.yaml` (every benchmark, nothing on "
        f"disk, so every job is planned), this checkout against commit {base} in a temporary "
        f"worktree, same Python environment, median of {args.repeats} interleaved runs after "
        f"one warm-up each; {pyc}. CPU = user + system time of the Snakemake process; "
        f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| checkout | jobs planned | CPU s | CPU vs baseline |",
        "|---|---:|---:|---:|",
        f"| {base} (baseline) | {r['baseline']['jobs']} | {r['baseline']['cpu']:.1f} | 1.00x |",
        f"| this checkout | {r['this']['jobs']} | {r['this']['cpu']:.1f} | {ratio:.2f}x |",
        f"| `snakemake --version` (Snakemake importing itself) | | {r['import']['cpu']:.1f} | "
        f"{r['import']['cpu'] / r['baseline']['cpu']:.2f}x |",
        "",
        f"This checkout builds the DAG in {ratio:.0%} of the baseline's CPU time "
        f"({'at most' if ratio <= 0.5 else 'more than'} half); "
        f"{r['import']['cpu']:.1f} s of its {r['this']['cpu']:.1f} s is Snakemake importing "
        f"itself and its plugins (pandas among them), which no workflow changes, "
        f"and the baseline spent {r['baseline']['cpu'] - r['this']['cpu']:.1f} s more.",
    ])
    print(md)
    if not args.no_write:
        update_section("dag-nobytecode" if args.no_bytecode else "dag", md)
    return 0
