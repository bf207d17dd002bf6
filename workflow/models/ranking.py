"""The LPIPS ranking network G, single and batched over K metrics.

G maps a pair of distances to the probability that p1 is the closer image
(judge semantics of BAPPS): input ``[d0, d1, d0 - d1, d0 / (d1 + 0.1), d1 / (d0 + 0.1)]``
-> 32 -> LeakyReLU(0.2) -> 32 -> LeakyReLU(0.2) -> 1 -> sigmoid (the 1x1 convs of
LPIPS's ``Dist2LogitLayer`` act on scalars, so they are linear layers here).
``forward`` returns *logits*; apply ``torch.sigmoid`` for the probability, or train
with ``binary_cross_entropy_with_logits`` (the same loss as BCE after a sigmoid,
numerically safer).

:class:`BatchedRankingNet` holds K independent copies (one per adapted metric)
and evaluates them in one einsum, so the fused adaptation trains every
ranking x method metric at once. Metric k's parameters are initialised from a
generator seeded by ``seeds[k]``, exactly as :class:`RankingNet` with that seed
would be, so fused and one-at-a-time training start from the same point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIDDEN = 32
EPS = 0.1
SIZES = ((5, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1))


def ranking_features(d0: Tensor, d1: Tensor, eps: float = EPS) -> Tensor:
    """``[..., 5]``: the five inputs of G, elementwise over any shape."""
    return torch.stack([d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)], dim=-1)


def _init_layer(fan_in: int, fan_out: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """PyTorch's default Conv/Linear initialisation (uniform +-1/sqrt(fan_in) for both)."""
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound
    b = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return w, b


class BatchedRankingNet(nn.Module):
    """K independent ranking nets: ``forward(d0 [N, K], d1 [N, K]) -> logits [N, K]``."""

    def __init__(self, seeds: Sequence[int], hidden: int = HIDDEN) -> None:
        super().__init__()
        if not len(seeds):
            raise ValueError("BatchedRankingNet needs at least one metric")
        sizes = ((5, hidden), (hidden, hidden), (hidden, 1))
        per_metric = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            per_metric.append([_init_layer(i, o, g) for i, o in sizes])
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.stack([m[j][0] for m in per_metric])) for j in range(len(sizes))]
        )  # [K, in, out]
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.stack([m[j][1] for m in per_metric])) for j in range(len(sizes))]
        )  # [K, out]

    @property
    def n_metrics(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, d0: Tensor, d1: Tensor) -> Tensor:
        x = ranking_features(d0, d1)  # [N, K, 5]
        last = len(self.weights) - 1
        for j, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.einsum("nki,kio->nko", x, w) + b
            if j < last:
                x = F.leaky_relu(x, 0.2)
        return x.squeeze(-1)


class RankingNet(nn.Module):
    """One ranking net: ``forward(d0 [N], d1 [N]) -> logits [N]``."""

    def __init__(self, seed: int = 0, hidden: int = HIDDEN) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.layers = nn.ModuleList()
        for i, o in ((5, hidden), (hidden, hidden), (hidden, 1)):
            w, b = _init_layer(i, o, g)
            lin = nn.Linear(i, o)
            with torch.no_grad():
                lin.weight.copy_(w.t())
                lin.bias.copy_(b)
            self.layers.append(lin)

    def forward(self, d0: Tensor, d1: Tensor) -> Tensor:
        x = ranking_features(d0, d1)
        for j, lin in enumerate(self.layers):
            x = lin(x)
            if j < len(self.layers) - 1:
                x = F.leaky_relu(x, 0.2)
        return x.squeeze(-1)
