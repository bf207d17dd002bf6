"""``python -m workflow perf super_resolution``: SR training throughput and the study's cost.

For each loss network (default alexnet/2 and vgg16/2) and each configuration, the
real harness step (``Trainer.train_step``: the benchmark's own step function with
on-device degradation, SRNet forward, feature loss, backward, Adam) is timed on the
same device in the same process, configurations interleaved:

* ``reference``: the study's setting: fp32, eager, NCHW, batch 4;
* ``default``: what ``config.yaml`` runs: ``precision: auto`` (bf16 autocast on
  CUDA, fp32 on CPU), channels_last on CUDA, cudnn autotuning, batch 4;
* optional extras: ``--compile`` (default + ``torch.compile``) and ``--big-batch N``
  (default at batch N: a deviation from the study's batch 4, which the
  ``super_resolution.batch_size`` key allows; reported separately).

FLOPs of one step come from ``torch.utils.flop_counter.FlopCounterMode``; achieved
TFLOP/s = FLOPs per step x steps per second. The projection for the full grid is
112 models (56 loss networks x 2 scales) x 800,000 training images (200,000 iterations at
batch 4) at the measured mean throughput of the measured loss networks, i.e. an estimate
that treats them as representative of the grid (validation and test scoring excluded: under
1% of the steps' work). Weights are random (nothing is downloaded; the cost is the same).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from workflow.archs import LossNet
from workflow.benchmarks.super_resolution import train_batches
from workflow.datasets.bank import EpochSampler, ImageBank
from workflow.imaging import degrade
from workflow.job import Job
from workflow.lossnets import feature_loss
from workflow.models.srnet import SRNet
from workflow.perf.report import machine_description, update_section
from workflow.training import TrainConfig, Trainer, make_adam

GRID_MODELS = 112
STUDY_IMAGES = 200_000 * 4  # 200k iterations at batch 4 = 80 epochs of the 10k images
# dense bf16 tensor-core peaks (no sparsity), for the "% of peak" column
BF16_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return peak
    return None


def make_job(device: str, precision: str, threads: int | None) -> Job:
    """The job of one configuration (random loss-network weights: nothing is read)."""
    return Job.create({"precision": precision, "weights": "random"},
                      {"device": device, "threads": threads})


def build(job: Job, net_id: LossNet, scale: int, batch: int, size: int, channels_last: bool,
          compile_: bool, workdir: Path) -> Trainer:
    """A harness around the benchmark's step on random uint8 images kept on the device."""
    device = job.device
    torch.manual_seed(0)
    images = torch.randint(0, 256, (max(64, batch * 4), size, size, 3), dtype=torch.uint8)
    bank = ImageBank(images.numpy(), device, "always")
    net = SRNet(scale)
    extractor = job.extractor(net_id, "none", channels_last=channels_last)
    opt = make_adam(net.parameters(), 1e-3, device)
    batches = train_batches(bank, EpochSampler(len(bank), batch, 0, device), None)
    trainer: Trainer

    def step_fn(step: int):  # the benchmark's step (workflow.benchmarks.super_resolution.train)
        with torch.autocast(device.type, enabled=False):
            hr = batches(step)
            lr = degrade(hr, scale)
        out = net(trainer.to_device(lr))
        return feature_loss(extractor, net_id.taps, out, trainer.to_device(hr)), batch

    cfg = TrainConfig(max_steps=10**9, checkpoint_every=None, compile=compile_,
                      channels_last=channels_last, progress=False)
    trainer = Trainer(job, workdir, {"model": net}, opt, step_fn, cfg,
                      aux_modules={"lossnet": extractor})
    return trainer


def step_flops(trainer: Trainer) -> int:
    with FlopCounterMode(display=False) as fc:
        trainer.train_step(0)
    trainer.check_losses()
    return int(fc.get_total_flops())


def time_steps(trainer: Trainer, start: int, steps: int) -> float:
    """Seconds per step over ``steps`` steps (one sync at each end, as in training)."""
    trainer.job.configure()  # its TF32 switches: the configurations are interleaved
    _sync(trainer.device)
    t = time.perf_counter()
    for s in range(start, start + steps):
        trainer.train_step(s)
    trainer.check_losses()  # the NaN guard's sync, as the harness does at log boundaries
    _sync(trainer.device)
    return (time.perf_counter() - t) / steps


def measure(net_id: LossNet, configs: dict[str, dict[str, Any]], scale: int, size: int,
            jobs: dict[str, Job], steps: int, warmup: int, repeats: int
            ) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="perf_sr_") as tmp:
        trainers = {name: build(jobs[c["precision"]], net_id, scale, c["batch"], size,
                                c["channels_last"], c["compile"], Path(tmp) / name)
                    for name, c in configs.items()}
        flops = {name: step_flops(tr) for name, tr in trainers.items()}
        for tr in trainers.values():  # warm-up: allocator, cudnn autotuning, compilation
            if warmup:
                time_steps(tr, 1, warmup)
        times: dict[str, list[float]] = {n: [] for n in trainers}
        for r in range(repeats):  # interleaved, so drift in machine load hits all alike
            for name, tr in trainers.items():
                times[name].append(time_steps(tr, 1 + warmup + r * steps, steps))
    for name, c in configs.items():
        sec = statistics.median(times[name])
        rows.append({"lossnet": net_id.id, "config": name, **c, "sec_per_step": sec,
                     "images_per_s": c["batch"] / sec, "gflop_per_step": flops[name] / 1e9,
                     "tflops": flops[name] / sec / 1e12})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf super_resolution",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--lossnets", nargs="+", default=["alexnet/2", "vgg16/2"])
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--size", type=int, default=288, help="target side (the study's 288)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repetition")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time default + torch.compile")
    ap.add_argument("--big-batch", type=int, default=None, help="also time default at this batch")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="BENCHMARKS.md", help="the file whose section is rewritten")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    # one job per precision: it resolves the device and sets the threads and TF32 switches
    auto = make_job(args.device, "auto", args.threads)
    device, default_precision = auto.device, auto.precision
    jobs = {"fp32": make_job(args.device, "fp32", args.threads), default_precision: auto}
    gpu = device.type == "cuda"
    steps = args.steps or (50 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (20 if gpu else 1)
    configs: dict[str, dict[str, Any]] = {
        "reference": {"precision": "fp32", "channels_last": False, "compile": False, "batch": 4},
        "default": {"precision": default_precision, "channels_last": gpu, "compile": False,
                    "batch": 4},
    }
    if args.compile:
        configs["default+compile"] = {**configs["default"], "compile": True}
    if args.big_batch:
        configs[f"default, batch {args.big_batch}"] = {**configs["default"],
                                                      "batch": args.big_batch}
    rows = []
    for text in args.lossnets:
        rows += measure(LossNet.parse(text), configs, args.scale, args.size, jobs, steps,
                        warmup, args.repeats)
        for r in rows[-len(configs):]:
            print(f"{r['lossnet']} {r['config']}: {r['images_per_s']:.2f} images/s, "
                  f"{r['tflops']:.3f} TFLOP/s ({r['gflop_per_step']:.1f} GFLOP/step)", flush=True)
    md = _markdown(rows, configs, device, args, steps, warmup, default_precision)
    print(md)
    if not args.no_write:
        update_section(f"super_resolution-{device.type}", md, args.out)
    return 0


def _markdown(rows: list[dict[str, Any]], configs: dict[str, dict[str, Any]], device: torch.device,
              args: argparse.Namespace, steps: int, warmup: int, default_precision: str) -> str:
    peak = bf16_peak(device)
    unit = "GPU" if device.type == "cuda" else "CPU"
    ref = {r["lossnet"]: r for r in rows if r["config"] == "reference"}
    lines = [
        f"## super_resolution: SR training throughput ({device.type})",
        "",
        f"Machine: {machine_description(device)}. Command: `python -m workflow perf "
        f"super_resolution` (x{args.scale}, {args.size}x{args.size} targets, random weights and "
        f"images; median of {args.repeats} interleaved repetitions of {steps} steps after "
        f"{warmup} warm-up steps). Each step is the harness's full step: on-device blur + "
        f"bicubic degradation, SRNet forward, loss-network features of the output (and of the "
        f"target in a no-grad pass), backward, Adam (fused on CUDA). FLOPs per step from "
        f"`torch.utils.flop_counter`.",
        "",
    ]
    if device.type == "cpu":
        lines += [f"On CPU `precision: auto` resolves to {default_precision} and channels_last is "
                  f"off, so the default configuration *is* the reference one here: the ratio "
                  f"measures noise (shared machine), not an optimisation.", ""]
    lines += [
        "| loss network | configuration | dtype | layout | batch | ms/step | images/s | "
        "GFLOP/step | TFLOP/s" + (" | % bf16 peak" if peak else "") + " | vs reference | "
        f"projected {unit}-hours, 112 models x 200k it. |",
        "|---|---|---|---|---|---|---|---|---|---" + ("|---" if peak else "") + "|---|",
    ]
    for r in rows:
        ratio = r["images_per_s"] / ref[r["lossnet"]]["images_per_s"]
        hours = GRID_MODELS * STUDY_IMAGES / r["images_per_s"] / 3600
        pct = f" | {100 * r['tflops'] / peak:.1f}%" if peak else ""
        compiled = " (compiled)" if r["compile"] else ""
        layout = "NHWC" if r["channels_last"] else "NCHW"
        lines.append(f"| {r['lossnet']} | {r['config']}{compiled} | {r['precision']} | {layout} | "
                     f"{r['batch']} | {1e3 * r['sec_per_step']:.1f} | {r['images_per_s']:.2f} | "
                     f"{r['gflop_per_step']:.1f} | "
                     f"{r['tflops']:.3f}{pct} | {ratio:.2f}x | {hours:,.0f} |")
    by_cfg: dict[str, list[float]] = {}
    for r in rows:
        by_cfg.setdefault(r["config"], []).append(
            GRID_MODELS * STUDY_IMAGES / r["images_per_s"] / 3600)
    lines += ["", "Projected cost of the full grid (mean over the measured loss networks, "
              "treated as representative; every configuration sees the study's 800k training "
              "images, i.e. 200k iterations at batch 4): "
              + "; ".join(f"{name}: {statistics.mean(h):,.0f} {unit}-hours"
                          for name, h in by_cfg.items()) + "."]
    return "\n".join(lines)
