"""The convolutional autoencoder of the dimensionality-reduction benchmark (docs/autoencoder.md).

Encoder: four 4x4 convolutions with stride 2 and no padding (3 -> 32 -> 64 -> 128 -> 256),
each followed by BatchNorm and ReLU, flattened, then a linear map to the code (z = 64).

Decoder: a linear map to 1024 x g x g with g = (size - 64) / 16 + 1, ReLU, then transposed
convolutions k5 s2 1024 -> 128, k5 s2 128 -> 64, k6 s2 64 -> 32 (each with BatchNorm and
ReLU) and k6 s2 32 -> 3 with a sigmoid, so the reconstruction lies in [0, 1].

Only input sizes of the form 64 + 16 k give an output of the input's size: 64 (SVHN, padded
from 32 by reflection) and 96 (STL-10) are the two the study uses.

:class:`FusedAutoencoder`: ``k`` of them as one network (grouped convolutions, the Linear
maps as one batched matmul), for fused training (config ``autoencoder.fuse``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workflow.models.fused import FusedMembers

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


class GroupedLinear(nn.Module):
    """``k`` :class:`~torch.nn.Linear` maps side by side, as one batched matmul: ``weight``
    ``[k * out, in]`` and ``bias`` ``[k * out]`` hold member ``i``'s rows at ``[i*out,
    (i+1)*out)`` (so slicing them gives its Linear's own ``weight`` and ``bias``); input
    ``[k, N, in]`` (member ``i``'s batch at ``[i]``), output ``[k, N, out]``."""

    def __init__(self, k: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.k, self.in_features, self.out_features = int(k), int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.k * self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.k * self.out_features))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.view(self.k, self.out_features, self.in_features)
        return torch.baddbmm(self.bias.view(self.k, 1, self.out_features), x, w.transpose(1, 2))


class _MemberFlatten(nn.Module):
    """``[N, k*C, h, w]`` -> ``[k, N, C*h*w]``: each member's channels flattened as
    :class:`~torch.nn.Flatten` flattens them (channel, row, column)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = int(k)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.k, -1).transpose(0, 1)


class _MemberUnflatten(nn.Module):
    """``[k, N, C*g*g]`` -> ``[N, k*C, g, g]`` (:class:`~torch.nn.Unflatten` per member)."""

    def __init__(self, k: int, channels: int, g: int) -> None:
        super().__init__()
        self.k, self.channels, self.g = int(k), int(channels), int(g)

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(0, 1).reshape(x.shape[1], self.k * self.channels, self.g, self.g)


class FusedAutoencoder(FusedMembers, nn.Module):
    """``k`` :class:`ConvAutoencoder` of one size and code size as ONE network.

    Every convolution and transposed convolution is grouped (``groups=k``: member ``i`` sees
    only its own channels ``[i*c, (i+1)*c)`` of every layer), the two Linear maps are
    :class:`GroupedLinear` (one batched matmul), and BatchNorm (batch statistics per
    channel, over the member's own batch), ReLU and the sigmoid are channel-wise already, so
    the fused network computes exactly the ``k`` separate ones. The module names are
    :class:`ConvAutoencoder`'s, and every parameter and buffer holds member ``i``'s tensor
    at rows ``[i*n, (i+1)*n)`` of its first dimension: :meth:`member_state_dict` and
    :meth:`load_member` are slices. Input ``[N, 3, s, s]`` (one batch for all: repeated to
    every member) or ``[k, N, 3, s, s]`` (a batch per member); :meth:`encode` gives
    ``[k, N, code_size]``, :meth:`forward` ``[k, N, 3, s, s]``.
    """

    def __init__(self, size: int, code_size: int = CODE_SIZE, k: int = 1) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"a fused autoencoder needs at least one member, got k={k}")
        self.size, self.code_size, self.k = int(size), int(code_size), int(k)
        g, e, k = decoder_grid(self.size), encoder_grid(self.size), self.k
        enc: list[nn.Module] = []
        for cin, cout in zip(ENCODER_CHANNELS[:-1], ENCODER_CHANNELS[1:], strict=True):
            enc += _bn_relu(nn.Conv2d(cin * k, cout * k, 4, stride=2, groups=k), cout * k)
        self.encoder = nn.Sequential(*enc, _MemberFlatten(k),
                                     GroupedLinear(k, ENCODER_CHANNELS[-1] * e * e,
                                                   self.code_size))
        self.decoder = nn.Sequential(
            GroupedLinear(k, self.code_size, 1024 * g * g),
            nn.ReLU(),
            _MemberUnflatten(k, 1024, g),
            *_bn_relu(nn.ConvTranspose2d(1024 * k, 128 * k, 5, stride=2, groups=k), 128 * k),
            *_bn_relu(nn.ConvTranspose2d(128 * k, 64 * k, 5, stride=2, groups=k), 64 * k),
            *_bn_relu(nn.ConvTranspose2d(64 * k, 32 * k, 6, stride=2, groups=k), 32 * k),
            nn.ConvTranspose2d(32 * k, 3 * k, 6, stride=2, groups=k),
            nn.Sigmoid(),
        )

    @classmethod
    def from_members(cls, members: list[ConvAutoencoder]) -> FusedAutoencoder:
        """The members (built and initialised each as it is trained alone) as one network."""
        if not members:
            raise ValueError("FusedAutoencoder.from_members needs at least one ConvAutoencoder")
        sizes = {(m.size, m.code_size) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"fused autoencoders share one input and code size, got {sizes}")
        fused = cls(members[0].size, members[0].code_size, len(members))
        return fused.fill(members)

    def _stacked(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"autoencoder built for {self.size}x{self.size} inputs got "
                             f"{tuple(x.shape[-2:])}")
        if x.dim() == 4:
            return x.repeat(1, self.k, 1, 1)
        if x.dim() != 5 or x.shape[0] != self.k:
            raise ValueError(f"a fused autoencoder of {self.k} takes [N, 3, s, s] or "
                             f"[{self.k}, N, 3, s, s], got {tuple(x.shape)}")
        return x.transpose(0, 1).flatten(1, 2)  # [k, N, 3, s, s] -> [N, k*3, s, s]

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(self._stacked(x))

    def decode(self, z: Tensor) -> Tensor:
        y = self.decoder(z)
        n, _, h, w = y.shape
        return y.view(n, self.k, 3, h, w).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
