"""The flaw probes of Sjögren et al. 2023 ("Identifying and Mitigating Flaws of Deep
Perceptual Similarity Metrics"): invert, translate, rotate and colour-stain image sets.

A metric is *correct* on a pair (original, variant) when ``d(original, variant)`` is
not larger than ``d(original, r)`` for every one of seven references (black, white,
gray, red, green, blue, uniform noise): a variant that a person sees as the same
picture must look closer than a blank image. On a stain triplet it is correct when
``d(original, stained) < d(original, reference)`` (same object on a stained
background beats a different object on the original background).

The published sets are hand-made 96x96 images; :func:`generate` draws procedural
sets that follow the same protocol (11 invert pairs, 5 translate pairs, 6 images x
5 rotations, 5 stain triplets, 7 references) and saves them as PNGs, so a reader
can look at them. A folder of hand-made PNGs with the same naming replaces them
(config key ``probes.images``). Naming (``NN`` = two-digit item number)::

    reference_{black,white,gray,red,green,blue,noise}.png
    invert_NN_original.png      invert_NN_variant.png
    translate_NN_original.png   translate_NN_variant.png
    rotate_NN_original.png      rotate_NN_variant_<degrees>.png   (one file per angle)
    stain_NN_original.png       stain_NN_stained.png   stain_NN_reference.png

Any set named ``<set>_NN_original.png`` + ``<set>_NN_variant[_<tag>].png`` is scored
as a pair set; ``stain`` is the triplet set.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from workflow import runtime
from workflow.compare import Variant, all_variants, per_channel_diffs, reduce_channels
from workflow.config import json_arg
from workflow.distortions import resize
from workflow.lossnets import LossNet, build_extractor, weights_id
from workflow.results import config_hash, score_frame, write_json, write_parquet

BENCHMARK = "probes"
REFERENCES = ("black", "white", "gray", "red", "green", "blue", "noise")
ROTATIONS = (22.5, 45.0, 67.5, 90.0, 180.0)
SET_SIZES = {"invert": 11, "translate": 5, "rotate": 6 * len(ROTATIONS), "stain": 5}
_PAIR = re.compile(r"^(?P<set>[a-z]+)_(?P<item>\d+)_(?P<role>original|variant|stained|reference)(?:_(?P<tag>.+))?$")


class ProbeError(ValueError):
    pass


@dataclass
class ProbeSet:
    """Images by name, and which names are compared (all as [3, H, W] float in [0, 1])."""

    images: dict[str, Tensor]
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # set -> (original, variant)
    triplets: list[tuple[str, str, str]] = field(default_factory=list)  # (original, stained, reference)

    def sizes(self) -> dict[str, int]:
        out = {k: len(v) for k, v in self.pairs.items()}
        if self.triplets:
            out["stain"] = len(self.triplets)
        return out


# ----------------------------------------------------------------------------- generation


def _blank(size: int, color: Sequence[float]) -> Tensor:
    return torch.tensor(color, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()


def _grid(size: int) -> tuple[Tensor, Tensor]:
    c = torch.arange(size, dtype=torch.float32) + 0.5
    return c.view(1, -1).expand(size, size), c.view(-1, 1).expand(size, size)  # x, y


def _bw(mask: Tensor) -> Tensor:
    return mask.float().unsqueeze(0).expand(3, -1, -1).clone()


def invert_patterns(size: int, g: torch.Generator) -> list[Tensor]:
    """11 black-and-white patterns."""
    x, y = _grid(size)
    cx = cy = size / 2
    r = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    cells = (torch.rand(8, 8, generator=g) > 0.5).float()
    blocks = cells.repeat_interleave(size // 8 + 1, 0).repeat_interleave(size // 8 + 1, 1)[:size, :size]
    tri = (y > size * 0.2) & (torch.abs(x - cx) < (y - size * 0.2) * 0.6) & (y < size * 0.85)
    masks = [
        (x // 8) % 2 == 0,  # vertical stripes
        (y // 8) % 2 == 0,  # horizontal stripes
        ((x + y) // 12) % 2 == 0,  # diagonal stripes
        ((x // 12) + (y // 12)) % 2 == 0,  # fine checkerboard
        ((x // (size / 3)).floor() + (y // (size / 3)).floor()) % 2 == 0,  # coarse checkerboard
        r < size * 0.3,  # disc
        (r // 8) % 2 == 0,  # rings
        x < cx,  # half and half
        (torch.abs(x - cx) < size * 0.1) | (torch.abs(y - cy) < size * 0.1),  # cross
        blocks > 0.5,  # random blocks
        tri,  # triangle
    ]
    return [_bw(m) for m in masks]


def _patch(kind: int, n: int, g: torch.Generator) -> Tensor:
    """A structured, colourful n x n region."""
    x, y = _grid(n)
    if kind == 0:
        cells = torch.rand(3, 4, 4, generator=g)
        return cells.repeat_interleave(n // 4, 1).repeat_interleave(n // 4, 2)
    if kind == 1:
        s = ((x // 4) % 2).unsqueeze(0)
        return torch.stack([s[0], 0.2 + 0 * s[0], 1 - s[0]])
    if kind == 2:
        return torch.stack([x / n, y / n, 1 - x / n])
    if kind == 3:
        return torch.rand(3, n, n, generator=g)
    r = torch.sqrt((x - n / 2) ** 2 + (y - n / 2) ** 2)
    ring = ((r // 3) % 2).float()
    return torch.stack([ring, ring * 0.5, 0.1 + 0 * ring])


def translate_pairs(size: int, g: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """5 pairs: a structured region moved elsewhere on a plain background."""
    backgrounds = [(0.5, 0.5, 0.5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.2, 0.3, 0.8), (0.9, 0.85, 0.7)]
    n = size // 3
    places = [((4, 4), (size - n - 4, size - n - 4)), ((size - n - 4, 4), (4, size - n - 4)),
              ((4, (size - n) // 2), (size - n - 4, (size - n) // 2)),
              (((size - n) // 2, 4), ((size - n) // 2, size - n - 4)),
              ((8, 8), ((size - n) // 2 + 10, (size - n) // 2 + 10))]
    out = []
    for k, (bg, (a, b)) in enumerate(zip(backgrounds, places, strict=True)):
        patch = _patch(k, n, g)
        imgs = []
        for (py, px) in (a, b):
            img = _blank(size, bg)
            img[:, py:py + n, px:px + n] = patch
            imgs.append(img)
        out.append((imgs[0], imgs[1]))
    return out


def rotate_images(size: int, g: torch.Generator) -> list[tuple[Tensor, list[Tensor]]]:
    """6 images (content inside a centred disc on a plain background) and their 5 rotations."""
    x, y = _grid(size)
    c = size / 2
    r = torch.sqrt((x - c) ** 2 + (y - c) ** 2)
    inside = r < size * 0.45
    backgrounds = [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (0.95, 0.9, 0.8), (0.3, 0.5, 0.3),
                   (0.1, 0.1, 0.3)]
    contents = []
    arrow = ((torch.abs(x - c) < size * 0.08) & (y > c - size * 0.3) & (y < c + size * 0.3)) | (
        (y < c - size * 0.1) & (y > c - size * 0.35) & (torch.abs(x - c) < (y - (c - size * 0.35)) * 0.8))
    contents.append(torch.stack([arrow.float() * 0.9, arrow.float() * 0.1, arrow.float() * 0.1]))
    letter_f = ((x > c - 20) & (x < c - 10) & (torch.abs(y - c) < 30)) | (
        (y > c - 30) & (y < c - 20) & (x > c - 20) & (x < c + 20)) | (
        (y > c - 5) & (y < c + 5) & (x > c - 20) & (x < c + 10))
    contents.append(torch.stack([0 * x, letter_f.float() * 0.7, letter_f.float()]))
    stripes = ((x // 6) % 2).float()
    contents.append(torch.stack([stripes, stripes * 0.8, 0.2 + 0 * x]))
    cells = torch.rand(3, 6, 6, generator=g).repeat_interleave(size // 6, 1).repeat_interleave(size // 6, 2)
    contents.append(cells[:, :size, :size])
    contents.append(torch.stack([x / size, (y / size) ** 2, 1 - x / size]))
    tri = (y > c - 25) & (torch.abs(x - c + 10) < (y - (c - 25)) * 0.7) & (y < c + 25)
    contents.append(torch.stack([tri.float(), tri.float() * 0.6, 0 * x]) + 0.3 * (~tri).float() * (x > c).float())
    out = []
    for bg, content in zip(backgrounds, contents, strict=True):
        # content that is part of the picture keeps its colour; the rest is background
        img = torch.where(inside.unsqueeze(0), content.clamp(0, 1), _blank(size, bg))
        rots = [TF.rotate(img, angle, InterpolationMode.BILINEAR, fill=list(bg)).clamp(0, 1) for angle in ROTATIONS]
        out.append((img, rots))
    return out


def stain_triplets(size: int, g: torch.Generator) -> list[tuple[Tensor, Tensor, Tensor]]:
    """5 triplets: object on background, same object on a stained / recoloured background,
    a different object on the original background."""
    x, y = _grid(size)
    c = size / 2
    r = torch.sqrt((x - c) ** 2 + (y - c) ** 2)
    shapes = [
        r < size * 0.25,  # disc
        (torch.abs(x - c) < size * 0.22) & (torch.abs(y - c) < size * 0.22),  # square
        (y > c - 25) & (torch.abs(x - c) < (y - (c - 25)) * 0.6) & (y < c + 25),  # triangle
        (torch.abs(x - c) < size * 0.08) | (torch.abs(y - c) < size * 0.08),  # cross
        (r < size * 0.3) & (r > size * 0.15),  # ring
    ]
    shapes = [s & (torch.abs(x - c) < size * 0.35) & (torch.abs(y - c) < size * 0.35) for s in shapes]
    colors = [(0.9, 0.1, 0.1), (0.1, 0.3, 0.9), (0.1, 0.7, 0.2), (0.9, 0.8, 0.1), (0.6, 0.1, 0.7)]
    backgrounds = [(0.9, 0.9, 0.9), (0.8, 0.7, 0.5), (0.6, 0.8, 0.9), (0.3, 0.3, 0.3), (0.9, 0.8, 0.8)]
    stains = [(0.4, 0.25, 0.1), (0.2, 0.6, 0.2), (0.9, 0.5, 0.1), (0.7, 0.2, 0.3), (0.2, 0.2, 0.6)]
    out = []
    for i in range(5):
        obj, other = shapes[i], shapes[(i + 2) % 5]
        fg = _blank(size, colors[i])
        bg = _blank(size, backgrounds[i])
        # the stain: a large random blob over the background (recolours most of it)
        bx, by = (torch.rand(2, generator=g) * size).tolist()
        blob = torch.sqrt((x - bx) ** 2 + (y - by) ** 2) < size * (0.55 + 0.2 * float(torch.rand(1, generator=g)))
        stained_bg = torch.where(blob.unsqueeze(0), _blank(size, stains[i]), bg)
        original = torch.where(obj.unsqueeze(0), fg, bg)
        stained = torch.where(obj.unsqueeze(0), fg, stained_bg)
        reference = torch.where(other.unsqueeze(0), fg, bg)
        out.append((original, stained, reference))
    return out


def reference_images(size: int, g: torch.Generator) -> dict[str, Tensor]:
    colors = {"black": (0, 0, 0), "white": (1, 1, 1), "gray": (0.5, 0.5, 0.5), "red": (1, 0, 0),
              "green": (0, 1, 0), "blue": (0, 0, 1)}
    out = {k: _blank(size, v) for k, v in colors.items()}
    out["noise"] = torch.rand(3, size, size, generator=g)
    return out


def generate(size: int = 96, seed: int = 0) -> dict[str, Tensor]:
    """Every probe image by file stem (see the module docstring for the naming)."""
    g = torch.Generator().manual_seed(int(seed))
    images: dict[str, Tensor] = {f"reference_{k}": v for k, v in reference_images(size, g).items()}
    for i, img in enumerate(invert_patterns(size, g)):
        images[f"invert_{i:02d}_original"] = img
        images[f"invert_{i:02d}_variant"] = 1.0 - img
    for i, (a, b) in enumerate(translate_pairs(size, g)):
        images[f"translate_{i:02d}_original"] = a
        images[f"translate_{i:02d}_variant"] = b
    for i, (img, rots) in enumerate(rotate_images(size, g)):
        images[f"rotate_{i:02d}_original"] = img
        for angle, rot in zip(ROTATIONS, rots, strict=True):
            images[f"rotate_{i:02d}_variant_{angle:g}"] = rot
    for i, (o, s, r) in enumerate(stain_triplets(size, g)):
        images[f"stain_{i:02d}_original"] = o
        images[f"stain_{i:02d}_stained"] = s
        images[f"stain_{i:02d}_reference"] = r
    return images


def to_uint8(img: Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- reading a folder


def read_folder(folder: str | Path, size: int) -> dict[str, Tensor]:
    """Every ``*.png`` of ``folder`` as ``[3, size, size]`` float (resized if needed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProbeError(f"probe image folder {folder} does not exist (config key probes.images)")
    images = {}
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
        images[p.stem] = resize(torch.from_numpy(arr)[None], size)[0]
    if not images:
        raise ProbeError(f"{folder} holds no .png probe images (naming: docs/adaptation.md)")
    return images


def build_probe_set(images: Mapping[str, Tensor], source: str = "images") -> ProbeSet:
    """Group images by the naming scheme; unknown names and incomplete items are errors."""
    missing = [f"reference_{r}" for r in REFERENCES if f"reference_{r}" not in images]
    if missing:
        raise ProbeError(f"{source}: missing reference images {missing} (need {', '.join(REFERENCES)})")
    ps = ProbeSet(images=dict(images))
    items: dict[tuple[str, str], dict[str, list[str]]] = {}
    for name in images:
        if name.startswith("reference_"):
            continue
        m = _PAIR.match(name)
        if m is None:
            raise ProbeError(f"{source}: {name}.png does not follow the probe naming "
                             f"<set>_NN_<original|variant[_tag]|stained|reference>.png")
        items.setdefault((m["set"], m["item"]), {}).setdefault(m["role"], []).append(name)
    for (set_name, item), roles in sorted(items.items()):
        where = f"{source}: {set_name}_{item}"
        if "original" not in roles:
            raise ProbeError(f"{where} has no _original image")
        orig = roles["original"][0]
        if set_name == "stain":
            if not (roles.get("stained") and roles.get("reference")):
                raise ProbeError(f"{where} needs _original, _stained and _reference images")
            ps.triplets.append((orig, roles["stained"][0], roles["reference"][0]))
        else:
            if not roles.get("variant"):
                raise ProbeError(f"{where} has no _variant image")
            ps.pairs.setdefault(set_name, []).extend((orig, v) for v in sorted(roles["variant"]))
    return ps


# ----------------------------------------------------------------------------- scoring


def probe_distances(features: Callable[[Tensor], Mapping[int, Tensor]], ps: ProbeSet,
                    variants: Sequence[Variant], pairs: Sequence[tuple[str, str]]) -> dict[Variant, Tensor]:
    """Distances of every (a, b) name pair for every variant, from one feature pass."""
    names = list(ps.images)
    index = {n: i for i, n in enumerate(names)}
    with torch.no_grad():
        feats = features(torch.stack([ps.images[n] for n in names]))
        a = torch.tensor([index[p[0]] for p in pairs])
        b = torch.tensor([index[p[1]] for p in pairs])
        dev = next(iter(feats.values())).device
        fa = {t: f[a.to(dev)] for t, f in feats.items()}
        fb = {t: f[b.to(dev)] for t, f in feats.items()}
        diffs = per_channel_diffs(fa, fb, variants)
        return {v: reduce_channels(d).cpu() for v, d in diffs.items()}


def count_correct(features: Callable[[Tensor], Mapping[int, Tensor]], ps: ProbeSet,
                  variants: Sequence[Variant]) -> dict[Variant, dict[str, tuple[int, int]]]:
    """``{variant: {set: (correct, pairs)}}``."""
    refs = [f"reference_{r}" for r in REFERENCES]
    wanted: list[tuple[str, str]] = []
    for pairs in ps.pairs.values():
        for o, v in pairs:
            wanted += [(o, v)] + [(o, r) for r in refs]
    for o, s, r in ps.triplets:
        wanted += [(o, s), (o, r)]
    pos = {p: i for i, p in enumerate(dict.fromkeys(wanted))}
    d = probe_distances(features, ps, variants, list(pos))
    out: dict[Variant, dict[str, tuple[int, int]]] = {}
    for var in variants:
        dv = d[var]
        res = {}
        for set_name, pairs in ps.pairs.items():
            ok = sum(bool(dv[pos[(o, v)]] <= min(dv[pos[(o, r)]] for r in refs)) for o, v in pairs)
            res[set_name] = (int(ok), len(pairs))
        if ps.triplets:
            ok = sum(bool(dv[pos[(o, s)]] < dv[pos[(o, r)]]) for o, s, r in ps.triplets)
            res["stain"] = (int(ok), len(ps.triplets))
        out[var] = res
    return out


def score(net: LossNet, cfg: Mapping[str, Any], lossnet: Mapping[str, Any], common: Mapping[str, Any],
          images_dir: Path) -> pd.DataFrame:
    t0 = time.perf_counter()
    device = runtime.pick_device(common.get("device", "auto"))
    precision = runtime.resolve_precision(common.get("precision", "auto"), device)
    runtime.configure(device, precision, runtime.job_threads())
    size = int(cfg.get("image_size", 96))
    ps = build_probe_set(read_folder(images_dir, size), str(images_dir))
    extractor = build_extractor(net.arch, lossnets=[net], weights=lossnet["weights"],
                                weights_dir=lossnet["weights_dir"], seed=int(lossnet.get("seed", 0)),
                                normalize=cfg.get("normalize", "imagenet")).to(device)
    taps = set(net.taps)

    def features(x: Tensor) -> dict[int, Tensor]:
        with runtime.autocast(device, precision):
            return {t: f.float() for t, f in extractor(x.to(device)).items() if t in taps}

    variants = all_variants(cfg["comparisons"], cfg["channel_norm"])
    counts = count_correct(features, ps, variants)
    source = "generated" if str(cfg.get("images", "generated")) == "generated" else "handmade"
    rows = [{"dataset": "probes", "split": set_name, "comparison": v.method, "channel_norm": v.channel_norm,
             "variant": source, "metric": "correct", "value": float(ok), "n": n}
            for v, res in counts.items() for set_name, (ok, n) in res.items()]
    return score_frame(rows, benchmark=BENCHMARK, arch=net.arch, layer=net.layer,
                       config_hash=config_hash(dict(cfg)), weights_id=weights_id(net.arch, lossnet["weights"]),
                       device=str(device), precision=precision, wall_time_s=time.perf_counter() - t0)


def write_images(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Generate the probe sets, or copy a hand-made folder, into ``out_dir`` (+ manifest.json last)."""
    size = int(cfg.get("image_size", 96))
    source = str(cfg.get("images", "generated"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    if source == "generated":
        images = generate(size, int(cfg.get("seed", 0)))
        ps = build_probe_set(images, "generated probes")
        for name, img in images.items():
            Image.fromarray(to_uint8(img)).save(out_dir / f"{name}.png")
    else:
        ps = build_probe_set(read_folder(source, size), source)  # validate before copying
        for name in ps.images:
            shutil.copyfile(Path(source) / f"{name}.png", out_dir / f"{name}.png")
    manifest = {"source": source, "image_size": size, "seed": cfg.get("seed", 0), "sizes": ps.sizes(),
                "images": sorted(ps.images)}
    write_json(manifest, out_dir / "manifest.json")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow benchmarks.probes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("images", help="generate (or import hand-made) probe images")
    i.add_argument("--config", type=json_arg, required=True)
    i.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("score", help="count correct probe pairs for one loss network")
    s.add_argument("--config", type=json_arg, required=True)
    s.add_argument("--lossnet", type=json_arg, required=True)
    s.add_argument("--common", type=json_arg, required=True)
    s.add_argument("--net", required=True)
    s.add_argument("--images", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "images":
        m = write_images(args.config, args.out)
        print(f"{args.out}: {len(m['images'])} images, sets {m['sizes']}")
        return 0
    df = score(LossNet.parse(args.net), args.config, args.lossnet, args.common, args.images)
    write_parquet(df, args.out)
    print(f"{args.out}: {len(df)} rows")
    return 0
