"""The flaw-probe images (Sjögren et al. 2023): naming, procedural sets, folders of PNGs, and
their grouping into pairs and triplets.

The published sets are hand-made 96x96 images; :func:`generate` draws procedural sets that
follow the same protocol (11 invert pairs, 5 translate pairs, 6 images x 5 rotations, 5 stain
triplets, 7 references). A folder of hand-made PNGs with the same naming replaces them
(config key ``probes.images``; docs/adaptation.md). Naming (``NN`` = two-digit item number)::

    reference_{black,white,gray,red,green,blue,noise}.png
    invert_NN_original.png      invert_NN_variant.png
    translate_NN_original.png   translate_NN_variant.png
    rotate_NN_original.png      rotate_NN_variant_<degrees>.png   (one file per angle)
    stain_NN_original.png       stain_NN_stained.png   stain_NN_reference.png

Any set named ``<set>_NN_original.png`` + ``<set>_NN_variant[_<tag>].png`` is a pair set;
``stain`` is the triplet set.

The scored folder (``results/probes/images/``) holds the PNGs and ``manifest.json`` (written
last: source, image_size, seed, set sizes, image names). :func:`load` is its one reader: the
images as uint8 HWC RGB arrays, grouped by :func:`build_probe_set`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from workflow.datasets.arrays import CorruptFileError, decode_image
from workflow.files import atomic_path, write_json

__all__ = ["REFERENCES", "ROTATIONS", "SET_SIZES", "ProbeError", "ProbeSet", "build_probe_set",
           "generate", "load", "read_folder", "reference_images", "save", "to_uint8"]

REFERENCES = ("black", "white", "gray", "red", "green", "blue", "noise")
ROTATIONS = (22.5, 45.0, 67.5, 90.0, 180.0)
SET_SIZES = {"invert": 11, "translate": 5, "rotate": 6 * len(ROTATIONS), "stain": 5}
_NAME = re.compile(r"^(?P<set>[a-z]+)_(?P<item>\d+)_"
                   r"(?P<role>original|variant|stained|reference)(?:_(?P<tag>.+))?$")
_NAMING = "<set>_NN_<original|variant[_tag]|stained|reference>.png (docs/adaptation.md)"


class ProbeError(ValueError):
    """A probe folder or set that cannot be scored; the message names the file and the fix."""


@dataclass
class ProbeSet:
    """Images by name (uint8 HWC arrays from a folder; float [3, H, W] when generated), and
    which names are compared."""

    images: dict[str, Any]
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # set -> (orig, var)
    triplets: list[tuple[str, str, str]] = field(default_factory=list)  # (orig, stained, ref)

    def sizes(self) -> dict[str, int]:
        """Pairs (or triplets) per set."""
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
    reps = size // 8 + 1
    blocks = cells.repeat_interleave(reps, 0).repeat_interleave(reps, 1)[:size, :size]
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
        reps = -(-n // 4)  # whole cells, cropped to n: any size, not only multiples of 4
        return cells.repeat_interleave(reps, 1).repeat_interleave(reps, 2)[:, :n, :n]
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
    backgrounds = [(0.5, 0.5, 0.5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.2, 0.3, 0.8),
                   (0.9, 0.85, 0.7)]
    n = size // 3
    far, mid = size - n - 4, (size - n) // 2
    places = [((4, 4), (far, far)), ((far, 4), (4, far)), ((4, mid), (far, mid)),
              ((mid, 4), (mid, far)), ((8, 8), (mid + 10, mid + 10))]
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
    backgrounds = [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (0.95, 0.9, 0.8),
                   (0.3, 0.5, 0.3), (0.1, 0.1, 0.3)]
    contents = []
    arrow = ((torch.abs(x - c) < size * 0.08) & (y > c - size * 0.3) & (y < c + size * 0.3)) | (
        (y < c - size * 0.1) & (y > c - size * 0.35)
        & (torch.abs(x - c) < (y - (c - size * 0.35)) * 0.8))
    contents.append(torch.stack([arrow.float() * 0.9, arrow.float() * 0.1, arrow.float() * 0.1]))
    letter_f = ((x > c - 20) & (x < c - 10) & (torch.abs(y - c) < 30)) | (
        (y > c - 30) & (y < c - 20) & (x > c - 20) & (x < c + 20)) | (
        (y > c - 5) & (y < c + 5) & (x > c - 20) & (x < c + 10))
    contents.append(torch.stack([0 * x, letter_f.float() * 0.7, letter_f.float()]))
    stripes = ((x // 6) % 2).float()
    contents.append(torch.stack([stripes, stripes * 0.8, 0.2 + 0 * x]))
    cells = torch.rand(3, 6, 6, generator=g)
    reps = -(-size // 6)
    cells = cells.repeat_interleave(reps, 1).repeat_interleave(reps, 2)
    contents.append(cells[:, :size, :size])
    contents.append(torch.stack([x / size, (y / size) ** 2, 1 - x / size]))
    tri = (y > c - 25) & (torch.abs(x - c + 10) < (y - (c - 25)) * 0.7) & (y < c + 25)
    contents.append(torch.stack([tri.float(), tri.float() * 0.6, 0 * x])
                    + 0.3 * (~tri).float() * (x > c).float())
    out = []
    for bg, content in zip(backgrounds, contents, strict=True):
        # content that is part of the picture keeps its colour; the rest is background
        img = torch.where(inside.unsqueeze(0), content.clamp(0, 1), _blank(size, bg))
        rots = [TF.rotate(img, angle, InterpolationMode.BILINEAR, fill=list(bg)).clamp(0, 1)
                for angle in ROTATIONS]
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
    shapes = [s & (torch.abs(x - c) < size * 0.35) & (torch.abs(y - c) < size * 0.35)
              for s in shapes]
    colors = [(0.9, 0.1, 0.1), (0.1, 0.3, 0.9), (0.1, 0.7, 0.2), (0.9, 0.8, 0.1), (0.6, 0.1, 0.7)]
    backgrounds = [(0.9, 0.9, 0.9), (0.8, 0.7, 0.5), (0.6, 0.8, 0.9), (0.3, 0.3, 0.3),
                   (0.9, 0.8, 0.8)]
    stains = [(0.4, 0.25, 0.1), (0.2, 0.6, 0.2), (0.9, 0.5, 0.1), (0.7, 0.2, 0.3), (0.2, 0.2, 0.6)]
    out = []
    for i in range(5):
        obj, other = shapes[i], shapes[(i + 2) % 5]
        fg = _blank(size, colors[i])
        bg = _blank(size, backgrounds[i])
        # the stain: a large random blob over the background (recolours most of it)
        bx, by = (torch.rand(2, generator=g) * size).tolist()
        radius = size * (0.55 + 0.2 * float(torch.rand(1, generator=g)))
        blob = torch.sqrt((x - bx) ** 2 + (y - by) ** 2) < radius
        stained_bg = torch.where(blob.unsqueeze(0), _blank(size, stains[i]), bg)
        original = torch.where(obj.unsqueeze(0), fg, bg)
        stained = torch.where(obj.unsqueeze(0), fg, stained_bg)
        reference = torch.where(other.unsqueeze(0), fg, bg)
        out.append((original, stained, reference))
    return out


def reference_images(size: int, g: torch.Generator) -> dict[str, Tensor]:
    """The seven references: six plain colours and uniform noise (drawn from ``g``)."""
    colors = {"black": (0, 0, 0), "white": (1, 1, 1), "gray": (0.5, 0.5, 0.5), "red": (1, 0, 0),
              "green": (0, 1, 0), "blue": (0, 0, 1)}
    out = {k: _blank(size, v) for k, v in colors.items()}
    out["noise"] = torch.rand(3, size, size, generator=g)
    return out


def generate(size: int = 96, seed: int = 0) -> dict[str, Tensor]:
    """Every procedural probe image by file stem, float ``[3, size, size]`` in [0, 1].

    One generator seeded with ``seed`` serves the sets in this order: references, invert,
    translate, rotate, stain (changing the order changes every random image).
    """
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
    """float ``[3, H, W]`` in [0, 1] -> uint8 ``[H, W, 3]`` (rounded), as saved in the PNGs."""
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- grouping


def build_probe_set(images: Mapping[str, Any], source: str = "images") -> ProbeSet:
    """Group images by the naming scheme; unknown names and incomplete items are errors
    naming ``source`` (the folder) and the file."""
    missing = [f"reference_{r}" for r in REFERENCES if f"reference_{r}" not in images]
    if missing:
        raise ProbeError(f"{source}: missing reference images {missing} "
                         f"(need reference_<{'|'.join(REFERENCES)}>.png)")
    ps = ProbeSet(images=dict(images))
    items: dict[tuple[str, str], dict[str, list[str]]] = {}
    for name in images:
        if name.startswith("reference_"):
            continue
        m = _NAME.match(name)
        if m is None:
            raise ProbeError(f"{source}: {name}.png does not follow the probe naming {_NAMING}")
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


# ----------------------------------------------------------------------------- folders


def read_folder(folder: str | Path) -> dict[str, np.ndarray]:
    """Every ``*.png`` of ``folder`` (sorted by file name) as uint8 ``[H, W, 3]`` RGB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProbeError(f"probe image folder {folder} does not exist (config key probes.images:"
                         f" 'generated' or a folder of PNGs named as in docs/adaptation.md)")
    images = {}
    for p in sorted(folder.glob("*.png")):
        try:
            images[p.stem] = decode_image(p)
        except CorruptFileError:
            raise ProbeError(f"{p}: cannot decode the PNG; replace or remove it (config key "
                             f"probes.images names the folder)") from None
    if not images:
        raise ProbeError(f"{folder} holds no .png probe images (naming: {_NAMING})")
    return images


def save(ps: ProbeSet, manifest: str | Path, copy_from: str | Path | None = None,
         **meta: Any) -> dict[str, Any]:
    """Write the probe folder: every image of ``ps`` as ``<name>.png`` next to ``manifest``
    (stale PNGs removed first), then ``manifest`` itself, last.

    ``ps.images`` are uint8 HWC arrays, or with ``copy_from`` the files are copied byte for
    byte from that folder (hand-made images keep their own encoding). Returns the manifest.
    """
    manifest = Path(manifest)
    out_dir = manifest.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # the folder is incomplete until the manifest is back
    for old in out_dir.glob("*.png"):
        old.unlink()
    for name, img in ps.images.items():
        with atomic_path(out_dir / f"{name}.png") as tmp:
            if copy_from is None:
                Image.fromarray(img).save(tmp, format="PNG")
            else:
                shutil.copyfile(Path(copy_from) / f"{name}.png", tmp)
    info = {**meta, "sizes": ps.sizes(), "images": sorted(ps.images)}
    write_json(info, manifest)
    return info


def load(path: str | Path) -> ProbeSet:
    """The probe set of a folder (``path``: the folder or its ``manifest.json``): uint8 HWC
    images in file-name order, checked against the manifest :func:`save` wrote, if any."""
    path = Path(path)
    folder = path.parent if path.suffix == ".json" else path
    manifest = folder / "manifest.json"
    if path.suffix == ".json" and not path.exists():
        raise FileNotFoundError(f"{path} is missing: write the probe images first (rule "
                                f"probes_images: `snakemake --cores 1 {path}`)")
    images = read_folder(folder)
    listed = json.loads(manifest.read_text())["images"] if manifest.exists() else list(images)
    if sorted(images) != sorted(listed):
        diff = sorted(set(images) ^ set(listed))[:5]
        raise ProbeError(f"{folder}: the PNGs do not match {manifest.name} (first differences: "
                         f"{diff}); rerun the probes_images rule "
                         f"(`snakemake --cores 1 -R probes_images {manifest}`)")
    return build_probe_set(images, str(folder))
