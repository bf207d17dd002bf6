"""Synthesize -> prepare for every dataset of this module set, checked against independent
readers (torchvision's SVHN / STL10 classes, PIL, torchvision transforms), plus the COCO
partial-zip fetch (bytes served counted) and corrupt-input failures."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from http_server import LoopbackServer
from PIL import Image

from workflow.datasets import coco, registry, roads, sr_test, stl10, svhn
from workflow.datasets.arrays import CorruptFileError
from workflow.datasets.fetch import Fetcher

DRAW = ("n_train", "n_val")  # COCO's draw sizes are dataset options, not fake sizes


def synthesize_dataset(name, raw, seed, **sizes):
    options = {"synthetic": {k: v for k, v in sizes.items() if k not in DRAW},
               **{k: v for k, v in sizes.items() if k in DRAW}}
    return registry.synthesize(name, raw, seed, options)


def prepare_dataset(name, raw, out, workers=None, **options):
    return registry.prepare(name, raw, out, options, {"threads": workers} if workers else None)


def test_svhn_matches_torchvision_reader(tmp_path, monkeypatch):
    import torchvision

    raw, out = tmp_path / "raw", tmp_path / "out"
    synthesize_dataset("svhn", raw, seed=3, train=20, test=12, extra=8)
    manifest = prepare_dataset("svhn", raw, out)
    assert manifest["counts"] == {"train": 20, "test": 12, "extra": 8}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    for split in ("train", "test", "extra"):
        ref = torchvision.datasets.SVHN(str(raw), split=split)
        got = svhn.load(out, split)
        np.testing.assert_array_equal(got["images"], ref.data.transpose(0, 2, 3, 1))  # NCHW
        np.testing.assert_array_equal(got["labels"], ref.labels)
        assert got["images"].dtype == np.uint8 and got["labels"].dtype == np.int64
        assert set(np.unique(got["labels"])) <= set(range(10))


def test_stl10_matches_torchvision_reader(tmp_path, monkeypatch):
    import torchvision

    raw, out = tmp_path / "raw", tmp_path / "out"
    synthesize_dataset("stl10", raw, seed=1, train=6, test=5, unlabeled=4)
    assert (raw / "stl10_binary.tar.gz").exists()  # what the download leaves, archive included
    prepare_dataset("stl10", raw, out)
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    for split in ("train", "test", "unlabeled"):
        ref = torchvision.datasets.STL10(str(raw), split=split)
        got = stl10.load(out, split)
        np.testing.assert_array_equal(got["images"], ref.data.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(got["labels"], ref.labels.astype(np.int64))
    assert (stl10.load(out, "unlabeled")["labels"] == -1).all()


def test_sr_test_full_size_images_and_bsds_test_split(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    synthesize_dataset("sr_test", raw, seed=0, set5=5, set14=3, bsd100=3)
    m = prepare_dataset("sr_test", raw, out)
    assert m["counts"] == {"set5": 5, "set14": 3, "bsd100": 3}
    s5 = sr_test.load(out, "set5")
    assert sorted(s5) == [f"img_00{i}" for i in range(1, 6)]
    ref = np.asarray(Image.open(raw / "Set5" / "img_003_SRF_2_HR.png").convert("RGB"))
    np.testing.assert_array_equal(s5["img_003"], ref)
    ids = (raw / "BSDS300" / "iids_test.txt").read_text().split()
    bsd = sr_test.load(out, "bsd100")
    assert sorted(bsd) == sorted(ids)
    for i in ids:
        np.testing.assert_array_equal(
            bsd[i], np.asarray(Image.open(raw / "BSDS300/images/test" / f"{i}.jpg").convert("RGB")))
    # train images of BSDS300 are not part of BSD100
    train_ids = (raw / "BSDS300" / "iids_train.txt").read_text().split()
    assert not set(train_ids) & set(bsd)


def test_roads_maps_are_binary_and_paired(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    synthesize_dataset("roads", raw, seed=2, train=2, valid=1, test=1, size=64)
    prepare_dataset("roads", raw, out, workers=2)
    d = roads.load(out, "train")
    assert d["sat"].shape == (2, 64, 64, 3) and d["map"].shape == (2, 64, 64)
    for k, stem in enumerate(d["names"]):
        sat = np.asarray(Image.open(raw / "train/sat" / f"{stem}.tiff"))
        mask = np.asarray(Image.open(raw / "train/map" / f"{stem}.tif"))
        np.testing.assert_array_equal(d["sat"][k], sat)
        np.testing.assert_array_equal(d["map"][k], (mask > 127).astype(np.uint8))
    assert 0 < d["map"].mean() < 1
    # the index page lists exactly the tiles
    html = (raw / "train/sat/index.html").read_text()
    assert roads.tile_links(html, ".tiff") == sorted(f"{s}.tiff" for s in d["names"])


def test_corrupt_image_in_prepare_fails_naming_it(tmp_path, capsys):
    raw = tmp_path / "raw"
    synthesize_dataset("roads", raw, seed=0, train=2, valid=1, test=1, size=64)
    bad = sorted((raw / "valid" / "sat").glob("*.tiff"))[0]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated TIFF
    with pytest.raises(CorruptFileError, match=bad.name):
        prepare_dataset("roads", raw, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    # and through the command line the rules call: exit 1, the file named on stderr
    from workflow.cli import main

    assert main(["data", "prepare", "roads", "--raw", str(raw), "--out",
                 str(tmp_path / "o2")]) == 1
    assert bad.name in capsys.readouterr().err


def test_coco_targets_match_torchvision_resize_and_center_crop(tmp_path):
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    raw, out = tmp_path / "raw", tmp_path / "out"
    synthesize_dataset("coco", raw, seed=0, train=7, val=3, n_train=4, n_val=2)
    prepare_dataset("coco", raw, out, n_train=4, n_val=2, seed=0)
    d = coco.load(out, "train")
    assert d["images"].shape == (4, 288, 288, 3)
    for k, name in enumerate(d["names"]):
        im = Image.open(raw / "train2014" / str(name)).convert("RGB")
        ref = TF.center_crop(TF.resize(im, 288, InterpolationMode.BILINEAR), 288)
        np.testing.assert_array_equal(d["images"][k], np.asarray(ref))


def test_coco_draw_is_reproducible_from_the_sorted_member_list():
    members = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in (5, 1, 9, 3, 7, 2)]
    a = coco.draw(members + ["train2014/"], 3, seed=4, split="train", config_key="n_train")
    b = coco.draw(list(reversed(members)), 3, seed=4, split="train", config_key="n_train")
    assert a == b and len(set(a)) == 3 and set(a) <= set(members)
    idx = np.random.default_rng([4, 0]).choice(6, 3, replace=False)
    assert a == [sorted(members)[i] for i in sorted(idx)]
    with pytest.raises(ValueError, match="data.coco.n_train"):
        coco.draw(members, 7, seed=0, split="train", config_key="n_train")


def _serve_coco(src: Path) -> dict[str, Path]:
    return {"/coco/zips/train2014.zip": src / "train2014.zip",
            "/coco/zips/val2014.zip": src / "val2014.zip"}


def test_coco_partial_zip_reads_only_the_needed_members(tmp_path):
    src = tmp_path / "src"
    synthesize_dataset("coco", src, seed=0, train=60, val=6, n_train=1, n_val=1)
    raw = tmp_path / "raw"
    with LoopbackServer(_serve_coco(src)) as srv:
        info = coco.download(raw, Fetcher(raw, mirror=f"{srv.url}/coco", progress=False),
                             n_train=5, n_val=2, seed=7)
        served = dict(srv.body_bytes)
    assert info["selection"]["train"]["fetched_by"] == "ranges"
    sel = json.loads((raw / "selection.json").read_text())
    with zipfile.ZipFile(src / "train2014.zip") as zf:
        infos = {i.filename: i for i in zf.infolist()}
        expected = coco.draw(list(infos), 5, 7, "train", "n_train")
        assert sel["train"]["members"] == expected
        for name in expected:  # the members arrive intact
            assert (raw / name).read_bytes() == zf.read(name)
        # bytes served: the tail (<= 64 KiB, holds the central directory here) plus each
        # drawn member's header + data; far less than the archive
        cd = zf.start_dir
        size = (src / "train2014.zip").stat().st_size
        offsets = sorted(i.header_offset for i in infos.values()) + [cd]
        spans = sum(offsets[offsets.index(infos[n].header_offset) + 1] - infos[n].header_offset
                    for n in expected)
    got = served["/coco/zips/train2014.zip"]
    assert got <= spans + 65536 + (size - cd)
    assert got < size / 3
    got_names = sorted(p.name for p in (raw / "train2014").iterdir())
    assert got_names == sorted(Path(n).name for n in expected)


def test_coco_without_range_support_downloads_whole_zip_and_verifies(tmp_path, monkeypatch):
    src = tmp_path / "src"
    synthesize_dataset("coco", src, seed=0, train=8, val=4, n_train=1, n_val=1)
    sha = {s: hashlib.sha256((src / f"{s}2014.zip").read_bytes()).hexdigest()
           for s in ("train", "val")}
    from workflow.datasets import RemoteFile

    monkeypatch.setattr(coco, "SPLITS", {
        s: RemoteFile(rf.url, sha256=sha[s]) for s, rf in coco.SPLITS.items()})
    raw = tmp_path / "raw"
    with LoopbackServer(_serve_coco(src), no_ranges=True) as srv:
        coco.download(raw, Fetcher(raw, mirror=f"{srv.url}/coco", progress=False),
                      n_train=3, n_val=2, seed=0)
    assert (raw / "train2014.zip").read_bytes() == (src / "train2014.zip").read_bytes()
    sel = json.loads((raw / "selection.json").read_text())
    assert sel["train"]["fetched_by"] == "zip" and len(sel["train"]["members"]) == 3
    # same draw as the synthetic tree made with the same n and seed
    other = tmp_path / "other"
    synthesize_dataset("coco", other, seed=0, train=8, val=4, n_train=3, n_val=2)
    assert json.loads((other / "selection.json").read_text())["train"]["members"] == \
        sel["train"]["members"]


def test_coco_prepare_refuses_a_draw_that_differs_from_the_config(tmp_path):
    raw = tmp_path / "raw"
    synthesize_dataset("coco", raw, seed=0, train=6, val=3, n_train=3, n_val=2)
    with pytest.raises(ValueError, match="data.coco.n_train"):
        prepare_dataset("coco", raw, tmp_path / "out", n_train=4, n_val=2, seed=0)


def test_corrupt_jpeg_member_named(tmp_path):
    raw = tmp_path / "raw"
    synthesize_dataset("coco", raw, seed=0, train=5, val=3, n_train=2, n_val=1)
    victim = raw / json.loads((raw / "selection.json").read_text())["val"]["members"][0]
    victim.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(CorruptFileError, match=victim.name):
        prepare_dataset("coco", raw, tmp_path / "out", n_train=2, n_val=1, seed=0)


def test_svhn_mat_with_wrong_shape_fails_naming_it(tmp_path):
    from scipy.io import savemat

    raw = tmp_path / "raw"
    synthesize_dataset("svhn", raw, seed=0, train=4, test=4, extra=4)
    savemat(raw / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 4), np.uint8),
                                     "y": np.ones((4, 1), np.uint8)})
    with pytest.raises(CorruptFileError, match="test_32x32.mat"):
        prepare_dataset("svhn", raw, tmp_path / "out")


def test_image_bytes_decoder_names_source():
    from workflow.datasets.arrays import decode_image

    buf = io.BytesIO()
    Image.fromarray(np.full((3, 4, 3), 7, np.uint8)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (3, 4, 3)
    with pytest.raises(CorruptFileError, match="member.png"):
        decode_image(b"garbage", name="member.png")


def test_svhn_float_labels_and_pixels_fail_prepare_naming_the_file(tmp_path):
    from scipy.io import savemat

    raw = tmp_path / "raw"
    synthesize_dataset("svhn", raw, seed=0, train=4, test=4, extra=4)
    x = np.zeros((32, 32, 3, 4), np.uint8)
    bad = raw / "test_32x32.mat"
    savemat(bad, {"X": x, "y": np.array([[1.0], [2.5], [3.0], [4.0]])})
    with pytest.raises(CorruptFileError, match=f"{bad}: y must hold whole digit labels"):
        prepare_dataset("svhn", raw, tmp_path / "out")
    savemat(bad, {"X": x.astype(np.float32), "y": np.ones((4, 1), np.uint8)})
    with pytest.raises(CorruptFileError, match=f"{bad}: X must be uint8"):
        prepare_dataset("svhn", raw, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_coco_selection_with_wrong_counts_fails_naming_it(tmp_path):
    raw = tmp_path / "raw"
    synthesize_dataset("coco", raw, seed=0, train=6, val=3, n_train=4, n_val=2)
    sel = json.loads((raw / "selection.json").read_text())
    sel["train"]["members"] = sel["train"]["members"][:3]  # one member lost
    (raw / "selection.json").write_text(json.dumps(sel))
    with pytest.raises(CorruptFileError, match=r"selection\.json: the train draw lists 3"):
        prepare_dataset("coco", raw, tmp_path / "out", n_train=4, n_val=2)


def test_download_extracts_with_the_configured_archive_limits(tmp_path):
    """config data.<dataset>.archive_limits reaches the extraction (via the command's
    --settings, as the download rule passes it) and the refusal names the key."""
    from workflow.cli import main

    src = tmp_path / "src"
    synthesize_dataset("stl10", src, seed=0, train=2, test=2, unlabeled=2)
    blob = (src / "stl10_binary.tar.gz").read_bytes()  # 7 members
    pin = json.dumps({"checksums": {"stl10_binary.tar.gz": hashlib.sha256(blob).hexdigest()}})
    with LoopbackServer({"/~acoates/stl10/stl10_binary.tar.gz": blob}) as srv:
        base = ["data", "fetch", "stl10", "--options", pin, "--mirror", srv.url]
        raw = tmp_path / "raw"
        assert main([*base, "--raw", str(raw), "--settings",
                     json.dumps({"archive_limits": {"max_members": 5}})]) == 1
        assert not (raw / "READY").exists() and not (raw / "stl10_binary").exists()
        with pytest.raises(Exception, match="raise config key "
                                            "data.stl10.archive_limits.max_members"):
            registry.download("stl10", raw, json.loads(pin), mirror=srv.url, progress=False,
                              settings={"archive_limits": {"max_members": 5}})
        assert main([*base, "--raw", str(raw), "--settings",
                     json.dumps({"archive_limits": {"max_members": 7}})]) == 0
    assert (raw / "READY").exists()
    assert (raw / "stl10_binary" / "train_X.bin").read_bytes() == \
        (src / "stl10_binary" / "train_X.bin").read_bytes()


def test_roads_tiles_missing_from_what_the_index_lists_fail_prepare(tmp_path):
    raw = tmp_path / "raw"
    synthesize_dataset("roads", raw, seed=0, train=3, valid=1, test=1, size=64)
    stem = sorted((raw / "train" / "sat").glob("*.tiff"))[1].stem
    (raw / "train" / "sat" / f"{stem}.tiff").unlink()  # a pair lost: they still pair up
    (raw / "train" / "map" / f"{stem}.tif").unlink()
    with pytest.raises(CorruptFileError, match=r"train/sat/index\.html lists 3 tiles but 2 "
                                               rf"are in .*\['{stem}'\]"):
        prepare_dataset("roads", raw, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_sr_test_download_must_hold_the_real_set_sizes(tmp_path):
    raw = tmp_path / "raw"
    synthesize_dataset("sr_test", raw, seed=0, set5=5, set14=3, bsd100=3)
    prepare_dataset("sr_test", raw, tmp_path / "out")  # a fake may be smaller
    (raw / "READY").write_text(json.dumps({"source": "download"}))
    with pytest.raises(CorruptFileError, match=f"{raw / 'Set14'}: 3 images of set14, the real "
                                               f"set has 14"):
        prepare_dataset("sr_test", raw, tmp_path / "out2")
