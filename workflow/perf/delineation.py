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
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from workflow.archs import LossNet
from workflow.benchmarks.delineation import make_trainer
from workflow.job import Job, pick_device, resolve_precision
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
    args = ap.parse_args(argv)
    md = run(args.lossnet, args.steps, args.warmup, args.repeats, args.crop, args.batch,
             args.tiles, args.device, args.threads)
    print(md)
    update_section("delineation", md, args.out)
    return 0
