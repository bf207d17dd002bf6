"""Comparison methods over tap dicts: every variant from one set of features.

Conventions (one place, used by every score in this project)
------------------------------------------------------------
For each tap (layer) ``l`` with features ``z`` of shape ``[N, C, H, W]``:

1. *transform*: ``spatial`` keeps ``z`` (H*W positions); ``mean`` averages over
   H, W (1 position); ``sort`` sorts each channel's H*W values independently
   (ascending; H*W "positions" in sorted order).
2. *channel normalisation* (optional): at every position divide the C-vector
   by ``sqrt(sum_c z_c^2) + 1e-10`` (LPIPS's ``normalize_tensor``). As in the
   flaws study it is applied AFTER the mean / sort transform.
3. *per-channel difference*: ``D[n, c] = mean over positions of (t_x - t_y)^2``.
4. *distance*: ``d[n] = sum over taps of sum over c of w_c * D[n, c]`` with
   ``w_c = 1`` unless per-channel weights are given.

That is the BAPPS / LPIPS convention (sum over channels, mean over positions,
sum over layers); ``spatial`` with channel normalisation on the LPIPS layer
sets equals ``lpips.LPIPS(lpips=False)``, and with the package's linear weights
as ``w`` equals ``lpips.LPIPS(lpips=True)``. The papers' formulas carry a 1/C
(and, for ``sort``, no 1/(H*W)): per layer these are constant factors, so a
single-layer 2AFC / JND score is unchanged, but across several layers they
re-weight the layers; ``channel_reduction="mean"`` gives the 1/C form.
Combined methods (``spatial+mean``, ``spatial+sort``) add the two per-channel
differences, so one weight per channel multiplies both terms.

Scoring many images (BAPPS) uses :func:`grouped_diffs`: the same numbers as
:func:`per_channel_diffs`, computed from one forward pass over several image
sets, each image transformed once, in small channels-last chunks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BASE_METHODS = ("spatial", "mean", "sort")
HALF_DTYPES = (torch.bfloat16, torch.float16)  # autocast dtypes: sorted before widening
METHODS = ("spatial", "mean", "sort", "spatial+mean", "spatial+sort")
EPS = 1e-10


@dataclass(frozen=True, order=True)
class Variant:
    """A comparison method with or without channel normalisation."""

    method: str
    channel_norm: bool

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown comparison {self.method!r}; known: {', '.join(METHODS)}")

    @property
    def name(self) -> str:
        return f"{self.method}{'-norm' if self.channel_norm else ''}"

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.method.split("+"))


def all_variants(methods: Iterable[str] = METHODS,
                 channel_norm: Iterable[bool] = (True, False)) -> list[Variant]:
    return [Variant(m, bool(n)) for m in methods for n in channel_norm]


def channel_normalize(t: Tensor, eps: float = EPS, dim: int = 1) -> Tensor:
    """Unit L2 norm over channels (``dim``, 1 by default) at every position.

    ``vector_norm`` is one fused reduction (no ``t * t`` temporary) and, unlike
    ``sqrt(sum(t * t))``, has a zero (not NaN) gradient at an all-zero position.
    """
    return t / (torch.linalg.vector_norm(t, dim=dim, keepdim=True) + eps)


def sort_positions(t: Tensor) -> Tensor:
    """Sort ``[N, C, P]`` along P (ascending).

    On the CPU, without autograd, NumPy's SIMD sort is used: it is about 15x
    faster than ``torch.sort`` for the many short rows of a feature map, and
    sorting is a permutation, so the values are identical.
    """
    if t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled()) \
            and t.dtype in (torch.float32, torch.float64):
        a = t.detach().clone(memory_format=torch.contiguous_format).numpy()
        a.sort(axis=-1)  # in place on the private copy
        return torch.from_numpy(a)
    return torch.sort(t, dim=-1).values


def transform(z: Tensor, base: str) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, C, P]``: the positions compared by ``base``."""
    z = z.flatten(2)
    if base == "spatial":
        return z
    if base == "mean":
        return z.mean(dim=2, keepdim=True)
    if base == "sort":
        return sort_positions(z)
    raise ValueError(f"unknown base method {base!r}")


def transform_features(
    feats: Mapping[int, Tensor],
    variants: Iterable[Variant],
    taps: Iterable[int] | None = None,
) -> dict[tuple[str, bool], dict[int, Tensor]]:
    """Every ``(base method, channel_norm)`` transform the variants need, once per tap.

    ``{(base, norm): {tap: [N, C, P]}}`` in float32. Transform a batch once and
    compare its slices many times (e.g. a BAPPS reference against p0 and p1):
    sorting and normalising dominate the cost of the comparisons.
    """
    taps = list(feats) if taps is None else list(taps)
    needed = sorted({(p, v.channel_norm) for v in variants for p in v.parts})
    out: dict[tuple[str, bool], dict[int, Tensor]] = {k: {} for k in needed}
    for tap in taps:
        raw = feats[tap]
        z = raw.float()
        for base in BASE_METHODS:
            norms = [n for (p, n) in needed if p == base]
            if not norms:
                continue
            if base == "sort" and raw.dtype in HALF_DTYPES:
                # sorting is a permutation and widening is exact and monotone: sorting the
                # autocast dtype and then widening gives the same values at half the bytes
                t = sort_positions(raw.flatten(2)).float()
            else:
                t = transform(z, base)
            for norm in norms:
                out[(base, norm)][tap] = channel_normalize(t) if norm else t
    return out


def diffs_from_transformed(
    tx: Mapping[tuple[str, bool], Mapping[int, Tensor]],
    ty: Mapping[tuple[str, bool], Mapping[int, Tensor]],
    variants: Iterable[Variant],
    taps: Iterable[int] | None = None,
) -> dict[Variant, dict[int, Tensor]]:
    """``D[variant][tap]`` of shape ``[..., C]`` from two :func:`transform_features` results.

    The leading dimensions of ``tx`` and ``ty`` broadcast (``[2, N, C, P]``
    against ``[N, C, P]`` compares two batches with one reference batch).
    """
    variants = list(dict.fromkeys(variants))
    keys = {(p, v.channel_norm) for v in variants for p in v.parts}
    if taps is None:
        taps = list(next(iter(tx.values()))) if tx else []
    out: dict[Variant, dict[int, Tensor]] = {v: {} for v in variants}
    for tap in taps:
        # subtract, square in place, average: one temporary per comparison, not two
        base = {k: torch.sub(tx[k][tap], ty[k][tap]).square_().mean(dim=-1) for k in keys}
        for v in variants:
            out[v][tap] = _combine(base, v)
    return out


def _combine(base: Mapping[tuple[str, bool], Tensor], v: Variant) -> Tensor:
    """A variant's per-channel difference: the sum of its parts' ``(base, norm)`` differences."""
    d = base[(v.parts[0], v.channel_norm)]
    for p in v.parts[1:]:
        d = d + base[(p, v.channel_norm)]
    return d


def per_channel_diffs(
    fx: Mapping[int, Tensor],
    fy: Mapping[int, Tensor],
    variants: Iterable[Variant],
    taps: Iterable[int] | None = None,
) -> dict[Variant, dict[int, Tensor]]:
    """``D[variant][tap]`` of shape ``[N, C]`` (float32), each transform computed once.

    ``fy`` may have batch size 1 (one reference against many) or ``N``.
    """
    variants = list(dict.fromkeys(variants))
    taps = list(fx) if taps is None else list(taps)
    return diffs_from_transformed(transform_features(fx, variants, taps),
                                  transform_features(fy, variants, taps), variants, taps)


def reduce_channels(
    diffs: Mapping[int, Tensor],
    weights: Mapping[int, Tensor] | None = None,
    channel_reduction: str = "sum",
) -> Tensor:
    """Distance from per-channel differences: ``[N]``, or ``[N, K]`` for ``[K, C]`` weights.

    The channel dimension is the last one, so ``[..., C]`` differences give ``[...]``.

    ``weights[tap]`` is ``[C]`` (one metric) or ``[K, C]`` (K metrics that share
    the features, e.g. all rankings of the adaptation study at once).
    """
    total = None
    for tap, d in diffs.items():
        if weights is None:
            r = d.sum(dim=-1)
        else:
            w = weights[tap].to(d.dtype)
            r = d @ w if w.dim() == 1 else d @ w.t()
        if channel_reduction == "mean":
            r = r / d.shape[-1]
        elif channel_reduction != "sum":
            raise ValueError(f"channel_reduction must be 'sum' or 'mean', "
                             f"got {channel_reduction!r}")
        total = r if total is None else total + r
    if total is None:
        raise ValueError("no taps to compare")
    return total


def distances(
    fx: Mapping[int, Tensor],
    fy: Mapping[int, Tensor],
    variants: Iterable[Variant],
    taps: Iterable[int] | None = None,
    weights: Mapping[int, Tensor] | None = None,
    channel_reduction: str = "sum",
) -> dict[Variant, Tensor]:
    """Distance per variant, ``[N]`` (or ``[N, K]`` with ``[K, C]`` weights)."""
    diffs = per_channel_diffs(fx, fy, variants, taps)
    return {v: reduce_channels(d, weights, channel_reduction) for v, d in diffs.items()}


@functools.lru_cache(maxsize=4)
def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="compare")


def _sort_columns(t: Tensor) -> Tensor:
    """Sort ``[..., P, C]`` along P (each channel's positions, ascending); inference only.

    On the CPU NumPy's SIMD sort, on a channels-last block, beats both
    ``torch.sort`` (~5x) and transposing to ``[..., C, P]`` first. It runs on one
    thread; :func:`grouped_diffs` spreads whole chunks over the cores instead.
    """
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) \
            and not (t.requires_grad and torch.is_grad_enabled()):
        return torch.from_numpy(np.sort(t.detach().numpy(), axis=-2))
    return torch.sort(t, dim=-2).values


def _selector(idx: Sequence[int]) -> Callable[[Tensor], Tensor]:
    """Pick image sets ``idx`` along dim 0: a view (broadcast for one repeated set) where
    possible."""
    if len(set(idx)) == 1:
        return lambda t: t[idx[0]:idx[0] + 1]  # one set against several: broadcast, no copy
    if list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return lambda t: t[idx[0]:idx[0] + len(idx)]
    index = torch.tensor(list(idx))
    return lambda t: t.index_select(0, index.to(t.device))


# Elements of one chunk's feature block (all image sets of a few items, one tap).
# On the CPU every temporary then stays far below glibc's mmap threshold (32 MiB)
# and mostly in cache: a fresh 47 MB tensor costs ~55 ms of page faults alone,
# more than the arithmetic on it. Devices with their own caching allocator
# (CUDA) take the whole batch at once.
CPU_CHUNK_ELEMENTS = 1 << 19


def grouped_diffs(
    feats: Mapping[int, Tensor],
    groups: int,
    pairs: Sequence[tuple[int, int]],
    variants: Iterable[Variant],
    taps: Iterable[int] | None = None,
    chunk_elements: int | None = None,
) -> dict[Variant, dict[int, Tensor]]:
    """Per-channel differences between image sets that went through one forward pass.

    ``feats[tap]`` is ``[groups * n, C, H, W]``: ``groups`` sets of ``n`` images,
    concatenated (a BAPPS 2AFC batch is ``(ref, p0, p1)``). Returns
    ``D[variant][tap]`` of shape ``[len(pairs), n, C]``, row ``k`` comparing set
    ``pairs[k][0]`` with set ``pairs[k][1]`` item by item: exactly
    :func:`per_channel_diffs` of those two sets (same transforms, same
    normalisation convention), but every image's transforms are computed once
    (a reference is sorted once for p0 and p1) and the work runs in chunks of
    items, in the features' own memory layout, so the temporaries stay small.
    Inference only (no autograd through the NumPy sort).
    """
    variants = list(dict.fromkeys(variants))
    taps = list(feats) if taps is None else list(taps)
    keys = sorted({(p, v.channel_norm) for v in variants for p in v.parts})
    bases = {p for p, _ in keys}
    sel_a, sel_b = _selector([a for a, _ in pairs]), _selector([b for _, b in pairs])
    diffs: dict[int, dict[tuple[str, bool], Tensor]] = {}
    tasks: list[tuple[Tensor, dict[tuple[str, bool], Tensor], int, int]] = []
    for tap in taps:
        z = feats[tap]
        if z.shape[0] % groups:
            raise ValueError(f"tap {tap}: batch {z.shape[0]} is not {groups} equal image sets")
        # [G, n, P, C]: channels last, a view of a channels_last feature map, so the
        # channel norm reduces over the contiguous dim and NumPy sorts down columns
        z = z.unflatten(0, (groups, z.shape[0] // groups)).flatten(3).transpose(-1, -2)
        n, npos, c = z.shape[1], z.shape[2], z.shape[3]
        limit = chunk_elements or (CPU_CHUNK_ELEMENTS if z.device.type == "cpu" else None)
        step = n if limit is None else max(1, min(n, limit // max(1, groups * c * npos)))
        diffs[tap] = d = {k: torch.empty(len(pairs), n, c, device=z.device) for k in keys}
        tasks += [(z, d, i, step) for i in range(0, n, step)]

    def chunk(z: Tensor, d: dict[tuple[str, bool], Tensor], i: int, step: int) -> None:
        t = z[:, i:i + step].float()  # no copy for float32 features
        blocks: dict[str, Tensor] = {}
        if "spatial" in bases:
            blocks["spatial"] = t
        if "mean" in bases:
            blocks["mean"] = t.mean(dim=-2, keepdim=True)
        if "sort" in bases:
            blocks["sort"] = _sort_columns(t)
        for (base, norm) in keys:
            t_k = blocks[base]
            if norm:  # AFTER the transform: sorted-then-normalised (module docstring)
                t_k = channel_normalize(t_k, dim=-1)
            # subtract, square in place, average over positions: [pairs, chunk, C]
            diff = torch.sub(sel_a(t_k), sel_b(t_k))
            d[(base, norm)][:, i:i + step] = diff.square_().mean(dim=-2)

    workers = torch.get_num_threads()
    if workers > 1 and len(tasks) > 1 and all(z.device.type == "cpu" for z, *_ in tasks):
        # Chunks are small (cache-sized), too small for torch's intra-op threads to pay off,
        # and NumPy sorts on one thread: run whole chunks side by side instead, each on one
        # thread (both torch kernels and NumPy's sort release the GIL). Every chunk writes
        # its own slice, so the result is the same as in order.
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def in_callers_mode(task: tuple) -> None:  # autograd modes are per thread
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                chunk(*task)

        with _single_threaded_torch():
            list(_cpu_pool(workers).map(in_callers_mode, tasks))
    else:
        for task in tasks:
            chunk(*task)
    out: dict[Variant, dict[int, Tensor]] = {v: {} for v in variants}
    for tap, d in diffs.items():
        for v in variants:
            out[v][tap] = _combine(d, v)
    return out


@contextlib.contextmanager
def _single_threaded_torch():
    """torch's intra-op thread count set to 1 for the block (it is process-wide), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
