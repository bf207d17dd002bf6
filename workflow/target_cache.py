"""Loss-network features of fixed training targets, computed once and kept where the compute is.

Super-resolution trains on whole, un-augmented images (``crop_size: null``, the study's
setting): the target of bank item ``i`` is the same image in every epoch, so its features at
the loss network's taps are too. :class:`TargetFeatures` computes them once, before the first
step, in batches of the evaluation size under the job's autocast (the dtype the loss compares
in: bf16 on CUDA by default, fp32 on the CPU), and a step looks its batch's rows up by index on
the device (no host synchronisation, no target pass: about a fifth of an SR step's FLOPs).

**The memory rule** (config ``super_resolution.target_cache``, a setting): ``auto`` keeps the
cache when its bytes, measured from one image's features at the taps, take at most half of the
device's free memory after the training data is placed (the image bank's own rule,
:func:`workflow.datasets.bank.placement`; on a CPU job the device is the host and its available
RAM is measured); ``always`` keeps it regardless, ``never`` computes the targets every step.
A cache that does not fit says so in the log and the step computes the target pass as before.

The loss network runs in eval mode, so an image's features do not depend on the batch it is
in: cached and per-step targets agree to the rounding of the convolution algorithm chosen for
the batch size (on the CPU in fp32: within 1e-6, ``tests/test_super_resolution.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from workflow.datasets.bank import ImageBank, placement

__all__ = ["TargetFeatures", "cached_targets", "plan_cache"]


def _features(extractor: nn.Module, images: Tensor, taps: Sequence) -> dict:
    out = extractor(images)
    return {t: out[t] for t in taps}


def plan_cache(extractor: nn.Module, bank: ImageBank, taps: Sequence, policy: str,
               autocast: Callable, to_device: Callable[[Tensor], Tensor]) -> tuple[bool, str]:
    """Whether to cache the bank's target features (``policy`` auto / always / never), and a
    sentence for the log saying why. The bytes are measured: one image's features at ``taps``
    under ``autocast``, times the bank's length."""
    if policy == "never":
        return False, "target features computed every step (super_resolution.target_cache: never)"
    with torch.no_grad(), autocast():
        one = _features(extractor, to_device(bank.images(torch.arange(1, device=bank.device))),
                        taps)
    nbytes = len(bank) * sum(v[0].numel() * v.element_size() for v in one.values())
    where = placement(nbytes, bank.device, policy)
    gib = nbytes / 2**30
    if where == "device":
        return True, (f"caching the target features of {len(bank)} images at taps "
                      f"{list(taps)}: {gib:.2f} GiB on {bank.device} "
                      f"(super_resolution.target_cache: {policy})")
    return False, (f"not caching target features: {gib:.2f} GiB is more than half of the free "
                   f"memory on {bank.device} (super_resolution.target_cache: auto; 'always' "
                   f"forces it)")


class TargetFeatures:
    """Every bank item's features at ``taps``, on the bank's device: ``lookup(idx)`` gives the
    rows of a batch, ``{tap: [B, C, h, w]}``."""

    def __init__(self, extractor: nn.Module, bank: ImageBank, taps: Sequence, batch: int,
                 autocast: Callable, to_device: Callable[[Tensor], Tensor]) -> None:
        self.taps = list(taps)
        parts: dict = {t: [] for t in self.taps}
        n = len(bank)
        with torch.no_grad(), autocast():
            for i in range(0, n, max(1, int(batch))):
                idx = torch.arange(i, min(i + batch, n), device=bank.device)
                for t, v in _features(extractor, to_device(bank.images(idx)), self.taps).items():
                    parts[t].append(v.contiguous())
        self.features: dict = {t: torch.cat(v) for t, v in parts.items()}

    def lookup(self, idx: Tensor) -> dict:
        return {t: v[idx.to(v.device)] for t, v in self.features.items()}

    def stacked(self, idxs: Sequence[Tensor]) -> dict:
        """``{tap: [R, B, C, h, w]}``: the rows of ``R`` batches (one per data stream)."""
        return {t: torch.stack([v[i.to(v.device)] for i in idxs])
                for t, v in self.features.items()}


def cached_targets(extractor: nn.Module, bank: ImageBank, taps: Sequence, policy: str,
                   batch: int, autocast: Callable, to_device: Callable[[Tensor], Tensor],
                   cropping: bool) -> TargetFeatures | None:
    """The cache of a training run, or ``None`` (random crops: the targets change per step;
    or the memory rule says no); prints the decision."""
    if cropping:
        if policy == "always":
            print("not caching target features: random crops make every step's targets new "
                  "(super_resolution.crop_size is set)", flush=True)
        return None
    keep, why = plan_cache(extractor, bank, taps, policy, autocast, to_device)
    print(why, flush=True)
    if not keep:
        return None
    return TargetFeatures(extractor, bank, taps, batch, autocast, to_device)

