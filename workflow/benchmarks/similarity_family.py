"""Benchmark 1 beyond BAPPS: the MOS datasets (TID2013, KADID-10k, CSIQ) and NIGHTS.

Wiring only, called by :func:`workflow.benchmarks.similarity.score` for a job whose
``config["dataset"]`` is not BAPPS:

* a MOS dataset: every distorted image's distance to its reference
  (:mod:`workflow.reference_scoring`: each reference's features once, each image through the
  network once, at the prepared resolution), then SRCC / KRCC / PLCC on all images and per
  distortion type with intervals over references (:func:`workflow.metrics.iqa.mos_rows`);
* NIGHTS: its test split scored as 2AFC triplets like BAPPS (the similarity benchmark's
  ``Scorer``), over all triplets and per subset, with intervals over triplets
  (:func:`workflow.metrics.iqa.twoafc_rows`).

Per-sample tables: MOS rows carry ``item``, ``ref_index``, ``dist_type``, ``level``, ``mos``
and ``d``; NIGHTS rows ``item``, ``subset``, ``d0``, ``d1``, ``judge``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow.archs import LossNet
from workflow.compare import Variant
from workflow.datasets import registry
from workflow.job import Job
from workflow.lossnets import FeatureExtractor
from workflow.metrics import iqa, pixel
from workflow.metrics.similarity import score_2afc
from workflow.reference_scoring import PixelReferenceScorer, Progress, ReferenceScorer

__all__ = ["MOS_DATASETS", "NIGHTS", "score", "variant_columns"]

MOS_DATASETS = ("tid2013", "kadid10k", "csiq")
NIGHTS = "nights"
NIGHTS_SPLIT = "test"


def variant_columns(v: Variant | None) -> dict[str, Any]:
    """comparison / channel_norm of a variant: "" / <NA> for a pixel baseline (None)."""
    if v is None:
        return {"comparison": "", "channel_norm": None}
    return {"comparison": v.method, "channel_norm": v.channel_norm}


def _manifest(folder: Path, dataset: str) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the manifest of prepared {dataset} ({e}); "
                         f"prepare it again (snakemake prepare_dataset)") from None
    if "higher_is_better" not in manifest and dataset in MOS_DATASETS:
        raise ValueError(f"{path}: no higher_is_better (MOS or DMOS?); prepare {dataset} again")
    return manifest


def score(job: Job, config: Mapping[str, Any], nets: Sequence[LossNet],
          variants: Sequence[Variant | None], extractor: FeatureExtractor | None, dataset: str,
          folder: Path, twoafc_scorer: Callable[[int], Any]) -> tuple[list, pd.DataFrame]:
    """Rows (scores schema, without the common columns) and the per-sample frame."""
    boot = config["bootstrap"]
    stats = int(boot["resamples"]), int(boot["seed"]), float(boot["level"])
    metrics = [n.layer for n in nets if n.is_pixel]
    batch = int(job.setting("batch_size"))
    if dataset == NIGHTS:
        data = registry.module(NIGHTS).load(folder, NIGHTS_SPLIT)
        h, w = data["ref"].shape[1:3]
        if h != w:
            raise ValueError(f"prepared {dataset} ({folder}): triplets of {h}x{w} px; NIGHTS is "
                             f"scored at its square prepared size (224); prepare it again")
        pixel.check_size(metrics, h, w, f"prepared {dataset} ({folder})")
        scorer = twoafc_scorer(int(h))
        progress = Progress(len(data["ref"]))
        parts: dict = {}
        for i in range(0, len(data["ref"]), batch):
            sl = slice(i, i + batch)
            for k, v in scorer.twoafc(data["ref"][sl], data["p0"][sl], data["p1"][sl]).items():
                parts.setdefault(k, []).append(v.double().cpu().numpy())
            progress.update(len(data["ref"][sl]), f"{dataset}/{NIGHTS_SPLIT}")
        dists = {k: np.concatenate(v, axis=-1) for k, v in parts.items()}
        rows, frames = [], []
        for net in nets:
            for v in variants:
                d0, d1 = dists[(net.id, v)]
                agree = score_2afc(d0, d1, data["judge"]).per_triplet
                key = {"layer": net.layer, **variant_columns(v)}
                rows += [{**key, **r} for r in iqa.twoafc_rows(
                    dataset, NIGHTS_SPLIT, agree, data["subset"], *stats)]
                frames.append(pd.DataFrame({
                    "dataset": dataset, "split": NIGHTS_SPLIT, "item": np.arange(len(d0)),
                    "subset": np.asarray(data["subset"]).astype(str), **key, "d0": d0,
                    "d1": d1, "judge": np.asarray(data["judge"], np.float64)}))
        return rows, pd.concat(frames, ignore_index=True)
    if dataset not in MOS_DATASETS:
        raise ValueError(f"similarity: unknown dataset {dataset!r} (config key "
                         f"similarity.datasets); known: bapps, {', '.join(MOS_DATASETS)}, "
                         f"{NIGHTS}")
    manifest = _manifest(folder, dataset)
    data = registry.module(dataset).load(folder)
    h, w = data["dist"].shape[1:3]
    pixel.check_size(metrics, h, w, f"prepared {dataset} ({folder})")
    ref_scorer = (PixelReferenceScorer(job, nets) if extractor is None
                  else ReferenceScorer(job, extractor, nets, variants,  # type: ignore[arg-type]
                                       image_size=(h, w)))
    progress = Progress(len(data["dist"]) + len(data["ref"]))
    progress.update(0, dataset)
    dists = ref_scorer.distances(data["ref"], data["dist"], data["ref_index"], batch,
                                 lambda n: progress.update(n, dataset))
    keyed = {(net.id, v): dists[(net.id, v)] for net in nets for v in variants}
    by_key = iqa.mos_rows(dataset, keyed, data, bool(manifest["higher_is_better"]), *stats)
    rows, frames, linear = [], [], 0
    for net in nets:
        for v in variants:
            key = {"layer": net.layer, **variant_columns(v)}
            for r in by_key[(net.id, v)]:
                linear += r.pop("fit", "logistic") == "linear"
                rows.append({**key, **r})
            frames.append(pd.DataFrame({
                "dataset": dataset, "split": "all", "item": np.arange(len(data["dist"])),
                "ref_index": np.asarray(data["ref_index"], np.int64),
                "dist_type": np.asarray(data["dist_type"]).astype(str),
                "level": np.asarray(data["level"], np.int64), **key,
                "mos": np.asarray(data["mos"], np.float64), "d": dists[(net.id, v)]}))
    if linear:
        print(f"  plcc: the logistic fit did not converge in {linear} group(s); those report "
              f"the linear PLCC (docs/similarity.md)", flush=True)
    return rows, pd.concat(frames, ignore_index=True)

