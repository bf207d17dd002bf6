"""``python -m workflow perf autoencoder``: autoencoder training speed, default vs reference.

Measures training images per second of the benchmark's autoencoder (the real step: the
image bank on the device -> reflect pad -> autoencoder -> loss network feature MSE ->
backward -> Adam, through ``workflow.training.Trainer``) in two configurations, in the same
run on the same device:

* default: ``precision: auto`` (bf16 autocast on CUDA) and channels_last on CUDA;
* reference: ``precision: fp32`` (TF32 off), contiguous NCHW: the reference numerics.

On a CPU the default resolves to fp32 as well (bf16 autocast is slower there), so the two
rows measure the same configuration and their ratio shows the run-to-run noise.
Loss-network weights are random: speed does not depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from workflow.benchmarks.autoencoder import DATASETS, parse_net, reconstruction_loss
from workflow.datasets.bank import ImageBank
from workflow.job import Job, pick_device
from workflow.models.autoencoder import ConvAutoencoder
from workflow.perf.report import machine_description, update_section
from workflow.training import TrainConfig, Trainer, make_adam

CONFIGS = {
    "default": {"precision": "auto", "channels_last": None},
    "fp32 reference": {"precision": "fp32", "channels_last": False},
}


def images_per_second(net: str, dataset: str, device: str, precision: str,
                      channels_last: bool | None, batch_size: int, steps: int,
                      warmup: int, seed: int = 0) -> tuple[float, str]:
    """Training throughput (images/s) over ``steps`` steps after ``warmup`` steps."""
    spec = DATASETS[dataset]
    job = Job.create({"precision": precision, "weights": "random", "weights_seed": seed},
                     {"device": device})
    cl = job.channels_last if channels_last is None else channels_last
    torch.manual_seed(seed)
    model = ConvAutoencoder(spec.size)
    lossnet = parse_net(net)
    loss_fn, extractor = reconstruction_loss(job, lossnet, "none")
    if extractor is not None and not cl:
        extractor = extractor.to(memory_format=torch.contiguous_format)
    opt = make_adam(model.parameters(), 1e-3, job.device)
    rng = np.random.default_rng(seed)
    side = spec.size - 2 * spec.pad
    bank = ImageBank(rng.integers(0, 256, (4 * batch_size, side, side, 3), dtype=np.uint8),
                     job.device)

    def step_fn(step: int):
        idx = torch.randint(0, len(bank), (batch_size,))
        x = bank.images(idx, pad=spec.pad, channels_last=cl)
        return loss_fn(model(x), x), batch_size

    with tempfile.TemporaryDirectory(prefix="perf-ae-") as tmp:
        trainer = Trainer(
            job, Path(tmp), modules={"autoencoder": model}, optimizer=opt, step_fn=step_fn,
            aux_modules={"lossnet": extractor} if extractor is not None else None,
            config=TrainConfig(max_steps=warmup + steps, eval_every=None, checkpoint_every=None,
                               channels_last=channels_last, log_every=warmup, progress=False,
                               seed=seed),
            description=f"perf {net} {dataset}")
        result = trainer.fit()
    # the harness logs one throughput row per window of log_every steps (and at the end);
    # the rate is total images / total time over the windows after the warm-up
    h = result.history.dropna(subset=["steps_per_s"]).sort_values("step")
    n_steps = h["step"].diff().fillna(h["step"])
    timed = h["step"] > warmup
    seconds = float((n_steps[timed] / h.loc[timed, "steps_per_s"]).sum())
    rate = batch_size * float(n_steps[timed].sum()) / seconds
    return rate, job.precision + (", channels_last" if cl else "")


def run(nets: Sequence[str], datasets: Sequence[str], device: str, batch_size: int, steps: int,
        warmup: int, out: str | Path, repeats: int = 2) -> str:
    dev = pick_device(device)
    lines = [
        "## autoencoder",
        "",
        "Autoencoder training images per second (benchmark 4: reflect pad, autoencoder, loss",
        f"network feature MSE, backward, Adam), batch {batch_size}, {steps} timed steps after "
        f"{warmup} warm-up steps, best of {repeats} alternating repeats,",
        f"random loss-network weights. Machine: {machine_description(dev)}.",
    ]
    if dev.type == "cpu":
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        lines += ["On CPU the default configuration resolves to fp32 (bf16 autocast is slower",
                  "there), so both columns run the same configuration: their ratio is noise",
                  f"(1-minute load average {load:.1f} on {os.cpu_count()} cores at the start)."]
    lines += ["", "| net | dataset | default (resolved) img/s | fp32 reference img/s | speed-up |",
              "|---|---|---|---|---|"]
    for dataset in datasets:
        for net in nets:
            rates: dict[str, float] = {}
            labels: dict[str, str] = {}
            for r in range(repeats):  # alternate the configurations; keep each one's best
                for name, c in CONFIGS.items():
                    rate, labels[name] = images_per_second(
                        net, dataset, device, c["precision"], c["channels_last"], batch_size,
                        steps, warmup, seed=r)
                    rates[name] = max(rate, rates.get(name, 0.0))
                    print(f"{net} {dataset} {name} ({labels[name]}) repeat {r}: {rate:.1f} "
                          f"images/s", flush=True)
            ratio = rates["default"] / rates["fp32 reference"]
            lines.append(f"| {net} | {dataset} | {rates['default']:.1f} ({labels['default']}) | "
                         f"{rates['fp32 reference']:.1f} | {ratio:.2f}x |")
    lines += ["", "Rerun: `python -m workflow perf autoencoder` (options: `--help`)."]
    md = "\n".join(lines)
    update_section("autoencoder", md, out)
    return md


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf autoencoder", description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nets", default="pixel,alexnet/2,vgg16/2",
                    help="comma-separated net ids (arch/layer or pixel)")
    ap.add_argument("--datasets", default=None,
                    help="comma-separated: svhn (64x64), stl10 (96x96); default both on CUDA, "
                         "svhn on CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps (default 10 CUDA, 2 CPU)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best counts")
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
    cuda = pick_device(args.device).type == "cuda"
    datasets = (args.datasets or ("svhn,stl10" if cuda else "svhn")).split(",")
    nets = (args.nets.split(",") if cuda or args.nets != ap.get_default("nets")
            else ["pixel", "alexnet/2"])
    md = run(nets, datasets, args.device, args.batch_size or (256 if cuda else 16),
             args.steps or (30 if cuda else 3), args.warmup or (10 if cuda else 2), args.out,
             args.repeats)
    print(md)
    return 0
