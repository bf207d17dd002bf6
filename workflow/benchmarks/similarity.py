"""Benchmark 1, the similarity family: every loss network of one architecture on one dataset.

A job scores one dataset of ``similarity.datasets``: BAPPS here (2AFC and JND, below), the
MOS datasets and NIGHTS in :mod:`workflow.benchmarks.similarity_family` (SRCC / KRCC /
PLCC with intervals over references; NIGHTS 2AFC with this module's :class:`Scorer`).

One extractor covers every configured tap of the architecture (its layers 1..4 and its
LPIPS set); each batch of images passes through it once, and every comparison x
channel-normalisation variant of every loss network is computed from those features
(``workflow.compare``; its docstring fixes the normalisation convention: sum over channels,
mean over positions, sum over layers, as in BAPPS / LPIPS).

The pixel baselines (arch ``pixel``, docs/similarity.md) are one job of their own: every
chosen ``pixel/<metric>`` computed on the images themselves (:mod:`workflow.metrics.pixel`,
float64), no extractor and no weights. Their rows have layer = the metric, comparison ``""``
and channel_norm <NA>.

Outputs (BAPPS)
- per-sample Parquet: one row per (item, loss network, variant): 2AFC rows carry ``d0``,
  ``d1``, ``judge``; JND rows carry ``d``, ``same``.
- summary Parquet in the scores schema (:func:`workflow.metrics.similarity.bapps_rows`):
  2AFC per val subset and their plain mean (split ``mean``); JND average precision per
  subset and pooled (split ``pooled``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from workflow import compare
from workflow.archs import PIXEL, LossNet
from workflow.benchmarks import similarity_family as family
from workflow.benchmarks.similarity_family import variant_columns
from workflow.compare import Variant
from workflow.datasets import bapps
from workflow.files import write_parquet
from workflow.imaging import to_images
from workflow.job import Job
from workflow.lossnets import FeatureExtractor
from workflow.metrics import pixel
from workflow.metrics.similarity import bapps_rows
from workflow.reference_scoring import CPU_FORWARD_BYTES, Progress
from workflow.results import score_frame

__all__ = ["CPU_FORWARD_BYTES", "PixelScorer", "Scorer", "score"]

# CPU_FORWARD_BYTES (workflow.reference_scoring): one forward chunk's activations on the CPU


class Scorer:
    """Distances of every loss network x variant of one architecture, from one pass per item.

    Each image goes through the extractor once (a 2AFC reference serves p0 and p1); on the
    CPU a batch runs in chunks of items sized by :data:`CPU_FORWARD_BYTES`, and every chunk
    is scored before the next one's features are computed. Images and features are
    channels-last, the layout the chunked scoring of :func:`workflow.compare.grouped_diffs`
    is written for.
    """

    def __init__(self, job: Job, extractor: FeatureExtractor, nets: Sequence[LossNet],
                 variants: Sequence[Variant], image_size: int = 64,
                 forward_bytes: int | None = CPU_FORWARD_BYTES):
        self.job, self.extractor = job, extractor
        self.nets, self.variants, self.size = list(nets), list(variants), int(image_size)
        self.taps = sorted({t for n in self.nets for t in n.taps})
        self.forward_bytes = forward_bytes if job.device.type == "cpu" else None

    def items_per_pass(self, sets: int, n: int) -> int:
        """Items (each with ``sets`` images) per forward chunk: all ``n`` off the CPU."""
        if not self.forward_bytes:
            return max(1, n)
        per_item = sets * self.extractor.peak_activation_bytes(self.size)
        return max(1, min(n, self.forward_bytes // per_item))

    def features(self, images: Sequence[np.ndarray]) -> dict:
        """Features of the concatenated image sets: one forward pass for all of them."""
        x = torch.cat([to_images(a, self.job.device, self.size, channels_last=True)
                       for a in images])
        with self.job.autocast():
            return self.extractor(x)

    def _score(self, sets: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]]) -> dict:
        n = len(sets[0])
        step = self.items_per_pass(len(sets), n)
        parts = []
        for i in range(0, n, step):
            feats = self.features([a[i:i + step] for a in sets])
            diffs = compare.grouped_diffs(feats, len(sets), pairs, self.variants, self.taps)
            parts.append({(net.id, v): compare.reduce_channels({t: diffs[v][t] for t in net.taps})
                          for net in self.nets for v in self.variants})
            del feats, diffs
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts], dim=-1) for k in parts[0]}

    @torch.inference_mode()
    def twoafc(self, ref: np.ndarray, p0: np.ndarray, p1: np.ndarray
               ) -> dict[tuple[str, Variant], torch.Tensor]:
        """``[2, N]`` distances (d0; d1) per (loss network id, variant)."""
        # each reference's transforms are computed once and compared with p0 and p1
        return self._score([ref, p0, p1], [(1, 0), (2, 0)])

    @torch.inference_mode()
    def jnd(self, p0: np.ndarray, p1: np.ndarray) -> dict[tuple[str, Variant], torch.Tensor]:
        """``[N]`` distances per (loss network id, variant)."""
        return {k: v[0] for k, v in self._score([p0, p1], [(0, 1)]).items()}


class PixelScorer:
    """Distances of the pixel baselines ``pixel/<metric>``, keyed as :class:`Scorer`'s with
    variant None (a pixel baseline has no comparison method or channel normalisation)."""

    def __init__(self, job: Job, nets: Sequence[LossNet], image_size: int = 64):
        bad = [n.id for n in nets if not n.is_pixel]
        if bad:
            raise ValueError(f"PixelScorer scores pixel baselines only, got {bad}")
        self.job, self.nets, self.size = job, list(nets), int(image_size)

    def _images(self, a: np.ndarray) -> torch.Tensor:
        return pixel.images64(a, self.job.device, self.size)

    def _score(self, sets: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]]) -> dict:
        d = pixel.pair_distances([n.layer for n in self.nets], [self._images(a) for a in sets],
                                 pairs)
        return {(net.id, None): d[net.layer] for net in self.nets}

    @torch.inference_mode()
    def twoafc(self, ref: np.ndarray, p0: np.ndarray, p1: np.ndarray
               ) -> dict[tuple[str, None], torch.Tensor]:
        """``[2, N]`` distances (d0; d1) per (pixel baseline id, None)."""
        return self._score([ref, p0, p1], [(1, 0), (2, 0)])

    @torch.inference_mode()
    def jnd(self, p0: np.ndarray, p1: np.ndarray) -> dict[tuple[str, None], torch.Tensor]:
        """``[N]`` distances per (pixel baseline id, None)."""
        return {k: v[0] for k, v in self._score([p0, p1], [(0, 1)]).items()}


def _batched(fn, arrays: Sequence[np.ndarray], batch: int, label: str, progress: Progress
             ) -> dict:
    """Run ``fn`` over batches; concatenate the results per key (on the CPU, float64)."""
    n = len(arrays[0])
    parts: dict = {}
    for i in range(0, n, batch):
        for k, v in fn(*[a[i:i + batch] for a in arrays]).items():
            parts.setdefault(k, []).append(v.double().cpu())
        progress.update(min(batch, n - i), label)
    return {k: torch.cat(v, dim=-1).numpy().astype(np.float64) for k, v in parts.items()}


def _lossnets(config: Mapping[str, Any]) -> tuple[list[LossNet], str]:
    nets = [LossNet.parse(s) for s in config["lossnets"]]
    archs = {n.arch for n in nets}
    if len(archs) != 1:
        raise ValueError(f"config key lossnets must list loss networks of one architecture, "
                         f"got {sorted(archs) or 'none'}")
    return nets, archs.pop()


def score(job: Job, config: Mapping[str, Any], prepared: Mapping[str, Path], samples: Path,
          scores: Path) -> pd.DataFrame:
    """Score ``config["lossnets"]`` (one architecture's) on the prepared dataset
    ``config["dataset"]`` of the family (BAPPS, a MOS dataset, NIGHTS); write both tables.

    Returns the summary rows (scores schema).
    """
    nets, arch = _lossnets(config)
    dataset = str(config["dataset"])
    if dataset not in prepared:
        raise ValueError(f"similarity {dataset}: --prepared has no {dataset} folder "
                         f"(got {', '.join(prepared) or 'none'})")
    if arch == PIXEL:
        variants: list[Variant | None] = [None]
        taps, precision, extractor = "none (pixels)", pixel.PRECISION, None
    else:
        variants = list(compare.all_variants(config["comparisons"], config["channel_norm"]))
        extractor = job.extractor(nets, config["normalize"], channels_last=True)
        taps, precision = str(sorted({t for n in nets for t in n.taps})), job.precision
    print(f"{arch} on {dataset}: {len(nets)} loss networks x {len(variants)} variants, taps "
          f"{taps}, device {job.device}, {precision}", flush=True)
    if dataset == "bapps":
        rows, frame = _bapps(job, config, nets, variants, extractor, prepared["bapps"])
    else:
        def twoafc_scorer(size: int) -> Scorer | PixelScorer:
            return (PixelScorer(job, nets, size) if extractor is None
                    else Scorer(job, extractor, nets, variants, size))

        rows, frame = family.score(job, config, nets, variants, extractor, dataset,
                                   prepared[dataset], twoafc_scorer)
    if arch == PIXEL:  # piq's metrics compute in float32 (metrics.pixel.precision)
        rows = [{**r, "precision": pixel.precision(r["layer"])} for r in rows]
    summary = score_frame(rows, benchmark="similarity", arch=arch,
                          **{**job.provenance(arch), "precision": precision})
    frame["arch"] = arch
    write_parquet(_categories(frame), samples)
    write_parquet(summary, scores)
    best = summary[summary["split"].isin(["mean", "pooled", "all", "test"])]
    print(best[["layer", "comparison", "channel_norm", "dataset", "split", "metric", "value"]]
          .to_string(index=False))
    return summary


def _bapps(job, config, nets, variants, extractor, folder: Path) -> tuple[list, pd.DataFrame]:
    size = int(config["image_size"])
    pixel.check_size([n.layer for n in nets if n.is_pixel], size, size,
                     "config key similarity.image_size")
    scorer = (PixelScorer(job, nets, size) if extractor is None
              else Scorer(job, extractor, nets, variants, size))
    data = {("2afc", s): bapps.load(folder, "2afc", "val", s) for s in config["twoafc_subsets"]}
    data |= {("jnd", s): bapps.load(folder, "jnd", "val", s) for s in config["jnd_subsets"]}
    progress = Progress(sum(len(d["p0"]) for d in data.values()))
    batch = int(job.setting("batch_size"))
    dists = {}
    for (kind, subset), d in data.items():
        if kind == "2afc":
            dists[(kind, subset)] = _batched(scorer.twoafc, [d["ref"], d["p0"], d["p1"]], batch,
                                             f"2afc/{subset}", progress)
        else:
            dists[(kind, subset)] = _batched(scorer.jnd, [d["p0"], d["p1"]], batch,
                                             f"jnd/{subset}", progress)
    rows = []
    for net in nets:
        for v in variants:
            key = {"layer": net.layer, **variant_columns(v)}
            twoafc = {s: (*dists[("2afc", s)][(net.id, v)], data[("2afc", s)]["judge"])
                      for s in config["twoafc_subsets"]}
            jnd = {s: (dists[("jnd", s)][(net.id, v)], np.asarray(data[("jnd", s)]["same"]))
                   for s in config["jnd_subsets"]}
            rows += [{**key, **r} for r in bapps_rows(twoafc, jnd)]
    return rows, _samples_frame(nets, variants, data, dists)


def _samples_frame(nets, variants, data, dists) -> pd.DataFrame:
    frames = []
    for (kind, subset), d in data.items():
        n = len(d["p0"])
        names = np.asarray(d["names"]).astype(str)
        for net in nets:
            for v in variants:
                x = dists[(kind, subset)][(net.id, v)]
                f = {"dataset": f"bapps-{kind}", "split": subset, "item": np.arange(n),
                     "name": names, "layer": net.layer, **variant_columns(v)}
                if kind == "2afc":
                    f |= {"d0": x[0], "d1": x[1], "judge": np.asarray(d["judge"], np.float64)}
                else:
                    f |= {"d": x, "same": np.asarray(d["same"], np.float64)}
                frames.append(pd.DataFrame(f))
    return pd.concat(frames, ignore_index=True)


def _categories(df: pd.DataFrame) -> pd.DataFrame:
    for c in ("dataset", "split", "arch", "layer", "comparison"):
        df[c] = df[c].astype("category")
    df["channel_norm"] = df["channel_norm"].astype("boolean")
    return df
