"""``python -m workflow perf iqa``: scoring one architecture's loss networks on a MOS dataset.

(a) baseline: every distorted image compared with its reference by passing BOTH through
    the network (the reference's features recomputed for each of its distorted versions,
    what a pairwise metric call does);
(b) this project (:class:`workflow.reference_scoring.ReferenceScorer`): each reference's
    features and transforms computed once and compared with all its distorted versions.

Both score every loss network of the architecture (layers 1..4 and the LPIPS set where it
has one) x every comparison x channel-norm variant, on random images at TID2013's
resolution (384x512), with random weights (nothing is downloaded). The run is smaller than
TID2013 (25 references x 120 distorted images) and the TID2013 time is extrapolated per
forward image: (b) passes 3000 + 25 images, (a) 2 x 3000, each at the per-image time
measured here (the rows say so). Same device, process, batch and images; interleaved
repetitions; the two must agree (their largest relative difference is printed). Writes the
``iqa`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from workflow import compare
from workflow.archs import ARCHS, LPIPS_ARCHS, all_lossnets
from workflow.job import Job
from workflow.perf.report import add_run_options, machine_description, run_job, update_section
from workflow.reference_scoring import ReferenceScorer

TID2013 = {"refs": 25, "images": 3000}


class PerImageReference(ReferenceScorer):
    """The baseline: the reference goes through the network again with every chunk."""

    def _state(self, ref: np.ndarray):
        return ref

    def _chunk(self, state, dist: np.ndarray) -> dict:
        return super()._chunk(self._features(np.repeat(state, len(dist), axis=0)), dist)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(job: Job, arch: str, refs: int, per_ref: int, size: tuple[int, int], batch: int,
            repeats: int) -> dict:
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (refs, *size, 3), dtype=np.uint8)
    ref_index = np.repeat(np.arange(refs), per_ref)
    dist = np.clip(ref[ref_index] + rng.normal(0, 20, (len(ref_index), *size, 3)), 0, 255
                   ).astype(np.uint8)
    nets = all_lossnets([arch], lpips_sets=[arch] if arch in LPIPS_ARCHS else [])
    variants = list(compare.all_variants())
    extractor = job.extractor(nets, channels_last=True)
    ours = ReferenceScorer(job, extractor, nets, variants, image_size=size)
    base = PerImageReference(job, extractor, nets, variants, image_size=size)
    times: dict[str, list[float]] = {"ours": [], "base": []}
    results = {}
    for scorer, name in ((ours, "ours"), (base, "base")):  # warm-up
        results[name] = scorer.distances(ref[:1], dist[:1], ref_index[:1], batch)
    for _ in range(repeats):
        for scorer, name in ((ours, "ours"), (base, "base")):
            _sync(job.device)
            t0 = time.perf_counter()
            results[name] = scorer.distances(ref, dist, ref_index, batch)
            _sync(job.device)
            times[name].append(time.perf_counter() - t0)
    diff = max(float(np.max(np.abs(results["ours"][k] - results["base"][k])
                            / np.maximum(np.abs(results["base"][k]), 1e-12)))
               for k in results["ours"])
    t_ours, t_base = statistics.median(times["ours"]), statistics.median(times["base"])
    n = len(dist)
    per_image_ours = t_ours / (n + refs)  # forward images of (b): the distorted + references
    per_image_base = t_base / (2 * n)
    return {"arch": arch, "nets": len(nets), "variants": len(variants), "n": n, "refs": refs,
            "ours_ips": n / t_ours, "base_ips": n / t_base, "ratio": t_base / t_ours,
            "tid_ours_s": per_image_ours * (TID2013["images"] + TID2013["refs"]),
            "tid_base_s": per_image_base * 2 * TID2013["images"], "max_rel_diff": diff,
            "step": ours._step(batch)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf iqa")
    ap.add_argument("--archs", nargs="+", default=["alexnet", "squeezenet1_1"],
                    choices=list(ARCHS))
    ap.add_argument("--refs", type=int, default=2)
    ap.add_argument("--per-ref", type=int, default=8, help="distorted images per reference")
    ap.add_argument("--size", type=int, nargs=2, default=[384, 512], metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=128)  # the similarity config's batch_size
    ap.add_argument("--repeats", type=int, default=2)
    args = add_run_options(ap).parse_args(argv)
    job = run_job(args)
    size = (int(args.size[0]), int(args.size[1]))
    rows = []
    for arch in args.archs:
        r = measure(job, arch, args.refs, args.per_ref, size, args.batch, args.repeats)
        print(f"{arch}: ours {r['ours_ips']:.2f} images/s, per-image reference "
              f"{r['base_ips']:.2f} images/s, ratio {r['ratio']:.2f} ({r['nets']} loss networks "
              f"x {r['variants']} variants; agree to {r['max_rel_diff']:.1e}); TID2013 "
              f"extrapolated {r['tid_ours_s']:.0f} s vs {r['tid_base_s']:.0f} s", flush=True)
        rows.append(r)
    threads = torch.get_num_threads()
    md = [
        f"## iqa: MOS-dataset scoring, one pass per reference ({job.device.type}"
        + (f", {threads} thread{'s' if threads > 1 else ''})" if job.device.type == "cpu"
           else ")"),
        "",
        f"Machine: {machine_description(job.device)}; dtype {job.precision}; batch {args.batch}; "
        f"{args.refs} random references x {args.per_ref} distorted images at "
        f"{size[0]}x{size[1]} (TID2013's resolution), random weights; median of {args.repeats} "
        f"interleaved repetitions; 1-minute load average at the end {os.getloadavg()[0]:.1f}. "
        f"Command: `python -m workflow perf iqa{' '.join([''] + list(argv or []))}`.",
        "(a) the reference passed through the network again with every distorted image; (b) "
        "each reference's features and transforms once (`ReferenceScorer`). Both score every "
        "loss network of the architecture x every comparison variant. TID2013 (25 x 120 "
        "images) extrapolated from the per-forward-image time measured here: (b) 3025 "
        "images, (a) 6000.",
        "",
        "| arch | loss networks x variants | (a) images/s | (b) images/s | ratio (b)/(a) "
        "| TID2013 (a) / (b), s | items per forward | max rel. difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    md += [f"| {r['arch']} | {r['nets']} x {r['variants']} | {r['base_ips']:.2f} "
           f"| {r['ours_ips']:.2f} | {r['ratio']:.2f} | {r['tid_base_s']:.0f} / "
           f"{r['tid_ours_s']:.0f} | {r['step']} | {r['max_rel_diff']:.1e} |" for r in rows]
    if not args.no_write:
        key = f"iqa-{job.device.type}" if job.device.type != "cpu" else \
            f"iqa-cpu-{threads}thread"
        update_section(key, "\n".join(md), args.out)
    return 0
