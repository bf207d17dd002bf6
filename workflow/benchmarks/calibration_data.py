"""LPIPS calibration's training data: the BAPPS 2AFC train triplets of the configured subsets,
memory-mapped, gathered by position (docs/calibration.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from workflow.datasets import bapps
from workflow.imaging import to_images

__all__ = ["CalibrationError", "TrainSet"]


class CalibrationError(ValueError):
    """Inputs that do not fit together; the message names them and the fix."""


class TrainSet:
    """The BAPPS 2AFC train triplets of ``subsets`` (at most ``limit`` of each), memory-mapped;
    ``batch(idx)`` gathers items by their position in the concatenation."""

    def __init__(self, folder: Path, subsets: Sequence[str], limit: int | None) -> None:
        self.parts = []
        for s in subsets:
            a = bapps.load(folder, "2afc", "train", s)
            n = len(a["judge"]) if limit is None else min(int(limit), len(a["judge"]))
            if n == 0:
                raise CalibrationError(f"{folder}: BAPPS 2afc/train/{s} has no triplets "
                                       f"(config key calibration.train_subsets)")
            self.parts.append({k: a[k] for k in ("ref", "p0", "p1", "judge")} | {"n": n})
        self.offsets = np.cumsum([0] + [p["n"] for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, idx: Tensor, device: torch.device, size: int
              ) -> tuple[list[Tensor], Tensor]:
        """``[ref, p0, p1]`` images (float, on ``device``) and the judge fractions ``[N, 1]``."""
        idx = idx.cpu().numpy()
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        arrays: dict[str, np.ndarray] = {}
        for j in np.unique(which):
            at = np.flatnonzero(which == j)
            local = idx[at] - self.offsets[j]
            order = np.argsort(local)  # read each memmap in file order
            for k in ("ref", "p0", "p1", "judge"):
                part = self.parts[j][k]
                if k not in arrays:
                    arrays[k] = np.empty((len(idx), *part.shape[1:]), part.dtype)
                arrays[k][at[order]] = part[local[order]]
        images = [to_images(arrays[k], device, size) for k in ("ref", "p0", "p1")]
        judge = torch.from_numpy(arrays["judge"].astype(np.float32)).to(device).unsqueeze(1)
        return images, judge
