"""TID2013, KADID-10k, CSIQ and NIGHTS: each prepare on its synthetic twin (checked against
an independent reader: PIL on the raw files, the label files parsed here), on damaged copies
(a missing image and a bad label line are named), the RAR path of TID2013, and data.paths."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workflow.datasets import registry, user_folders
from workflow.datasets.archives import ArchiveFormatError, UnsafeArchiveError, extract_archive
from workflow.datasets.mos import MosError
from workflow.plan import Plan, load_config

sys.path.insert(0, str(Path(__file__).parent))
from rar4 import write_stored_rar  # noqa: E402

SIZES = {
    "tid2013": {"references": 2, "types": 3, "levels": 2, "height": 24, "width": 32},
    "kadid10k": {"references": 2, "types": 3, "levels": 2, "height": 24, "width": 32},
    "csiq": {"references": 2, "types": 3, "levels": 2, "size": 24},
    "nights": {"train": 3, "val": 2, "test": 6, "side": 24},
}
MOS_SETS = ("tid2013", "kadid10k", "csiq")


def twin(tmp_path: Path, name: str) -> Path:
    raw = tmp_path / "raw" / name
    registry.synthesize(name, raw, 3, {"synthetic": SIZES[name]})
    return raw


def pil(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(im)


def lower_index(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in folder.iterdir()}


def sheet_rows(xlsx: Path) -> list[list[str]]:
    """The cells of the workbook's one sheet, in row order, read with regular expressions
    (independently of csiq.read_sheet)."""
    with zipfile.ZipFile(xlsx) as zf:
        strings = re.findall(r"<t>(.*?)</t>", zf.read("xl/sharedStrings.xml").decode())
        sheet = zf.read("xl/worksheets/sheet1.xml").decode()
    rows = []
    for row in re.findall(r"<row [^>]*>(.*?)</row>", sheet):
        cells = []
        for kind, value in re.findall(r'<c r="[A-Z]+\d+"( t="s")?><v>(.*?)</v></c>', row):
            cells.append(strings[int(value)] if kind else value)
        rows.append(cells)
    return rows


def expected_mos(raw: Path, name: str) -> list[tuple[Path, Path, float, str, int]]:
    """(reference file, distorted file, score, type, level) per label row, parsed here."""
    out = []
    if name == "tid2013":
        refs, dists = lower_index(raw / "reference_images"), lower_index(raw / "distorted_images")
        for line in (raw / "mos_with_names.txt").read_text().splitlines():
            score, fname = line.split()
            out.append((refs[fname[:3].lower() + ".bmp"], dists[fname.lower()], float(score),
                        fname[4:6], int(fname[7])))
    elif name == "kadid10k":
        root = raw / "kadid10k"
        with open(root / "dmos.csv", newline="") as f:
            for r in csv.DictReader(f):
                out.append((root / "images" / r["ref_img"], root / "images" / r["dist_img"],
                            float(r["dmos"]), r["dist_img"][4:6], int(r["dist_img"][7:9])))
    else:
        folder = {"noise": ("awgn", "AWGN"), "jpeg": ("jpeg", "JPEG"),
                  "jpeg 2000": ("jpeg2000", "jpeg2000"), "fnoise": ("fnoise", "fnoise")}
        rows = sheet_rows(raw / "csiq.DMOS.xlsx")
        assert rows[1] == ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"]
        for image, _, kind, lev, _, dmos in rows[2:]:
            image = image.removesuffix(".0")
            d, token = folder[kind]
            lev = int(float(lev))
            out.append((raw / "src_imgs" / f"{image}.png",
                        raw / "dst_imgs" / d / f"{image}.{token}.{lev}.png", float(dmos), kind,
                        lev))
    return out


@pytest.mark.parametrize("name", MOS_SETS)
def test_mos_twin_prepares_like_an_independent_reader(tmp_path, name):
    raw = twin(tmp_path, name)
    out = tmp_path / "prepared"
    registry.prepare(name, raw, out)
    got = registry.module(name).load(out)
    manifest = json.loads((out / "manifest.json").read_text())
    want = expected_mos(raw, name)
    s = SIZES[name]
    n = s["references"] * s["types"] * s["levels"]
    assert len(want) == n and got["dist"].shape[0] == n and got["ref"].shape[0] == 2
    hw = (s.get("height", s.get("size")), s.get("width", s.get("size")))
    assert manifest["dataset"] == name and manifest["size"] == list(hw)
    assert manifest["higher_is_better"] is (name != "csiq")
    for i, (ref, dist, score, kind, level) in enumerate(want):
        np.testing.assert_array_equal(got["dist"][i], pil(dist), err_msg=str(dist))
        np.testing.assert_array_equal(got["ref"][got["ref_index"][i]], pil(ref))
        assert got["mos"][i] == score and got["dist_type"][i] == kind
        assert got["level"][i] == level and got["names"][i] == dist.name
    assert got["mos"].dtype == np.float64 and got["ref_index"].dtype == np.int64
    assert got["dist_type"].dtype.kind == "U" and got["level"].dtype == np.int64
    # the fake scores fall with the level as real MOS do (rise for CSIQ's DMOS)
    sign = 1 if manifest["higher_is_better"] else -1
    lev = got["level"]
    assert sign * (got["mos"][lev == 1].mean() - got["mos"][lev == 2].mean()) > 0


def test_tid2013_twin_has_the_upstream_case_mix(tmp_path):
    raw = twin(tmp_path, "tid2013")
    refs = sorted(p.name for p in (raw / "reference_images").iterdir())
    assert refs == ["I01.BMP", "i02.bmp"]  # the last in lower case, as TID2013's i25.bmp
    dists = {p.name for p in (raw / "distorted_images").iterdir()}
    assert {"I01_01_1.bmp", "I01_11_1.BMP", "i01_01_2.bmp", "i01_11_2.bmp"} <= dists
    assert "i01_11_1.bmp" in (raw / "mos_with_names.txt").read_text()  # lower in the labels
    with Image.open(raw / "distorted_images" / "I01_11_1.BMP") as im:
        assert im.format == "BMP"


def _damage_label(raw: Path, name: str) -> tuple[str, str]:
    """Break the second label row; (what the error must name, the file)."""
    if name == "tid2013":
        p = raw / "mos_with_names.txt"
        lines = p.read_text().splitlines()
        lines[1] = "five " + lines[1].split()[1]
        p.write_text("\n".join(lines) + "\n")
        return f"{p}:2", "five"
    if name == "kadid10k":
        p = raw / "kadid10k" / "dmos.csv"
        lines = p.read_text().splitlines()
        f = lines[2].split(",")
        lines[2] = ",".join([f[0], f[1], "nan", f[3]])
        p.write_text("\n".join(lines) + "\n")
        return f"{p}:3", "nan"
    from workflow.datasets.csiq import read_sheet, write_xlsx

    p = raw / "csiq.DMOS.xlsx"
    cells = read_sheet(p, "all_by_image")
    cells[6][8] = "n/a"
    write_xlsx(p, "all_by_image", cells)
    return f"{p} (sheet all_by_image, row 6)", "n/a"


@pytest.mark.parametrize("name", MOS_SETS)
def test_mos_damaged_copies_name_the_file_and_line(tmp_path, name):
    raw = twin(tmp_path, name)
    out = tmp_path / "prepared"
    victim = expected_mos(raw, name)[3][1]
    victim.unlink()
    with pytest.raises(MosError, match=re.escape(str(victim)) + " is missing"):
        registry.prepare(name, raw, out)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.npy"))
    raw = twin(tmp_path / "again", name)
    where, bad = _damage_label(raw, name)
    with pytest.raises(MosError) as e:
        registry.prepare(name, raw, out)
    assert where in str(e.value) and repr(bad) in str(e.value)
    assert not (out / "manifest.json").exists()


def test_tid2013_std_file_must_match(tmp_path):
    raw = twin(tmp_path, "tid2013")
    p = raw / "mos_std.txt"
    p.write_text("\n".join(p.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(MosError, match=r"mos_std.txt holds 11 values for the 12 images"):
        registry.prepare("tid2013", raw, tmp_path / "prepared")


def test_an_odd_sized_image_is_resized_and_counted(tmp_path):
    raw = twin(tmp_path, "kadid10k")
    odd = raw / "kadid10k" / "images" / "I02_03_02.png"
    Image.fromarray(pil(odd)).resize((40, 30)).save(odd)
    m = registry.prepare("kadid10k", raw, tmp_path / "prepared")
    assert m["resized"] == ["I02_03_02.png"] and m["size"] == [24, 32]
    got = registry.module("kadid10k").load(tmp_path / "prepared")
    i = list(got["names"]).index("I02_03_02.png")
    np.testing.assert_array_equal(got["dist"][i], pil(odd, (24, 32)))


def test_nights_twin_prepares_like_an_independent_reader(tmp_path):
    raw = twin(tmp_path, "nights")
    out = tmp_path / "prepared"
    registry.prepare("nights", raw, out, {"size": 20, "min_votes": 6})
    root = raw / "nights"
    with open(root / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path",
                             "right_path", "prompt", "split", "is_imagenet"]
    nights = registry.module("nights")
    for split in ("train", "val", "test"):
        kept = [r for r in rows if r["split"] == split and int(r["votes"]) >= 6]
        got = nights.load(out, split)
        assert len(got["judge"]) == len(kept) > 0
        for i, r in enumerate(kept):
            for part, col in (("ref", "ref_path"), ("p0", "left_path"), ("p1", "right_path")):
                np.testing.assert_array_equal(got[part][i], pil(root / r[col], (20, 20)))
            right, left = float(r["right_vote"]), float(r["left_vote"])
            assert got["judge"][i] == right / (left + right)
            assert got["subset"][i] == ("imagenet" if r["is_imagenet"] == "True"
                                        else "no_imagenet")
            assert got["ids"][i] == r["id"]
    # every 5th fake row has 5 votes: the DreamSim filter drops it
    m = json.loads((out / "manifest.json").read_text())
    assert sum(m["counts"].values()) == sum(int(r["votes"]) >= 6 for r in rows) < len(rows)
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        nights.load(out, "test_imagenet")


def test_nights_damaged_copies_name_the_file_and_line(tmp_path):
    raw = twin(tmp_path, "nights")
    out = tmp_path / "prepared"
    victim = raw / "nights" / "distort" / "000" / "001_1.png"
    victim.unlink()
    with pytest.raises(MosError, match=re.escape(str(victim)) + r" is missing \(.*data.csv:3"):
        registry.prepare("nights", raw, out)
    raw = twin(tmp_path / "again", "nights")
    p = raw / "nights" / "data.csv"
    lines = p.read_text().splitlines()
    f = lines[4].split(",")
    f[2] = "yes"
    lines[4] = ",".join(f)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(MosError, match=re.escape(f"{p}:5: right_vote 'yes'")):
        registry.prepare("nights", raw, out)
    assert not (out / "manifest.json").exists()


# ----------------------------------------------------------------------------- RAR


def _rar_of(tree: Path, rar: Path) -> Path:
    members = {p.relative_to(tree).as_posix(): p.read_bytes()
               for p in sorted(tree.rglob("*")) if p.is_file() and p.name != "READY"}
    return write_stored_rar(rar, members)


def test_tid2013_from_a_stored_rar(tmp_path):
    src = twin(tmp_path, "tid2013")
    rar = _rar_of(src, tmp_path / "tid2013.rar")
    raw = tmp_path / "fetched"
    files = extract_archive(rar, raw)
    assert "distorted_images/I01_11_1.BMP" in files and "mos_with_names.txt" in files
    (raw / "READY").write_text("{}")
    registry.prepare("tid2013", raw, tmp_path / "a")
    registry.prepare("tid2013", src, tmp_path / "b")
    a, b = (registry.module("tid2013").load(tmp_path / x) for x in "ab")
    for k in ("dist", "ref", "mos", "ref_index"):
        np.testing.assert_array_equal(a[k], b[k])


def test_rar_refusals_write_nothing(tmp_path, monkeypatch):
    import rarfile

    bad = write_stored_rar(tmp_path / "escape.rar", {"ok.txt": b"x", "../evil.txt": b"x"})
    with pytest.raises(UnsafeArchiveError, match="outside the target folder"):
        extract_archive(bad, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "out").iterdir())
    # a compressed member with no extractor: the message names what to install
    packed = write_stored_rar(tmp_path / "packed.rar", {"a.txt": b"hello"})
    blob = bytearray(packed.read_bytes())
    head = blob.index(b"a.txt") - 32 + 2  # the file header, past its CRC
    blob[head + 23] = 0x33  # METHOD: "normal" compression
    import struct
    import zlib

    size = struct.unpack_from("<H", blob, head + 3)[0]
    struct.pack_into("<H", blob, head - 2, zlib.crc32(bytes(blob[head:head - 2 + size]))
                     & 0xFFFF)
    packed.write_bytes(bytes(blob))

    def no_tool(*a, **k):
        raise rarfile.RarCannotExec("none")

    monkeypatch.setattr(rarfile, "tool_setup", no_tool)
    with pytest.raises(ArchiveFormatError, match="install one of unrar, unar, bsdtar"):
        extract_archive(packed, tmp_path / "out2")
    assert not (tmp_path / "out2" / "a.txt").exists()


def test_rar_limits_are_the_shared_ones(tmp_path):
    from workflow.datasets.archives import ArchiveLimitError, ArchiveLimits

    rar = write_stored_rar(tmp_path / "many.rar", {f"f{i}.txt": b"x" for i in range(3)})
    with pytest.raises(ArchiveLimitError, match=r"more than 2 members.*data.tid2013"):
        extract_archive(rar, tmp_path / "out",
                        limits=ArchiveLimits(max_members=2, key="data.tid2013.archive_limits"))
    assert not (tmp_path / "out" / "f0.txt").exists()


# ----------------------------------------------------------------------------- folders


@pytest.mark.parametrize("name", [*MOS_SETS, "nights"])
def test_a_user_folder_prepares_like_the_twin(tmp_path, name):
    user = twin(tmp_path / "mine", name)
    (user / "READY").unlink()
    raw = tmp_path / "res" / "raw" / name
    registry.download(name, raw, {"folder": str(user)})
    opts = {"size": 20} if name == "nights" else None
    registry.prepare(name, raw, tmp_path / "a", opts)
    registry.module(name).prepare(user, tmp_path / "b", **(opts or {}))
    for p in sorted((tmp_path / "b").glob("*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "a" / p.name), np.load(p))
    label = {"tid2013": "mos_with_names.txt", "kadid10k": "kadid10k/dmos.csv",
             "csiq": "csiq.DMOS.xlsx", "nights": "nights/data.csv"}[name]
    shutil.move(user / label, tmp_path / "moved")
    with pytest.raises(user_folders.UserFolderError, match=f"data.paths.{name}.*no "
                       + re.escape(Path(label).name)):
        user_folders.layout(name, user)


def test_plan_lists_the_urls_and_csiq_needs_a_folder(tmp_path):
    assert registry.urls("tid2013") == ["http://www.ponomarenko.info/tid2013/tid2013.rar"]
    assert registry.urls("kadid10k") == [
        "https://datasets.vqa.mmsp-kn.de/archives/kadid10k.zip"]
    assert registry.urls("nights") == ["https://data.csail.mit.edu/nights/nights.zip"]
    config = Path(__file__).resolve().parent.parent / "config.yaml"
    plan = Plan(load_config(config, overrides={"resources_dir": str(tmp_path)}))
    assert not plan.obtainable("csiq") and plan.obtainable("tid2013")
    plan = Plan(load_config(config, overrides={
        "resources_dir": str(tmp_path), "data": {"paths": {"csiq": str(tmp_path)}}}))
    assert plan.obtainable("csiq")
    with pytest.raises(MosError, match="config data.paths.csiq"):
        registry.download("csiq", tmp_path / "raw")
