"""``python -m workflow perf study``: the full study's device-hours, projected from training
steps measured on this device.

For every training benchmark the config enables, the command times the benchmark's own step
(the code the trainer runs, at the study's image sizes and batch sizes, random weights and
images) for a representative set of loss networks (``--archs``: by default alexnet, vgg19,
efficientnet_b7 and densenet121, the three costly taps the issue that asked for this names
plus a cheap one), and multiplies the mean seconds per step by the steps the config asks for:

* super-resolution: the fused job's step (the architecture's layers 1-4 trained together at
  x4 on 288 px targets, batch 4 each, as ``train_fused`` runs it), per model, times
  ``iterations``, times the models of the plan (x8 is counted at the x4 cost: the targets, and
  the loss network's work, are the same 288 px images);
* autoencoder: a step at the dataset's input size and ``train.batch_size``, times
  ``train.epochs`` (the upper bound: early stopping ends most runs sooner) times the steps of
  an epoch over the training share (``1 - val_fraction``) of SVHN ``extra`` (531,131) or STL-10
  ``unlabeled`` (100,000), per (loss network, dataset, run) (the pixel baseline, which runs no
  loss network, is not counted);
* delineation: a step of ``batch_size`` crops of ``crop_size``, times ``epochs`` x the steps of
  an epoch over the 1,108 training tiles (one crop per tile), per (loss network, run);
* adaptation: the fused step of every ranking x comparison (batch ``batch_size``), times
  ``epochs_constant + epochs_decay`` x the steps of an epoch over the training share (80 %)
  of SVHN ``train`` (73,257), per (loss network, run);
* calibration: the fused step of its comparisons with one "ranking" (the human judgement),
  batch ``batch_size``, times the epochs over about 151,000 BAPPS 2AFC training triplets.

Job start-up is measured too: a fresh Python importing torch, torchvision and the workflow's
training code, times the GPU jobs of the study's DAG (``snakemake -n``: the rules that ask for
a ``gpu`` resource); on SLURM every job also starts Snakemake in the job, counted as one
``snakemake -n`` of the study (an upper bound: it plans all jobs, not one). Scoring jobs
(similarity, probes, evaluation passes) are not projected: their step is not a training step
(``perf similarity`` and ``perf iqa`` measure them).

Every sentence the command writes is computed from the numbers of the same run.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workflow.archs import LossNet
from workflow.job import Job
from workflow.perf.report import machine_description, update_section
from workflow.plan import Plan, load_config

ROOT = Path(__file__).resolve().parents[2]
REPRESENTATIVE = ("alexnet", "vgg19", "efficientnet_b7", "densenet121")
GOAL_HOURS = 8.0
# the study's training-set sizes (docs/autoencoder.md, docs/delineation.md, docs/adaptation.md,
# docs/calibration.md)
AE_TRAIN_IMAGES = {"svhn": 531_131, "stl10": 100_000}
ROADS_TRAIN_TILES = 1_108
SVHN_TRAIN = 73_257
ADAPTATION_TRAIN_SHARE = 0.8
BAPPS_2AFC_TRAIN = 151_000
SR_SIZE = 288


def _layers(arch: str) -> list[LossNet]:
    """The architecture's four grid layers, as the fused SR job of the study trains them."""
    return [LossNet(arch, str(i)) for i in range(1, 5)]


# ----------------------------------------------------------------------------- measurements


def sr_step_s(job: Job, arch: str, steps: int, warmup: int) -> float:
    """Seconds per model-step of the fused SR job of ``arch``'s layers (x4, batch 4)."""
    from workflow.perf.super_resolution import build_fused, time_steps

    nets = _layers(arch)
    with tempfile.TemporaryDirectory(prefix="perf_study_sr_") as tmp:
        trainer = build_fused(job, nets, 4, 4, SR_SIZE, Path(tmp))
        if warmup:
            time_steps(trainer, 0, warmup)
        return time_steps(trainer, warmup, steps) / len(nets)


def ae_step_s(job: Job, net: str, dataset: str, batch: int, steps: int, warmup: int) -> float:
    from workflow.perf.autoencoder import images_per_second

    rate, _ = images_per_second(net, dataset, str(job.device), job.precision, None, batch,
                                steps, warmup)
    return batch / rate


def delineation_step_s(job: Job, net: str, crop: int, batch: int, steps: int, warmup: int
                       ) -> float:
    from workflow.perf.delineation import measure, random_tiles

    tiles = random_tiles(2 * batch, max(256, crop))
    r = measure(LossNet.parse(net), job.precision, str(job.device), tiles, crop, batch, steps,
                warmup, torch.get_num_threads())
    return batch / r["crops_per_s"]


def adaptation_step_s(job: Job, net: str, rankings: int, methods: Sequence[str], batch: int,
                      steps: int, warmup: int) -> float:
    from workflow.perf.adaptation import fused_step_s

    return fused_step_s(job, LossNet.parse(net), rankings, methods, batch, steps, warmup)


def startup_s(repeats: int = 3) -> float:
    """Median wall seconds of a fresh Python importing what a training job imports."""
    code = ("import torch, torchvision, workflow.training, workflow.lossnets, "
            "workflow.benchmarks.super_resolution")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gpu_rules(rules_dir: Path = ROOT / "rules") -> set[str]:
    """The rules that ask for a ``gpu`` resource (``gpu=plan.gpus(...)``)."""
    names = set()
    for f in sorted(rules_dir.glob("*.smk")):
        for block in re.split(r"^(?=\s*(?:local)?rule \w+:)", f.read_text(), flags=re.M):
            m = re.match(r"\s*(?:local)?rule (\w+):", block)
            if m and "gpu=plan.gpus(" in block:
                names.add(m.group(1))
    return names


def dag_jobs(configfiles: Sequence[str]) -> tuple[dict[str, int], float]:
    """Jobs per rule of ``snakemake -n`` on the study (device cuda), and its wall seconds."""
    with tempfile.TemporaryDirectory(prefix="perf_study_dag_") as tmp:
        cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--quiet", "rules"]
        cmd += [a for f in configfiles for a in ("--configfile", f)]
        cmd += ["--config", "device=cuda", f"results_dir={tmp}/results",
                f"resources_dir={tmp}/res"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed:\n{proc.stderr[-3000:]}")
    counts: dict[str, int] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and re.fullmatch(r"\w+", parts[0]):
            counts[parts[0]] = int(parts[1])
    counts.pop("total", None)
    return counts, wall


# ----------------------------------------------------------------------------- projection


def projection(plan: Plan, job: Job, archs: Sequence[str], steps: int, warmup: int,
               only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per training benchmark: models, steps per model, measured s/step per network,
    projected hours."""
    cfg, enabled, rows = plan.config, set(plan.enabled()), []

    def keep(b: str) -> bool:
        return b in enabled and (not only or b in only)

    def row(benchmark: str, models: int, steps_per_model: float, measured: dict[str, float],
            what: str) -> None:
        mean = statistics.mean(measured.values())
        rows.append({"benchmark": benchmark, "models": models, "steps_per_model": steps_per_model,
                     "measured": measured, "mean_s": mean, "what": what,
                     "hours": models * steps_per_model * mean / 3600})
        print(f"{benchmark}: {models} models x {steps_per_model:,.0f} steps x {mean:.4f} s "
              f"= {rows[-1]['hours']:.2f} h", flush=True)

    if keep("super_resolution"):
        sec = cfg["super_resolution"]
        measured = {f"{a}/1-4": sr_step_s(job, a, steps, warmup) for a in archs}
        row("super_resolution", len(plan.jobs("super_resolution")), int(sec["iterations"]),
            measured, f"fused step of the 4 layers, x4, {SR_SIZE} px, batch "
                      f"{sec['batch_size']} each, per model")
    if keep("autoencoder"):
        sec = cfg["autoencoder"]
        batch, epochs = int(sec["train"]["batch_size"]), int(sec["train"]["epochs"])
        for d in sec["datasets"]:
            n = AE_TRAIN_IMAGES[d]
            if sec["train"].get("max_images"):
                n = min(n, int(sec["train"]["max_images"]))
            per_epoch = math.ceil((1 - float(sec["val_fraction"])) * n / batch)
            # the pixel baseline runs no loss network: not counted (a fraction of one model)
            models = sum(1 for j in plan.jobs("autoencoder")
                         if j["dataset"] == d and j["net"] != "pixel")
            measured = {f"{a}/4": ae_step_s(job, f"{a}/4", d, batch, steps, warmup)
                        for a in archs}
            row(f"autoencoder ({d})", models, epochs * per_epoch, measured,
                f"batch {batch}, {epochs} epochs at most")
    if keep("delineation"):
        sec = cfg["delineation"]
        batch, crop = int(sec["batch_size"]), int(sec["crop_size"])
        measured = {f"{a}/4": delineation_step_s(job, f"{a}/4", crop, batch, steps, warmup)
                    for a in archs}
        row("delineation", len(plan.jobs("delineation")),
            int(sec["epochs"]) * math.ceil(ROADS_TRAIN_TILES / batch), measured,
            f"batch {batch} crops of {crop} px")
    for name, n_train, rankings in (
            ("adaptation", ADAPTATION_TRAIN_SHARE * SVHN_TRAIN, None),
            ("calibration", BAPPS_2AFC_TRAIN, 1)):
        if not keep(name):
            continue
        sec = cfg[name]
        batch = int(sec["batch_size"])
        nets = sorted({n.id for n in plan.lossnets(name)})
        # few networks (the LPIPS sets by default): measure each; else the representatives
        pick = nets if len(nets) <= len(REPRESENTATIVE) else [f"{a}/4" for a in archs]
        k = int(rankings or sec["rankings"])
        measured = {n: adaptation_step_s(job, n, k, sec["comparisons"], batch, steps, warmup)
                    for n in pick}
        epochs = int(sec["epochs_constant"]) + int(sec["epochs_decay"])
        row(name, len(plan.jobs(name)), epochs * math.ceil(n_train / batch), measured,
            f"fused step of {k} ranking(s) x {len(sec['comparisons'])} comparisons, "
            f"batch {batch}")
    return rows


def markdown(rows: list[dict[str, Any]], job: Job, archs: Sequence[str], steps: int,
             warmup: int, startup: float, gpu_jobs: int, snakemake_s: float,
             configfiles: Sequence[str]) -> str:
    dev = job.device
    unit = "GPU" if dev.type == "cuda" else dev.type.upper()
    train_h = sum(r["hours"] for r in rows)
    start_local_h = gpu_jobs * startup / 3600
    start_slurm_h = gpu_jobs * (startup + snakemake_s) / 3600
    lines = [
        f"## study: projected {unit}-hours of the full study ({dev.type})", "",
        f"Machine: {machine_description(dev)}; precision {job.precision}. Command: "
        f"`python -m workflow perf study` on {', '.join(configfiles) or 'the default config'}"
        f" (random weights and images; {steps} timed step(s) after {warmup} warm-up step(s) per "
        f"measurement; representative loss networks: {', '.join(archs)}; their mean s/step is "
        f"taken for every loss network of the benchmark).",
        "",
        f"| benchmark | models | steps per model | s/step per network | mean s/step | "
        f"projected {unit}-hours |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        per = "; ".join(f"{n} {s:.4f}" for n, s in r["measured"].items())
        lines.append(f"| {r['benchmark']} ({r['what']}) | {r['models']} | "
                     f"{r['steps_per_model']:,.0f} | {per} | {r['mean_s']:.4f} | "
                     f"{r['hours']:,.2f} |")
    lines += [
        f"| job start-up: {gpu_jobs} GPU jobs x {startup:.1f} s (imports) | | | | | "
        f"{start_local_h:,.2f} |",
        "",
        f"Training: {train_h:,.1f} {unit}-hours; with start-up {train_h + start_local_h:,.1f} "
        f"(local) or {train_h + start_slurm_h:,.1f} on SLURM (each job also starts Snakemake: "
        f"{snakemake_s:.1f} s, one `snakemake -n` of the study).",
    ]
    if dev.type == "cuda":
        total = train_h + start_slurm_h
        verdict = "within" if total <= GOAL_HOURS else "over"
        lines.append(f"Against the goal of {GOAL_HOURS:.0f} GPU-hours: {total:,.1f}, "
                     f"{verdict} it ({total / GOAL_HOURS:.2f}x).")
    else:
        lines.append(f"Measured on the {dev.type.upper()}, so these are {unit}-hours; the "
                     f"{GOAL_HOURS:.0f} GPU-hour goal is checked by a run on a GPU "
                     f"(tools/gpu-check).")
    lines += ["", "Rerun: `python -m workflow perf study` (options: `--help`)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow perf study",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", nargs="*", default=["config.yaml"],
                    help="the study's config files (default config.yaml)")
    ap.add_argument("--archs", nargs="+", default=list(REPRESENTATIVE))
    ap.add_argument("--benchmarks", nargs="*", default=None,
                    help="project only these (default: every enabled training benchmark)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per measurement (default 5 on CUDA, 1 on the CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--no-report", action="store_true", help="print only")
    args = ap.parse_args(argv)
    for f in args.configfile:
        if not Path(f).exists():
            raise SystemExit(f"--configfile {f}: no such file")
    job = Job.create({"precision": args.precision, "weights": "random"},
                     {"device": args.device, "threads": args.threads})
    job.configure()
    steps = args.steps or (5 if job.device.type == "cuda" else 1)
    plan = Plan(load_config(*args.configfile))
    rows = projection(plan, job, args.archs, steps, args.warmup, args.benchmarks)
    counts, snakemake_s = dag_jobs(args.configfile)
    gpu = gpu_rules()
    gpu_jobs = sum(n for rule, n in counts.items() if rule in gpu)
    md = markdown(rows, job, args.archs, steps, args.warmup, startup_s(), gpu_jobs, snakemake_s,
                  args.configfile)
    print(md)
    if not args.no_report:
        update_section(f"study-{job.device.type}", md, args.out)
    return 0
