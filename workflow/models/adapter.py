"""The fused adapter: every (comparison, ranking) metric of one loss network and run.

An adapted metric (docs/adaptation.md) is non-negative per-channel weights on the
position-averaged differences of one comparison, plus an LPIPS ranking net G trained with
BCE and the sync loss ``sync_weight * BCE(sigmoid(d0 - d1), label)`` while the metric's
batch 2AFC is <= 0.5. The images of a triplet batch do not depend on the ranking, so one
set of per-channel differences per comparison serves every metric: :class:`FusedAdapter`
holds a ``[rankings x channels]`` weight matrix per comparison and tap and K = comparisons x
rankings ranking nets evaluated in one einsum (:class:`workflow.models.ranking.
BatchedRankingNet`). The total loss is the *sum* of the metrics' losses and their parameters
are disjoint, so under Adam (elementwise) each metric follows exactly the trajectory it
would follow alone; ``tests/test_adapter.py`` checks it.

Choices (also in docs/adaptation.md): channel weights start at 1 (the baseline metric);
dropout acts on the position-averaged differences, one mask per image, tap and channel,
shared by the metrics of a batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflow.compare import Variant, reduce_channels
from workflow.metrics.similarity import twoafc_rate
from workflow.models.ranking import BatchedRankingNet

__all__ = ["FusedAdapter", "baseline_distances", "load_adapter", "make_optimizer",
           "metric_seed", "tap_channels"]


def tap_key(t: int | str) -> int | str:
    """A tap as the extractor names it: a child index (the study's architectures; ``"3"`` in
    a model file's meta) or a module path (the node-name kind)."""
    return int(t) if isinstance(t, int) or str(t).isdigit() else str(t)


def _pname(v: int, t: int | str) -> str:
    # parameter names cannot hold "."; a module path's dots become ":" (child indices as before)
    return f"{v}_{str(t).replace('.', ':')}"


def metric_seed(seed: int, ranking: int, variant: Variant) -> int:
    """Initialisation seed of one (ranking, comparison) metric, the same fused or alone."""
    return zlib.crc32(f"{seed}/{ranking}/{variant.name}".encode())


class FusedAdapter(nn.Module):
    """Every (comparison, ranking) metric of one loss network and run, trained together.

    ``channel_weights[f"{v}_{tap}"]``: ``[R, C]`` non-negative weights of comparison
    ``variants[v]`` at ``tap`` for the R rankings; ``rank_net``: K = V x R ranking nets,
    metric ``k = v * R + r``.
    """

    def __init__(self, channels: Mapping[int, int], variants: Sequence[Variant],
                 rankings: Sequence[int], seed: int = 0, dropout: float = 0.5,
                 sync_weight: float = 10.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"config key adaptation.dropout must be in [0, 1), got {dropout}")
        self.variants = list(variants)
        self.rankings = [int(r) for r in rankings]
        channels = {tap_key(t): int(c) for t, c in channels.items()}
        self.taps = list(channels)
        if all(isinstance(t, int) for t in self.taps):
            self.taps.sort()
        self.dropout = float(dropout)
        self.sync_weight = float(sync_weight)
        r = len(self.rankings)
        self.channel_weights = nn.ParameterDict({
            _pname(v, t): nn.Parameter(torch.ones(r, channels[t]))
            for v in range(len(self.variants)) for t in self.taps
        })
        self.rank_net = BatchedRankingNet([metric_seed(seed, rk, var) for var in self.variants
                                           for rk in self.rankings])

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> FusedAdapter:
        """An adapter shaped as :meth:`describe` says (its weights are then loaded)."""
        return cls({tap_key(t): int(c) for t, c in meta["taps"].items()},
                   [Variant(m, bool(n)) for m, n in meta["variants"]], meta["rankings"],
                   dropout=meta["dropout"], sync_weight=meta["sync_weight"])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.variants), len(self.rankings)

    def weights(self, v: int) -> dict[int, Tensor]:
        return {t: self.channel_weights[_pname(v, t)] for t in self.taps}

    def dropout_masks(self, n: int, generator: torch.Generator | None, device: torch.device
                      ) -> dict[int, Tensor] | None:
        """Inverted-dropout masks ``[n, C]`` per tap (0 or 1 / keep); None in eval mode."""
        if not self.training or self.dropout == 0.0:
            return None
        keep = 1.0 - self.dropout
        return {t: (torch.rand(n, self.channel_weights[_pname(0, t)].shape[1], generator=generator,
                               device=device) < keep).float() / keep for t in self.taps}

    def distances(self, diffs: Mapping[Variant, Mapping[int, Tensor]],
                  masks: Mapping[int, Tensor] | None = None) -> Tensor:
        """``[N, V, R]`` adapted distances from per-channel differences ``[N, C]``."""
        out = []
        for v, var in enumerate(self.variants):
            d = diffs[var]
            if masks is not None:
                d = {t: d[t] * masks[t] for t in self.taps}
            else:
                d = {t: d[t] for t in self.taps}
            out.append(reduce_channels(d, self.weights(v)))
        return torch.stack(out, dim=1)

    def loss(self, d0: Tensor, d1: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Summed loss, per-metric losses ``[V, R]`` and per-metric batch 2AFC ``[V, R]``."""
        n, v, r = d0.shape
        if labels.shape != (n, r):
            raise ValueError(f"labels must be [N, R] = [{n}, {r}], got {tuple(labels.shape)}")
        target = labels.unsqueeze(1).expand(n, v, r).float()
        logits = self.rank_net(d0.reshape(n, v * r), d1.reshape(n, v * r)).view(n, v, r)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0)
        with torch.no_grad():
            acc = twoafc_rate(d0, d1, target)
        sync = F.binary_cross_entropy_with_logits(d0 - d1, target, reduction="none").mean(0)
        per = bce + self.sync_weight * sync * (acc <= 0.5).float()
        return per.sum(), per.detach(), acc

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the channel weights non-negative (after every optimiser step)."""
        for p in self.channel_weights.values():
            p.clamp_(min=0.0)

    def describe(self) -> dict[str, Any]:
        """What :meth:`from_meta` needs, for the model file's meta."""
        return {"variants": [[v.method, v.channel_norm] for v in self.variants],
                "rankings": self.rankings,
                "taps": {str(t): int(self.channel_weights[_pname(0, t)].shape[1])
                         for t in self.taps},
                "dropout": self.dropout, "sync_weight": self.sync_weight}


def baseline_distances(diffs: Mapping[Variant, Mapping[int, Tensor]],
                       variants: Sequence[Variant]) -> Tensor:
    """``[N, V, 1]``: the unadapted metrics (every channel weight 1), shaped as
    :meth:`FusedAdapter.distances` with one ranking."""
    return torch.stack([reduce_channels(diffs[v]) for v in variants], dim=1).unsqueeze(-1)


def tap_channels(extractor: nn.Module, size: int, device: torch.device) -> dict[int, int]:
    """Channels per tap of a loss-network extractor (the widths of the channel weights)."""
    with torch.no_grad():
        feats = extractor(torch.zeros(1, 3, size, size, device=device))
    return {tap_key(t): int(f.shape[1]) for t, f in feats.items()}


def make_optimizer(adapter: FusedAdapter, lr: float, betas: Sequence[float]
                   ) -> torch.optim.Adam:
    """Adam over every metric's parameters (elementwise, so the metrics stay independent),
    built by :func:`workflow.training.make_adam` for the device the adapter is on."""
    from workflow.training import make_adam

    return make_adam(adapter.parameters(), lr, next(adapter.parameters()).device, betas)


def load_adapter(path: str | Path, device: torch.device) -> tuple[FusedAdapter, dict[str, Any]]:
    """The adapter of a model file written by the ``train`` command, on ``device``, in eval
    mode, and the file's meta."""
    from workflow.training import load_model

    made: dict[str, FusedAdapter] = {}

    def build(meta: dict[str, Any]) -> dict[str, FusedAdapter]:
        missing = [k for k in ("taps", "variants", "rankings", "dropout", "sync_weight")
                   if k not in meta]
        if missing:
            raise ValueError(f"{path} is not an adapter file (its meta lacks {missing}); "
                             f"rerun the adaptation_train rule that writes it")
        made["adapter"] = FusedAdapter.from_meta(meta)
        return made

    meta = load_model(path, build)
    return made["adapter"].to(device).eval(), meta
