"""The job context: device, precision, threads, autocast, loss networks and provenance.

One :class:`Job` is built per command, from the rule's ``--config`` (what the result depends
on: ``precision``, the loss network's ``weights`` and ``weights_seed``) and ``--settings``
(how it runs: ``device``, ``threads``, ``weights_dir``, batch sizes...). It resolves the
device and precision once and configures torch once; the trainer and the evaluators take it
and never resolve anything again.

``device: auto`` is CUDA when a GPU is visible, else Apple's MPS (Apple-silicon GPU) when
available, else the CPU. ``precision: auto`` is bf16 autocast on CUDA and fp32 on the CPU
(bf16 on a CPU is slower than fp32) and on MPS (bf16 needs macOS 14, and many MPS kernels
run bf16 through fp32 anyway); ``precision: bf16`` on MPS is bf16 autocast on MPS.
``fp32`` is the reference numerics (TF32 off). On CUDA cudnn autotuning is on and 4-D
tensors go channels_last; on MPS they stay contiguous NCHW, the layout the MPS kernels take
(channels_last costs a conversion per op there).

Ops that MPS lacks fall back to the CPU only when ``PYTORCH_ENABLE_MPS_FALLBACK=1`` is in
the environment before torch is imported (torch reads it once, when it loads): the Snakefile
sets it for every job it starts; a command started by hand on a Mac without it warns.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workflow.archs import LossNet, weights_id

__all__ = ["MPS_FALLBACK", "Job", "autocast", "mps_available", "pick_device", "resolve_precision",
           "seed_everything"]


MPS_FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"


def mps_available() -> bool:
    """Apple's MPS backend is built into this torch and a Metal GPU is usable."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else MPS when available, else CPU. ``cuda`` without a
    CUDA GPU, or ``mps`` without MPS, is an error."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available()
                           else "mps" if mps_available() else "cpu")
    else:
        dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key device is 'cuda' but no CUDA GPU is visible to this job")
    if dev.type == "mps" and not mps_available():
        raise RuntimeError("config key device is 'mps' but MPS is not available to this job "
                           "(it needs an Apple-silicon Mac, macOS 12.3+ and a torch built with "
                           "MPS); use device: auto or cpu")
    if dev.type == "mps" and os.environ.get(MPS_FALLBACK) != "1":
        print(f"warning: device mps without {MPS_FALLBACK}=1: an op that MPS lacks will stop "
              f"the job; export {MPS_FALLBACK}=1 before starting (the Snakefile sets it for "
              f"its jobs) to run such ops on the CPU", file=sys.stderr)
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU and MPS."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"config key precision must be auto, fp32 or bf16, got {precision!r}")
    if (precision == "bf16" and device.type == "mps"
            and not torch.backends.mps.is_macos_or_newer(14, 0)):
        raise ValueError("config key precision is bf16 but MPS supports bf16 from macOS 14 "
                         "on; use precision: auto (fp32 on MPS) or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"``, a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Job:
    """Where and how one command computes; see the module docstring.

    ``config`` is the stage's config (kept for the provenance hash), ``settings`` the rest
    of what the command was told (``setting(key)`` reads one, naming it when missing).
    """

    device: torch.device
    precision: str
    threads: int | None = None
    weights: str = "random"
    weights_seed: int = 0
    weights_dir: Path = Path("resources/weights")
    config: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, config: Mapping[str, Any] | None = None,
               settings: Mapping[str, Any] | None = None) -> Job:
        """Resolve a job from a stage's ``--config`` and ``--settings`` and configure torch."""
        config, settings = dict(config or {}), dict(settings or {})
        if config.get("custom_lossnets"):  # config lossnets.custom entries of this job
            from workflow.archs import register_custom

            register_custom(config["custom_lossnets"])
        device = pick_device(str(settings.get("device", "auto")))
        job = cls(device=device,
                  precision=resolve_precision(str(config.get("precision", "auto")), device),
                  threads=int(settings["threads"]) if settings.get("threads") else None,
                  weights=str(config.get("weights", "random")),
                  weights_seed=int(config.get("weights_seed", 0)),
                  weights_dir=Path(settings.get("weights_dir", "resources/weights")),
                  config=config, settings=settings)
        job.configure()
        return job

    def configure(self) -> None:
        """Threads, cudnn autotuning, and TF32 off for fp32 reference numerics."""
        if self.threads:
            torch.set_num_threads(int(self.threads))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            fast = self.precision != "fp32"
            torch.backends.cuda.matmul.allow_tf32 = fast
            torch.backends.cudnn.allow_tf32 = fast

    # ------------------------------------------------------------------ compute

    @property
    def channels_last(self) -> bool:
        """4-D activations channels_last: on CUDA (tensor cores), not on the CPU or MPS."""
        return self.device.type == "cuda"

    def autocast(self):
        """The job's autocast context (bf16 on CUDA by default, a no-op in fp32); on MPS it
        is MPS autocast (bf16 when precision is bf16)."""
        return autocast(self.device, self.precision)

    def to_device(self, x: Tensor, channels_last: bool | None = None) -> Tensor:
        """Move a batch to the device, channels_last for 4-D tensors where the job uses it
        (or where ``channels_last`` says so)."""
        x = x.to(self.device, non_blocking=True)
        if (self.channels_last if channels_last is None else channels_last) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def setting(self, key: str) -> Any:
        try:
            return self.settings[key]
        except KeyError:
            raise KeyError(f"setting {key!r} was not given to this command (--settings); the "
                           f"rules pass it from the config section of the stage") from None

    # ------------------------------------------------------------------ loss networks

    def extractor(self, nets: LossNet | Iterable[LossNet], normalize: str = "imagenet",
                  channels_last: bool | None = None):
        """One frozen extractor on the device covering every tap of ``nets`` (one arch)."""
        from workflow.lossnets import build_extractor

        nets = [nets] if isinstance(nets, LossNet) else list(nets)
        archs = {n.arch for n in nets}
        if len(archs) != 1:
            raise ValueError(f"one extractor serves one architecture, got {sorted(archs)}")
        ext = build_extractor(archs.pop(), lossnets=nets, weights=self.weights,
                              weights_dir=self.weights_dir, normalize=normalize,
                              seed=self.weights_seed).to(self.device)
        if self.channels_last if channels_last is None else channels_last:
            ext = ext.to(memory_format=torch.channels_last)
        return ext

    def weights_file(self, arch: str) -> Path | None:
        """The file the loss network ``arch``'s weights come from (None for random weights)."""
        if self.weights == "random":
            return None
        if self.weights == "imagenet":
            from workflow.archs import weights_filename

            return self.weights_dir / weights_filename(arch)
        return Path(self.weights)

    # ------------------------------------------------------------------ provenance

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def provenance(self, arch: str | None = None, wall_time_s: float | None = None
                   ) -> dict[str, Any]:
        """The provenance columns of the scores table for this job."""
        from workflow.results import config_hash

        return {"config_hash": config_hash(dict(self.config)),
                "weights_id": weights_id(arch, self.weights) if arch else "none",
                "device": str(self.device), "precision": self.precision,
                "wall_time_s": self.elapsed() if wall_time_s is None else wall_time_s}
