"""The flaw-probes benchmark (Sjögren et al. 2023): correct-pair counts of one loss network
on the invert, translate, rotate and colour-stain probe sets.

A metric is *correct* on a pair (original, variant) when ``d(original, variant)`` is not
larger than ``d(original, r)`` for every one of seven references (black, white, gray, red,
green, blue, uniform noise): a variant that a person sees as the same picture must look
closer than a blank image. On a stain triplet it is correct when ``d(original, stained) <
d(original, reference)`` (the same object on a stained background beats a different object
on the original background). The images, their naming and grouping are
:mod:`workflow.datasets.probes`; docs/adaptation.md describes the sets.

A pixel baseline ``pixel/<metric>`` (docs/similarity.md) is scored by the same rule with its
distance computed on the images (:mod:`workflow.metrics.pixel`, float64, no extractor); its
rows have arch ``pixel``, layer = the metric, comparison ``""`` and channel_norm <NA>.

Outputs: the probe folder (``images``), and per loss network the summary rows in the scores
schema (``score``): dataset ``probes``, split = probe set, metric ``correct``, value = correct
count, n = pairs in the set, variant ``generated`` or ``handmade``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from workflow import compare
from workflow.archs import LossNet
from workflow.compare import Variant
from workflow.datasets import probes
from workflow.files import write_parquet
from workflow.imaging import to_images
from workflow.job import Job
from workflow.metrics import pixel
from workflow.results import score_frame

__all__ = ["BENCHMARK", "count_correct", "count_correct_pixel", "count_pairs", "images",
           "probe_distances", "score"]

BENCHMARK = "probes"


def images(config: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Generate the probe sets, or copy a hand-made folder, next to ``out`` (manifest.json).

    Args: config: the stage config (``images``, ``seed``, ``image_size``); out: the manifest,
    written last. Returns: the manifest (source, image_size, seed, sizes, images).
    """
    source, size, seed = str(config["images"]), int(config["image_size"]), int(config["seed"])
    copy_from = None
    if source == "generated":
        ps = probes.build_probe_set({k: probes.to_uint8(v)
                                     for k, v in probes.generate(size, seed).items()},
                                    "generated probes")
    else:
        # validated before anything is copied; the files keep their own size and encoding
        ps, copy_from = probes.build_probe_set(probes.read_folder(source), source), source
    manifest = probes.save(ps, out, copy_from, source=source, image_size=size, seed=seed)
    print(f"{out}: {len(manifest['images'])} images, sets {manifest['sizes']}")
    return manifest


def probe_distances(feats: Mapping[int, Tensor], index: Mapping[str, int],
                    variants: Sequence[Variant], pairs: Sequence[tuple[str, str]]
                    ) -> dict[Variant, Tensor]:
    """Distances ``[len(pairs)]`` (on the CPU) of every ``(a, b)`` name pair per variant.

    Args: feats: ``{tap: [N, C, H, W]}`` of the images, row ``index[name]`` for each name.
    """
    dev = next(iter(feats.values())).device
    a = torch.tensor([index[p[0]] for p in pairs]).to(dev)
    b = torch.tensor([index[p[1]] for p in pairs]).to(dev)
    diffs = compare.per_channel_diffs({t: f[a] for t, f in feats.items()},
                                      {t: f[b] for t, f in feats.items()}, variants)
    return {v: compare.reduce_channels(d).cpu() for v, d in diffs.items()}


def _wanted(ps: probes.ProbeSet) -> dict[tuple[str, str], int]:
    """Every distinct (a, b) name pair the counts need, with its position."""
    refs = [f"reference_{r}" for r in probes.REFERENCES]
    wanted: list[tuple[str, str]] = []
    for pairs in ps.pairs.values():
        for o, v in pairs:
            wanted += [(o, v)] + [(o, r) for r in refs]
    for o, s, r in ps.triplets:
        wanted += [(o, s), (o, r)]
    return {p: i for i, p in enumerate(dict.fromkeys(wanted))}


def count_pairs(dv: Tensor, pos: Mapping[tuple[str, str], int], ps: probes.ProbeSet
                ) -> dict[str, tuple[int, int]]:
    """``{set: (correct, pairs)}`` from the distances ``dv[pos[(a, b)]]`` of one metric."""
    refs = [f"reference_{r}" for r in probes.REFERENCES]
    res = {}
    for set_name, pairs in ps.pairs.items():
        ok = sum(bool(dv[pos[(o, v)]] <= min(dv[pos[(o, r)]] for r in refs)) for o, v in pairs)
        res[set_name] = (int(ok), len(pairs))
    if ps.triplets:
        ok = sum(bool(dv[pos[(o, s)]] < dv[pos[(o, r)]]) for o, s, r in ps.triplets)
        res["stain"] = (int(ok), len(ps.triplets))
    return res


def count_correct(feats: Mapping[int, Tensor], names: Sequence[str], ps: probes.ProbeSet,
                  variants: Sequence[Variant]) -> dict[Variant, dict[str, tuple[int, int]]]:
    """``{variant: {set: (correct, pairs)}}`` (the rule of the module docstring).

    Args: feats: ``{tap: [N, ...]}`` features of the images ``names`` (row i = names[i]).
    """
    pos = _wanted(ps)  # every distinct (a, b) once, all in one batch
    d = probe_distances(feats, {n: i for i, n in enumerate(names)}, variants, list(pos))
    return {var: count_pairs(d[var], pos, ps) for var in variants}


def count_correct_pixel(x: Tensor, names: Sequence[str], ps: probes.ProbeSet, metric: str
                        ) -> dict[str, tuple[int, int]]:
    """``{set: (correct, pairs)}`` of the pixel baseline ``metric`` on the images ``x``
    ([N, 3, H, W] in [0, 1], row i = names[i])."""
    pos, index = _wanted(ps), {n: i for i, n in enumerate(names)}
    a = torch.tensor([index[p[0]] for p in pos], device=x.device)
    b = torch.tensor([index[p[1]] for p in pos], device=x.device)
    return count_pairs(pixel.distance(metric, x[a], x[b]).cpu(), pos, ps)


@torch.inference_mode()
def score(job: Job, config: Mapping[str, Any], net: str, images: Path, scores: Path
          ) -> pd.DataFrame:
    """Count the correct probe pairs of loss network ``net`` and write the summary rows.

    Args: config: the stage config (comparisons, channel_norm, normalize, image_size,
    images; a pixel baseline's has image_size and images only); net: ``arch/layer``;
    images: the probe folder or its manifest.json; scores: the output Parquet.
    Returns: the rows (scores schema).
    """
    lossnet = LossNet.parse(net)
    ps = probes.load(images)
    names = list(ps.images)
    # one image at a time: hand-made PNGs may differ in size before the resize. The batch
    # is made contiguous NCHW (to_images keeps the HWC permute's strides), then the job's
    # layout: on the CPU the convolutions' last bits depend on the layout, and the study's
    # numbers were made from NCHW batches
    size = int(config["image_size"])
    if lossnet.is_pixel:
        x = torch.cat([pixel.images64(ps.images[n][None], job.device, size) for n in names])
        counts: dict[Variant | None, dict[str, tuple[int, int]]] = {
            None: count_correct_pixel(x, names, ps, lossnet.layer)}
    else:
        x = job.to_device(torch.cat([to_images(ps.images[n][None], job.device, size)
                                     for n in names]).contiguous())
        extractor = job.extractor(lossnet, config["normalize"])
        with job.autocast():
            feats = {t: f.float() for t, f in extractor(x).items()}
        variants = compare.all_variants(config["comparisons"], config["channel_norm"])
        counts = dict(count_correct(feats, names, ps, variants))
    source = "generated" if str(config["images"]) == "generated" else "handmade"
    rows = [{"dataset": "probes", "split": set_name, "layer": lossnet.layer,
             "comparison": "" if v is None else v.method,
             "channel_norm": None if v is None else v.channel_norm, "variant": source,
             "metric": "correct", "value": float(ok), "n": n}
            for v, res in counts.items() for set_name, (ok, n) in res.items()]
    precision = pixel.PRECISION if lossnet.is_pixel else job.precision
    df = score_frame(rows, benchmark=BENCHMARK, arch=lossnet.arch,
                     **{**job.provenance(lossnet.arch), "precision": precision})
    write_parquet(df, scores)
    print(f"{scores}: {len(df)} rows ({lossnet.id}, {len(names)} images, device {job.device}, "
          f"{precision})")
    return df
