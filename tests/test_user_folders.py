"""config data.paths: the user's own folders in their upstream layouts stand in for the
download, verified like one, never modified, and a change is detected."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from snakemake_helpers import ROOT, snakemake

from workflow.datasets import bapps, registry, sr_test, svhn
from workflow.datasets.user_folders import UserFolderError, fingerprint, layout, link

SIZES = {  # small twins; Set5/Set14/BSD100 at their real counts (the link checks them)
    "bapps": {"n_val": 2, "n_train": 1, "n_jnd": 2, "size": 72},
    "svhn": {"train": 16, "test": 8, "extra": 8},
    "sr_test": {"set5": 5, "set14": 14, "bsd100": 100},
}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (links followed): kind, size, mtime and sha256 of files,
    and the link target of links."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", st.st_size, st.st_mtime_ns, sha256(p))
            else:
                out[rel] = ("dir", st.st_mtime_ns, oct(st.st_mode))
    return out


def user_folders(tmp: Path, seed: int = 0) -> dict[str, Path]:
    """BAPPS, SVHN and Set5/Set14/BSDS300 in their upstream layouts, written by the datasets'
    own synthesize; BAPPS is given as a symlink to its dataset/ folder (as a user whose data
    lives on another disk has it)."""
    store = tmp / "store"
    bapps.synthesize(store / "lpips", seed, **SIZES["bapps"])   # store/lpips/dataset/2afc ...
    svhn.synthesize(store / "torchvision_root", seed, **SIZES["svhn"])
    sr_test.synthesize(store / "sr", seed, **SIZES["sr_test"])
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "BAPPS").symlink_to(store / "lpips" / "dataset", target_is_directory=True)
    return {"bapps": mine / "BAPPS", "svhn": store / "torchvision_root", "sr_test": store / "sr"}


def arrays(prepared: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(prepared.iterdir()):
        if p.suffix == ".npy":
            out[p.name] = np.load(p)
        elif p.suffix == ".npz":
            with np.load(p) as z:
                out.update({f"{p.name}:{k}": z[k] for k in z.files})
    return out


@pytest.mark.slow
def test_demo_parts_from_user_folders_through_the_rules(tmp_path):
    folders = user_folders(tmp_path)
    before = {ds: snapshot(f) for ds, f in folders.items()}
    # the synthetic .mat files are not the published ones: pin their sha256, as for a mirror
    pins = {n: sha256(folders["svhn"] / n) for n in
            ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat")}
    res = tmp_path / "res"
    cfg = {"data": {"paths": {ds: str(f) for ds, f in folders.items()},
                    "svhn": {"checksums": pins}}}
    (tmp_path / "paths.yaml").write_text(yaml.safe_dump(cfg))
    args = ["--configfile", str(ROOT / "config" / "demo.yaml"), str(tmp_path / "paths.yaml"),
            "--config", f"resources_dir={res}", f"results_dir={tmp_path / 'out'}", "--",
            *[str(res / "prepared" / ds / "manifest.json") for ds in folders]]
    proc = snakemake("--cores", "2", *args)
    text = proc.stdout + proc.stderr
    assert "link_dataset" in text and "synthesize_dataset" not in text

    # nothing in the user's folders changed: paths, sizes, mtimes, hashes, links
    for ds, f in folders.items():
        assert snapshot(f) == before[ds], ds
    assert os.readlink(folders["bapps"]) == str(tmp_path / "store" / "lpips" / "dataset")

    # the raw folders read the user's files through links, with their sha256 recorded
    for ds, f in folders.items():
        raw = res / "raw" / ds
        ready = json.loads((raw / "READY").read_text())
        assert ready["source"] == "user" and ready["folder"] == str(f.resolve())
        book = json.loads((raw / "checksums.json").read_text())
        for rel, entry in book.items():
            src = (raw / rel).resolve()  # through the link, into the user's folder
            assert f.resolve() in src.parents and entry["sha256"] == sha256(src), rel
            assert entry["size"] == src.stat().st_size
    assert len(json.loads((res / "raw/bapps/checksums.json").read_text())) == \
        sum(len(list((folders["bapps"] / k).rglob("*.*"))) for k in ("2afc", "jnd"))
    assert (res / "raw/svhn/train_32x32.mat").is_symlink()
    assert (res / "raw/bapps/2afc").resolve() == (folders["bapps"] / "2afc").resolve()

    # the prepared arrays equal those of a normal synthesize in the raw folder
    ref = tmp_path / "ref"
    for ds in folders:
        registry.synthesize(ds, ref / "raw" / ds, 0, {"synthetic": SIZES[ds]})
        registry.prepare(ds, ref / "raw" / ds, ref / "prepared" / ds)
        got, want = arrays(res / "prepared" / ds), arrays(ref / "prepared" / ds)
        assert sorted(got) == sorted(want) and len(got) > 2, ds
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{ds} {k}")

    # a rewritten user file reruns link and prepare of svhn, and only those
    mat = folders["svhn"] / "test_32x32.mat"
    st = mat.stat()
    os.utime(mat, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    dry = snakemake("-n", *args).stdout
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", dry, re.M)}
    assert jobs == {"link_dataset": 1, "prepare_dataset": 1, "total": 2}, dry
    assert "dataset=svhn" in dry and "dataset=bapps" not in dry and "dataset=sr_test" not in dry


# ----------------------------------------------------------------------------- unit tests


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Small user folders (BAPPS, SVHN), built once."""
    tmp = tmp_path_factory.mktemp("small")
    bapps.synthesize(tmp / "lpips", 1, n_val=2, n_train=1, n_jnd=2, size=32)
    svhn.synthesize(tmp / "root", 1, train=8, test=4, extra=4)
    return tmp


def copytree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_missing_folder_names_the_key_and_the_folder(tmp_path):
    with pytest.raises(UserFolderError) as e:
        layout("svhn", tmp_path / "nowhere")
    assert str(e.value) == (f"config key data.paths.svhn: the folder {tmp_path / 'nowhere'} "
                            f"does not exist")
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    with pytest.raises(UserFolderError, match=r"data\.paths\.bapps: the folder .*broken does "
                                              r"not exist \(it resolves to .*gone\)"):
        layout("bapps", tmp_path / "broken")
    # the rule's fingerprint says so, so the link job runs and reports it
    assert fingerprint("svhn", tmp_path / "nowhere").startswith("unusable: config key")


def test_wrong_layouts_name_what_is_missing(tmp_path, small):
    root = copytree(small / "root", tmp_path / "root")
    (root / "extra_32x32.mat").unlink()
    with pytest.raises(UserFolderError, match=r"^config key data\.paths\.svhn \(.*root\): "
                                              r"missing extra_32x32\.mat; a torchvision SVHN"):
        layout("svhn", root)
    ds = copytree(small / "lpips" / "dataset", tmp_path / "dataset")
    (ds / "2afc/val/cnn/p1/000001.png").unlink()
    with pytest.raises(UserFolderError, match=r"data\.paths\.bapps .*2afc/val/cnn/p1 has no "
                                              r"000001\.png \(1 of the 2 items lack their p1\)"):
        layout("bapps", ds)
    import shutil

    shutil.rmtree(ds / "jnd")
    with pytest.raises(UserFolderError, match=r"no jnd/ folder in it .*download_dataset\.sh of the "
                                              r"PerceptualSimilarity"):
        layout("bapps", ds)
    with pytest.raises(UserFolderError, match=r"data\.paths\.sr_test .*no Set5/img_001_SRF_2_HR"):
        layout("sr_test", ds)


def test_symlinked_bapps_folder_is_found(tmp_path, small):
    """The old bug: a raw folder holding a link to the BAPPS tree was 'incomplete'."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset").symlink_to(small / "lpips" / "dataset", target_is_directory=True)
    roots = bapps.find_roots(raw)
    assert roots == {"2afc": raw / "dataset" / "2afc", "jnd": raw / "dataset" / "jnd"}
    # and the parent of dataset/ is a valid user folder too
    lay = layout("bapps", small / "lpips")
    assert lay.entries["2afc"] == (small / "lpips" / "dataset" / "2afc").resolve()
    # 2afc val: 6 subsets x 2 items x 4 parts, train: 3 x 1 x 4; jnd: 2 subsets x 2 x 3
    assert len(lay.files) == 48 + 12 + 12


def test_published_checksums_and_pins(tmp_path, small):
    root = small / "root"
    with pytest.raises(UserFolderError, match=r"train_32x32\.mat: md5 [0-9a-f]{32} is not the "
                                              r"expected e26dedcc434d2e4c54c9b2d4a06d8373 "
                                              r"\(published upstream\)"):
        link("svhn", root, tmp_path / "raw")
    assert not (tmp_path / "raw" / "READY").exists()
    pins = {n: sha256(root / n) for n in ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat")}
    bad = {**pins, "test_32x32.mat": "0" * 64}
    with pytest.raises(UserFolderError, match=r"test_32x32\.mat: sha256 .* not the expected "
                                              r"0{64} \(pinned in data\.svhn\.checksums\)"):
        link("svhn", root, tmp_path / "raw", {"checksums": bad})
    info = link("svhn", root, tmp_path / "raw", {"checksums": pins})
    assert info["files"] == 3 and info["folder"] == str(root)


def test_change_after_verification_is_detected(tmp_path, small):
    root = copytree(small / "root", tmp_path / "root")
    pins = {n: sha256(root / n) for n in ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat")}
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    fp = fingerprint("svhn", root)
    registry.download("svhn", raw, {"checksums": pins, "folder": str(root)})
    assert fingerprint("svhn", root) == fp  # linking changed nothing
    registry.prepare("svhn", raw, out)
    np.testing.assert_array_equal(np.load(out / "test_labels.npy"),
                                  svhn.read_mat(root / "test_32x32.mat")[1])
    # rewrite a file with other bytes after the link verified it
    from scipy.io import loadmat, savemat

    mat = loadmat(root / "test_32x32.mat")
    savemat(root / "test_32x32.mat", {"X": mat["X"][..., :2], "y": mat["y"][:2]})
    assert fingerprint("svhn", root) != fp  # the link rule's param: Snakemake reruns it
    with pytest.raises(UserFolderError, match=r"^config key data\.paths\.svhn: .*test_32x32\.mat "
                                              r"changed after it was verified .*link_dataset"):
        registry.prepare("svhn", raw, out)
    assert not (out / "manifest.json").exists()


def test_download_after_a_link_never_writes_into_the_user_folder(tmp_path, small):
    ds = copytree(small / "lpips", tmp_path / "lpips")
    before = snapshot(ds)
    raw = tmp_path / "raw"
    tiny = {"synthetic": {"n_val": 1, "n_train": 1, "n_jnd": 1, "size": 32}}
    registry.synthesize("bapps", raw, 3, tiny)  # an earlier twin: replaced by the links
    link("bapps", ds / "dataset", raw)
    assert sorted(p.name for p in raw.iterdir()) == ["2afc", "READY", "checksums.json", "jnd"]
    assert (raw / "2afc").is_symlink() and (raw / "jnd").is_symlink()
    manifest = registry.prepare("bapps", raw, tmp_path / "prepared")
    assert manifest["counts"]["2afc/val/cnn"] == 2
    with pytest.raises(UserFolderError, match=r"data\.paths\.bapps .*raw folder .* overlap"):
        link("bapps", raw.parent, raw)
    # data.paths removed again: the synthetic twin replaces the links, not the user's files
    registry.synthesize("bapps", raw, 3, tiny)
    assert not any(p.is_symlink() for p in raw.iterdir())
    assert json.loads((raw / "READY").read_text())["source"] == "synthetic"
    assert not (raw / "checksums.json").exists()
    assert snapshot(ds) == before


# ----------------------------------------------------------------------------- weights_dir


def _hub(tmp: Path, archs=("alexnet", "vgg16")) -> Path:
    """A fake torch hub cache: files under torchvision's names (contents not checked here)."""
    from workflow.archs import weights_filename

    hub = tmp / "home" / ".cache" / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    for a in archs:
        (hub / weights_filename(a)).write_bytes(a.encode())
    return hub


def test_weights_dir_is_read_and_only_verified(tmp_path, monkeypatch):
    from workflow.plan import ConfigError, Plan, load_config

    hub = _hub(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    over = {"resources_dir": "R", "lossnets": {"archs": ["alexnet", "vgg16"], "lpips_sets": [],
                                               "weights_dir": "~/.cache/torch/hub/checkpoints"}}
    plan = Plan(load_config(ROOT / "config.yaml", overrides=over))
    assert plan.weights_dir() == str(hub)
    assert plan.weights_input("alexnet") == [
        f"{hub}/alexnet-owt-7be5be79.pth", "R/weights/verified/alexnet-owt-7be5be79.pth.json"]
    assert plan.weight_files() == [f"{hub}/alexnet-owt-7be5be79.pth", f"{hub}/vgg16-397923af.pth"]
    assert plan.weight_targets() == ["R/weights/verified/alexnet-owt-7be5be79.pth.json",
                                     "R/weights/verified/vgg16-397923af.pth.json"]
    assert plan.stage_settings("similarity", "score")["weights_dir"] == str(hub)
    # a configured architecture whose file the folder lacks stops the DAG build
    over["lossnets"]["archs"].append("resnet18")
    with pytest.raises(ConfigError, match=r"^config key lossnets\.weights_dir \(.*checkpoints\): "
                                          r"1 ImageNet file\(s\) missing: resnet18-f37072fd\.pth"):
        Plan(load_config(ROOT / "config.yaml", overrides=over))


def test_verify_folder_checks_the_name_hash_and_never_writes(tmp_path, monkeypatch):
    from workflow.datasets import weights

    hub = tmp_path / "hub"
    hub.mkdir()
    good, bad = b"alexnet weights", b"vgg16 weights"
    names = {"alexnet": f"alexnet-{hashlib.sha256(good).hexdigest()[:8]}.pth",
             "vgg16": "vgg16-397923af.pth"}
    from workflow import archs

    def rename(name):  # both readers of the file name: the fetch and archs.weights_file_in
        monkeypatch.setattr(weights, "weights_filename", name)
        monkeypatch.setattr(archs, "weights_filename", name)

    rename(names.__getitem__)
    (hub / names["alexnet"]).write_bytes(good)
    (hub / names["vgg16"]).write_bytes(bad)
    os.utime(hub / names["alexnet"], ns=(10**18, 10**18))
    before = snapshot(hub)
    rec, = weights.fetch_weights(["alexnet"], tmp_path / "R/verified", mirror=str(hub))
    entry = json.loads(rec.read_text())
    assert entry["sha256"] == hashlib.sha256(good).hexdigest() and entry["size"] == len(good)
    assert entry["mtime_ns"] == 10**18 and entry["source"] == str(hub / names["alexnet"])
    with pytest.raises(weights.WeightsFileError, match=r"lossnets\.weights_dir .*vgg16-397923af"
                                                       r"\.pth has sha256 .* does not start "
                                                       r"with 397923af"):
        weights.verify_folder(["vgg16"], hub, tmp_path / "R/verified")
    with pytest.raises(weights.WeightsFileError, match=r"resnet18 is missing|missing \(resnet18"):
        rename(lambda a: f"{a}-00000000.pth")
        weights.verify_folder(["resnet18"], hub, tmp_path / "R/verified")
    assert snapshot(hub) == before


@pytest.mark.slow
def test_dry_run_with_weights_dir_verifies_instead_of_downloading(tmp_path):
    from workflow.plan import Plan, load_config

    demo = load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml")
    plan = Plan(demo)
    arch_names = [a for a in plan.archs("similarity") if a != "pixel"]
    # the demo's architectures and presets: every enabled benchmark's (the weights it verifies)
    hub = _hub(tmp_path, archs=tuple(dict.fromkeys(
        a for b in plan.enabled() for a in plan.archs(b) if a != "pixel")))
    proc = snakemake("-n", "-p", "similarity", "--configfile",
                     str(ROOT / "config" / "demo.yaml"), "--config",
                     f"resources_dir={tmp_path / 'res'}", f"results_dir={tmp_path / 'out'}",
                     f"lossnets={{'weights': 'imagenet', 'weights_dir': '{hub}'}}")
    text = proc.stdout + proc.stderr
    assert f"verify ImageNet weights in lossnets.weights_dir: {hub}" in text
    assert "download.pytorch.org" not in text
    # the similarity jobs wait for the verification and read the files where they are
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", proc.stdout, re.M)}
    # one job per architecture and one for the pixel baselines, per dataset
    expected = (len(arch_names) + 1) * len(demo["similarity"]["datasets"])
    assert jobs["download_weights"] == 1 and jobs["score_similarity"] == expected, proc.stdout
    assert (text.count(f'"weights_dir": "{hub}"') + text.count(f'"weights_dir":"{hub}"')
            == expected)


# ----------------------------------------------------------------------------- every dataset

TINY = {
    "bapps": {"n_val": 1, "n_train": 1, "n_jnd": 1, "size": 32},
    "svhn": {"train": 4, "test": 4, "extra": 4},
    "stl10": {"train": 2, "test": 2, "unlabeled": 2},
    "sr_test": {"set5": 5, "set14": 14, "bsd100": 100},
    "roads": {"train": 1, "valid": 1, "test": 1, "size": 64},
    "coco": {"train": 6, "val": 3},
}
COCO_DRAW = {"n_train": 2, "n_val": 1, "seed": 0}


def _user_copy(ds: str, tmp: Path) -> tuple[Path, dict[str, str]]:
    """A synthesized twin in the upstream layout a user would hold, and the pins of the
    files whose published checksum a twin cannot match."""
    src = tmp / "store" / ds
    mod = registry.module(ds)
    mod.synthesize(src, 0, **TINY[ds], **({k: COCO_DRAW[k] for k in ("n_train", "n_val")}
                                          if ds == "coco" else {}))
    if ds == "bapps":
        return src / "dataset", {}
    if ds == "svhn":
        return src, {f"{s}_32x32.mat": sha256(src / f"{s}_32x32.mat")
                     for s in ("train", "test", "extra")}
    if ds == "stl10":
        return src, {f"stl10_binary/{n}": sha256(src / "stl10_binary" / n)
                     for n in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin",
                               "unlabeled_X.bin")}
    if ds == "coco":  # the zips alone, as images.cocodataset.org ships them
        user = tmp / "coco_zips"
        user.mkdir()
        for z in ("train2014.zip", "val2014.zip"):
            (src / z).rename(user / z)
        return user, {z: sha256(user / z) for z in ("train2014.zip", "val2014.zip")}
    if ds == "sr_test":  # Set5 as a copy of SelfExSR's data/ folder has it
        (src / "Set5" / "image_SRF_2").mkdir()
        for p in sorted((src / "Set5").glob("*.png")):
            p.rename(src / "Set5" / "image_SRF_2" / p.name)
        (src / "Set5" / "image_SRF_2" / "img_001_SRF_2_LR.png").write_bytes(b"not read")
    return src, {}


@pytest.mark.parametrize("ds", list(TINY))
def test_every_dataset_from_a_user_folder_prepares_like_its_twin(tmp_path, ds):
    user, pins = _user_copy(ds, tmp_path)
    before = snapshot(user)
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    opts = {"checksums": pins, **(COCO_DRAW if ds == "coco" else {})}
    registry.download(ds, raw, {**opts, "folder": str(user)})
    registry.prepare(ds, raw, out, COCO_DRAW if ds == "coco" else None)
    ref = tmp_path / "ref"
    registry.synthesize(ds, ref / "raw", 0, {"synthetic": TINY[ds],
                                             **(COCO_DRAW if ds == "coco" else {})})
    registry.prepare(ds, ref / "raw", ref / "prepared", COCO_DRAW if ds == "coco" else None)
    got, want = arrays(out), arrays(ref / "prepared")
    assert sorted(got) == sorted(want) and got, ds
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{ds} {k}")
    assert snapshot(user) == before
    assert json.loads((raw / "READY").read_text())["source"] == "user"
