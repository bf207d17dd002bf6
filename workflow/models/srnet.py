"""Johnson et al. (2016) super-resolution network, as the loss-network study used it.

9x9 conv 3->64 (BN, ReLU), 4 residual blocks (conv-BN-ReLU-conv-BN + identity,
64 channels), log2(scale) upsample blocks (nearest x2, 3x3 conv, BN, ReLU),
9x9 conv 64->3, BN, tanh; output ``(tanh + 1) / 2`` in [0, 1]. Reflection padding
everywhere (no zero padding), so the output is exactly ``scale`` times the input.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class ConvBN(nn.Sequential):
    """Reflection pad + conv + BatchNorm (+ ReLU)."""

    def __init__(self, cin: int, cout: int, k: int, relu: bool = True) -> None:
        layers: list[nn.Module] = [nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k),
                                   nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBN(ch, ch, 3), ConvBN(ch, ch, 3, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class UpsampleBlock(nn.Sequential):
    def __init__(self, ch: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvBN(ch, ch, 3))


class SRNet(nn.Module):
    """Super-resolution by ``scale`` (a power of two: 4 -> 2 upsample blocks, 8 -> 3)."""

    def __init__(self, scale: int = 4, channels: int = 64, n_residual: int = 4) -> None:
        super().__init__()
        n_up = int(round(math.log2(scale))) if scale > 0 else -1
        if scale < 2 or 2**n_up != scale:
            raise ValueError(f"scale must be a power of two >= 2 (the study uses 4 and 8), "
                             f"got {scale}")
        self.scale = scale
        self.head = ConvBN(3, channels, 9)
        self.residual = nn.Sequential(*[ResidualBlock(channels) for _ in range(n_residual)])
        self.upsample = nn.Sequential(*[UpsampleBlock(channels) for _ in range(n_up)])
        self.tail = ConvBN(channels, 3, 9, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: low-resolution images in [0, 1], [N, 3, h, w] -> [N, 3, h*scale, w*scale]."""
        y = self.tail(self.upsample(self.residual(self.head(x))))
        return (y.tanh() + 1) / 2
