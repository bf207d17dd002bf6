"""Benchmark 1 (BAPPS): 2AFC and JND scores of every loss network of one architecture.

One extractor covers every configured tap of the architecture (its layers 1..4
and its LPIPS set); each batch of images passes through it once, and every
comparison x channel-normalisation variant of every loss network is computed
from those features (``workflow.compare``; its docstring fixes the
normalisation convention: sum over channels, mean over positions, sum over
layers, as in BAPPS / LPIPS).

Outputs
- per-sample Parquet: one row per (item, loss network, variant): 2AFC rows carry
  ``d0``, ``d1``, ``judge``; JND rows carry ``d``, ``same``.
- summary Parquet in the scores schema: 2AFC per val subset and their plain mean
  (split ``mean``); JND average precision per subset and pooled (split ``pooled``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from workflow import compare
from workflow.compare import Variant
from workflow.config import json_arg
from workflow.datasets import bapps
from workflow.lossnets import FeatureExtractor, LossNet, build_extractor, weights_id
from workflow.metrics.similarity import jnd_average_precision, score_2afc
from workflow.results import config_hash, score_frame, write_parquet
from workflow.runtime import autocast, configure, job_threads, pick_device, resolve_precision

DEFAULTS = {
    "comparisons": list(compare.METHODS),
    "channel_norm": [True, False],
    "normalize": "imagenet",
    "image_size": 64,
    "batch_size": 128,
    "twoafc_subsets": list(bapps.TWOAFC_SUBSETS["val"]),
    "jnd_subsets": list(bapps.JND_SUBSETS),
}


def to_images(batch: np.ndarray, device: torch.device, size: int) -> torch.Tensor:
    """uint8 NHWC -> float [0, 1] NCHW on ``device``, resized on the device if needed."""
    x = torch.from_numpy(np.array(batch)).to(device, non_blocking=True)  # copy: mmap is read-only
    x = x.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous(memory_format=torch.channels_last)


# Bytes of one forward chunk's activations on the CPU (all image sets together, the
# largest tensor of the pass): far below glibc's mmap threshold, so every pass reuses the
# heap instead of faulting in fresh pages (lossnets.FeatureExtractor.peak_activation_bytes;
# measured in BENCHMARKS.md "similarity"). Devices with a caching allocator take a whole batch.
CPU_FORWARD_BYTES = 24 << 20


class Scorer:
    """Distances of every loss network x variant of one architecture, from one pass per item.

    Each image goes through the extractor once (a 2AFC reference serves p0 and p1); on the
    CPU a batch runs in chunks of items sized by :data:`CPU_FORWARD_BYTES`, and every chunk
    is scored before the next one's features are computed.
    """

    def __init__(self, extractor: FeatureExtractor, nets: Sequence[LossNet], variants: Sequence[Variant],
                 device: torch.device, precision: str, image_size: int = 64,
                 forward_bytes: int | None = CPU_FORWARD_BYTES):
        self.extractor, self.nets, self.variants = extractor, list(nets), list(variants)
        self.device, self.precision, self.size = device, precision, image_size
        self.taps = sorted({t for n in self.nets for t in n.taps})
        self.forward_bytes = forward_bytes if device.type == "cpu" else None

    def items_per_pass(self, sets: int, n: int) -> int:
        """Items (each with ``sets`` images) per forward chunk: all ``n`` off the CPU."""
        if not self.forward_bytes:
            return max(1, n)
        per_item = sets * self.extractor.peak_activation_bytes(self.size)
        return max(1, min(n, self.forward_bytes // per_item))

    def features(self, images: Sequence[np.ndarray]) -> dict:
        """Features of the concatenated image sets: one forward pass for all of them."""
        x = torch.cat([to_images(a, self.device, self.size) for a in images])
        with autocast(self.device, self.precision):
            return self.extractor(x)

    def _distances(self, diffs: Mapping) -> dict[tuple[str, Variant], torch.Tensor]:
        return {(net.id, v): compare.reduce_channels({t: diffs[v][t] for t in net.taps})
                for net in self.nets for v in self.variants}

    def _score(self, sets: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]]) -> dict:
        n = len(sets[0])
        step = self.items_per_pass(len(sets), n)
        parts = []
        for i in range(0, n, step):
            feats = self.features([a[i:i + step] for a in sets])
            diffs = compare.grouped_diffs(feats, len(sets), pairs, self.variants, self.taps)
            parts.append(self._distances(diffs))
            del feats, diffs
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts], dim=-1) for k in parts[0]}

    @torch.inference_mode()
    def twoafc(self, ref: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> dict[tuple[str, Variant], torch.Tensor]:
        """``[2, N]`` distances (d0; d1) per (loss network id, variant)."""
        # each reference's transforms are computed once and compared with p0 and p1
        return self._score([ref, p0, p1], [(1, 0), (2, 0)])

    @torch.inference_mode()
    def jnd(self, p0: np.ndarray, p1: np.ndarray) -> dict[tuple[str, Variant], torch.Tensor]:
        """``[N]`` distances per (loss network id, variant)."""
        return {k: v[0] for k, v in self._score([p0, p1], [(0, 1)]).items()}


def _batched(scorer_fn, arrays: Sequence[np.ndarray], batch: int, label: str, progress: dict):
    """Run ``scorer_fn`` over batches; concatenate the results per key (on the CPU)."""
    n = len(arrays[0])
    parts: dict = {}
    for i in range(0, n, batch):
        out = scorer_fn(*[a[i:i + batch] for a in arrays])
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().cpu())
        progress["done"] += min(batch, n - i)
        now = time.perf_counter()
        if now - progress["last"] > 10 or progress["done"] == progress["total"]:
            rate = progress["done"] / max(now - progress["t0"], 1e-9)
            print(f"  {label}: {progress['done']}/{progress['total']} images-sets "
                  f"({rate:.1f}/s)", flush=True)
            progress["last"] = now
    return {k: torch.cat(v, dim=-1).numpy().astype(np.float64) for k, v in parts.items()}


def score(arch: str, cfg: Mapping[str, Any], lossnet: Mapping[str, Any], common: Mapping[str, Any],
          prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-sample and summary tables for every configured loss network of ``arch``."""
    t_start = time.perf_counter()
    cfg = {**DEFAULTS, **cfg}
    nets = [LossNet.parse(s) for s in lossnet.get("lossnets", [])] or None
    if nets is None:
        raise ValueError(f"no similarity loss networks given for {arch} (--lossnet key 'lossnets')")
    if any(n.arch != arch for n in nets):
        raise ValueError(f"--lossnet lists {[n.id for n in nets if n.arch != arch]}, not {arch} networks")
    variants = compare.all_variants(cfg["comparisons"], cfg["channel_norm"])
    device = pick_device(common.get("device", "auto"))
    precision = resolve_precision(common.get("precision", "auto"), device)
    configure(device, precision)
    extractor = build_extractor(arch, lossnets=nets, weights=lossnet.get("weights", "imagenet"),
                                weights_dir=lossnet.get("weights_dir", "resources/weights"),
                                normalize=cfg["normalize"], seed=int(lossnet.get("seed", 0)))
    extractor = extractor.to(device).to(memory_format=torch.channels_last)
    scorer = Scorer(extractor, nets, variants, device, precision, int(cfg["image_size"]))

    data = {("2afc", s): bapps.load(prepared, "2afc", "val", s) for s in cfg["twoafc_subsets"]}
    data |= {("jnd", s): bapps.load(prepared, "jnd", "val", s) for s in cfg["jnd_subsets"]}
    total = sum(len(d["p0"]) for d in data.values())
    print(f"{arch}: {len(nets)} loss networks x {len(variants)} variants, taps {scorer.taps}, "
          f"{total} items, device {device}, {precision}", flush=True)
    progress = {"done": 0, "total": total, "t0": time.perf_counter(), "last": 0.0}
    batch = int(cfg["batch_size"])
    dists = {}
    for (kind, subset), d in data.items():
        if kind == "2afc":
            dists[(kind, subset)] = _batched(scorer.twoafc, [d["ref"], d["p0"], d["p1"]], batch,
                                             f"2afc/{subset}", progress)
        else:
            dists[(kind, subset)] = _batched(scorer.jnd, [d["p0"], d["p1"]], batch,
                                             f"jnd/{subset}", progress)
    samples = _samples_frame(arch, nets, variants, data, dists)
    rows = _summary_rows(nets, variants, data, dists, cfg)
    summary = score_frame(
        rows, benchmark="similarity", arch=arch,
        config_hash=config_hash(cfg), weights_id=weights_id(arch, lossnet.get("weights", "imagenet")),
        device=str(device), precision=precision, wall_time_s=time.perf_counter() - t_start,
    )
    return samples, summary


def _samples_frame(arch, nets, variants, data, dists) -> pd.DataFrame:
    frames = []
    for (kind, subset), d in data.items():
        n = len(d["p0"])
        names = np.asarray(d["names"]).astype(str)
        for net in nets:
            for v in variants:
                x = dists[(kind, subset)][(net.id, v)]
                f = {"dataset": f"bapps-{kind}", "split": subset, "item": np.arange(n), "name": names,
                     "arch": arch, "layer": net.layer, "comparison": v.method,
                     "channel_norm": v.channel_norm}
                if kind == "2afc":
                    f |= {"d0": x[0], "d1": x[1], "judge": np.asarray(d["judge"], np.float64)}
                else:
                    f |= {"d": x, "same": np.asarray(d["same"], np.float64)}
                frames.append(pd.DataFrame(f))
    df = pd.concat(frames, ignore_index=True)
    for c in ("dataset", "split", "arch", "layer", "comparison"):
        df[c] = df[c].astype("category")
    return df


def _summary_rows(nets, variants, data, dists, cfg) -> list[dict]:
    rows = []
    for net in nets:
        for v in variants:
            key = {"layer": net.layer, "comparison": v.method, "channel_norm": v.channel_norm}
            subset_scores, total_n = [], 0
            for s in cfg["twoafc_subsets"]:
                d0, d1 = dists[("2afc", s)][(net.id, v)]
                val = score_2afc(d0, d1, data[("2afc", s)]["judge"]).mean
                rows.append({**key, "dataset": "bapps-2afc", "split": s, "metric": "2afc",
                             "value": val, "n": len(d0)})
                subset_scores.append(val)
                total_n += len(d0)
            if subset_scores:
                # the study's 2AFC: the plain (unweighted) mean of the val subsets
                rows.append({**key, "dataset": "bapps-2afc", "split": "mean", "metric": "2afc",
                             "value": float(np.mean(subset_scores)), "n": total_n})
            all_d, all_same = [], []
            for s in cfg["jnd_subsets"]:
                dd, same = dists[("jnd", s)][(net.id, v)], np.asarray(data[("jnd", s)]["same"])
                rows.append({**key, "dataset": "bapps-jnd", "split": s, "metric": "jnd_ap",
                             "value": jnd_average_precision(dd, same), "n": len(dd)})
                all_d.append(dd)
                all_same.append(same)
            if all_d:
                rows.append({**key, "dataset": "bapps-jnd", "split": "pooled", "metric": "jnd_ap",
                             "value": jnd_average_precision(np.concatenate(all_d), np.concatenate(all_same)),
                             "n": sum(len(x) for x in all_d)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow benchmarks.similarity")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="2AFC and JND of every configured loss network of one arch")
    s.add_argument("--arch", required=True)
    s.add_argument("--config", required=True, type=json_arg, help="config key similarity (JSON)")
    s.add_argument("--lossnet", required=True, type=json_arg,
                   help="lossnet_params(config, arch) plus 'lossnets': the arch/layer ids to score")
    s.add_argument("--common", required=True, type=json_arg, help="device, precision, ... (JSON)")
    s.add_argument("--prepared", required=True, type=Path, help="prepared BAPPS folder")
    s.add_argument("--out-samples", required=True, type=Path)
    s.add_argument("--out-summary", required=True, type=Path)
    s.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or job_threads(torch.get_num_threads()))
    try:
        samples, summary = score(args.arch, args.config, args.lossnet, args.common, args.prepared)
    except (bapps.BappsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_parquet(samples, args.out_samples)
    write_parquet(summary, args.out_summary)
    best = summary[summary["split"].isin(["mean", "pooled"])]
    print(best[["layer", "comparison", "channel_norm", "dataset", "split", "value"]].to_string(index=False))
    print(f"wrote {args.out_samples} ({len(samples)} rows) and {args.out_summary} ({len(summary)} rows)")
    return 0
