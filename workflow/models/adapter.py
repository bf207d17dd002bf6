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

Combined comparisons (``spatial+mean``, ``spatial+sort``) weight each term separately, as
the reference code does (docs/adaptation.md): the adapter takes the per-channel differences
of the *terms* (:func:`terms`: ``spatial``, ``mean``, ``sort`` with the metric's channel
normalisation) and holds one ``[R, C]`` matrix per comparison, term and tap.

Choices (also in docs/adaptation.md): channel weights start at 1 (the baseline metric);
dropout acts on the position-averaged differences, one mask per image, term, tap and channel,
shared by the metrics of a batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflow.archs import LossNet
from workflow.compare import Variant, reduce_channels
from workflow.metrics.similarity import twoafc_rate
from workflow.models.ranking import BatchedRankingNet

__all__ = ["FusedAdapter", "LinWeightsError", "baseline_distances", "load_adapter",
           "load_lpips_lin", "make_optimizer", "metric_seed", "tap_channels", "terms"]


def terms(variants: Sequence[Variant]) -> list[Variant]:
    """The single comparisons whose per-channel differences the metrics of ``variants`` are
    made of (``spatial+sort`` with channel norm -> ``spatial``, ``sort`` with it), each once."""
    return list(dict.fromkeys(Variant(p, v.channel_norm) for v in variants for p in v.parts))


def tap_key(t: int | str) -> int | str:
    """A tap as the extractor names it: a child index (the study's architectures; ``"3"`` in
    a model file's meta) or a module path (the node-name kind)."""
    return int(t) if isinstance(t, int) or str(t).isdigit() else str(t)


def _pname(v: int, t: int | str, term: int = 0) -> str:
    # comparison v, its term, tap t; parameter names cannot hold ".": a module path's dots
    # become ":" (child indices as before)
    return f"{v}_{term}_{str(t).replace('.', ':')}"


def metric_seed(seed: int, ranking: int, variant: Variant) -> int:
    """Initialisation seed of one (ranking, comparison) metric, the same fused or alone."""
    return zlib.crc32(f"{seed}/{ranking}/{variant.name}".encode())


class FusedAdapter(nn.Module):
    """Every (comparison, ranking) metric of one loss network and run, trained together.

    ``channel_weights[f"{v}_{j}_{tap}"]``: ``[R, C]`` non-negative weights of term ``j`` of
    comparison ``variants[v]`` at ``tap`` for the R rankings (a combined comparison has two
    terms, each with its own weights); ``rank_net``: K = V x R ranking nets, metric
    ``k = v * R + r``.
    """

    def __init__(self, channels: Mapping[int, int], variants: Sequence[Variant],
                 rankings: Sequence[int], seed: int = 0, dropout: float = 0.5,
                 sync_weight: float = 10.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"config key adaptation.dropout must be in [0, 1), got {dropout}")
        self.variants = list(variants)
        self.terms = terms(self.variants)
        self.rankings = [int(r) for r in rankings]
        channels = {tap_key(t): int(c) for t, c in channels.items()}
        self.taps = list(channels)
        if all(isinstance(t, int) for t in self.taps):
            self.taps.sort()
        self.channels = {t: channels[t] for t in self.taps}
        self.dropout = float(dropout)
        self.sync_weight = float(sync_weight)
        r = len(self.rankings)
        self.channel_weights = nn.ParameterDict({
            _pname(v, t, j): nn.Parameter(torch.ones(r, self.channels[t]))
            for v, var in enumerate(self.variants) for j in range(len(var.parts))
            for t in self.taps
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

    def weights(self, v: int, term: int = 0) -> dict[int | str, Tensor]:
        """``{tap: [R, C]}``: the weights of term ``term`` of comparison ``variants[v]``."""
        return {t: self.channel_weights[_pname(v, t, term)] for t in self.taps}

    def dropout_masks(self, n: int, generator: torch.Generator | None, device: torch.device
                      ) -> dict[Variant, dict[int, Tensor]] | None:
        """Inverted-dropout masks ``[n, C]`` per term and tap (0 or 1 / keep); None in eval
        mode."""
        if not self.training or self.dropout == 0.0:
            return None
        keep = 1.0 - self.dropout
        return {term: {t: (torch.rand(n, self.channels[t], generator=generator, device=device)
                           < keep).float() / keep for t in self.taps}
                for term in self.terms}

    def distances(self, diffs: Mapping[Variant, Mapping[int, Tensor]],
                  masks: Mapping[Variant, Mapping[int, Tensor]] | None = None) -> Tensor:
        """``[N, V, R]`` adapted distances from the terms' per-channel differences ``[N, C]``
        (``diffs`` keyed by the variants of :func:`terms`)."""
        missing = [t.name for t in self.terms if t not in diffs]
        if missing:
            raise KeyError(f"the adapter needs the per-channel differences of {missing} "
                           f"(workflow.models.adapter.terms of its comparisons)")
        out = []
        for v, var in enumerate(self.variants):
            total = None
            for j, part in enumerate(var.parts):
                term = Variant(part, var.channel_norm)
                d = {t: diffs[term][t] * masks[term][t] if masks is not None
                     else diffs[term][t] for t in self.taps}
                r = reduce_channels(d, self.weights(v, j))
                total = r if total is None else total + r
            out.append(total)
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

    def batch_loss(self, diffs0: Mapping[Variant, Mapping[int, Tensor]],
                   diffs1: Mapping[Variant, Mapping[int, Tensor]], labels: Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
        """One training step's summed loss from the terms' differences of (ref, p0) and
        (ref, p1): dropout masks (drawn from ``generator``, p0 side first), the distances
        and :meth:`loss`, in fp32 whatever the autocast around it (the adaptation and the
        LPIPS calibration steps). ``labels``: ``[N, R]``, 0 / 1 or a judge fraction."""
        n = labels.shape[0]
        dev = labels.device
        with torch.autocast(dev.type, enabled=False):
            dist0 = self.distances(diffs0, self.dropout_masks(n, generator, dev))
            dist1 = self.distances(diffs1, self.dropout_masks(n, generator, dev))
            total, _, _ = self.loss(dist0, dist1, labels.float())
        return total

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the channel weights non-negative (after every optimiser step)."""
        for p in self.channel_weights.values():
            p.clamp_(min=0.0)

    def describe(self) -> dict[str, Any]:
        """What :meth:`from_meta` needs, for the model file's meta."""
        return {"variants": [[v.method, v.channel_norm] for v in self.variants],
                "rankings": self.rankings,
                "taps": {str(t): c for t, c in self.channels.items()},
                "dropout": self.dropout, "sync_weight": self.sync_weight,
                "term_weights": "per term"}


def baseline_distances(diffs: Mapping[Variant, Mapping[int, Tensor]],
                       variants: Sequence[Variant]) -> Tensor:
    """``[N, V, 1]``: the unadapted metrics (every channel weight 1), shaped as
    :meth:`FusedAdapter.distances` with one ranking, from the terms' differences (a combined
    comparison is the sum of its terms')."""
    out = [sum(reduce_channels(diffs[Variant(p, v.channel_norm)]) for p in v.parts)
           for v in variants]
    return torch.stack(out, dim=1).unsqueeze(-1)


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


def load_adapter(path: str | Path, device: torch.device,
                 extra: Callable[[dict[str, Any]], Mapping[str, nn.Module]] | None = None
                 ) -> tuple[FusedAdapter, dict[str, Any]]:
    """The adapter of a model file written by the ``train`` command, on ``device``, in eval
    mode, and the file's meta; ``extra(meta)``: further modules the file holds (a trained
    ``backbone``: :mod:`workflow.models.backbone`), loaded in place, then moved to
    ``device`` and put in eval mode."""
    from workflow.training import load_model

    made: dict[str, FusedAdapter] = {}
    others: dict[str, nn.Module] = {}

    def build(meta: dict[str, Any]) -> dict[str, FusedAdapter]:
        missing = [k for k in ("taps", "variants", "rankings", "dropout", "sync_weight")
                   if k not in meta]
        if missing:
            raise ValueError(f"{path} is not an adapter file (its meta lacks {missing}); "
                             f"rerun the adaptation_train rule that writes it")
        if meta.get("term_weights") != "per term":
            raise ValueError(f"{path} was written when combined comparisons shared one weight "
                             f"per channel across their terms; rerun the rule that wrote it "
                             f"(adaptation_train or calibration_train)")
        made["adapter"] = FusedAdapter.from_meta(meta)
        others.update(extra(meta) if extra is not None else {})
        return {**made, **others}

    meta = load_model(path, build)
    for m in others.values():
        m.to(device).eval()
    return made["adapter"].to(device).eval(), meta


class LinWeightsError(ValueError):
    """A lin weights file of the lpips package that is missing or does not fit the loss
    network; the message names the file and the config key."""


def load_lpips_lin(folder_or_file: Path, lossnet: LossNet, channels: Mapping[int, int]
                 ) -> FusedAdapter:
    """An adapter (spatial, channel-normalised) holding the lpips package's lin weights of
    ``lossnet`` (``lin{k}.model.1.weight`` [1, C, 1, 1] of ``<alex|vgg|squeeze>.pth``), in
    tap order; ``channels``: the extractor's channels per tap, checked against the file."""
    from workflow.plan import LPIPS_SHIPPED  # the rules' module: torch-free, so no circle

    path = Path(folder_or_file)
    if path.is_dir():
        if lossnet.arch not in LPIPS_SHIPPED:
            raise LinWeightsError(f"the lpips package ships lin weights for "
                                   f"{', '.join(LPIPS_SHIPPED)}, not {lossnet.arch}")
        path = path / f"{LPIPS_SHIPPED[lossnet.arch]}.pth"
    if not path.is_file():
        raise LinWeightsError(f"{path} not found: config key calibration.shipped_weights must "
                               f"be a folder laid out as the lpips package's weights/v0.1/")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise LinWeightsError(f"cannot read {path} ({e}); it should be a lin weights file "
                               f"of the lpips package (weights/v0.1/)") from e
    taps = sorted(channels)
    keys = [f"lin{k}.model.1.weight" for k in range(len(taps))]
    if sorted(state) != sorted(keys):
        raise LinWeightsError(f"{path} holds {sorted(state)}, not the {len(taps)} lin layers "
                               f"({keys[0]} ...) of {lossnet.id}'s taps {taps}")
    adapter = FusedAdapter(channels, [Variant("spatial", True)], [0], dropout=0.0,
                           sync_weight=0.0)
    with torch.no_grad():
        for k, t in zip(keys, taps, strict=True):
            w = state[k].reshape(-1)
            if w.numel() != channels[t]:
                raise LinWeightsError(f"{path}: {k} has {w.numel()} channels, tap {t} of "
                                       f"{lossnet.id} has {channels[t]}")
            adapter.weights(0)[t][0].copy_(w)
    return adapter.eval()
