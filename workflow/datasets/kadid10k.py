"""KADID-10k (Lin, Hosu and Saupe 2019): 81 reference images x 25 distortion types x 5 levels
= 10,125 distorted images, 512 x 384 PNG, with subjective scores from 30 ratings each.

Raw layout (what ``kadid10k.zip`` extracts to)::

    kadid10k/images/I01.png ... I81.png            the references
    kadid10k/images/I01_01_01.png ...              IRR_TT_LL: reference, type 01..25, level 01..05
    kadid10k/dmos.csv    header "dist_img,ref_img,dmos,var", one row per distorted image

Despite its name the ``dmos`` column is quality-oriented (1..5, higher = better: a
degradation category rating; IQA-PyTorch and the publishers' paper use it so), and ``var``
holds the ratings' spread. Prepared arrays: :mod:`workflow.datasets.mos`; ``dist_type`` is
the two-digit type id ("01".."25"), the score is ``dmos`` as published.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workflow import recovery
from workflow.datasets import mos, sources
from workflow.datasets.arrays import raw_checksums
from workflow.datasets.fakes import distort, photo

FILES = sources.KADID10K
TOP = "kadid10k"
LABELS = "dmos.csv"
COLUMNS = ("dist_img", "ref_img", "dmos", "var")
NAME = re.compile(r"^(I\d{2})_(\d{2})_(\d{2})\.png$", re.IGNORECASE)


def synthesize(raw_dir: Path, seed: int, references: int = 3, types: int = 4,
               levels: int = 2, height: int = 32, width: int = 48) -> None:
    """A small KADID-10k in the upstream layout (``kadid10k/images/*.png``, ``dmos.csv``)."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stage = recovery.mkdtemp(raw_dir, "synth")
    try:
        images = stage / TOP / "images"
        images.mkdir(parents=True)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in range(1, references + 1):
            img = photo(rng, height, width)
            ref = f"I{r:02d}.png"
            Image.fromarray(img).save(images / ref)
            for t in range(1, types + 1):
                for lev in range(1, levels + 1):
                    strength = lev / levels
                    name = f"I{r:02d}_{t:02d}_{lev:02d}.png"
                    out = distort(img, t - 1, strength * (0.6 + 0.4 * rng.random()), rng)
                    Image.fromarray(out).save(images / name)
                    score = float(np.clip(4.8 - 3.5 * strength + rng.normal(0, 0.2), 1, 5))
                    w.writerow([name, ref, f"{score:.2f}", f"{0.3 + 0.6 * rng.random():.3f}"])
        (stage / TOP / LABELS).write_text(buf.getvalue())
        final = raw_dir / TOP
        if final.exists():
            shutil.rmtree(final)
        (stage / TOP).rename(final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_rows(root: Path) -> list[mos.Row]:
    labels = root / LABELS
    images = mos.case_index(root / "images", (".png",))
    with open(labels, newline="", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:4]) != COLUMNS:
            raise mos.MosError(f"{labels}:1: expected the header {','.join(COLUMNS)}, got "
                               f"{header}; the label file is damaged: fetch it again")
        rows = []
        for i, rec in enumerate(reader, 2):
            if not any(x.strip() for x in rec):
                continue
            where = f"{labels}:{i}"
            m = NAME.match(rec[0].strip()) if len(rec) >= 4 else None
            if m is None or rec[1].strip().lower() != m.group(1).lower() + ".png":
                raise mos.MosError(f"{where}: expected 'IRR_TT_LL.png,IRR.png,<dmos>,<var>', "
                                   f"got {','.join(rec)!r}; the label file is damaged: fetch "
                                   f"or synthesize it again")
            score = mos.number(rec[2].strip(), where, "dmos")
            mos.number(rec[3].strip(), where, "var")
            dist = images.get(rec[0].strip().lower(), root / "images" / rec[0].strip())
            ref = images.get(rec[1].strip().lower(), root / "images" / rec[1].strip())
            rows.append(mos.Row(ref, dist, score, m.group(2), int(m.group(3)), where))
    return rows


def prepare(raw_dir: Path, out_dir: Path, workers: int | None = None) -> dict[str, Any]:
    return mos.prepare(raw_dir, out_dir, "kadid10k", "KADID-10k", LABELS, read_rows,
                       higher_is_better=True, score="dmos column (1..5, higher = better quality)",
                       checksums=raw_checksums(Path(raw_dir)), workers=workers)


load = mos.loader("kadid10k")
load_manifest = mos.load_manifest
