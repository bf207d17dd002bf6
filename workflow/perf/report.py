"""Writing one benchmark's section of BENCHMARKS.md without touching the others."""

from __future__ import annotations

import fcntl
import os
import platform
import re
from argparse import ArgumentParser, Namespace
from pathlib import Path

import torch

from workflow.files import write_text
from workflow.job import Job

HEADER = (
    "# Benchmarks\n\n"
    "Figures written by `python -m workflow perf NAME` (one section per command; rerun a\n"
    "command to refresh its section). Every speed is a ratio against a baseline measured\n"
    "in the same run on the same device.\n"
)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), "
                f"torch {torch.__version__}")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def update_section(name: str, markdown: str, path: str | Path = "BENCHMARKS.md") -> Path:
    """Replace (or append) the section ``<!-- bench:name -->...<!-- /bench:name -->``."""
    path = Path(path)
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else HEADER
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        write_text(text, path)
    return path


def add_run_options(ap: ArgumentParser, precision: bool = True) -> ArgumentParser:
    """The options every timing command shares: where it runs (``--device``, ``--precision``
    unless the command times several precisions itself, ``--threads``) and where its section
    goes (``--out``, ``--no-write``)."""
    ap.add_argument("--device", default="auto")
    if precision:
        ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="BENCHMARKS.md", help="the file whose section is rewritten")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return ap


def run_job(args: Namespace, precision: str | None = None) -> Job:
    """The job of a timing command's options (random loss-network weights: nothing is read);
    ``precision`` overrides ``--precision``."""
    return Job.create({"precision": precision or args.precision, "weights": "random"},
                      {"device": args.device, "threads": args.threads})
