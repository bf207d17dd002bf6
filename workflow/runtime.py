"""Device, precision and thread settings shared by every job."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key device is 'cuda' but no CUDA GPU is visible to this job")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU (bf16 on CPU is slower than fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"config key precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"``, a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure(device: torch.device, precision: str, threads: int | None = None) -> None:
    """Fast defaults: cudnn autotune and TF32 off for fp32 reference numerics."""
    if threads:
        torch.set_num_threads(int(threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        fast = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def job_threads(default: int = 1) -> int:
    """Threads granted to this job (Snakemake threads / SLURM cpus), for torch."""
    for key in ("SNAKEMAKE_THREADS", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        v = os.environ.get(key)
        if v and v.isdigit():
            return int(v)
    return default
