"""Johnson et al. (2016) super-resolution network, as the loss-network study used it.

9x9 conv 3->64 (BN, ReLU), 4 residual blocks (conv-BN-ReLU-conv-BN + identity,
64 channels), log2(scale) upsample blocks (nearest x2, 3x3 conv, BN, ReLU),
9x9 conv 64->3, BN, tanh; output ``(tanh + 1) / 2`` in [0, 1]. Reflection padding
everywhere (no zero padding), so the output is exactly ``scale`` times the input.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from workflow.models.fused import FusedMembers


class ConvBN(nn.Sequential):
    """Reflection pad + conv + BatchNorm (+ ReLU)."""

    def __init__(self, cin: int, cout: int, k: int, relu: bool = True, groups: int = 1) -> None:
        layers: list[nn.Module] = [nn.ReflectionPad2d(k // 2),
                                   nn.Conv2d(cin, cout, k, groups=groups), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, ch: int, groups: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBN(ch, ch, 3, groups=groups),
                                  ConvBN(ch, ch, 3, relu=False, groups=groups))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class UpsampleBlock(nn.Sequential):
    def __init__(self, ch: int, groups: int = 1) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"),
                         ConvBN(ch, ch, 3, groups=groups))


class SRNet(nn.Module):
    """Super-resolution by ``scale`` (a power of two: 4 -> 2 upsample blocks, 8 -> 3).

    ``members`` > 1 is :class:`FusedSRNet`'s layout: that many networks side by side, every
    convolution grouped (``groups=members``), 3 * members input and output channels.
    """

    def __init__(self, scale: int = 4, channels: int = 64, n_residual: int = 4,
                 members: int = 1) -> None:
        super().__init__()
        n_up = int(round(math.log2(scale))) if scale > 0 else -1
        if scale < 2 or 2**n_up != scale:
            raise ValueError(f"scale must be a power of two >= 2 (the study uses 4 and 8), "
                             f"got {scale}")
        self.scale, g, ch = scale, int(members), channels * int(members)
        self.head = ConvBN(3 * g, ch, 9, groups=g)
        self.residual = nn.Sequential(*[ResidualBlock(ch, g) for _ in range(n_residual)])
        self.upsample = nn.Sequential(*[UpsampleBlock(ch, g) for _ in range(n_up)])
        self.tail = ConvBN(ch, 3 * g, 9, relu=False, groups=g)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: low-resolution images in [0, 1], [N, 3, h, w] -> [N, 3, h*scale, w*scale]."""
        y = self.tail(self.upsample(self.residual(self.head(x))))
        return (y.tanh() + 1) / 2


class FusedSRNet(FusedMembers, nn.Module):
    """``k`` :class:`SRNet` of one scale as ONE network: grouped convolutions (``groups=k``).

    Every layer of SRNet is per-channel except the convolutions, so ``k`` networks side by
    side are one network of ``k`` times the channels whose convolutions see only their own
    member's channels: a grouped convolution computes exactly the ``k`` separate ones, the
    BatchNorms (batch statistics per channel, over the member's own batch) and everything
    else are channel-wise already. Member ``i`` holds channels ``[i*c, (i+1)*c)`` of every
    layer. Input ``[N, 3, h, w]`` (one batch for all: repeated to every member) or
    ``[k, N, 3, h, w]`` (a batch per member); output ``[k, N, 3, h*scale, w*scale]``.
    """

    def __init__(self, scale: int, k: int, channels: int = 64, n_residual: int = 4) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"a fused SR network needs at least one member, got k={k}")
        self.k, self.scale = int(k), scale
        self.net = SRNet(scale, channels, n_residual, members=self.k)

    @classmethod
    def from_members(cls, members: list[SRNet]) -> FusedSRNet:
        if not members:
            raise ValueError("FusedSRNet.from_members needs at least one SRNet")
        ch = members[0].head[1].out_channels
        fused = cls(members[0].scale, len(members), ch, len(members[0].residual))
        return fused.fill(members)

    def member_root(self) -> nn.Module:
        return self.net  # names below it are the single model's

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.repeat(1, self.k, 1, 1)
        else:  # [k, N, 3, h, w] -> [N, k*3, h, w]
            x = x.permute(1, 0, 2, 3, 4).flatten(1, 2)
        y = self.net(x)
        n, _, h, w = y.shape
        return y.view(n, self.k, 3, h, w).transpose(0, 1)
