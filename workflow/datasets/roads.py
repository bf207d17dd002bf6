"""Massachusetts Roads (Mnih 2013): 1,108 train / 14 valid / 49 test tiles of 1500x1500.

There is no archive and no published checksum: the download reads the six index pages
``https://www.cs.toronto.edu/~vmnih/data/mass_roads/{train,valid,test}/{sat,map}/``,
fetches every tile they link and records the sha256 of each in ``checksums.json`` (later
runs verify against it).

Raw layout (what the download leaves and ``synthesize`` writes), ``{RES}/raw/roads/``:
``{split}/sat/index.html`` + ``{split}/sat/<tile>.tiff`` (RGB aerial image) and
``{split}/map/index.html`` + ``{split}/map/<tile>.tif`` (road mask, 0 / 255), paired by
file stem.

Prepared (``{RES}/prepared/roads/``): ``{split}_sat.npy`` uint8 [N, H, W, 3],
``{split}_map.npy`` uint8 [N, H, W] in {0, 1}, ``{split}_names.npy`` (tile stems).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np

from workflow.datasets import RemoteFile, sources
from workflow.datasets.arrays import (
    CorruptFileError,
    array_entry,
    decode_image,
    decode_into_npy,
    expect,
    load_arrays,
    parallel_map,
    raw_checksums,
    write_manifest,
)
from workflow.files import atomic_path, save_npy, write_text

SPLITS = sources.ROADS_SPLITS
KINDS = sources.ROADS_KINDS
FILES = sources.ROADS
_TILE = re.compile(r"^[^/?#]+\.tiff?$", re.I)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def tile_links(html: str, suffix: str) -> list[str]:
    """The tile file names an index page links (relative hrefs ending in ``suffix``)."""
    p = _Links()
    p.feed(html)
    names = {h for h in p.hrefs if _TILE.match(h) and h.lower().endswith(suffix)}
    return sorted(names)


def download(raw_dir: Path, fetcher: Any, workers: int = 4) -> dict[str, Any]:
    """Index pages, then every tile they list (4 at a time), each sha256-recorded."""
    from tqdm import tqdm

    todo: list[RemoteFile] = []
    for page in FILES:
        path = fetcher.fetch(page, progress=False)
        split, kind = page.name.split("/")[:2]
        names = tile_links(path.read_text(errors="replace"), KINDS[kind])
        if not names:
            raise CorruptFileError(f"{page.url} ({path}) links no *{KINDS[kind]} tiles; the "
                                   f"index page format changed or the server sent an error page")
        todo += [RemoteFile(urljoin(page.url, n), filename=f"{split}/{kind}/{n}") for n in names]
    bar = tqdm(total=len(todo), desc="roads tiles", unit="tile", mininterval=2.0)

    def one(rf: RemoteFile) -> None:
        fetcher.fetch(rf, progress=False)
        bar.update()

    try:
        parallel_map(one, todo, workers)
    finally:
        bar.close()
    return {"files": {rf.name: fetcher.book.get(Path(raw_dir) / rf.name) for rf in todo},
            "tiles": len(todo)}


def _index_html(title: str, names: list[str]) -> str:
    rows = "\n".join(f'<tr><td><a href="{n}">{n}</a></td></tr>' for n in names)
    return (f"<html><head><title>Index of {title}</title></head><body><h1>Index of {title}"
            f'</h1><table><tr><td><a href="../">Parent Directory</a></td></tr>\n{rows}\n'
            f"</table></body></html>\n")


def synthesize(raw_dir: Path, seed: int, train: int, valid: int, test: int, size: int) -> None:
    """Aerial-like RGB tiles with straight roads and their 0/255 masks, plus index pages."""
    from PIL import Image, ImageDraw

    raw_dir = Path(raw_dir)
    rng = np.random.default_rng(seed)
    tile_id = 10000000
    for split, n in (("train", train), ("valid", valid), ("test", test)):
        names = []
        for _ in range(n):
            tile_id += int(rng.integers(1, 9999))
            stem = f"{tile_id}_15"
            names.append(stem)
            mask = Image.new("L", (size, size), 0)
            d = ImageDraw.Draw(mask)
            for _ in range(int(rng.integers(2, 5))):
                pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
                d.line(pts, fill=255, width=int(rng.integers(4, 9)))
            m = np.asarray(mask)
            ground = rng.normal([90, 110, 70], 18, (size, size, 3))
            sat = np.where(m[..., None] > 0, rng.normal(150, 10, (size, size, 3)), ground)
            sat = np.clip(sat, 0, 255).astype(np.uint8)
            for kind, arr in (("sat", sat), ("map", m)):
                folder = raw_dir / split / kind
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(folder / f"{stem}{KINDS[kind]}") as tmp:
                    Image.fromarray(arr).save(tmp, format="TIFF")
        for kind, suffix in KINDS.items():
            write_text(_index_html(f"/~vmnih/data/mass_roads/{split}/{kind}",
                                   [f"{s}{suffix}" for s in names]),
                       raw_dir / split / kind / "index.html")


def _pairs(raw_dir: Path, split: str) -> list[str]:
    stems = {k: {p.name[: -len(s)] for p in (raw_dir / split / k).glob(f"*{s}")}
             for k, s in KINDS.items()}
    if stems["sat"] != stems["map"]:
        odd = sorted(stems["sat"] ^ stems["map"])[:5]
        raise CorruptFileError(f"{raw_dir / split}: satellite and map tiles do not pair up "
                               f"(e.g. {odd}); download roads again")
    if not stems["sat"]:
        raise CorruptFileError(f"{raw_dir / split}/sat has no *.tiff tiles; download roads again")
    for kind, suffix in KINDS.items():  # the index page says which tiles the split has
        index = raw_dir / split / kind / "index.html"
        if index.exists():
            listed = {n[: -len(suffix)] for n in tile_links(index.read_text(errors="replace"),
                                                            suffix)}
            if listed != stems[kind]:
                odd = sorted(listed ^ stems[kind])[:5]
                raise CorruptFileError(
                    f"{index} lists {len(listed)} tiles but {len(stems[kind])} are in "
                    f"{index.parent} (e.g. {odd} differ); the download is incomplete: "
                    f"download roads again")
    return sorted(stems["sat"])


def prepare(raw_dir: Path, out_dir: Path, workers: int | None = None) -> dict[str, Any]:
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, arrays = {}, {}
    for split in SPLITS:
        stems = _pairs(raw_dir, split)
        sat_paths = [raw_dir / split / "sat" / f"{s}.tiff" for s in stems]
        map_paths = [raw_dir / split / "map" / f"{s}.tif" for s in stems]
        shape = decode_image(sat_paths[0]).shape
        p = out_dir / f"{split}_sat.npy"
        decode_into_npy(p, sat_paths, decode_image, shape, workers, desc=f"{split} sat")
        arrays[p.name] = array_entry(p)

        def dec_map(path: Path) -> np.ndarray:
            return (decode_image(path, mode="L") > 127).astype(np.uint8)

        p = out_dir / f"{split}_map.npy"
        decode_into_npy(p, map_paths, dec_map, shape[:2], workers, desc=f"{split} map")
        arrays[p.name] = array_entry(p)
        p = save_npy(out_dir / f"{split}_names.npy", np.array(stems))
        arrays[p.name] = array_entry(p)
        counts[split] = len(stems)
    road_fraction = {s: float(np.load(out_dir / f"{s}_map.npy", mmap_mode="r").mean())
                     for s in SPLITS}
    return write_manifest(out_dir, {
        "dataset": "roads", "counts": counts, "arrays": arrays,
        "road_fraction": road_fraction, "checksums": raw_checksums(raw_dir),
    })


def load(prepared_dir: Path, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """Memory-mapped ``sat`` uint8 [N, H, W, 3], ``map`` uint8 [N, H, W] in {0, 1} and
    ``names`` of a prepared split (its first ``limit`` tiles when given)."""
    arrays = load_arrays(prepared_dir, {"sat": f"{split}_sat.npy", "map": f"{split}_map.npy",
                                        "names": f"{split}_names.npy"})
    d = Path(prepared_dir)
    sat = expect(arrays["sat"], d / f"{split}_sat.npy", np.uint8, (None, None, None, 3), "tiles")
    expect(arrays["map"], d / f"{split}_map.npy", np.uint8, sat.shape[:3], "road maps")
    if len(sat) == 0:
        raise CorruptFileError(f"{d}: the {split} split has no tiles; rerun the roads prepare")
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
    return arrays
