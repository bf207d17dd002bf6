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

Fused training (``autoencoder.fuse``, ``--fused-k K``, default 4; 0 skips): for each
architecture of ``--nets``, one harness step of its first K layers trained as ONE job
(:class:`~workflow.models.autoencoder.FusedAutoencoder`, one loss-network pass over the K
outputs, one no-grad pass over the shared input) against the K models trained one per job,
in the same run, fp32: FLOPs (``torch.utils.flop_counter``, grouped convolutions counted
right) and kernel ops (aten ops dispatched) per model-step. ``--fused-only`` prints those
counts alone and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflow.archs import LossNet
from workflow.benchmarks.autoencoder import DATASETS, parse_net, reconstruction_loss
from workflow.benchmarks.autoencoder_fused import member_losses
from workflow.datasets.bank import ImageBank
from workflow.job import Job, pick_device
from workflow.models.autoencoder import ConvAutoencoder, FusedAutoencoder
from workflow.perf.counts import step_counts
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


def _count_trainer(job: Job, nets: list[LossNet], dataset: str, batch: int, workdir: Path,
                   fused: bool) -> Trainer:
    """The benchmark's step for ``nets`` (one model, or all of them fused: train /
    train_fused), on random images, one data stream."""
    spec = DATASETS[dataset]
    side = spec.size - 2 * spec.pad
    images = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    bank, idx = ImageBank(images, job.device), torch.arange(batch, device=job.device)
    models = [ConvAutoencoder(spec.size) for _ in nets]
    if fused:
        model = FusedAutoencoder.from_members(models)
        extractor = job.extractor(nets, "none")

        def step_fn(step: int):
            x = bank.images(idx, pad=spec.pad)
            return member_losses(extractor, nets, model(x), x[None], [0] * len(nets)).sum()
    else:
        model = models[0]
        loss_fn, extractor = reconstruction_loss(job, nets[0], "none")

        def step_fn(step: int):
            x = bank.images(idx, pad=spec.pad)
            return loss_fn(model(x), x)

    return Trainer(job, workdir, {"model": model}, make_adam(model.parameters(), 1e-3,
                                                                job.device), step_fn,
                   TrainConfig(max_steps=1, eval_every=None, checkpoint_every=None,
                               progress=False), aux_modules={"lossnet": extractor})


def fused_counts(arch: str, k: int, dataset: str, batch: int, device: str) -> dict[str, Any]:
    """FLOPs and aten ops per model-step: the first ``k`` layers of ``arch`` trained as one
    job vs one model per job (fp32, the step after a first untimed one)."""
    job = Job.create({"precision": "fp32", "weights": "random"}, {"device": device})
    nets = [LossNet(arch, str(layer)) for layer in range(1, k + 1)]
    with tempfile.TemporaryDirectory(prefix="perf-ae-fused-") as tmp:
        alone = []
        for n in nets:
            tr = _count_trainer(job, [n], dataset, batch, Path(tmp) / n.layer, False)
            tr.train_step(0)  # lazy initialisations out of the count
            alone.append(step_counts(tr, 1))
        tr = _count_trainer(job, nets, dataset, batch, Path(tmp) / "fused", True)
        tr.train_step(0)
        fused = step_counts(tr, 1)
    return {"arch": arch, "k": k, "dataset": dataset, "batch": batch,
            "alone_gflop": sum(f for f, _ in alone) / k / 1e9,
            "alone_ops": sum(o for _, o in alone) / k,
            "fused_gflop": fused[0] / k / 1e9, "fused_ops": fused[1] / k}


def fused_markdown(rows: list[dict[str, Any]], device: torch.device) -> str:
    r0 = rows[0]
    lines = [f"Fused training (`autoencoder.fuse`, the default): one step of the first "
             f"{r0['k']} layers of an architecture trained as one job vs one model per job, "
             f"{r0['dataset']}, batch {r0['batch']} per model, fp32, on "
             f"{machine_description(device)}, counted in this run (FLOPs: "
             f"`torch.utils.flop_counter`, grouped convolutions' backward counted as the two "
             f"forward-sized products it is; ops: aten ops dispatched, about one kernel launch "
             f"each on a GPU), per model-step:", "",
             "| architecture | K | GFLOP one per job | GFLOP fused | ops one per job | "
             "ops fused | ops ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['k']} | {r['alone_gflop']:.2f} | "
                     f"{r['fused_gflop']:.2f} | {r['alone_ops']:.0f} | {r['fused_ops']:.0f} | "
                     f"{r['alone_ops'] / max(r['fused_ops'], 1e-9):.2f}x |")
    return "\n".join(lines)


def _archs(nets: Sequence[str]) -> list[str]:
    """The architectures of the loss networks among ``nets`` (pixel has none), in order."""
    return list(dict.fromkeys(n.arch for n in map(parse_net, nets) if n is not None))


def run(nets: Sequence[str], datasets: Sequence[str], device: str, batch_size: int, steps: int,
        warmup: int, out: str | Path, repeats: int = 2, fused_k: int = 0) -> str:
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
    if fused_k:
        rows = [fused_counts(a, fused_k, datasets[0], batch_size, device)
                for a in _archs(nets)]
        lines += ["", fused_markdown(rows, dev)]
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
    ap.add_argument("--fused-k", type=int, default=4,
                    help="models per fused job in the FLOP/op count (its first K layers; 0: skip)")
    ap.add_argument("--fused-only", action="store_true",
                    help="only the fused FLOP/op count: print it, write nothing")
    args = ap.parse_args(argv)
    cuda = pick_device(args.device).type == "cuda"
    datasets = (args.datasets or ("svhn,stl10" if cuda else "svhn")).split(",")
    nets = (args.nets.split(",") if cuda or args.nets != ap.get_default("nets")
            else ["pixel", "alexnet/2"])
    batch = args.batch_size or (256 if cuda else 16)
    if args.fused_only:
        rows = []
        for arch in _archs(nets):
            rows.append(fused_counts(arch, args.fused_k or 4, datasets[0], batch, args.device))
            print(f"{arch} K={rows[-1]['k']}: {rows[-1]}", flush=True)
        print(fused_markdown(rows, pick_device(args.device)))
        return 0
    md = run(nets, datasets, args.device, batch, args.steps or (30 if cuda else 3),
             args.warmup or (10 if cuda else 2), args.out, args.repeats, args.fused_k)
    print(md)
    return 0
