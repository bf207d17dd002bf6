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

Fused training (``super_resolution.fuse``): for each measured architecture, one step of
the four grid layers trained as ONE job (``FusedSRNet``, one loss-network pass over the four
outputs, one no-grad pass over the shared target) against the four models trained one per
job, in the same run: FLOPs (flop counter) and kernel ops (aten ops dispatched, counted by a
``TorchDispatchMode``) per model-step (``--fused-k 0`` skips it).
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
from workflow.lossnets import feature_loss, fused_feature_loss
from workflow.models.srnet import FusedSRNet, SRNet
from workflow.perf.counts import step_counts
from workflow.perf.report import add_run_options, machine_description, run_job, update_section
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


def build_fused(job: Job, nets: list[LossNet], scale: int, batch: int, size: int,
                workdir: Path) -> Trainer:
    """The fused job's step (``train_fused``): ``len(nets)`` models of one data stream."""
    device = job.device
    torch.manual_seed(0)
    images = torch.randint(0, 256, (max(64, batch * 4), size, size, 3), dtype=torch.uint8)
    bank = ImageBank(images.numpy(), device, "always")
    fused = FusedSRNet.from_members([SRNet(scale) for _ in nets])
    extractor = job.extractor(nets, "none", channels_last=False)
    opt = make_adam(fused.parameters(), 1e-3, device)
    batches = train_batches(bank, EpochSampler(len(bank), batch, 0, device), None)
    taps, target_of = [n.taps for n in nets], [0] * len(nets)

    def step_fn(step: int):
        with torch.autocast(device.type, enabled=False):
            hr = batches(step)
            lr = degrade(hr, scale)
        out = fused(lr)
        return fused_feature_loss(extractor, taps, out, hr[None], target_of).sum(), batch

    cfg = TrainConfig(max_steps=10**9, checkpoint_every=None, channels_last=False,
                      progress=False)
    return Trainer(job, workdir, {"fused": fused}, opt, step_fn, cfg,
                   aux_modules={"lossnet": extractor})


def fused_counts(arch: str, k: int, scale: int, size: int, job: Job) -> dict[str, Any]:
    """Per model-step FLOPs and ops: ``k`` layers of ``arch`` fused vs one model per job."""
    nets = [LossNet(arch, str(layer)) for layer in range(1, k + 1)]
    with tempfile.TemporaryDirectory(prefix="perf_sr_fused_") as tmp:
        alone = [step_counts(build(job, n, scale, 4, size, False, False, Path(tmp) / n.layer))
                 for n in nets]
        fused = step_counts(build_fused(job, nets, scale, 4, size, Path(tmp) / "fused"))
    return {"arch": arch, "k": k,
            "alone_gflop": sum(f for f, _ in alone) / k / 1e9,
            "alone_ops": sum(o for _, o in alone) / k,
            "fused_gflop": fused[0] / k / 1e9, "fused_ops": fused[1] / k}


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
    ap.add_argument("--fused-k", type=int, default=4,
                    help="models per fused job in the FLOP/op count (the 4 layers; 0: skip)")
    args = add_run_options(ap, precision=False).parse_args(argv)
    # one job per precision: it resolves the device and sets the threads and TF32 switches
    auto = run_job(args, "auto")
    device, default_precision = auto.device, auto.precision
    jobs = {"fp32": run_job(args, "fp32"), default_precision: auto}
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
    fused = []
    if args.fused_k:
        for arch in dict.fromkeys(LossNet.parse(t).arch for t in args.lossnets):
            fused.append(fused_counts(arch, args.fused_k, args.scale, args.size, jobs["fp32"]))
            f = fused[-1]
            print(f"{arch} fused K={f['k']}: {f['fused_gflop']:.1f} GFLOP and "
                  f"{f['fused_ops']:.0f} ops per model-step; one per job: "
                  f"{f['alone_gflop']:.1f} GFLOP, {f['alone_ops']:.0f} ops", flush=True)
    md = _markdown(rows, configs, device, args, steps, warmup, default_precision)
    if fused:
        md += "\n\n" + _fused_markdown(fused, args)
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


def _fused_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"Fused training (`super_resolution.fuse`, the default): one step of the "
             f"{rows[0]['k']} grid layers of an architecture trained as one job vs one model "
             f"per job, x{args.scale}, {args.size}x{args.size}, batch 4 per model, fp32, counted "
             f"in this run (FLOPs: `torch.utils.flop_counter`; ops: aten ops dispatched, about "
             f"one kernel launch each on a GPU), per model-step:", "",
             "| architecture | K | GFLOP one per job | GFLOP fused | ops one per job | "
             "ops fused | ops ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['k']} | {r['alone_gflop']:.1f} | "
                     f"{r['fused_gflop']:.1f} | {r['alone_ops']:.0f} | {r['fused_ops']:.0f} | "
                     f"{r['alone_ops'] / max(r['fused_ops'], 1e-9):.2f}x |")
    return "\n".join(lines)

