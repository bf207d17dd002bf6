"""CSIQ (Larson and Chandler 2010): 30 reference images, 866 distorted ones (6 distortion
types, 4 or 5 levels), 512 x 512 PNG, with DMOS (0..1, higher = more distorted).

Raw layout (the publisher's three downloads, extracted side by side)::

    src_imgs/1600.png, aerial_city.png, ...                the references
    dst_imgs/<folder>/<image>.<TOKEN>.<level>.png         folder/token per type:
        awgn/AWGN, jpeg/JPEG, jpeg2000/jpeg2000, fnoise/fnoise, blur/BLUR, contrast/contrast
    csiq.DMOS.xlsx   sheet "all_by_image": header in row 4 from column D
                     (image, dst_idx, dst_type, dst_lev, dmos_std, dmos), one row per image;
                     dst_type "noise", "jpeg", "jpeg 2000", "fnoise", "blur", "contrast"

The workbook is read with the standard library (an .xlsx is a zip of XML: no spreadsheet
package needed). CSIQ's host has moved several times and serves no stable archive: there is
no download; give your copy as ``data.paths.csiq`` (docs/data.md). Prepared arrays:
:mod:`workflow.datasets.mos`; ``dist_type`` is the workbook's type name, the score its DMOS
as published (``higher_is_better`` false).
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from workflow import recovery
from workflow.datasets import mos, sources
from workflow.datasets.arrays import raw_checksums
from workflow.datasets.fakes import distort, photo

FILES = sources.CSIQ
TYPES = sources.CSIQ_TYPES
LABELS = "csiq.DMOS.xlsx"
SHEET = "all_by_image"
COLUMNS = ("image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos")
REFERENCES = ("1600", "aerial_city", "boston", "bridge", "butter_flower", "cactus",
              "child_swimming", "couple", "elk", "family", "fisher", "foxy", "geckos",
              "lady_liberty", "lake", "log_seaside", "monument", "native_american", "redwood",
              "roping", "rushmore", "shroom", "snow_leaves", "sunsetcolor", "sunset_sparrow",
              "swarm", "trolley", "turtle", "veggies", "woman")
MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
PKG = "http://schemas.openxmlformats.org/package/2006/relationships"
XLSX_LIMIT = 64 << 20  # most bytes one XML part of the workbook may expand to


def download(raw_dir: Path, fetcher: Any) -> dict[str, Any]:
    raise mos.MosError(
        "CSIQ has no download: its host has moved several times and serves no stable "
        "archive. Fetch src_imgs, dst_imgs and csiq.DMOS.xlsx from the publisher (docs/"
        "data.md) and give the folder holding them as config data.paths.csiq")


# ----------------------------------------------------------------------------- xlsx


def _col(ref: str) -> int:
    n = 0
    for ch in re.match(r"[A-Z]+", ref).group(0):
        n = n * 26 + ord(ch) - 64
    return n - 1


def _part(zf: zipfile.ZipFile, name: str, path: Path) -> ET.Element:
    info = zf.getinfo(name)
    if info.file_size > XLSX_LIMIT:
        raise mos.MosError(f"{path}: part {name} expands to {info.file_size:,} bytes; this is "
                           f"not the published workbook")
    return ET.fromstring(zf.read(name))


def read_sheet(path: Path, sheet: str) -> dict[int, dict[int, Any]]:
    """The cells of one worksheet of an .xlsx: row number -> column index -> value (str or
    float), read with zipfile and ElementTree."""
    try:
        with zipfile.ZipFile(path) as zf:
            wb = _part(zf, "xl/workbook.xml", path)
            rid = next((s.get(f"{{{REL}}}id") for s in wb.iter(f"{{{MAIN}}}sheet")
                        if s.get("name") == sheet), None)
            if rid is None:
                raise mos.MosError(f"{path}: no sheet {sheet!r}; this is not the published "
                                   f"workbook")
            rels = _part(zf, "xl/_rels/workbook.xml.rels", path)
            target = next(r.get("Target") for r in rels.iter(f"{{{PKG}}}Relationship")
                          if r.get("Id") == rid)
            target = target.lstrip("/")
            target = target if target.startswith("xl/") else "xl/" + target
            shared: list[str] = []
            if "xl/sharedStrings.xml" in zf.namelist():
                for si in _part(zf, "xl/sharedStrings.xml", path).iter(f"{{{MAIN}}}si"):
                    shared.append("".join(t.text or "" for t in si.iter(f"{{{MAIN}}}t")))
            cells: dict[int, dict[int, Any]] = {}
            for c in _part(zf, target, path).iter(f"{{{MAIN}}}c"):
                ref, kind = c.get("r", ""), c.get("t")
                v = c.find(f"{{{MAIN}}}v")
                if kind == "inlineStr":
                    value: Any = "".join(t.text or "" for t in c.iter(f"{{{MAIN}}}t"))
                elif v is None or v.text is None:
                    continue
                elif kind == "s":
                    value = shared[int(v.text)]
                elif kind in ("str", "e"):
                    value = v.text
                else:
                    value = float(v.text)
                row = int(re.search(r"\d+", ref).group(0))
                cells.setdefault(row, {})[_col(ref)] = value
            return cells
    except (zipfile.BadZipFile, KeyError, ET.ParseError, ValueError, IndexError,
            StopIteration, AttributeError) as e:
        raise mos.MosError(f"{path}: cannot read the workbook ({type(e).__name__}: {e}); it "
                           f"is damaged or not the published csiq.DMOS.xlsx") from None


def _name(value: Any) -> str:
    """The image column: a number for 1600 in the published workbook."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def write_xlsx(path: Path, sheet: str, rows: dict[int, dict[int, Any]]) -> None:
    """A minimal .xlsx (shared strings, one worksheet), as a spreadsheet program writes it."""
    strings: list[str] = []
    xml_rows = []
    for r in sorted(rows):
        cells = []
        for c in sorted(rows[r]):
            ref = f"{chr(65 + c)}{r}"
            v = rows[r][c]
            if isinstance(v, str):
                if v not in strings:
                    strings.append(v)
                cells.append(f'<c r="{ref}" t="s"><v>{strings.index(v)}</v></c>')
            else:
                cells.append(f'<c r="{ref}"><v>{v!r}</v></c>')
        xml_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    head = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    parts = {
        "[Content_Types].xml": (
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
            'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxml'
            'formats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.'
            'openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            '<Override PartName="/xl/sharedStrings.xml" ContentType="application/vnd.'
            'openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/></Types>'),
        "_rels/.rels": (
            f'<Relationships xmlns="{PKG}"><Relationship Id="rId1" Type="{REL}/'
            f'officeDocument" Target="xl/workbook.xml"/></Relationships>'),
        "xl/workbook.xml": (
            f'<workbook xmlns="{MAIN}" xmlns:r="{REL}"><sheets><sheet name="{escape(sheet)}" '
            f'sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            f'<Relationships xmlns="{PKG}"><Relationship Id="rId1" Type="{REL}/worksheet" '
            f'Target="worksheets/sheet1.xml"/><Relationship Id="rId2" Type="{REL}/'
            f'sharedStrings" Target="sharedStrings.xml"/></Relationships>'),
        "xl/worksheets/sheet1.xml": (
            f'<worksheet xmlns="{MAIN}"><sheetData>{"".join(xml_rows)}</sheetData>'
            f'</worksheet>'),
        "xl/sharedStrings.xml": (
            f'<sst xmlns="{MAIN}" count="{len(strings)}" uniqueCount="{len(strings)}">'
            + "".join(f"<si><t>{escape(s)}</t></si>" for s in strings) + "</sst>"),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in parts.items():
            zf.writestr(name, head + text)


# ----------------------------------------------------------------------------- synthesize


def synthesize(raw_dir: Path, seed: int, references: int = 3, types: int = 4,
               levels: int = 2, size: int = 32) -> None:
    """A small CSIQ in the upstream layout (PNG files, ``csiq.DMOS.xlsx``)."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stage = recovery.mkdtemp(raw_dir, "synth")
    try:
        (stage / "src_imgs").mkdir()
        sheet: dict[int, dict[int, Any]] = {1: {0: "CSIQ DMOS (synthetic twin)"},
                                            4: {3 + i: c for i, c in enumerate(COLUMNS)}}
        row = 5
        for k, dst_type in enumerate(list(TYPES)[:types]):
            folder, token = TYPES[dst_type]
            (stage / "dst_imgs" / folder).mkdir(parents=True)
            for r, image in enumerate(REFERENCES[:references]):
                if k == 0:
                    Image.fromarray(photo(np.random.default_rng([seed, r]), size, size)).save(
                        stage / "src_imgs" / f"{image}.png")
                with Image.open(stage / "src_imgs" / f"{image}.png") as im:
                    img = np.asarray(im.convert("RGB"))
                for lev in range(1, levels + 1):
                    strength = lev / levels
                    out = distort(img, k, strength * (0.6 + 0.4 * rng.random()), rng)
                    Image.fromarray(out).save(
                        stage / "dst_imgs" / folder / f"{image}.{token}.{lev}.png")
                    dmos = float(np.clip(0.8 * strength + rng.normal(0, 0.05), 0, 1))
                    sheet[row] = {3: float(image) if image.isdigit() else image,
                                  4: float(k + 1), 5: dst_type, 6: float(lev),
                                  7: round(0.05 + 0.1 * rng.random(), 6), 8: round(dmos, 6)}
                    row += 1
        write_xlsx(stage / LABELS, SHEET, sheet)
        mos.install_staged(stage, raw_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------- prepare


def read_rows(root: Path) -> list[mos.Row]:
    labels = root / LABELS
    cells = read_sheet(labels, SHEET)
    header_row = next((r for r in sorted(cells) if "image" in cells[r].values()
                       and "dmos" in cells[r].values()), None)
    if header_row is None:
        raise mos.MosError(f"{labels}: no header row with {', '.join(COLUMNS)} in sheet "
                           f"{SHEET!r}; this is not the published workbook")
    col = {v: c for c, v in cells[header_row].items() if v in COLUMNS}
    missing = [c for c in COLUMNS if c not in col]
    if missing:
        raise mos.MosError(f"{labels} (sheet {SHEET}, row {header_row}): no column "
                           f"{', '.join(missing)}")
    refs = mos.case_index(root / "src_imgs", (".png",))
    folders: dict[str, dict[str, Path]] = {}
    rows = []
    for r in sorted(cells):
        if r <= header_row or cells[r].get(col["image"]) in (None, ""):
            continue
        where = f"{labels} (sheet {SHEET}, row {r})"
        cell = cells[r]
        image, dst_type = _name(cell[col["image"]]), str(cell.get(col["dst_type"], "")).strip()
        if dst_type not in TYPES:
            raise mos.MosError(f"{where}: dst_type {dst_type!r} is none of "
                               f"{', '.join(TYPES)}; the workbook is damaged")
        level = mos.number(cell.get(col["dst_lev"]), where, "dst_lev")
        score = mos.number(cell.get(col["dmos"]), where, "dmos")
        if not level.is_integer():
            raise mos.MosError(f"{where}: dst_lev {level!r} is not a whole level")
        folder, token = TYPES[dst_type]
        if folder not in folders:
            folders[folder] = mos.case_index(root / "dst_imgs" / folder, (".png",))
        name = f"{image}.{token}.{int(level)}.png"
        dist = folders[folder].get(name.lower(), root / "dst_imgs" / folder / name)
        ref = refs.get(f"{image}.png".lower(), root / "src_imgs" / f"{image}.png")
        rows.append(mos.Row(ref, dist, score, dst_type, int(level), where))
    return rows


def prepare(raw_dir: Path, out_dir: Path, workers: int | None = None) -> dict[str, Any]:
    return mos.prepare(raw_dir, out_dir, "csiq", "CSIQ", LABELS, read_rows,
                       higher_is_better=False, score="DMOS (0..1, higher = more distorted)",
                       checksums=raw_checksums(Path(raw_dir)), workers=workers)


load = mos.loader("csiq")
load_manifest = mos.load_manifest
