"""``python -m workflow perf adaptation``: fused adaptation vs one metric at a time.

For each LPIPS loss network, times training steps of the fused adapter (every
comparison x ranking metric on one extractor pass per batch) and steps of single
metrics trained alone (each its own distortion draw, extractor pass, per-channel
differences, weights and ranking net: what one process per metric would do). Steps
of the same batch size take the same time for every ranking, so the separate cost
of a network is ``rankings x sum over comparisons of t(comparison)``; the runs
factor is the same on both sides. Process start-up and model loading of the
separate processes are left out, so the ratio is a lower bound. The projection for
the whole grid sums the networks.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch

from workflow.archs import LossNet
from workflow.benchmarks.adaptation import adaptation_step
from workflow.compare import METHODS, Variant
from workflow.datasets.bank import ImageBank
from workflow.distortions import positions, random_rankings
from workflow.job import Job
from workflow.models.adapter import FusedAdapter, make_optimizer, tap_channels
from workflow.perf.report import machine_description, update_section


def _time_steps(job: Job, extractor, adapter: FusedAdapter, bank: ImageBank, pos, batch: int,
                steps: int, warmup: int) -> float:
    """Seconds per optimisation step (distort, extract, compare, loss, backward, Adam, clamp),
    as the trainer runs it (under the job's autocast)."""
    device = job.device
    opt = make_optimizer(adapter, 1e-3, (0.5, 0.999))
    gen = torch.Generator(device=device).manual_seed(0)

    def one() -> None:
        idx = torch.randint(0, len(bank), (batch,), device=device, generator=gen)
        opt.zero_grad(set_to_none=True)
        with job.autocast():
            loss, _ = adaptation_step(job, extractor, adapter, bank, idx, pos, 64, gen)
        loss.backward()
        opt.step()
        adapter.clamp_()

    for _ in range(warmup):
        one()
    # CUDA: wall time. CPU: this process's CPU time, which a shared, loaded machine (other
    # jobs competing for the cores) does not inflate the way it inflates wall time.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - t0) / steps


def _setup(job: Job, net: LossNet, rankings: int):
    device = job.device
    extractor = job.extractor(net)
    channels = tap_channels(extractor, 64, device)
    rng = np.random.default_rng(0)
    bank = ImageBank(rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8), device)  # SVHN-shaped
    pos = positions(random_rankings(rankings, 0)).to(device)
    return extractor, channels, bank, pos


def fused_step_s(job: Job, net: LossNet, rankings: int, methods: Sequence[str], batch: int,
                 steps: int, warmup: int) -> float:
    """Seconds per step of the fused adapter of ``rankings`` x ``methods`` (channel-normalised)
    metrics of ``net``, as the trainer runs it."""
    extractor, channels, bank, pos = _setup(job, net, rankings)
    fused = FusedAdapter(channels, [Variant(m, True) for m in methods],
                         range(rankings)).to(job.device)
    return _time_steps(job, extractor, fused, bank, pos, batch, steps, warmup)


def bench_net(job: Job, net: LossNet, rankings: int, methods: Sequence[str], batch: int,
              steps: int, warmup: int) -> dict:
    device = job.device
    extractor, channels, bank, pos = _setup(job, net, rankings)
    variants = [Variant(m, True) for m in methods]
    fused = FusedAdapter(channels, variants, range(rankings)).to(device)
    t_fused = _time_steps(job, extractor, fused, bank, pos, batch, steps, warmup)
    per_method = {}
    for v in variants:  # one ranking per comparison: the ranking does not change the cost
        single = FusedAdapter(channels, [v], [0]).to(device)
        per_method[v.method] = _time_steps(job, extractor, single, bank, pos[:1], batch, steps,
                                           warmup)
    t_separate = rankings * sum(per_method.values())
    return {"net": net.id, "fused_s": t_fused, "per_method_s": per_method,
            "separate_s": t_separate, "speedup": t_separate / t_fused,
            "metrics": rankings * len(variants)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf adaptation")
    ap.add_argument("--nets", nargs="+",
                    default=["alexnet/lpips", "vgg16/lpips", "squeezenet1_1/lpips"])
    ap.add_argument("--rankings", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--runs", type=int, default=4, help="runs per network (same factor both sides)")
    ap.add_argument("--batch", type=int, default=None, help="default: 1024 on CUDA, 32 on CPU")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps (default: 10 on CUDA, 2 on CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--weights", default="random",
                    help="random | imagenet (speed does not depend on it)")
    ap.add_argument("--weights-dir", default="resources/weights")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="BENCHMARKS.md", help="the file whose section is written")
    ap.add_argument("--no-report", action="store_true",
                    help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    job = Job.create({"precision": args.precision, "weights": args.weights},
                     {"device": args.device, "threads": args.threads,
                      "weights_dir": args.weights_dir})
    device, precision = job.device, job.precision
    batch = args.batch or (1024 if device.type == "cuda" else 32)
    steps = args.steps or (10 if device.type == "cuda" else 2)
    results = []
    for name in args.nets:
        r = bench_net(job, LossNet.parse(name), args.rankings, args.methods, batch, steps,
                      args.warmup)
        results.append(r)
        print(f"{r['net']}: fused {r['fused_s']:.3f} s/step for {r['metrics']} metrics; separate "
              f"{r['separate_s']:.3f} s/step; speed-up {r['speedup']:.1f}x", flush=True)
    fused_total = args.runs * sum(r["fused_s"] for r in results)
    separate_total = args.runs * sum(r["separate_s"] for r in results)
    grid = separate_total / fused_total
    lines = [
        "## Adaptation: fused training vs one metric at a time",
        "",
        f"Machine: {machine_description(device)}; precision {precision}; batch {batch}; "
        f"{steps} timed steps after {args.warmup} warm-up; {args.rankings} rankings x "
        f"{len(args.methods)} comparisons (channel-normalised); weights {args.weights}; "
        "SVHN-shaped inputs resized to 64x64.",
        f"Times are {'wall' if device.type == 'cuda' else 'process CPU'} seconds per step. "
        "Separate = rankings x sum over comparisons of the step time of one metric trained alone "
        "(its own distortion draw, extractor pass and comparison); process start-up excluded, so "
        "the speed-ups are lower bounds.",
        "",
        "| loss network | fused s/step | separate s/step (all metrics) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['net']} | {r['fused_s']:.4f} | {r['separate_s']:.3f} | {r['speedup']:.1f}x |"
              for r in results]
    per_method = "; ".join(f"{r['net']}: " + ", ".join(f"{m} {t:.3f}"
                                                       for m, t in r["per_method_s"].items())
                           for r in results)
    lines += ["", f"Projected whole grid ({len(results)} networks x {len(args.methods)} "
                  f"comparisons x {args.rankings} rankings x {args.runs} runs): {grid:.1f}x faster "
                  f"fused (target >= 20x).", "",
              f"Per-comparison step time of one metric alone (s): {per_method}"]
    md = "\n".join(lines)
    print(md)
    if not args.no_report:
        update_section("adaptation", md, args.out)
    return 0
