"""The data rules end to end: `snakemake -n download` lists every real URL, and the real
download_dataset + prepare_dataset rules fetch every synthetic twin from a loopback mirror
(data.source: download, data.mirrors -> 127.0.0.1), verify, extract and prepare it."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
import yaml
from http_server import LoopbackServer
from snakemake_helpers import ROOT, snakemake

from workflow.archs import ARCHS, weights_url
from workflow.datasets import registry
from workflow.datasets.registry import module as dataset_module


def synthesize_dataset(name, raw, seed, **sizes):
    draw = {k: sizes.pop(k) for k in ("n_train", "n_val") if k in sizes and name == "coco"}
    registry.synthesize(name, raw, seed, {"synthetic": sizes, **draw})

DATASETS = ("bapps", "coco", "sr_test", "roads", "svhn", "stl10")
# the human-judgement datasets: downloaded from the mirror, CSIQ (no download) from data.paths
IQA = ("tid2013", "kadid10k", "nights")


@pytest.mark.slow
def test_dry_run_download_lists_every_real_url(tmp_path):
    proc = snakemake("-n", "download", "--config", f"resources_dir={tmp_path / 'res'}",
                     f"results_dir={tmp_path / 'out'}")
    text = proc.stdout + proc.stderr
    from workflow.plan import Plan, load_config

    needed = Plan(load_config(ROOT / "config.yaml")).needed_datasets()
    urls = [f.url for d in DATASETS + tuple(d for d in IQA if d in needed)
            for f in dataset_module(d).FILES]
    urls += [weights_url(a) for a in ARCHS]
    missing = [u for u in urls if u not in text]
    assert not missing, f"not listed by `snakemake -n download`: {missing}"
    assert "download_weights" in text and "synthesize_dataset" not in text


@pytest.mark.slow
def test_synthetic_source_uses_synthesize_rule(tmp_path):
    proc = snakemake("-n", "--configfile", str(ROOT / "config" / "demo.yaml"), "--config",
                     f"resources_dir={tmp_path / 'res'}", f"results_dir={tmp_path / 'out'}",
                     "--", str(tmp_path / "res/prepared/svhn/manifest.json"))
    text = proc.stdout + proc.stderr
    assert "synthesize_dataset" in text and "download_dataset" not in text


def _bapps_archives(src: Path) -> None:
    """BAPPS's synthesize writes the extracted tree; pack it as the three upstream archives
    (the jnd one as plain tar under a .tar.gz name, as upstream files may be)."""
    top = src / "dataset"
    for name, sub, mode in (("twoafc_train.tar.gz", "2afc/train", "w:gz"),
                            ("twoafc_val.tar.gz", "2afc/val", "w:gz"),
                            ("jnd.tar.gz", "jnd", "w")):
        with tarfile.open(src / name, mode) as tf:
            tf.add(top / sub, arcname=f"dataset/{sub}")


def _iqa_archives(ds: str, src: Path) -> None:
    """Pack a synthesized tree as its upstream archive: TID2013's RAR (stored members, the
    format rarfile reads without a binary), KADID-10k's and NIGHTS's zips."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "READY")
    if ds == "tid2013":
        sys.path.insert(0, str(Path(__file__).parent))
        from rar4 import write_stored_rar

        write_stored_rar(src / "tid2013.rar",
                         {p.relative_to(src).as_posix(): p.read_bytes() for p in files})
        return
    with zipfile.ZipFile(src / f"{ds}.zip", "w") as zf:
        for p in files:
            zf.write(p, p.relative_to(src).as_posix())


def _routes(ds: str, src: Path) -> dict[str, Path]:
    """URL path on the mirror -> synthetic file, for every file the download will ask for."""
    routes = {}
    for rf in dataset_module(ds).FILES:
        routes[f"/{ds}{urlsplit(rf.url).path}"] = src / rf.name
        if ds == "roads":  # the tiles the index page links
            for tile in (src / rf.name).parent.glob("*.tif*"):
                routes[f"/{ds}{urlsplit(urljoin(rf.url, tile.name)).path}"] = tile
    return routes


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_download_and_prepare_every_dataset_through_the_rules(tmp_path):
    src = tmp_path / "mirror"
    sizes = {
        "bapps": {"n_val": 12, "n_train": 4, "n_jnd": 12, "size": 80},
        "coco": {"train": 24, "val": 6, "n_train": 1, "n_val": 1},
        "sr_test": {"set5": 5, "set14": 14, "bsd100": 100},  # the real sizes
        "roads": {"train": 2, "valid": 1, "test": 1, "size": 64},
        "svhn": {"train": 16, "test": 8, "extra": 8},
        "stl10": {"train": 4, "test": 4, "unlabeled": 4},
        "tid2013": {"references": 2, "types": 2, "levels": 2, "height": 16, "width": 24},
        "kadid10k": {"references": 2, "types": 2, "levels": 2, "height": 16, "width": 24},
        "nights": {"train": 2, "val": 2, "test": 3, "side": 16},
    }
    routes = {}
    for ds, kw in sizes.items():
        synthesize_dataset(ds, src / ds, seed=1, **kw)
        if ds == "bapps":
            _bapps_archives(src / ds)
        if ds in IQA:
            _iqa_archives(ds, src / ds)
        routes.update(_routes(ds, src / ds))
    csiq = tmp_path / "my_csiq"  # CSIQ has no download: the user's folder (data.paths)
    synthesize_dataset("csiq", csiq, seed=1, references=2, types=2, levels=2, size=16)
    (csiq / "READY").unlink()
    # the twins are not the upstream bytes: pin their hashes where upstream ones are built in
    # (COCO's zips are read by ranges, never hashed whole)
    pinned = {ds: {rf.name: sha256(src / ds / rf.name) for rf in dataset_module(ds).FILES
                   if rf.sha256 or rf.md5} for ds in ("bapps", "svhn", "stl10")}
    res = tmp_path / "res"
    with LoopbackServer(routes, max_seconds=900) as srv:
        cfg = {"data": {"source": "download",
                        "mirrors": {ds: f"{srv.url}/{ds}" for ds in DATASETS + IQA},
                        "paths": {"csiq": str(csiq)},
                        "nights": {"size": 16},
                        "coco": {"n_train": 5, "n_val": 2, "seed": 3},
                        **{ds: {"checksums": c} for ds, c in pinned.items()}},
               "lossnets": {"weights": "random"}}
        (tmp_path / "test.yaml").write_text(yaml.safe_dump(cfg))
        snakemake("--cores", "2", "--configfile", str(ROOT / "config" / "demo.yaml"),
                  str(tmp_path / "test.yaml"), "--config", f"resources_dir={res}",
                  f"results_dir={tmp_path / 'out'}", "--",
                  *[str(res / "prepared" / ds / "manifest.json")
                    for ds in (*DATASETS, *IQA, "csiq")])
        coco_bytes = srv.body_bytes["/coco/zips/train2014.zip"]

    for ds in DATASETS + IQA:
        ready = json.loads((res / "raw" / ds / "READY").read_text())
        assert ready["source"] == "download" and ready["mirror"] == f"{srv.url}/{ds}"
        assert (res / "prepared" / ds / "manifest.json").exists()
    assert json.loads((res / "raw/csiq/READY").read_text())["source"] == "user"
    # every fetched file is byte-identical to what the mirror served, and its sha256 recorded
    for ds in ("sr_test", "roads", "svhn", "stl10", "bapps", *IQA):
        book = json.loads((res / "raw" / ds / "checksums.json").read_text())
        for rf in dataset_module(ds).FILES:
            got = res / "raw" / ds / rf.name
            assert got.read_bytes() == (src / ds / rf.name).read_bytes()
            assert book[rf.name]["sha256"] == sha256(src / ds / rf.name)
    tiles = sorted(p.name for p in (src / "roads/train/sat").glob("*.tiff"))
    assert sorted(p.name for p in (res / "raw/roads/train/sat").glob("*.tiff")) == tiles

    # extraction happened and prepare read it: counts match the synthetic sizes
    m = {ds: json.loads((res / "prepared" / ds / "manifest.json").read_text())
         for ds in (*DATASETS, *IQA, "csiq")}
    assert m["svhn"]["counts"] == {"train": 16, "test": 8, "extra": 8}
    assert m["stl10"]["counts"] == {"train": 4, "test": 4, "unlabeled": 4}
    assert m["sr_test"]["counts"] == {"set5": 5, "set14": 14, "bsd100": 100}
    assert m["roads"]["counts"] == {"train": 2, "valid": 1, "test": 1}
    assert m["coco"]["counts"] == {"train": 5, "val": 2}
    for ds in ("tid2013", "kadid10k", "csiq"):  # extracted (TID2013: from the RAR) and read
        assert m[ds]["counts"]["distorted"] == 8 and m[ds]["counts"]["references"] == 2
    assert m["tid2013"]["size"] == [16, 24] and m["csiq"]["higher_is_better"] is False
    assert m["nights"]["size"] == [16, 16] and m["nights"]["counts"]["test"] == 2  # 1 of 3: 5 votes
    # COCO came through ranged reads of the zip, not the whole archive
    assert coco_bytes < (src / "coco/train2014.zip").stat().st_size / 2
    selection = json.loads((res / "raw/coco/selection.json").read_text())
    assert selection["train"]["fetched_by"] == "ranges"
    # the prepared SVHN arrays are the served .mat contents (scipy reads them independently)
    from scipy.io import loadmat

    mat = loadmat(src / "svhn" / "test_32x32.mat")
    np.testing.assert_array_equal(np.load(res / "prepared/svhn/test_images.npy"),
                                  mat["X"].transpose(3, 0, 1, 2))
    np.testing.assert_array_equal(np.load(res / "prepared/svhn/test_labels.npy"),
                                  mat["y"].ravel() % 10)
    assert any(k.startswith("2afc_val_") for k in
               (p.name for p in (res / "prepared/bapps").iterdir()))
