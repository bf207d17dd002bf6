"""``python -m workflow perf similarity``: BAPPS 2AFC scoring throughput.

(a) the ``lpips`` package scoring ONE variant (LPIPS: its LPIPS layer set,
    channel-normalised spatial distance with its shipped linear weights), two
    calls per triplet (ref vs p0, ref vs p1), as its own 2AFC evaluation does;
(b) this project scoring ALL comparison x channel-norm variants of ALL taps of
    the same architecture (layers 1..4 and the LPIPS set) from one pass.

Same device, same process, same batch, same random images, interleaved
repetitions; the backbone is randomly initialised in both (``pnet_rand=True``),
so nothing is downloaded. Writes the ``similarity`` section of BENCHMARKS.md.
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
from workflow.archs import all_lossnets
from workflow.benchmarks.similarity import Scorer
from workflow.imaging import to_images
from workflow.job import Job
from workflow.perf.report import add_run_options, machine_description, run_job, update_section

LPIPS_NET = {"alexnet": "alex", "squeezenet1_1": "squeeze", "vgg16": "vgg"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(job: Job, arch: str, n: int, batch: int, repeats: int) -> dict:
    import lpips

    device = job.device
    rng = np.random.default_rng(0)
    ref, p0, p1 = (rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8) for _ in range(3))
    # the package's users hand it ordinary (contiguous NCHW) tensors
    batches = [tuple(to_images(a[i:i + batch], device, 64).contiguous() for a in (ref, p0, p1))
               for i in range(0, n, batch)]

    baseline = lpips.LPIPS(net=LPIPS_NET[arch], pretrained=True, lpips=True, pnet_rand=True,
                           verbose=False).to(device).eval()

    @torch.inference_mode()
    def run_lpips() -> None:
        for r, a, b in batches:  # LPIPS takes [-1, 1] input; normalize=True maps [0, 1] onto it
            with job.autocast():
                baseline(r, a, normalize=True)
                baseline(r, b, normalize=True)

    nets = all_lossnets([arch], lpips_sets=[arch])
    variants = compare.all_variants()
    extractor = job.extractor(nets, "imagenet", channels_last=True)
    scorer = Scorer(job, extractor, nets, variants)

    def run_ours() -> None:
        for i in range(0, n, batch):
            scorer.twoafc(ref[i:i + batch], p0[i:i + batch], p1[i:i + batch])

    step = scorer.items_per_pass(3, batch)

    @torch.inference_mode()
    def run_forward() -> None:  # (b) without the scoring, in (b)'s chunks: the bound on (b)
        for i in range(0, n, step):
            scorer.features([ref[i:i + step], p0[i:i + step], p1[i:i + step]])

    conv_x, conv = conv_ceiling_case(device)

    @torch.inference_mode()
    def run_ceiling() -> None:  # one large channels_last convolution: the core's conv ceiling
        conv(conv_x)

    runs = (("lpips", run_lpips), ("ours", run_ours), ("forward", run_forward),
            ("ceiling", run_ceiling))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _, fn in runs:  # warm-up (allocator, kernels) for every contender
        fn()
    for _ in range(repeats):
        for name, fn in runs:
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["lpips"]), statistics.median(times["ours"])
    f = statistics.median(times["forward"])
    flops = forward_flops(extractor, 64)  # per image, multiply-adds counted as 2
    ceiling = conv_flops(conv, conv_x) / statistics.median(times["ceiling"])
    return {"arch": arch, "nets": len(nets), "variants": len(variants), "step": step,
            "lpips_tps": n / a, "ours_tps": n / b, "ratio": a / b, "fwd_ratio": a / f,
            "fwd_gflops": 3 * n * flops / f / 1e9, "lpips_gflops": 4 * n * flops / a / 1e9,
            "ceiling_gflops": ceiling / 1e9}


def _reading(rows: Sequence[dict]) -> str:
    """What the table says, recomputed from this run's numbers."""
    best = max(rows, key=lambda r: r["ratio"])
    worst = min(rows, key=lambda r: r["ratio"])
    bound = [r["arch"] for r in rows if r["fwd_gflops"] >= 0.8 * r["ceiling_gflops"]]
    text = (f"Scoring every variant of every loss network runs {worst['ratio']:.2f}x "
            f"({worst['arch']}) to {best['ratio']:.2f}x ({best['arch']}) as fast as the package "
            f"scoring one. The package runs 4 backbone passes per triplet (the reference "
            f"twice), this project 3, so \"forward only\" bounds the ratio whatever the scoring "
            f"costs.")
    if bound:
        text += (f" The forward pass of {', '.join(bound)} reaches at least 80% of the measured "
                 f"conv ceiling: there the backbone's FLOPs, the same for both sides, decide.")
    return text


def forward_flops(extractor: torch.nn.Module, size: int) -> float:
    """FLOPs of one image's pass through ``extractor`` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(extractor.parameters())
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        extractor(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    return float(counter.get_total_flops())


def conv_ceiling_case(device: torch.device) -> tuple[torch.Tensor, torch.nn.Module]:
    """A large, well-shaped convolution (256 -> 256 channels, 3x3, 16x16 maps, batch 64,
    channels_last): what the backend reaches on this core when nothing else limits it."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device).to(memory_format=torch.channels_last)
    x = torch.rand(64, 256, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    return x, conv.eval()


def conv_flops(conv: torch.nn.Conv2d, x: torch.Tensor) -> float:
    n, _, h, w = x.shape
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2.0 * n * h * w * conv.out_channels * conv.in_channels * k


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf similarity")
    ap.add_argument("--archs", nargs="+", default=["alexnet", "squeezenet1_1", "vgg16"],
                    choices=list(LPIPS_NET))
    ap.add_argument("--triplets", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)  # the similarity config's batch_size
    ap.add_argument("--repeats", type=int, default=3)
    args = add_run_options(ap).parse_args(argv)
    job = run_job(args)
    device, precision = job.device, job.precision
    rows = []
    for arch in args.archs:
        r = measure(job, arch, args.triplets, args.batch, args.repeats)
        print(f"{arch}: lpips {r['lpips_tps']:.1f} triplets/s (1 variant), ours "
              f"{r['ours_tps']:.1f} triplets/s ({r['nets']} loss networks x {r['variants']} "
              f"variants), ratio {r['ratio']:.2f} (forward only {r['fwd_ratio']:.2f}; forward "
              f"{r['fwd_gflops']:.0f} GFLOP/s, conv ceiling {r['ceiling_gflops']:.0f})", flush=True)
        rows.append(r)
    md = [
        f"## similarity: BAPPS 2AFC scoring ({device.type}"
        + (f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
           if device.type == "cpu" else ")"),
        "",
        f"Machine: {machine_description(device)}; dtype {precision}; batch {args.batch} triplets; "
        f"{args.triplets} random 64x64 triplets; median of {args.repeats} interleaved repetitions; "
        f"1-minute load average at the end {os.getloadavg()[0]:.1f} (a shared machine slows "
        "all columns alike).",
        "(a) `lpips.LPIPS(lpips=True)` scoring one variant (two calls per triplet); (b) this "
        "project scoring every comparison x channel-norm variant of every loss network of the "
        "architecture (layers 1-4 and the LPIPS set) from one forward pass. Command: "
        f"`python -m workflow perf similarity{' '.join([''] + list(argv or []))}`. Both sides: "
        "same threads, inference mode, one "
        "warm-up run each; the package gets ordinary NCHW tensors, as its users pass them. "
        "\"forward only\": (b)'s backbone pass alone, timed in the same interleaved loop.",
        "",
        "Forward GFLOP/s: the backbone's FLOPs (torch.utils.flop_counter) over the time of "
        "\"forward only\" (ours) and of (a) (the package, 4 passes per triplet, its scoring "
        "included); \"conv ceiling\": one large 256->256 3x3 channels_last convolution timed in "
        "the same loop, what this core's backend reaches when nothing else limits it.",
        "",
        "| arch | (a) lpips, triplets/s | (b) ours, triplets/s | loss networks x variants "
        "| ratio (b)/(a) "
        "| forward only / (a) | items per forward | forward GFLOP/s: ours / lpips / conv ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    md += [f"| {r['arch']} | {r['lpips_tps']:.1f} | {r['ours_tps']:.1f} "
           f"| {r['nets']} x {r['variants']} "
           f"| {r['ratio']:.2f} | {r['fwd_ratio']:.2f} | {r['step']} | {r['fwd_gflops']:.0f} / "
           f"{r['lpips_gflops']:.0f} / {r['ceiling_gflops']:.0f} |" for r in rows]
    md += ["", _reading(rows)]
    if not args.no_write:
        # one section per device and thread count (a 1-thread and an all-cores run coexist)
        key = f"similarity-{device.type}" if device.type != "cpu" else \
            f"similarity-cpu-{torch.get_num_threads()}thread"
        update_section(key, "\n".join(md), args.out)
    else:
        print("\n".join(md))
    return 0
