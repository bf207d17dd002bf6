"""The BAPPS dataset (workflow/datasets/bapps.py): synthesize -> prepare -> load, pairing by
stem, and the failure modes of a damaged raw tree."""

from __future__ import annotations

import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workflow.cli import main
from workflow.datasets import bapps
from workflow.files import DiskFullError
from workflow.metrics.similarity import score_2afc


@pytest.fixture(scope="module")
def bapps_dirs(prepared) -> tuple[Path, Path]:
    out = prepared("bapps")
    return out.parent / "raw", out  # the conftest fixture keeps raw/ next to prepared/


@pytest.fixture(scope="module")
def raw(bapps_dirs) -> Path:
    return bapps_dirs[0]


@pytest.fixture(scope="module")
def bapps_prepared(bapps_dirs) -> Path:
    return bapps_dirs[1]


def _expected_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))


def test_synthesize_writes_the_upstream_layout(raw):
    assert (raw / "READY").exists()
    root = raw / "dataset"
    for split, subsets in bapps.TWOAFC_SUBSETS.items():
        for s in subsets:
            for part in ("ref", "p0", "p1"):
                pngs = sorted((root / "2afc" / split / s / part).glob("*.png"))
                assert pngs and Image.open(pngs[0]).size[0] > 64  # prepare must resize
            j = np.load(next((root / "2afc" / split / s / "judge").glob("*.npy")))
            assert j.shape == (1,) and 0 <= j[0] <= 1
    for s in bapps.JND_SUBSETS:
        assert sorted((root / "jnd" / "val" / s / "same").glob("*.npy"))


def test_round_trip(raw, bapps_prepared):
    prepared = bapps_prepared
    import json

    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["counts"]["2afc/val/traditional"] == 12
    assert manifest["counts"]["jnd/val/cnn"] == 12
    d = bapps.load(prepared, "2afc", "val", "cnn")
    assert d["ref"].shape == (12, 64, 64, 3) and d["ref"].dtype == np.uint8
    assert d["judge"].dtype == np.float32 and d["judge"].shape == (12,)
    src = raw / "dataset" / "2afc" / "val" / "cnn"
    for i in (0, 7):
        name = str(d["names"][i])
        np.testing.assert_array_equal(d["p1"][i], _expected_image(src / "p1" / f"{name}.png"))
        assert d["judge"][i] == pytest.approx(float(np.load(src / "judge" / f"{name}.npy")[0]))
    j = bapps.load(prepared, "jnd", "val", "traditional")
    assert set(j) == {"p0", "p1", "same", "names"}
    with pytest.raises(bapps.BappsError, match="not prepared"):
        bapps.load(prepared, "2afc", "val", "nonexistent")


def test_fake_judgements_are_meaningful(bapps_prepared):
    prepared = bapps_prepared
    # pixel L2 (independent of any network) agrees with the simulated humans above chance
    scores = []
    for s in bapps.TWOAFC_SUBSETS["val"]:
        d = bapps.load(prepared, "2afc", "val", s)
        ref, p0, p1 = (np.asarray(d[k], np.float64) for k in ("ref", "p0", "p1"))
        d0 = ((ref - p0) ** 2).mean(axis=(1, 2, 3))
        d1 = ((ref - p1) ** 2).mean(axis=(1, 2, 3))
        scores.append(score_2afc(d0, d1, d["judge"]).mean)
    assert np.mean(scores) > 0.6


def test_pairs_by_stem_not_listing_order(raw, tmp_path, monkeypatch):
    tree = tmp_path / "raw"
    shutil.copytree(raw / "dataset" / "2afc" / "val" / "color", tree / "2afc" / "val" / "color")
    real_iterdir = Path.iterdir

    def shuffled(self):
        items = list(real_iterdir(self))
        random.Random(str(self)).shuffle(items)  # a different order in every folder
        return iter(items)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    out = tmp_path / "out"
    bapps.prepare(tree, out, workers=2)
    d = bapps.load(out, "2afc", "val", "color")
    assert list(d["names"]) == sorted(d["names"])
    for i, name in enumerate(d["names"]):
        for part in ("ref", "p0"):
            want = _expected_image(tree / "2afc" / "val" / "color" / part / f"{name}.png")
            np.testing.assert_array_equal(d[part][i], want)


def _small_tree(raw: Path, dst: Path) -> Path:
    sub = Path("dataset") / "2afc" / "val" / "deblur"
    shutil.copytree(raw / sub, dst / sub)
    return dst


def test_judgements_are_parsed_on_one_thread(raw, tmp_path, monkeypatch):
    """np.load parses .npy headers with ast, which CPython 3.11.7 cannot do on two threads
    at once (gh-106905: "AST constructor recursion depth mismatch"); the pool only reads."""
    tree = _small_tree(raw, tmp_path / "raw")
    threads, real = set(), bapps._read_label

    def spy(*a, **k):
        threads.add(threading.get_ident())
        return real(*a, **k)

    monkeypatch.setattr(bapps, "_read_label", spy)
    out = tmp_path / "out"
    bapps.prepare(tree, out, workers=4)
    assert threads == {threading.get_ident()}
    want = [float(np.load(f)[0]) for f in
            sorted((tree / "dataset" / "2afc" / "val" / "deblur" / "judge").glob("*.npy"))]
    np.testing.assert_array_equal(bapps.load(out, "2afc", "val", "deblur")["judge"],
                                  np.array(want, np.float32))


def test_missing_partner_names_the_file(raw, tmp_path):
    tree = _small_tree(raw, tmp_path / "raw")
    victim = tree / "dataset" / "2afc" / "val" / "deblur" / "p1" / "000003.png"
    victim.unlink()
    out = tmp_path / "out"
    with pytest.raises(bapps.BappsError, match=r"000003\.png has no partner in .*p1"):
        bapps.prepare(tree, out)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.npy"))


def test_corrupt_png_names_the_file(raw, tmp_path):
    tree = _small_tree(raw, tmp_path / "raw")
    victim = tree / "dataset" / "2afc" / "val" / "deblur" / "p0" / "000005.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "out"
    (tree / "READY").write_text("{}")
    assert main(["data", "prepare", "bapps", "--raw", str(tree), "--out", str(out)]) == 1
    with pytest.raises(bapps.BappsError, match=str(victim)):
        bapps.prepare(tree, out)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.npy"))


def test_no_2afc_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(bapps.BappsError, match="no 2afc/ folder"):
        bapps.prepare(tmp_path / "empty", tmp_path / "out")


def test_load_checks_shapes_and_dtypes(bapps_prepared, tmp_path):
    """A stale or damaged prepared array fails in load(), naming the file and the rule."""
    bad = tmp_path / "bad"
    shutil.copytree(bapps_prepared, bad)
    judge = bad / "2afc_val_cnn_judge.npy"
    np.save(judge, np.zeros(3, np.float64))
    with pytest.raises(bapps.CorruptFileError, match=r"2afc_val_cnn_judge\.npy.*prepare_dataset"):
        bapps.load(bad, "2afc", "val", "cnn")


@pytest.mark.parametrize("kind,value", [("judge", np.nan), ("judge", 7.0), ("judge", -0.25),
                                        ("same", np.inf)])
def test_out_of_range_or_nan_judgement_fails_prepare_naming_the_file(raw, tmp_path, kind,
                                                                      value):
    if kind == "judge":
        tree = _small_tree(raw, tmp_path / "raw")
        victim = tree / "dataset" / "2afc" / "val" / "deblur" / "judge" / "000004.npy"
    else:
        sub = Path("dataset") / "jnd" / "val" / "cnn"
        shutil.copytree(raw / sub, tmp_path / "raw" / sub)
        (tmp_path / "raw" / "dataset" / "2afc").mkdir()  # find_roots needs one
        tree = tmp_path / "raw"
        victim = tree / sub / "same" / "000002.npy"
    np.save(victim, np.array([value], np.float32))
    out = tmp_path / "out"
    with pytest.raises(bapps.BappsError, match=r"not a fraction in \[0, 1\]") as e:
        bapps.prepare(tree, out, workers=2)
    assert str(e.value).startswith(f"{victim}: judgement {float(np.float32(value))!r}")
    assert not (out / "manifest.json").exists() and not list(out.glob("*.npy"))
    assert not [p for p in out.iterdir() if p.name.startswith(".prepare~")]


def test_prepare_checks_free_space_before_writing(raw, tmp_path, monkeypatch):
    from collections import namedtuple

    tree = _small_tree(raw, tmp_path / "raw")
    n = len(list((tree / "dataset/2afc/val/deblur/ref").glob("*.png")))
    need = 3 * n * 64 * 64 * 3 + n * 64  # 3 patches + judgement and name per triplet
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "out"
    with pytest.raises(DiskFullError) as e:
        bapps.prepare(tree, out, workers=2)
    assert str(e.value).startswith(f"disk full at {out}: the prepared BAPPS arrays")
    assert f"{need:,} bytes" in str(e.value) and "5,000 bytes" in str(e.value)
    assert list(out.iterdir()) == []
