"""TID2013 (Ponomarenko et al. 2015): 25 reference images x 24 distortion types x 5 levels
= 3,000 distorted images, 512 x 384 BMP, with mean opinion scores (0..9, higher = better).

Raw layout (what ``tid2013.rar`` extracts to, possibly under a top folder)::

    reference_images/I01.BMP ... I24.BMP, i25.bmp
    distorted_images/i01_01_1.bmp ... (iRR_TT_L: reference, type 01..24, level 1..5; a
                     few upper-case, e.g. I01_01_1.bmp, I01_11_1.BMP, I01_13_1.BMP)
    mos_with_names.txt   one line per image: "<MOS> <file name>" (e.g. "5.51429 i01_01_1.bmp")
    mos_std.txt          one line per image: the standard deviation of its MOS
    mos.txt              the MOS alone (not read)

File names are matched case-insensitively (the label file and the disk disagree in case).
The archive is RAR: extracted with ``rarfile`` (stored members in Python; compressed ones
need ``unrar``/``unar``/``bsdtar``/``7z``), or give the extracted folder as
``data.paths.tid2013``. Prepared arrays: :mod:`workflow.datasets.mos`; ``dist_type`` is the
two-digit type id ("01".."24"), the score is the MOS as published (``higher_is_better``).
"""

from __future__ import annotations

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

FILES = sources.TID2013
NAME = re.compile(r"^i(\d{2})_(\d{2})_(\d)\.bmp$", re.IGNORECASE)
LABELS = "mos_with_names.txt"
STD = "mos_std.txt"
# the published upper-case exceptions (IQA-PyTorch's meta_info_TID2013Dataset.csv)
UPPER_STEM = ("_01_1",)
UPPER_ALL = ("_11_1", "_13_1")
# the types a small fake draws first, so it holds the upper-case exceptions
FAKE_TYPES = (1, 11, 13, 8, 24, 2, 3, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 18, 19, 20,
              21, 22, 23)


def disk_name(ref: int, kind: int, level: int) -> str:
    """The file name of a distorted image as the archive spells it."""
    stem = f"i{ref:02d}_{kind:02d}_{level}"
    if any(stem.endswith(s) for s in UPPER_ALL):
        return stem.upper() + ".BMP"
    if any(stem.endswith(s) for s in UPPER_STEM):
        return "I" + stem[1:] + ".bmp"
    return stem + ".bmp"


def ref_name(ref: int, last: int) -> str:
    """I01.BMP ... and the last reference in lower case (TID2013's i25.bmp)."""
    return f"i{ref:02d}.bmp" if ref == last else f"I{ref:02d}.BMP"


def synthesize(raw_dir: Path, seed: int, references: int = 3, types: int = 4,
               levels: int = 2, height: int = 32, width: int = 48) -> None:
    """A small TID2013 in the upstream layout (BMP files, the two label files, CRLF lines)."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stage = recovery.mkdtemp(raw_dir, "synth")
    kinds = sorted(FAKE_TYPES[:types])
    try:
        (stage / "reference_images").mkdir()
        (stage / "distorted_images").mkdir()
        lines, stds = [], []
        for r in range(1, references + 1):
            img = photo(rng, height, width)
            Image.fromarray(img).save(stage / "reference_images" / ref_name(r, references),
                                      format="BMP")
            for t in kinds:
                for lev in range(1, levels + 1):
                    strength = lev / levels
                    out = distort(img, t, strength * (0.6 + 0.4 * rng.random()), rng)
                    name = disk_name(r, t, lev)
                    Image.fromarray(out).save(stage / "distorted_images" / name, format="BMP")
                    score = float(np.clip(7 - 5 * strength + rng.normal(0, 0.3), 0, 9))
                    lines.append(f"{score:.5f} {name.lower()}")
                    stds.append(f"{0.1 + 0.1 * rng.random():.5f}")
        (stage / LABELS).write_text("\r\n".join(lines) + "\r\n")
        (stage / STD).write_text("\r\n".join(stds) + "\r\n")
        (stage / "mos.txt").write_text("\r\n".join(x.split()[0] for x in lines) + "\r\n")
        mos.install_staged(stage, raw_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_rows(root: Path) -> list[mos.Row]:
    """The rows of ``mos_with_names.txt`` (checked against ``mos_std.txt``), resolved on disk."""
    labels, std = root / LABELS, root / STD
    refs = mos.case_index(root / "reference_images", (".bmp",))
    dists = mos.case_index(root / "distorted_images", (".bmp",))
    rows = []
    for i, line in enumerate(labels.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{labels}:{i}"
        parts = line.split()
        m = NAME.match(parts[1]) if len(parts) == 2 else None
        if m is None:
            raise mos.MosError(f"{where}: expected '<MOS> iRR_TT_L.bmp', got {line.strip()!r}; "
                               f"the label file is damaged: fetch or synthesize it again")
        score = mos.number(parts[0], where, "MOS")
        r, t, lev = m.groups()
        dist = dists.get(parts[1].lower(), root / "distorted_images" / parts[1])
        ref = refs.get(f"i{r}.bmp", root / "reference_images" / f"I{r}.BMP")
        rows.append(mos.Row(ref, dist, score, t, int(lev), where))
    if not std.is_file():
        raise mos.MosError(f"{std} is missing; the raw tree is incomplete: fetch or "
                           f"synthesize the dataset again")
    sds = [(i, x) for i, x in enumerate(std.read_text(errors="replace").splitlines(), 1)
           if x.strip()]
    for i, x in sds:
        mos.number(x.strip(), f"{std}:{i}", "standard deviation")
    if len(sds) != len(rows):
        raise mos.MosError(f"{std} holds {len(sds)} values for the {len(rows)} images of "
                           f"{labels}; one of them is damaged: fetch or synthesize again")
    return rows


def prepare(raw_dir: Path, out_dir: Path, workers: int | None = None) -> dict[str, Any]:
    return mos.prepare(raw_dir, out_dir, "tid2013", "TID2013", LABELS, read_rows,
                       higher_is_better=True, score="MOS (0..9)",
                       checksums=raw_checksums(Path(raw_dir)), workers=workers)


load = mos.loader("tid2013")
load_manifest = mos.load_manifest
