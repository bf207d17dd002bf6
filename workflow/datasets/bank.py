"""Training data where the compute is: image banks on the device and the epoch sampler.

:class:`ImageBank` holds one prepared uint8 array (images ``[N, H, W, C]`` or masks
``[N, H, W]``) for a job. One rule decides where (:func:`placement`): on the GPU when it takes
at most half of the free memory, else in (pinned) host memory when it takes at most half of
the available RAM, else it stays memory-mapped on disk; a setting ``always`` / ``never``
overrides it. Batches are gathered there by index (and, for random crops, by index
arithmetic: a crop is a grid of rows and columns, a flip a reversed column index), then moved
and converted on the device. No loader or PIL is involved in a training loop.

:class:`EpochSampler` gives the item indices of training step ``step``: epochs visit every
item once in a shuffled order that is a function of ``(seed, epoch)`` alone, so a run
resumed mid-epoch draws the same batches without storing any sampler state. The order is
drawn on the CPU (so it is the same on every device) and copied to the device once per
epoch, asynchronously (from pinned memory on CUDA: the host never waits for the GPU); a
step's indices are a slice of it there, so the index path makes no host synchronisation.
Gathering from a device-placed bank stays on the device too; a bank kept in host memory or on
disk is indexed on the host, which needs the indices there (one device-to-host copy a step).
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workflow.imaging import to_float

__all__ = ["EpochSampler", "ImageBank", "crop_grid", "placement", "random_crops", "to_device_async"]

Where = Literal["device", "host", "disk"]
POLICIES = ("auto", "always", "never")


def _available_ram() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def placement(nbytes: int, device: torch.device, policy: str = "auto",
              share: float = 0.5) -> Where:
    """Where a bank of ``nbytes`` lives: ``device``, ``host`` (RAM; pinned for CUDA) or ``disk``.

    ``auto``: on the device when it takes at most ``share`` of the device's free memory (on
    a CPU job the device *is* the host, and its RAM is what is measured), else in RAM when it
    takes at most ``share`` of the available RAM, else memory-mapped. ``always``: the device.
    ``never``: RAM, or disk when it does not fit.
    """
    if policy not in POLICIES:
        raise ValueError(f"data placement {policy!r} is not one of {', '.join(POLICIES)} "
                         f"(config key data_on_device)")
    ram = _available_ram()
    fits_ram = ram is None or nbytes <= share * ram
    if policy == "always":
        return "device"
    if policy == "auto":
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if nbytes <= share * free:
                return "device"
        elif fits_ram:
            return "device"
    return "host" if fits_ram else "disk"


def to_device_async(t: Tensor, device: torch.device | str | None) -> Tensor:
    """A CPU tensor on ``device`` without making the host wait: a CUDA copy is queued from
    pinned memory (torch's pinned-block cache keeps the source alive until the copy ran);
    elsewhere an ordinary ``.to``."""
    if device is not None and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class ImageBank:
    """One uint8 array placed by :func:`placement`; batches come out on ``device``."""

    def __init__(self, array: np.ndarray, device: torch.device, policy: str = "auto",
                 share: float = 0.5) -> None:
        self.device = device
        self.where = placement(int(array.nbytes), device, policy, share)
        if self.where == "disk":
            self.data: np.ndarray | Tensor = array
        else:
            host = torch.from_numpy(np.array(array))  # a private copy out of the memory map
            if self.where == "device":
                self.data = host.to(device)
            else:
                self.data = host.pin_memory() if device.type == "cuda" else host
        self.shape = tuple(int(s) for s in array.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def gather(self, idx: Tensor, rows: Tensor | None = None, cols: Tensor | None = None
               ) -> Tensor:
        """uint8 items ``idx`` on the device; with ``rows`` / ``cols`` ``[B, c]`` index grids
        (:func:`crop_grid`), the crop ``data[idx[b], rows[b], cols[b]]`` of each item."""
        if isinstance(self.data, Tensor):
            i = idx.to(self.data.device)
            if rows is None:
                out = self.data[i]
            else:
                r, c = rows.to(self.data.device), cols.to(self.data.device)
                out = self.data[i[:, None, None], r[:, :, None], c[:, None, :]]
            return out.to(self.device, non_blocking=True)
        i = idx.cpu().numpy()
        if rows is None:
            out_np = self.data[i]
        else:
            r, c = rows.cpu().numpy(), cols.cpu().numpy()
            out_np = self.data[i[:, None, None], r[:, :, None], c[:, None, :]]
        return torch.from_numpy(np.ascontiguousarray(out_np)).to(self.device)

    def images(self, idx: Tensor, rows: Tensor | None = None, cols: Tensor | None = None,
               pad: int = 0, channels_last: bool = False) -> Tensor:
        """Float ``[B, C, H, W]`` in [0, 1] of items ``idx`` (cropped, reflect-padded)."""
        x = to_float(self.gather(idx, rows, cols))
        if pad:
            x = F.pad(x, (pad,) * 4, mode="reflect")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def random_crops(n: int, height: int, width: int, crop: int, flip: bool = False,
                 device: torch.device | None = None, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Offsets (and horizontal flips with probability 1/2) of ``n`` random ``crop`` x ``crop``
    windows, drawn from the global torch RNG of ``device`` (which the harness checkpoints), or
    from ``generator`` (one of ``device``, passed to the harness too): top offsets, then left
    offsets, then flips. A generator seeded ``s`` draws what the global RNG draws after
    ``torch.manual_seed(s)``."""
    if crop > height or crop > width:
        raise ValueError(f"crop {crop} exceeds the {height}x{width} images")
    g = {"generator": generator} if generator is not None else {}
    top = torch.randint(0, height - crop + 1, (n,), device=device, **g)
    left = torch.randint(0, width - crop + 1, (n,), device=device, **g)
    flips = torch.rand(n, device=device, **g) < 0.5 if flip else None
    return top, left, flips


def crop_grid(top: Tensor, left: Tensor, crop: int, flips: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """``[B, crop]`` row and column indices of crops at ``top`` / ``left``; a flipped crop
    reads its columns right to left (the flip costs nothing)."""
    ar = torch.arange(crop, device=top.device)
    rows = top[:, None] + ar
    cols = left[:, None] + ar
    if flips is not None:
        cols = torch.where(flips[:, None], left[:, None] + crop - 1 - ar, cols)
    return rows, cols


class EpochSampler:
    """Indices of the items of training step ``step`` (see the module docstring).

    Epoch ``e`` is a permutation seeded with ``seed * seed_stride + e``; step ``k`` of an epoch
    takes its ``k``-th slice of ``batch_size``. The trailing batch of an epoch is kept when it
    has at least ``min_batch`` items (BatchNorm cannot train on one), else dropped. With
    ``items`` (a tensor), the sampler shuffles those instead of ``range(n)``.
    """

    def __init__(self, items: int | Tensor, batch_size: int, seed: int,
                 device: torch.device | None = None, min_batch: int = 1,
                 seed_stride: int = 1_000_003) -> None:
        self.items = items.to(device) if isinstance(items, Tensor) else None
        self.n = int(items) if isinstance(items, int) else int(items.shape[0])
        self.batch_size, self.seed, self.device = int(batch_size), int(seed), device
        self.seed_stride = int(seed_stride)
        if self.n < max(1, min_batch):
            raise ValueError(f"{self.n} training item(s) are too few for batches of at least "
                             f"{min_batch}")
        full, rest = divmod(self.n, self.batch_size)
        self.steps_per_epoch = full + (1 if rest >= max(1, min_batch) else 0)
        self._epoch = -1
        self._order: Tensor | None = None

    def order(self, epoch: int) -> Tensor:
        """The shuffled positions of epoch ``epoch`` (on the device)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * self.seed_stride + int(epoch))
            self._order = to_device_async(torch.randperm(self.n, generator=g), self.device)
            self._epoch = epoch
        assert self._order is not None
        return self._order

    def __call__(self, step: int) -> Tensor:
        epoch, k = divmod(int(step), self.steps_per_epoch)
        pos = self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        return pos if self.items is None else self.items[pos]
