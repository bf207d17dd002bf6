"""LPIPS calibration's scoring: a calibrated model (``lin``, ``tune``, ``scratch``) or the lpips
package's shipped lin weights (``weights/v0.1/<alex|vgg|squeeze>.pth``, read by
:func:`workflow.models.adapter.load_lpips_lin`) on BAPPS val, 2AFC per subset + mean and JND
per subset + pooled, through the adaptation's :func:`workflow.benchmarks.adaptation.bapps_scores`
(docs/calibration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from workflow.archs import LossNet
from workflow.benchmarks.adaptation import bapps_scores
from workflow.benchmarks.calibration import BENCHMARK
from workflow.benchmarks.calibration_data import CalibrationError
from workflow.files import write_parquet
from workflow.job import Job
from workflow.lossnets import FeatureExtractor, build_extractor
from workflow.models.adapter import FusedAdapter, load_adapter, load_lpips_lin, tap_channels
from workflow.models.backbone import TrainableBackbone
from workflow.results import score_frame

__all__ = ["evaluate", "shipped"]


def _score(job: Job, config: Mapping[str, Any], lossnet: LossNet, extractor: FeatureExtractor,
           adapter: FusedAdapter, folder: Path, variant: str, run: int | None, scores: Path
           ) -> pd.DataFrame:
    rows = bapps_scores(job, extractor, adapter, adapter.variants, config, folder)
    out = []
    for row in rows:
        v, _ = adapter.variants[row.pop("_v")], row.pop("_r")
        out.append({**row, "comparison": v.method, "channel_norm": v.channel_norm,
                    "variant": variant, "run": run})
    provenance = job.provenance(lossnet.arch)
    if variant == "scratch":  # its backbone never came from lossnets.weights
        provenance["weights_id"] = "random"
    df = score_frame(out, benchmark=BENCHMARK, arch=lossnet.arch, layer=lossnet.layer,
                     **provenance)
    write_parquet(df, scores)
    mean = df[df["split"].isin(["mean", "pooled"])]
    print(mean[["comparison", "channel_norm", "dataset", "split", "value"]].to_string(index=False))
    return df


def evaluate(job: Job, config: Mapping[str, Any], net: str, run: int, model: Path,
             prepared: Mapping[str, Path], scores: Path) -> pd.DataFrame:
    """Score a calibrated model on BAPPS val (2AFC per subset + mean, JND per subset +
    pooled); rows of the model's variant (``lin``, ``tune``, ``scratch``: its meta). A
    ``tune`` / ``scratch`` file holds its backbone, loaded into a freshly built one (no
    weights file is read)."""
    lossnet = LossNet.parse(net)
    built: dict[str, TrainableBackbone] = {}

    def extra(meta: dict[str, Any]) -> dict[str, TrainableBackbone]:
        if meta.get("net") != lossnet.id:
            raise CalibrationError(f"{model} was trained for {meta.get('net')}, not "
                                   f"{lossnet.id}: rerun calibration_train")
        if meta.get("variant", "lin") == "lin":
            return {}
        ext = build_extractor(lossnet.arch, lossnets=[lossnet], weights="random",
                              weights_dir=job.weights_dir, normalize=config["normalize"])
        built["backbone"] = TrainableBackbone(ext)
        return dict(built)

    adapter, meta = load_adapter(model, job.device, extra)
    variant = str(meta.get("variant", "lin"))
    extractor = built.get("backbone") or job.extractor(lossnet, config["normalize"])
    return _score(job, config, lossnet, extractor, adapter, prepared["bapps"], variant, run,
                  scores)


def shipped(job: Job, config: Mapping[str, Any], net: str, model: Path,
            prepared: Mapping[str, Path], scores: Path) -> pd.DataFrame:
    """Score the lpips package's lin weights (``model``: its ``.pth`` file or folder) on BAPPS
    val; rows of variant ``lin-shipped``."""
    lossnet = LossNet.parse(net)
    extractor = job.extractor(lossnet, config["normalize"])
    channels = tap_channels(extractor, int(config["image_size"]), job.device)
    adapter = load_lpips_lin(model, lossnet, channels).to(job.device)
    return _score(job, config, lossnet, extractor, adapter, prepared["bapps"], "lin-shipped",
                  None, scores)
