"""``python -m workflow perf delineation``: training throughput of the road-delineation U-Net.

Training crops per second of the real training step (``benchmarks.delineation.make_trainer``
in the real harness: crop gathering from the image banks, U-Net, BCE + feature loss,
backward, Adam) in two configurations, same process, same device, same data, interleaved
repetitions:

(a) default: ``precision: auto`` (bf16 autocast + channels_last on CUDA; on CPU ``auto``
    resolves to fp32, so (a) and (b) differ only in noise there, which the table says);
(b) reference: ``precision: fp32`` (fp32 numerics, TF32 off, no channels_last).

Every other key is the study's (the schema defaults, via ``workflow.plan``). The tiles are
random (no dataset needed), the loss network randomly initialised (nothing is downloaded).
The first ``warmup`` steps (cudnn autotuning, allocator) are not timed: the figure is crops
over the harness's logged wall time between the end of the warm-up and the last step (no
evaluation or checkpoint falls inside it). Writes the ``delineation`` section of
BENCHMARKS.md.

``--fused-k K`` (default 4; 0 skips it) adds, in the same run, FLOPs
(``torch.utils.flop_counter``) and kernel ops (aten ops dispatched) per model-step and the
step time of the K layers of the loss network's architecture trained as one job
(``delineation.fuse``: :func:`workflow.benchmarks.delineation_fused.make_fused_trainer`) vs
one U-Net per job, fp32, on the ``--device``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from workflow.archs import LossNet
from workflow.benchmarks.delineation import make_trainer
from workflow.benchmarks.delineation_fused import make_fused_trainer
from workflow.job import Job, pick_device, resolve_precision
from workflow.perf.counts import step_counts
from workflow.perf.report import machine_description, update_section
from workflow.plan import Plan, load_config


def random_tiles(n: int, side: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``roads.load``-like tiles: random images, maps with 5 % road."""
    rng = np.random.default_rng(seed)
    sat = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    maps = (rng.random((n, side, side)) < 0.05).astype(np.uint8)
    return {"sat": sat, "map": maps}


def make_job(net: LossNet, precision: str, device: str, crop: int, batch: int,
             threads: int | None) -> tuple[Job, dict]:
    """The train stage's job and config of the study, with this measurement's keys."""
    plan = Plan(load_config(overrides={
        "device": device, "precision": precision, "lossnets": {"weights": "random"},
        "delineation": {"crop_size": crop, "batch_size": batch, "epochs": 1}}))
    config = plan.stage_config("delineation", "train", net.arch)
    settings = {**plan.stage_settings("delineation", "train"), "threads": threads}
    return Job.create(config, settings), config


def measure(net: LossNet, precision: str, device: str, tiles: Mapping[str, np.ndarray],
            crop: int, batch: int, steps: int, warmup: int, threads: int | None) -> dict:
    """Crops per second over ``steps`` timed steps after ``warmup`` untimed ones."""
    job, config = make_job(net, precision, device, crop, batch, threads)
    with tempfile.TemporaryDirectory(prefix="perf-delineation-") as work:
        trainer, _, info = make_trainer(job, config, net, 0, tiles, None, work,
                                        max_steps=warmup + steps, log_every=warmup,
                                        progress=False)
        trainer.cfg.checkpoint_every = None  # only the final checkpoint, outside the window
        result = trainer.fit()
    # the harness logs wall_s at every multiple of log_every = warmup and at the last step;
    # every batch is full (tiles is a multiple of batch), so the window holds steps * batch crops
    wall = result.history.dropna(subset=["wall_s"]).set_index("step")["wall_s"]
    if warmup not in wall.index or warmup + steps not in wall.index:
        raise RuntimeError(f"the harness logged wall_s at steps {list(wall.index)}, not at "
                           f"{warmup} and {warmup + steps}")
    crops_per_s = steps * batch / (wall[warmup + steps] - wall[warmup])
    return {"crops_per_s": float(crops_per_s), "precision": info["precision"],
            "channels_last": info["channels_last"], "data_on_device": info["data_on_device"]}


def _counts(trainer, steps: int) -> dict[str, float]:
    """FLOPs and aten ops of the first harness step, and seconds per step of ``steps`` more."""
    flops, ops = step_counts(trainer, 0)
    t = time.perf_counter()
    for s in range(1, 1 + steps):
        trainer.train_step(s)
    trainer.check_losses()
    return {"flops": float(flops), "ops": float(ops),
            "s": (time.perf_counter() - t) / max(steps, 1)}


def fused_counts(arch: str, k: int, tiles: Mapping[str, np.ndarray], crop: int, batch: int,
                 steps: int, threads: int | None, device: str = "cpu") -> dict:
    """Per model-step FLOPs, ops and seconds: layers 1..k of ``arch`` (run 0) as one fused
    job vs one U-Net per job, fp32 on ``device``."""
    nets = [LossNet(arch, str(layer)) for layer in range(1, k + 1)]
    job, config = make_job(nets[0], "fp32", device, crop, batch, threads)
    with tempfile.TemporaryDirectory(prefix="perf-delineation-fused-") as tmp:
        alone = [_counts(make_trainer(job, config, n, 0, tiles, None, Path(tmp) / n.layer,
                                      max_steps=1 + steps, progress=False)[0], steps)
                 for n in nets]
        fused = _counts(make_fused_trainer(job, config, nets, [0] * k, tiles, None,
                                           Path(tmp) / "fused", max_steps=1 + steps,
                                           progress=False)[0], steps)
    per = {f"alone_{q}": sum(a[q] for a in alone) / k for q in ("flops", "ops", "s")}
    return {"arch": arch, "k": k, "device": str(job.device), **per, **{f"fused_{q}": fused[q] / k
                                            for q in ("flops", "ops", "s")}}


def fused_markdown(rows: list[dict], crop: int, batch: int, steps: int) -> str:
    lines = [f"Fused training (`delineation.fuse`, the default): the {rows[0]['k']} layers of "
             f"an architecture trained as one job vs one U-Net per job, {crop}px crops, batch "
             f"{batch} per U-Net, fp32 on {rows[0]['device']}, counted in this run (FLOPs: "
             f"`torch.utils.flop_counter`, convolution backward counted as two forward-sized "
             f"products; ops: aten ops dispatched, about one kernel launch each on a GPU; time: "
             f"mean of {steps} steps), per model-step (`python -m workflow perf delineation "
             f"--fused-k {rows[0]['k']}`):", "",
             "| architecture | K | GFLOP one per job | GFLOP fused | ops one per job | "
             "ops fused | ops ratio | ms one per job | ms fused |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['k']} | {r['alone_flops'] / 1e9:.2f} | "
                     f"{r['fused_flops'] / 1e9:.2f} | {r['alone_ops']:.0f} | "
                     f"{r['fused_ops']:.0f} | {r['alone_ops'] / max(r['fused_ops'], 1e-9):.2f}x"
                     f" | {1e3 * r['alone_s']:.0f} | {1e3 * r['fused_s']:.0f} |")
    return "\n".join(lines)


def run(lossnet: str = "alexnet/2", steps: int = 20, warmup: int = 3, repeats: int = 2,
        crop: int = 224, batch: int = 8, tiles: int = 32, device_name: str = "auto",
        threads: int | None = None) -> str:
    device = pick_device(device_name)
    net = LossNet.parse(lossnet)
    side = max(256, crop)
    tiles = -(-tiles // batch) * batch  # full batches only
    arrays = random_tiles(tiles, side)
    configs = {"default (precision: auto)": "auto", "reference (precision: fp32)": "fp32"}
    samples: dict[str, list[float]] = {k: [] for k in configs}
    details: dict[str, dict] = {}
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        for name, precision in configs.items():
            r = measure(net, precision, str(device), arrays, crop, batch, steps, warmup,
                        threads)
            samples[name].append(r["crops_per_s"])
            details[name] = r
    base = statistics.median(samples["reference (precision: fp32)"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## Road delineation: training throughput",
        "",
        f"Machine: {machine_description(device)}. Loss network {net.id} (random weights), "
        f"U-Net refinement pass K = 1, {crop}px crops, batch {batch}, {tiles} random "
        f"{side}px tiles; median of {repeats} interleaved repetitions of {steps} timed steps "
        f"after {warmup} warm-up steps (`python -m workflow perf delineation`); 1-minute load "
        f"average at the end {load:.1f} (other processes share the machine when it exceeds "
        f"the core count, which lowers both rows alike).",
        "",
        "| configuration | precision | channels_last | tiles on | crops/s | vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name in configs:
        d, v = details[name], statistics.median(samples[name])
        lines.append(f"| {name} | {d['precision']} | {d['channels_last']} | "
                     f"{d['data_on_device']} | {v:.1f} | {v / base:.2f}x |")
    if resolve_precision("auto", device) == "fp32":
        lines += ["", f"On {device.type.upper()} `precision: auto` resolves to fp32, so both "
                      "rows run the same computation; their ratio shows the measurement noise."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf delineation",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--lossnet", default="alexnet/2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--fused-k", type=int, default=4,
                    help="U-Nets per fused job in the FLOP/op count (layers 1..K; 0: skip)")
    ap.add_argument("--fused-archs", nargs="+", default=None,
                    help="architectures of the fused count (default: --lossnet's)")
    ap.add_argument("--fused-steps", type=int, default=3, help="timed steps of the fused count")
    ap.add_argument("--fused-only", action="store_true",
                    help="only the fused count (no throughput table)")
    args = ap.parse_args(argv)
    parts = []
    if not args.fused_only:
        parts.append(run(args.lossnet, args.steps, args.warmup, args.repeats, args.crop,
                         args.batch, args.tiles, args.device, args.threads))
    if args.fused_k:
        tiles = random_tiles(-(-args.tiles // args.batch) * args.batch, max(256, args.crop))
        rows = []
        for arch in args.fused_archs or [LossNet.parse(args.lossnet).arch]:
            rows.append(fused_counts(arch, args.fused_k, tiles, args.crop, args.batch,
                                     args.fused_steps, args.threads,
                                     str(pick_device(args.device))))
            r = rows[-1]
            print(f"{arch} fused K={r['k']}: {r['fused_flops'] / 1e9:.2f} GFLOP, "
                  f"{r['fused_ops']:.0f} ops, {1e3 * r['fused_s']:.0f} ms per model-step; one "
                  f"per job: {r['alone_flops'] / 1e9:.2f} GFLOP, {r['alone_ops']:.0f} ops, "
                  f"{1e3 * r['alone_s']:.0f} ms", flush=True)
        parts.append(fused_markdown(rows, args.crop, args.batch, args.fused_steps))
    md = "\n\n".join(parts)
    print(md)
    update_section("delineation", md, args.out)
    return 0
