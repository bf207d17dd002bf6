"""The convolutional autoencoder of the dimensionality-reduction benchmark (docs/autoencoder.md).

Encoder: four 4x4 convolutions with stride 2 and no padding (3 -> 32 -> 64 -> 128 -> 256),
each followed by BatchNorm and ReLU, flattened, then a linear map to the code (z = 64).

Decoder: a linear map to 1024 x g x g with g = (size - 64) / 16 + 1, ReLU, then transposed
convolutions k5 s2 1024 -> 128, k5 s2 128 -> 64, k6 s2 64 -> 32 (each with BatchNorm and
ReLU) and k6 s2 32 -> 3 with a sigmoid, so the reconstruction lies in [0, 1].

Only input sizes of the form 64 + 16 k give an output of the input's size: 64 (SVHN, padded
from 32 by reflection) and 96 (STL-10) are the two the study uses.
"""

from __future__ import annotations

from torch import Tensor, nn

CODE_SIZE = 64
ENCODER_CHANNELS = (3, 32, 64, 128, 256)


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def encoder_grid(size: int) -> int:
    """Spatial side of the last encoder feature map for a ``size`` x ``size`` input."""
    for _ in range(len(ENCODER_CHANNELS) - 1):
        size = _conv_out(size, 4, 2)
    return size


def decoder_grid(size: int) -> int:
    """``g`` of the decoder's first feature map (1024 x g x g); checks that ``size`` fits."""
    if size < 64 or (size - 64) % 16:
        raise ValueError(
            f"autoencoder input size {size} is not supported: the decoder reproduces sizes "
            f"64 + 16k only (64 for padded SVHN, 96 for STL-10)"
        )
    return (size - 64) // 16 + 1


def _bn_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels), nn.ReLU()]


class ConvAutoencoder(nn.Module):
    """``encode(x) -> [N, code_size]``, ``decode(z) -> [N, 3, size, size]``,
    ``forward = decode(encode)``."""

    def __init__(self, size: int, code_size: int = CODE_SIZE):
        super().__init__()
        self.size = int(size)
        self.code_size = int(code_size)
        g = decoder_grid(self.size)
        enc: list[nn.Module] = []
        for cin, cout in zip(ENCODER_CHANNELS[:-1], ENCODER_CHANNELS[1:], strict=True):
            enc += _bn_relu(nn.Conv2d(cin, cout, 4, stride=2, padding=0), cout)
        e = encoder_grid(self.size)
        self.encoder = nn.Sequential(*enc, nn.Flatten(),
                                     nn.Linear(ENCODER_CHANNELS[-1] * e * e, self.code_size))
        self.decoder = nn.Sequential(
            nn.Linear(self.code_size, 1024 * g * g),
            nn.ReLU(),
            nn.Unflatten(1, (1024, g, g)),
            *_bn_relu(nn.ConvTranspose2d(1024, 128, 5, stride=2), 128),
            *_bn_relu(nn.ConvTranspose2d(128, 64, 5, stride=2), 64),
            *_bn_relu(nn.ConvTranspose2d(64, 32, 6, stride=2), 32),
            nn.ConvTranspose2d(32, 3, 6, stride=2),
            nn.Sigmoid(),
        )

    def encode(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(
                f"autoencoder built for {self.size}x{self.size} inputs got {tuple(x.shape[-2:])}"
            )
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
