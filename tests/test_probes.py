"""Flaw probes: set sizes, naming, folders, and correct-pair counts, on tiny hand-made images
whose distances are worked out by hand (identity "features": the pixels themselves) and on
the generated set scored end to end (distances recomputed here with NumPy)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workflow import cli
from workflow.archs import LossNet
from workflow.benchmarks import probes
from workflow.compare import Variant
from workflow.datasets import probes as data

SPATIAL, MEAN = Variant("spatial", False), Variant("mean", False)


def _tiny_set(size: int = 8) -> dict[str, torch.Tensor]:
    imgs = {f"reference_{k}": v
            for k, v in data.reference_images(size, torch.Generator().manual_seed(0)).items()}
    half = torch.zeros(3, size, size)
    half[:, :, : size // 2] = 1.0  # left half white, right half black
    imgs["invert_00_original"], imgs["invert_00_variant"] = half, 1.0 - half
    gray = torch.full((3, size, size), 0.5)
    a, b = gray.clone(), gray.clone()
    a[:, 0:2, 0:2] = 1.0
    b[:, 6:8, 6:8] = 1.0
    imgs["translate_00_original"], imgs["translate_00_variant"] = a, b
    red_white = torch.ones(3, size, size)
    red_white[1:, :, : size // 2] = 0.0  # left half red, right half white
    stained = red_white.clone()
    stained[:, :, size // 2:] = 0.5  # background turned gray
    other = torch.ones(3, size, size)
    other[:2, :, : size // 2] = 0.0  # left half blue: a different object, same background
    imgs["stain_00_original"], imgs["stain_00_stained"] = red_white, stained
    imgs["stain_00_reference"] = other
    return imgs


def _identity(images: dict[str, torch.Tensor]) -> tuple[dict[int, torch.Tensor], list[str]]:
    names = list(images)
    return {0: torch.stack([images[n] for n in names])}, names


def _write_pngs(folder, images: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{name}.png")


def test_hand_worked_counts():
    imgs = _tiny_set()
    ps = data.build_probe_set(imgs)
    assert ps.sizes() == {"invert": 1, "translate": 1, "stain": 1}
    feats, names = _identity(imgs)
    counts = probes.count_correct(feats, names, ps, [SPATIAL, MEAN])
    # invert, spatial: d(o, inverse) = 3 (every pixel differs by 1 in 3 channels) while
    # d(o, gray) = 3 * 0.25 = 0.75 -> wrong. mean: both have channel means 0.5 -> d = 0 -> right
    assert counts[SPATIAL]["invert"] == (0, 1)
    assert counts[MEAN]["invert"] == (1, 1)
    # translate: d(o, v) = 8 px * 0.75 / 64 = 0.094 > d(o, gray) = 4 px * 0.75 / 64 = 0.047
    # -> wrong; mean: identical channel means -> right
    assert counts[SPATIAL]["translate"] == (0, 1)
    assert counts[MEAN]["translate"] == (1, 1)
    # stain, spatial: d(o, stained) = half the pixels * 3 * 0.25 = 0.375 < d(o, other) = 1.0
    # -> right; mean: (0.25^2 * 3) = 0.1875 < (0.5^2 + 0 + 0.5^2) = 0.5 -> right
    assert counts[SPATIAL]["stain"] == (1, 1)
    assert counts[MEAN]["stain"] == (1, 1)
    index = {n: i for i, n in enumerate(names)}
    d = probes.probe_distances(feats, index, [SPATIAL, MEAN],
                               [("invert_00_original", "reference_gray"),
                                ("translate_00_original", "translate_00_variant")])
    assert d[SPATIAL].tolist() == pytest.approx([0.75, 8 * 0.75 / 64])
    assert d[MEAN].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)


def test_handmade_folder_round_trip(tmp_path):
    src = tmp_path / "handmade"
    _write_pngs(src, _tiny_set())
    Image.open(src / "reference_red.png").convert("RGBA").save(src / "reference_red.png")
    out = tmp_path / "copied" / "manifest.json"
    (out.parent).mkdir()
    (out.parent / "stale.png").write_bytes(b"left over from an earlier run")
    manifest = probes.images({"images": str(src), "image_size": 8, "seed": 0}, out)
    assert manifest["sizes"] == {"invert": 1, "translate": 1, "stain": 1}
    assert json.loads(out.read_text()) == manifest and manifest["source"] == str(src)
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert pngs == sorted(p.name for p in src.glob("*.png"))  # the stale PNG is gone
    for name in pngs:  # copied byte for byte (the RGBA file stays RGBA)
        assert (out.parent / name).read_bytes() == (src / name).read_bytes()
    ps = data.load(out)
    assert list(ps.images) == sorted(ps.images)
    for name, arr in ps.images.items():
        with Image.open(src / f"{name}.png") as im:
            assert arr.dtype == np.uint8 and np.array_equal(arr, np.asarray(im.convert("RGB")))
    feats, names = _identity({n: torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255
                              for n, a in ps.images.items()})
    counts = probes.count_correct(feats, names, ps, [SPATIAL, MEAN])
    assert counts[SPATIAL]["invert"] == (0, 1) and counts[MEAN]["translate"] == (1, 1)


def test_generated_set_sizes_and_content(tmp_path):
    images = data.generate(96, seed=0)
    ps = data.build_probe_set(images)
    assert ps.sizes() == data.SET_SIZES == {"invert": 11, "translate": 5, "rotate": 30, "stain": 5}
    assert all(img.shape == (3, 96, 96) for img in images.values())
    assert all(float(img.min()) >= 0 and float(img.max()) <= 1 for img in images.values())
    # invert pairs are exact inversions of black-and-white patterns
    for o, v in ps.pairs["invert"]:
        assert torch.equal(images[v], 1 - images[o])
        assert set(images[o].unique().tolist()) <= {0.0, 1.0}
    # a translated pair has the same pixels, moved: identical sorted values
    for o, v in ps.pairs["translate"]:
        assert torch.equal(images[o].flatten().sort().values, images[v].flatten().sort().values)
        assert not torch.equal(images[o], images[v])
    # 180 / 90 degree rotations are flips / NumPy's counter-clockwise rot90 (bilinear at
    # exact pixel centres)
    orig = images["rotate_00_original"].numpy()
    assert np.allclose(images["rotate_00_variant_180"].numpy(), orig[:, ::-1, ::-1], atol=1e-4)
    assert np.allclose(images["rotate_00_variant_90"].numpy(), np.rot90(orig, 1, axes=(1, 2)),
                       atol=1e-4)
    assert torch.equal(data.generate(96, seed=0)["reference_noise"], images["reference_noise"])
    assert not torch.equal(data.generate(96, seed=1)["reference_noise"], images["reference_noise"])
    # the written folder: PNG pixels are the images rounded to 8 bits
    out = tmp_path / "images" / "manifest.json"
    manifest = probes.images({"images": "generated", "image_size": 96, "seed": 0}, out)
    assert manifest["images"] == sorted(images) and manifest["seed"] == 0
    for name in ("invert_03_variant", "rotate_02_variant_22.5", "reference_noise"):
        with Image.open(out.parent / f"{name}.png") as im:
            want = np.rint(images[name].permute(1, 2, 0).numpy().astype(np.float64) * 255)
            assert np.array_equal(np.asarray(im), want.astype(np.uint8))


@pytest.mark.parametrize("size", [32, 64, 100])
def test_generated_set_at_any_schema_size(size):
    """probes.image_size accepts 32 and up; sizes that are not multiples of the patterns'
    cells crashed before (cells are now whole and cropped; 96, the default, is unchanged)."""
    images = data.generate(size, seed=0)
    assert images and all(v.shape[-2:] == (size, size) for v in images.values())


def test_bad_folders_fail_clearly(tmp_path):
    imgs = _tiny_set()
    with pytest.raises(data.ProbeError, match="reference_noise"):
        data.build_probe_set({k: v for k, v in imgs.items() if k != "reference_noise"})
    with pytest.raises(data.ProbeError, match="naming"):
        data.build_probe_set({**imgs, "whatever": imgs["reference_black"]})
    with pytest.raises(data.ProbeError, match="_variant"):
        data.build_probe_set({k: v for k, v in imgs.items() if k != "invert_00_variant"})
    with pytest.raises(data.ProbeError, match="_stained"):
        data.build_probe_set({k: v for k, v in imgs.items() if k != "stain_00_stained"})
    with pytest.raises(data.ProbeError, match="_original"):
        data.build_probe_set({k: v for k, v in imgs.items() if k != "translate_00_original"})
    with pytest.raises(data.ProbeError, match="does not exist.*probes.images"):
        data.read_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.ProbeError, match="no .png"):
        data.read_folder(tmp_path / "empty")
    folder = tmp_path / "set"
    _write_pngs(folder, imgs)
    data.save(data.build_probe_set(data.read_folder(folder)), folder / "manifest.json")
    (folder / "invert_00_variant.png").unlink()  # a folder that no longer fits its manifest
    with pytest.raises(data.ProbeError, match="invert_00_variant.*-R probes_images"):
        data.load(folder / "manifest.json")
    (folder / "invert_00_variant.png").write_bytes(b"not a png")
    with pytest.raises(data.ProbeError, match="invert_00_variant.png: cannot decode"):
        data.load(folder)
    with pytest.raises(FileNotFoundError, match="probes_images"):
        data.load(tmp_path / "missing" / "manifest.json")


def _distances(f: dict[int, np.ndarray], a: list[int], b: list[int], v: Variant) -> np.ndarray:
    """The comparison convention by hand (float64): channel norm after the mean, squared
    difference averaged over positions, summed over channels and taps."""
    total = np.zeros(len(a))
    for x in f.values():
        x = x.astype(np.float64)
        if v.method == "mean":
            x = x.mean(axis=(2, 3), keepdims=True)
        if v.channel_norm:
            x = x / (np.sqrt((x ** 2).sum(axis=1, keepdims=True)) + 1e-10)
        total += ((x[a] - x[b]) ** 2).mean(axis=(2, 3)).sum(axis=1)
    return total


def test_score_generated_set_end_to_end(tmp_path, cpu_job, demo_plan):
    config = demo_plan.stage_config("probes", "score", "alexnet")
    out = tmp_path / "images" / "manifest.json"
    cli.run("probes", "images", ["--config", json.dumps(demo_plan.stage_config("probes", "images")),
                                 "--out", str(out)])
    job = cpu_job("probes", "score", "alexnet")
    df = probes.score(job=job, config=config, net="alexnet/lpips", images=out,
                      scores=tmp_path / "scores.parquet")
    variants = [(c, n) for c in config["comparisons"] for n in config["channel_norm"]]
    assert len(df) == 4 * len(variants)
    assert set(df["benchmark"]) == {"probes"} and set(df["dataset"]) == {"probes"}
    assert set(df["variant"]) == {"generated"} and set(df["metric"]) == {"correct"}
    assert set(df["arch"]) == {"alexnet"} and set(df["layer"]) == {"lpips"}
    assert dict(zip(df["split"], df["n"], strict=True)) == data.SET_SIZES
    assert ((df["value"] >= 0) & (df["value"] <= df["n"])).all()
    # recompute two variants' counts from the PNGs (PIL) and the extractor's features
    names = sorted(p.stem for p in out.parent.glob("*.png"))
    x = np.stack([np.asarray(Image.open(out.parent / f"{n}.png")) for n in names])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().float() / 255
    with torch.no_grad():
        feats = {t: f.numpy() for t, f in job.extractor(
            LossNet.parse("alexnet/lpips"), "imagenet")(x).items()}
    at = {n: i for i, n in enumerate(names)}
    ps = data.load(out)
    refs = [f"reference_{r}" for r in data.REFERENCES]
    for v in (Variant("spatial", True), MEAN):
        want = {}
        for set_name, pairs in ps.pairs.items():
            o = [at[p[0]] for p in pairs]
            dv = _distances(feats, o, [at[p[1]] for p in pairs], v)
            dr = np.stack([_distances(feats, o, [at[r]] * len(o), v) for r in refs])
            want[set_name] = int((dv <= dr.min(axis=0)).sum())
        o = [at[t[0]] for t in ps.triplets]
        want["stain"] = int((_distances(feats, o, [at[t[1]] for t in ps.triplets], v)
                             < _distances(feats, o, [at[t[2]] for t in ps.triplets], v)).sum())
        got = df[(df["comparison"] == v.method) & (df["channel_norm"] == v.channel_norm)]
        assert dict(zip(got["split"], got["value"].astype(int), strict=True)) == want


def test_score_command_handmade_folder(tmp_path):
    """The CLI row: a hand-made folder of mixed sizes, resized to image_size, variant
    ``handmade``; a folder without a manifest is read as it is."""
    src = tmp_path / "handmade"
    imgs = _tiny_set(16)
    imgs["invert_00_original"] = torch.nn.functional.interpolate(
        imgs["invert_00_original"][None], size=(24, 40))[0]  # not square, not 16
    _write_pngs(src, imgs)
    config = {"comparisons": ["spatial", "sort"], "channel_norm": [False], "normalize": "none",
              "image_size": 32, "images": str(src), "precision": "fp32", "weights": "random",
              "weights_seed": 0}
    scores = tmp_path / "scores.parquet"
    cli.run("probes", "score", ["--net", "squeezenet1_1/1", "--config", json.dumps(config),
                                "--settings", json.dumps({"device": "cpu", "threads": 1}),
                                "--images", str(src), "--scores", str(scores)])
    df = pd.read_parquet(scores)
    assert len(df) == 3 * 2 and set(df["variant"]) == {"handmade"}
    assert set(df["layer"]) == {"1"} and set(df["comparison"]) == {"spatial", "sort"}
    assert df.set_index(["split", "comparison"])["n"].to_dict() == {
        (s, c): 1 for s in ("invert", "translate", "stain") for c in ("spatial", "sort")}
