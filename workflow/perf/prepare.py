"""``python -m workflow perf prepare``: PNG decoding speed of dataset preparation, 1 worker
vs all cores, in the same run on the same BAPPS-like tree.

Measures BAPPS's own ``prepare`` (decode + 64x64 resize of every patch, arrays written) and
the shared decoder every other dataset uses (``workflow.datasets.arrays.decode_into_npy``)
on the same PNG files, and writes the ``prepare`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _pngs(raw: Path) -> list[Path]:
    return sorted(raw.rglob("*.png"))


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(n_val: int, n_train: int, n_jnd: int, size: int, workers: list[int], repeats: int,
        scratch: Path) -> list[dict]:
    from PIL import Image

    from workflow.datasets import bapps
    from workflow.datasets.arrays import decode_image, decode_into_npy

    raw = scratch / "raw"
    bapps.synthesize(raw, seed=0, n_val=n_val, n_train=n_train, n_jnd=n_jnd, size=size)
    pngs = _pngs(raw)

    def shared(path: Path) -> np.ndarray:
        img = decode_image(path)
        return np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR))

    rows = []
    for w in workers:
        out = scratch / f"out{w}"
        t = _time(lambda w=w, out=out: bapps.prepare(raw, out, workers=w), repeats)
        rows.append({"what": "bapps.prepare (decode, resize 64, write arrays)", "workers": w,
                     "images": len(pngs), "seconds": t})
        t = _time(lambda w=w: decode_into_npy(scratch / f"shared{w}.npy", pngs, shared,
                                              (64, 64, 3), workers=w), repeats)
        rows.append({"what": "arrays.decode_into_npy (decode, resize 64)", "workers": w,
                     "images": len(pngs), "seconds": t})
    return rows


def markdown(rows: list[dict], size: int, repeats: int, load: float) -> str:
    import torch

    from workflow.perf.report import machine_description

    base = {r["what"]: r["seconds"] for r in rows if r["workers"] == 1}
    lines = [
        "## prepare: PNG decoding (BAPPS-like tree)",
        "",
        f"Machine: {machine_description(torch.device('cpu'))}. Synthetic BAPPS tree of "
        f"{rows[0]['images']} PNG patches of {size}x{size} (the real patches are 256x256), "
        f"best of {repeats} runs; speed-up against 1 worker in the same run. The machine may "
        f"be shared: absolute rates are indicative, the ratio is the figure. Load average "
        f"when the run started: {load:.1f} on {os.cpu_count()} cores (a ratio near 1 under a "
        f"load above the core count says the cores were busy, not that decoding is serial).",
        "",
        "| what | workers | images | seconds | images/s | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['what']} | {r['workers']} | {r['images']} | {r['seconds']:.2f} | "
                     f"{r['images'] / r['seconds']:.0f} | {base[r['what']] / r['seconds']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf prepare", description=__doc__)
    ap.add_argument("--n-val", type=int, default=24, help="triplets per val subset (6 subsets)")
    ap.add_argument("--n-train", type=int, default=8, help="triplets per train subset (3)")
    ap.add_argument("--n-jnd", type=int, default=24, help="pairs per JND subset (2)")
    ap.add_argument("--size", type=int, default=256, help="patch side in pixels")
    ap.add_argument("--workers", type=int, nargs="*", default=None,
                    help="worker counts to compare (default: 1 and all cores)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    workers = args.workers or sorted({1, cores})
    if 1 not in workers:
        workers = [1, *workers]
    load = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="perf-prepare-"))
    try:
        rows = run(args.n_val, args.n_train, args.n_jnd, args.size, workers, args.repeats, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    md = markdown(rows, args.size, args.repeats, load)
    print(md)
    from workflow.perf.report import update_section

    update_section("prepare", md, args.out)
    return 0
