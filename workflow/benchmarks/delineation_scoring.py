"""Benchmark 3's scoring of a U-Net (docs/delineation.md): per-tile counts and scores at full
resolution (tiled inference) or under the reference protocol (tiles resized, one forward), and
their pooled summary rows. Used by :mod:`workflow.benchmarks.delineation` (model selection and
``evaluate``) and its fused mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from workflow.imaging import masks_to_float, resize, to_images
from workflow.job import Job
from workflow.metrics.delineation import COUNT_KEYS, match_counts, scores_from_counts
from workflow.models.unet import RefinementUNet, predict_tiled

__all__ = ["match_name", "score_tiles", "summarize"]



def score_tiles(job: Job, model: RefinementUNet, tiles: Mapping[str, np.ndarray],
                config: Mapping[str, Any], passes: Sequence[int], tolerances: Sequence[int],
                reference: bool = False, chunk: int = 4) -> pd.DataFrame:
    """Per-tile counts and scores for every pass in ``passes`` and every tolerance.

    ``reference``: the reference protocol (tiles resized to ``reference_size``, one forward
    over the whole resized tile); otherwise full resolution with tiled inference. Tiles are
    read from the memory map ``chunk`` at a time, so the test set never has to fit.
    """
    sat, maps = tiles["sat"], tiles["map"]
    k_max = max(passes)
    rows = []
    for start in range(0, len(sat), chunk):
        img = to_images(sat[start:start + chunk], job.device)
        ref = masks_to_float(torch.from_numpy(np.array(maps[start:start + chunk])).to(job.device))
        if reference:
            # maps are resampled like the images, then road where >= 0.5 (stays binary)
            size = int(config["reference_size"])
            img, ref = resize(img, size), (resize(ref, size) >= 0.5).float()
            model.eval()
            with torch.no_grad(), job.autocast():
                preds = [p.float() for p in model.refine(img, k_max)]
        else:
            preds = predict_tiled(model, img, k_max, tile=int(job.setting("tile_size")),
                                  margin=int(config["tile_margin"]),
                                  batch=int(job.setting("inference_batch")),
                                  autocast=job.autocast)
        for k in passes:
            for tol in tolerances:
                counts = match_counts(preds[k - 1], ref, config["threshold"], tol)
                for j in range(len(img)):
                    c = {key: int(counts[key][j]) for key in COUNT_KEYS}
                    rows.append({"tile": start + j, "passes": k, "tolerance": tol, **c,
                                 **scores_from_counts(c)})
    return pd.DataFrame(rows)


def match_name(tolerance: int) -> str:
    """The ``match`` of a tolerance: ``exact`` (0 px) or ``relaxed``."""
    return "exact" if tolerance == 0 else "relaxed"


def summarize(tiles: pd.DataFrame) -> list[dict[str, Any]]:
    """Pooled counts (every pixel weighs alike) per protocol, pass and tolerance -> score rows."""
    rows = []
    for (protocol, split, k, tol), g in tiles.groupby(["protocol", "split", "passes",
                                                       "tolerance"], sort=True):
        pooled = {key: int(g[key].sum()) for key in COUNT_KEYS}
        variant = f"reference/K{k}" if protocol == "reference" else f"K{k}/{match_name(int(tol))}"
        for metric, value in scores_from_counts(pooled).items():
            rows.append({"split": split, "variant": variant, "metric": metric, "value": value,
                         "n": len(g)})
    return rows
