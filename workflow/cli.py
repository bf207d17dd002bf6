"""``python -m workflow GROUP COMMAND ...``: what the rules call, and what a user can run by hand.

Every command is a row of :data:`COMMANDS`: ``(group, command) -> Command(target, help,
args)``, where ``target`` is ``module:function`` (imported only when the command runs, so
``--help`` answers at once) and ``args`` names the shared arguments it takes from
:data:`ARGS`: one word for one thing everywhere (``--net`` a loss network, ``--prepared``
prepared dataset folders, ``--out`` the output file or folder, ``--scores`` a summary in the
scores schema, ``--samples`` its per-sample rows, ``--workdir`` a training run's
checkpoints, ``--model`` a trained model, ``--config`` what the result depends on,
``--settings`` how the job runs). The function is called with those names as keyword
arguments; commands that compute get ``job``, the :class:`workflow.job.Job` built once from
``--config`` and ``--settings``.

``snakemake --printshellcmds`` shows the exact command line of any job.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ARGS", "COMMANDS", "Command", "main"]


def json_arg(text: str) -> Any:
    """argparse ``type=`` for JSON arguments; ``@file.json`` reads a file."""
    try:
        if text.startswith("@"):
            return json.loads(Path(text[1:]).read_text())
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text[:200]}") from None


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"
    help: str
    args: tuple[str, ...]

    @property
    def computes(self) -> bool:
        return "job" in self.args


# The shared arguments: name -> (flags, argparse keywords). A command lists the names it takes.
ARGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "dataset": (("--dataset",), {"required": True, "help": "dataset name, e.g. svhn"}),
    "name": (("name",), {"help": "dataset name (bapps, coco, sr_test, roads, svhn, stl10)"}),
    "net": (("--net",), {"required": True, "help": "loss network arch/layer, e.g. alexnet/2"}),
    "run": (("--run",), {"type": int, "default": None, "help": "run index (seed offset)"}),
    "scale": (("--scale",), {"type": int, "required": True, "help": "upscaling factor"}),
    "members": (("--members",), {"type": json_arg, "required": True,
                                 "help": 'fused models: [{"net", "run", "dir"}] (JSON or @file)'}),
    "config": (("--config",), {"type": json_arg, "required": True,
                               "help": "what the result depends on (JSON or @file)"}),
    "settings": (("--settings",), {"type": json_arg, "default": {},
                                   "help": "how the job runs: device, batch sizes, ..."}),
    # the config of a stage folded into the command (its own job: precision, provenance)
    "encode_config": (("--encode-config",), {"type": json_arg, "required": True,
                                             "help": "the encode stage's config (JSON or @file)"}),
    "eval_config": (("--eval-config",), {"type": json_arg, "required": True,
                                         "help": "the eval stage's config (JSON or @file)"}),
    "threads": (("--threads",), {"type": int, "default": None,
                                 "help": "CPU threads of the job (the rule's threads)"}),
    "options": (("--options",), {"type": json_arg, "default": {},
                                 "help": "config data.<name> (JSON or @file)"}),
    "seed": (("--seed",), {"type": int, "default": 0, "help": "config data.seed"}),
    "mirror": (("--mirror",), {"default": "", "help": "base URL replacing the upstream host"}),
    "raw": (("--raw",), {"type": Path, "required": True, "help": "the dataset's raw folder"}),
    "prepared": (("--prepared",), {"type": Path, "nargs": "+", "required": True,
                                   "help": "prepared dataset folders (or their manifest.json)"}),
    "archs": (("--archs",), {"nargs": "+", "required": True, "help": "architectures"}),
    "custom": (("--custom",), {"type": json_arg, "default": {},
                               "help": "config lossnets.custom entries of --archs (JSON)"}),
    "rankings": (("--rankings",), {"type": Path, "required": True, "help": "rankings.json"}),
    "ranking": (("--ranking",), {"type": int, "required": True,
                                 "help": "a ranking's index in rankings.json"}),
    "triplets": (("--triplets",), {"type": Path, "nargs": "*", "default": [],
                                   "help": "triplet files (.npz)"}),
    "images": (("--images",), {"type": Path, "required": True,
                               "help": "probe image folder (or its manifest.json)"}),
    "codes": (("--codes",), {"type": Path, "required": True, "help": "codes.npz"}),
    "model": (("--model",), {"type": Path, "default": None, "help": "a trained model file"}),
    "workdir": (("--workdir",), {"type": Path, "required": True,
                                 "help": "checkpoints and metrics.csv of the training run"}),
    "scores": (("--scores",), {"type": Path, "required": True,
                               "help": "output: summary rows in the scores schema (.parquet)"}),
    "samples": (("--samples",), {"type": Path, "required": True,
                                 "help": "output: per-sample rows (.parquet)"}),
    "lossnets": (("--lossnets",), {"type": Path, "required": True,
                                   "help": "lossnets.parquet (the loss-network attributes)"}),
    "tables": (("--tables",), {"type": Path, "required": True, "help": "the tables folder"}),
    "inputs": (("inputs",), {"type": Path, "nargs": "*", "help": "summary (scores) files"}),
    "columns": (("--columns",), {"nargs": "*", "default": None,
                                 "help": "columns to compare (default: value and n)"}),
    "out": (("--out",), {"type": Path, "required": True, "help": "output file or folder"}),
    "configfiles": (("configfiles",), {"type": Path, "nargs": "*",
                                       "help": "config files, later ones win (default: "
                                               "config.yaml)"}),
    "job": ((), {}),  # the Job, built from --config, --settings and --threads (it implies them)
    # the metric command (workflow/metric.py)
    "a": (("a",), {"type": Path, "help": "an image, or a folder of images"}),
    "b": (("b",), {"type": Path, "help": "an image, or a folder paired with a by file name"}),
    "lossnet": (("--lossnet",), {"default": "squeezenet1_1/lpips",
                                 "help": "loss network arch/layer (default squeezenet1_1/lpips)"}),
    "comparison": (("--comparison",), {"default": "spatial",
                                       "help": "spatial | mean | sort | spatial+mean | "
                                               "spatial+sort (default spatial)"}),
    "channel_norm": (("--channel-norm",), {"type": lambda t: _flag(t, "--channel-norm"),
                                           "default": True, "dest": "channel_norm",
                                           "help": "true | false (default true)"}),
    "weights": (("--weights",), {"default": "imagenet",
                                 "help": "imagenet | random | a state_dict path"}),
    "weights_dir": (("--weights-dir",), {"type": Path, "default": None, "dest": "weights_dir",
                                         "help": "folder of torchvision's weight files (default: "
                                                 "resources/weights, then torch's hub cache)"}),
    "device": (("--device",), {"default": "cpu", "help": "cpu | cuda | mps | auto"}),
}


def _flag(text: str, name: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{name} takes true or false, got {text!r}")

_B = "workflow.benchmarks."
COMMANDS: dict[tuple[str, str], Command] = {
    ("config", "show"): Command("workflow.plan:show_config",
                                "print the complete config (every default filled in)",
                                ("configfiles",)),
    # data
    ("data", "fetch"): Command("workflow.datasets.registry:download",
                               "download (and extract) one dataset, then write READY",
                               ("name", "raw", "options", "mirror", "settings")),
    ("data", "synthesize"): Command("workflow.datasets.registry:synthesize",
                                    "write a small fake dataset in the upstream layout",
                                    ("name", "raw", "seed", "options")),
    ("data", "prepare"): Command("workflow.datasets.registry:prepare",
                                 "decode a raw dataset into arrays + manifest.json",
                                 ("name", "raw", "out", "options", "settings")),
    ("data", "weights"): Command("workflow.datasets.weights:fetch_weights",
                                 "download and verify ImageNet weight files into a folder",
                                 ("archs", "out", "mirror", "custom")),
    # benchmarks
    ("similarity", "score"): Command(_B + "similarity:score",
                                     "one architecture's loss networks on one dataset of "
                                     "the family (BAPPS 2AFC + JND, MOS SRCC/KRCC/PLCC, "
                                     "NIGHTS 2AFC)",
                                     ("job", "config", "prepared", "samples", "scores")),
    ("super_resolution", "train"): Command(_B + "super_resolution:train",
                                           "train one SR network (resumes from --workdir)",
                                           ("job", "config", "net", "scale", "run",
                                            "prepared", "workdir", "out")),
    ("super_resolution", "train_fused"): Command(
        _B + "super_resolution_fused:train_fused",
        "train the SR networks of one architecture and scale as one (resumes from --workdir), "
        "then score each",
        ("job", "config", "eval_config", "members", "scale", "prepared", "workdir", "out",
         "scores")),
    ("super_resolution", "eval"): Command(_B + "super_resolution:evaluate",
                                          "score a trained SR network on the test sets",
                                          ("job", "config", "net", "scale", "run", "model",
                                           "prepared", "samples", "scores")),
    ("delineation", "train"): Command(_B + "delineation:train",
                                      "train one road-delineation U-Net (resumes), then score it",
                                      ("job", "config", "eval_config", "net", "run", "prepared",
                                       "workdir", "out", "samples", "scores")),
    ("delineation", "train_fused"): Command(
        _B + "delineation_fused:train_fused",
        "train the U-Nets of one architecture as one (resumes from --workdir), then score each",
        ("job", "config", "eval_config", "members", "prepared", "workdir", "out", "scores")),
    ("delineation", "eval"): Command(_B + "delineation:evaluate",
                                     "score a trained U-Net (test tiles + reference protocol)",
                                     ("job", "config", "net", "run", "model", "prepared",
                                      "samples", "scores")),
    ("autoencoder", "train"): Command(_B + "autoencoder:train",
                                      "train one autoencoder (net 'pixel': the baseline)",
                                      ("job", "config", "net", "dataset", "run", "prepared",
                                       "workdir", "out")),
    ("autoencoder", "train_fused"): Command(
        _B + "autoencoder_fused:train_fused",
        "train the autoencoders of one architecture (or the pixel runs) and dataset as one "
        "(resumes from --workdir)",
        ("job", "config", "members", "dataset", "prepared", "workdir", "out")),
    ("autoencoder", "encode"): Command(_B + "autoencoder:encode",
                                       "the codes of the labelled splits",
                                       ("job", "config", "dataset", "model", "prepared", "out")),
    ("autoencoder", "mlp"): Command(_B + "autoencoder:fit_mlps",
                                    "encode (unless --codes holds them), fit the MLP grid, score",
                                    ("job", "config", "encode_config", "net", "dataset", "run",
                                     "model", "prepared", "codes", "workdir", "samples",
                                     "scores")),
    ("adaptation", "rankings"): Command(_B + "adaptation:rankings",
                                        "the seeded random distortion rankings",
                                        ("config", "out")),
    ("adaptation", "triplets"): Command(_B + "adaptation:triplets",
                                        "fixed evaluation triplets of one dataset",
                                        ("config", "prepared", "out")),
    ("adaptation", "train"): Command(_B + "adaptation:train",
                                     "adapt every ranking x comparison of a loss network",
                                     ("job", "config", "net", "run", "rankings", "triplets",
                                      "prepared", "workdir", "out")),
    ("adaptation", "evaluate"): Command(_B + "adaptation:evaluate",
                                        "score the baseline (no --model) or an adapted run",
                                        ("job", "config", "net", "run", "model", "rankings",
                                         "triplets", "prepared", "scores")),
    ("adaptation", "train_net"): Command(
        _B + "adaptation_net:train_net",
        "adapted net: fine-tune the loss network for one comparison and ranking",
        ("job", "config", "net", "run", "comparison", "channel_norm", "ranking", "rankings",
         "triplets", "prepared", "workdir", "out")),
    ("adaptation", "evaluate_net"): Command(_B + "adaptation_net:evaluate_net",
                                            "score an adapted net (variant adapted_net)",
                                            ("job", "config", "net", "run", "model",
                                             "rankings", "triplets", "prepared", "scores")),
    ("calibration", "train"): Command(_B + "calibration:train",
                                      "LPIPS lin: calibrate a loss network on BAPPS 2AFC train",
                                      ("job", "config", "net", "run", "prepared", "workdir",
                                       "out")),
    ("calibration", "tune"): Command(_B + "calibration:tune",
                                     "LPIPS tune: lin with the backbone fine-tuned too",
                                     ("job", "config", "net", "run", "prepared", "workdir",
                                      "out")),
    ("calibration", "scratch"): Command(_B + "calibration:scratch",
                                        "LPIPS scratch: lin with a random backbone trained too",
                                        ("job", "config", "net", "run", "prepared", "workdir",
                                         "out")),
    ("calibration", "evaluate"): Command(_B + "calibration_scoring:evaluate",
                                         "score a calibrated model (lin, tune, scratch) on "
                                         "BAPPS val",
                                         ("job", "config", "net", "run", "model", "prepared",
                                          "scores")),
    ("calibration", "shipped"): Command(_B + "calibration_scoring:shipped",
                                        "score the lpips package's lin weights on BAPPS val",
                                        ("job", "config", "net", "model", "prepared", "scores")),
    ("probes", "images"): Command(_B + "probes:images",
                                  "generate (or import hand-made) probe images",
                                  ("config", "out")),
    ("probes", "score"): Command(_B + "probes:score",
                                 "count the correct probe pairs of one loss network",
                                 ("job", "config", "net", "images", "scores")),
    # results and analysis
    ("results", "gather"): Command("workflow.results:gather",
                                   "concatenate summary files into the scores table",
                                   ("inputs", "out")),
    ("results", "compare"): Command("workflow.results:compare",
                                    "two scores tables equal bit for bit, provenance aside?",
                                    ("inputs", "columns")),
    ("metric", "score"): Command("workflow.metric:score",
                                 "distances of two images, or of two folders paired by name",
                                 ("a", "b", "out", "lossnet", "comparison", "channel_norm",
                                  "weights", "weights_dir", "device")),
    ("analysis", "attributes"): Command("workflow.analysis.attributes:write_attributes",
                                        "loss-network attributes -> lossnets.parquet",
                                        ("config", "out")),
    ("analysis", "tables"): Command("workflow.analysis.correlations:write_tables",
                                    "correlation tables and Pareto points",
                                    ("config", "scores", "lossnets", "out")),
    ("analysis", "figures"): Command("workflow.analysis.all_figures:write_figures",
                                     "the figures, from the scores and the tables",
                                     ("config", "scores", "tables", "out")),
}

# Speed measurements: `python -m workflow perf NAME [args]` hands its arguments to the module.
PERF = {
    "similarity": "BAPPS scoring throughput against the lpips package",
    "iqa": "MOS-dataset scoring (one pass per reference) against per-image reference passes",
    "super_resolution": "SR training steps, reference vs default settings",
    "delineation": "road-delineation training steps",
    "autoencoder": "autoencoder training images/s, default vs fp32 reference",
    "adaptation": "fused adaptation against one metric at a time",
    "prepare": "PNG decoding throughput of dataset preparation",
    "dag": "CPU time of `snakemake -n` on the full study against an earlier commit",
    "study": "the full study's device-hours, projected from training steps measured here",
}


def _usage() -> str:
    lines = [__doc__.split("\n\n")[0], "", "commands:"]
    width = max(len(f"{g} {c}") for g, c in COMMANDS) + 2
    for (group, cmd), spec in COMMANDS.items():
        lines.append(f"  {f'{group} {cmd}':<{width}}{spec.help}")
    lines += ["", "speed measurements (write BENCHMARKS.md):"]
    for name, text in PERF.items():
        lines.append(f"  {f'perf {name}':<{width}}{text}")
    lines += ["", "`python -m workflow GROUP COMMAND --help` lists a command's arguments."]
    return "\n".join(lines)


def parser(group: str, cmd: str) -> argparse.ArgumentParser:
    spec = COMMANDS[(group, cmd)]
    ap = argparse.ArgumentParser(prog=f"python -m workflow {group} {cmd}", description=spec.help)
    names = list(spec.args)
    if spec.computes:  # the job is built from --config, --settings and --threads
        names += [n for n in ("config", "settings") if n not in names]
    if "settings" in names:
        names.append("threads")
    for name in names:
        flags, kwargs = ARGS[name]
        if flags:
            ap.add_argument(*flags, **kwargs)
    return ap


def _load(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def run(group: str, cmd: str, argv: Sequence[str]) -> Any:
    """Parse ``argv`` for one command and call its function; return what it returns."""
    spec = COMMANDS[(group, cmd)]
    ns = vars(parser(group, cmd).parse_args(list(argv)))
    if ns.get("threads") is not None:
        ns["settings"] = {**ns.get("settings", {}), "threads": ns.pop("threads")}
    if "prepared" in ns and ns["prepared"] is not None:
        from workflow.datasets.arrays import prepared_folders

        ns["prepared"] = prepared_folders(ns["prepared"])
    fn = _load(spec.target)  # imports torch: before the job's clock starts
    if spec.computes:
        from workflow.job import Job

        ns["job"] = Job.create(ns.get("config"), ns.get("settings"))
    return fn(**{k: ns[k] for k in spec.args if k in ns})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "perf":
        if len(argv) < 2 or argv[1] not in PERF:
            print(f"usage: python -m workflow perf NAME [args]; NAME is one of "
                  f"{', '.join(PERF)}", file=sys.stderr)
            return 2
        return int(importlib.import_module(f"workflow.perf.{argv[1]}").main(argv[2:]) or 0)
    if len(argv) < 2 or (argv[0], argv[1]) not in COMMANDS:
        print(f"unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        run(argv[0], argv[1], argv[2:])
    except Exception as e:
        # the project's own errors name the file or key and what to do: one line says it;
        # anything else is a bug and keeps its traceback
        atexit.register(_keep_attempt_log)  # after the error or traceback is printed
        if not (type(e).__module__.startswith("workflow.") or isinstance(e, FileNotFoundError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException:  # preempted (exit 75), interrupted
        atexit.register(_keep_attempt_log)
        raise
    return 0


def _keep_attempt_log() -> None:
    """A failed attempt's log survives the retry: Snakemake deletes a job's log before each
    attempt, so the rule log (this process's stdout, ``> {log}``) is copied to
    ``<log>.attempt<N>`` when the command fails."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        log = Path(os.readlink("/proc/self/fd/1"))
    except OSError:
        return
    if log.suffix != ".log" or not log.is_file():
        return
    n = 1
    while log.with_name(f"{log.name}.attempt{n}").exists():
        n += 1
    try:
        shutil.copyfile(log, log.with_name(f"{log.name}.attempt{n}"))
    except OSError:
        pass
