"""Distances of distorted images to their reference images, each image through the network once.

A MOS dataset (TID2013, KADID-10k, CSIQ) has few references and many distorted versions of
each. :class:`ReferenceScorer` walks the references in turn: a reference's features (and
their mean / sort / channel-norm transforms, :func:`workflow.compare.transform_features`)
are computed once and compared with every distorted version of it, which pass through the
extractor in chunks; every loss network x comparison variant of the architecture comes
from those features. :class:`PixelReferenceScorer` does the same for the pixel baselines
(no features: the reference is compared as it is). Images are scored at the resolution they
were prepared at (no resize here).

Both return ``{(loss network id, variant): float64 [N]}`` in the order of the distorted
images (variant None for a pixel baseline), the keys of
:class:`workflow.benchmarks.similarity.Scorer`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from workflow import compare
from workflow.archs import LossNet
from workflow.compare import Variant
from workflow.imaging import to_images
from workflow.job import Job
from workflow.lossnets import FeatureExtractor
from workflow.metrics import pixel

__all__ = ["CPU_FORWARD_BYTES", "PixelReferenceScorer", "Progress", "ReferenceScorer",
           "by_reference"]

# Bytes of one forward chunk's activations on the CPU (all image sets together, the
# largest tensor of the pass): far below glibc's mmap threshold, so every pass reuses the
# heap instead of faulting in fresh pages (lossnets.FeatureExtractor.peak_activation_bytes;
# measured in BENCHMARKS.md "similarity"). Devices with a caching allocator take a whole batch.
CPU_FORWARD_BYTES = 24 << 20


class Progress:
    """A log line every 10 s (and at the end): image sets done, of how many, how fast."""

    def __init__(self, total: int) -> None:
        self.done, self.total, self.t0, self.last = 0, total, time.perf_counter(), 0.0

    def update(self, n: int, label: str) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last > 10 or self.done == self.total:
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"  {label}: {self.done}/{self.total} image sets ({rate:.1f}/s)", flush=True)
            self.last = now


def by_reference(ref_index: np.ndarray, n_refs: int) -> list[tuple[int, np.ndarray]]:
    """``(reference, indices of its distorted images)`` for every reference that has any, in
    reference order; a ``ref_index`` outside ``[0, n_refs)`` is refused."""
    ref_index = np.asarray(ref_index, np.int64)
    if ref_index.size and (ref_index.min() < 0 or ref_index.max() >= n_refs):
        raise ValueError(f"ref_index points outside the {n_refs} reference images "
                         f"(values {ref_index.min()}..{ref_index.max()})")
    order = np.argsort(ref_index, kind="stable")
    refs, starts = np.unique(ref_index[order], return_index=True)
    return [(int(r), order[a:b]) for r, a, b in
            zip(refs, starts, [*starts[1:], len(order)], strict=True)]


class _Walk:
    """The loop both scorers share: per reference, its state once, then chunks of its
    distorted images; results scattered back into image order."""

    def _state(self, ref: np.ndarray):  # the reference's features (or pixels), once
        raise NotImplementedError

    def _chunk(self, state, dist: np.ndarray) -> dict:  # key -> [k] distances
        raise NotImplementedError

    def _step(self, batch: int) -> int:
        return max(1, batch)

    @torch.inference_mode()
    def distances(self, ref: np.ndarray, dist: np.ndarray, ref_index: np.ndarray, batch: int,
                  progress: Callable[[int], None] | None = None) -> dict:
        n = len(dist)
        out: dict = {}
        step = self._step(batch)
        for r, members in by_reference(ref_index, len(ref)):
            state = self._state(ref[r:r + 1])
            for i in range(0, len(members), step):
                idx = members[i:i + step]
                for key, d in self._chunk(state, dist[np.sort(idx)]).items():
                    if key not in out:
                        out[key] = np.full(n, np.nan)
                    out[key][np.sort(idx)] = d.double().cpu().numpy()
                if progress:
                    progress(len(idx))
            del state
        return out


class ReferenceScorer(_Walk):
    """Every loss network x variant of one architecture (its extractor covers their taps)."""

    def __init__(self, job: Job, extractor: FeatureExtractor, nets: Sequence[LossNet],
                 variants: Sequence[Variant], forward_bytes: int | None = CPU_FORWARD_BYTES,
                 image_size: tuple[int, int] | None = None):
        self.job, self.extractor = job, extractor
        self.nets, self.variants = list(nets), list(variants)
        self.taps = sorted({t for n in self.nets for t in n.taps})
        self.forward_bytes = forward_bytes if job.device.type == "cpu" else None
        self.image_size = image_size

    def _step(self, batch: int) -> int:
        if not self.forward_bytes or self.image_size is None:
            return max(1, batch)
        per_image = self.extractor.peak_activation_bytes(self.image_size)
        return max(1, min(batch, self.forward_bytes // per_image))

    def _features(self, images: np.ndarray) -> dict:
        x = to_images(images, self.job.device, None, channels_last=True)
        with self.job.autocast():
            feats = self.extractor(x)
        return compare.transform_features(feats, self.variants, self.taps)

    def _state(self, ref: np.ndarray):
        return self._features(ref)

    def _chunk(self, state, dist: np.ndarray) -> dict:
        diffs = compare.diffs_from_transformed(self._features(dist), state, self.variants,
                                               self.taps)
        return {(net.id, v): compare.reduce_channels({t: diffs[v][t] for t in net.taps})
                for net in self.nets for v in self.variants}


class PixelReferenceScorer(_Walk):
    """The pixel baselines ``pixel/<metric>`` (float64, on the images themselves)."""

    def __init__(self, job: Job, nets: Sequence[LossNet]):
        bad = [n.id for n in nets if not n.is_pixel]
        if bad:
            raise ValueError(f"PixelReferenceScorer scores pixel baselines only, got {bad}")
        self.job, self.nets = job, list(nets)

    def _state(self, ref: np.ndarray):
        return pixel.images64(ref, self.job.device)

    def _chunk(self, state, dist: np.ndarray) -> dict:
        x = pixel.images64(dist, self.job.device)
        d = pixel.pair_distances([n.layer for n in self.nets],
                                 [x, state.expand(len(x), -1, -1, -1)], [(0, 1)])
        return {(net.id, None): d[net.layer][0] for net in self.nets}
