"""The refinement U-Net of the road-delineation benchmark (docs/delineation.md; after Mosinska
et al. 2018), and its tiled inference.

Input: 4 channels, the RGB image in [0, 1] and the previous road prediction in [0, 1].
Encoder: four blocks of a 4x4 convolution with stride 2 and padding 1, BatchNorm and ReLU,
4 -> 8 -> 16 -> 32 -> 32 channels (each halves the side). Decoder: four blocks of a 4x4
transposed convolution with stride 2 and padding 1 (each doubles the side); the outputs of
the first three are concatenated with the encoder features of the same resolution (the skip
connections) and batch-normalised, the last maps to one channel at full resolution and ends
in a sigmoid (no BatchNorm on the single output channel: it would only rescale the logit).

    x (4, S) -> d1 (8, S/2) -> d2 (16, S/4) -> d3 (32, S/8) -> d4 (32, S/16)
    u1 = up(d4) 32 ++ d3 32 -> (64, S/8)
    u2 = up(u1) 16 ++ d2 16 -> (32, S/4)
    u3 = up(u2)  8 ++ d1  8 -> (16, S/2)
    out = sigmoid(up(u3))    -> (1, S)

The side S must be a multiple of 16 (``SIDE_MULTIPLE``); ``pad_to_multiple`` pads images.

Refinement (``refine``): pass 1 gets an all-zero prediction channel (there is no previous
prediction; zeros mean "no road anywhere", the same empty map Mosinska et al. start from) and
pass k > 1 gets the output of pass k - 1. Training uses one pass (K = 1), so the network only
ever sees the zero map in training, exactly as in the reference; the benchmark reports every
pass K = 1, 2, 3 at test time so the effect of feeding back is visible rather than summed.

Receptive field: an output pixel depends on input pixels at most ``RECEPTIVE_RADIUS`` px away
(per axis). Tiled inference (:func:`predict_tiled`) whose tiles keep at least that margin at
every inner edge, with tile origins on multiples of 16 (so every tile sees the same phase of
the four stride-2 stages as the whole image), reproduces whole-image inference; the tile
size then only trades memory for speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from workflow.models.fused import FusedMembers

__all__ = ["RECEPTIVE_RADIUS", "SIDE_MULTIPLE", "FusedUNet", "RefinementUNet", "kept_span",
           "pad_to_multiple", "padded_side", "predict_tiled", "tile_starts"]

ENCODER_CHANNELS = (4, 8, 16, 32, 32)
SIDE_MULTIPLE = 16  # four stride-2 stages
# Interval analysis: a stride-2 conv (k4, p1) output i reads inputs 2i-1..2i+2, a transposed
# one (k4, s2, p1) output o reads inputs ceil(o/2)-1..floor((o+1)/2). Following every path
# (skips included) back to the input, the widest reach over the 16 phases is 45 px per side;
# the tests confirm it with gradients.
RECEPTIVE_RADIUS = 45


def _down(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1, groups=groups),
                         nn.BatchNorm2d(cout), nn.ReLU())


class RefinementUNet(nn.Module):
    """``forward(x) -> road probability [N, 1, S, S]`` for ``x`` = [N, 4, S, S] (RGB + prediction).

    ``logits(x)`` is the same before the sigmoid (train with BCE-with-logits: it is the same
    loss, numerically stable, and safe under bf16 autocast where plain BCE is refused).

    ``members`` > 1 is :class:`FusedUNet`'s layout: that many U-Nets side by side, every
    (transposed) convolution grouped (``groups=members``), 4 * members input channels and
    ``members`` output channels; a skip concatenation keeps each member's channels together
    (member ``i``: its upsampled channels, then its encoder channels).
    """

    def __init__(self, members: int = 1) -> None:
        super().__init__()
        g = self.members = int(members)
        if g < 1:
            raise ValueError(f"a U-Net has at least one member, got members={members}")
        c = [ch * g for ch in ENCODER_CHANNELS]
        self.down = nn.ModuleList(_down(c[i], c[i + 1], g) for i in range(4))
        # transposed convolution of the block, then BatchNorm + ReLU of the concatenation
        self.up = nn.ModuleList([
            nn.ConvTranspose2d(c[4], c[3], 4, stride=2, padding=1, groups=g),      # 32 -> 32
            nn.ConvTranspose2d(2 * c[3], c[2], 4, stride=2, padding=1, groups=g),  # 64 -> 16
            nn.ConvTranspose2d(2 * c[2], c[1], 4, stride=2, padding=1, groups=g),  # 32 -> 8
            nn.ConvTranspose2d(2 * c[1], g, 4, stride=2, padding=1, groups=g),     # 16 -> 1
        ])
        self.up_norm = nn.ModuleList(nn.BatchNorm2d(2 * c[i]) for i in (3, 2, 1))

    def _skip(self, up: Tensor, skip: Tensor) -> Tensor:
        """``up ++ skip`` along channels, per member: [up_0, skip_0, up_1, skip_1, ...]."""
        if self.members == 1:
            return torch.cat([up, skip], 1)
        g = self.members
        return torch.cat([up.unflatten(1, (g, -1)), skip.unflatten(1, (g, -1))], 2).flatten(1, 2)

    def logits(self, x: Tensor) -> Tensor:
        cin = ENCODER_CHANNELS[0] * self.members
        if x.ndim != 4 or x.shape[1] != cin:
            raise ValueError(f"RefinementUNet expects [N, {cin}, H, W] (RGB + prediction"
                             f"{' per member' if self.members > 1 else ''}), got "
                             f"{tuple(x.shape)}")
        if x.shape[-2] % SIDE_MULTIPLE or x.shape[-1] % SIDE_MULTIPLE:
            raise ValueError(
                f"RefinementUNet input sides must be multiples of {SIDE_MULTIPLE}, got "
                f"{tuple(x.shape[-2:])}; pad with workflow.models.unet.pad_to_multiple"
            )
        skips = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
        h = skips.pop()  # the bottleneck d4 has no skip partner
        for up, norm in zip(self.up[:3], self.up_norm, strict=True):
            h = F.relu(norm(self._skip(up(h), skips.pop())))
        return self.up[3](h)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))

    def refine(self, image: Tensor, passes: int, previous: Tensor | None = None) -> list[Tensor]:
        """Run ``passes`` refinement passes on RGB ``image`` [N, 3, S, S]; return every pass's
        output.

        Pass 1 sees ``previous`` (default: zeros) as channel 4, pass k the output of pass k - 1.
        """
        if passes < 1:
            raise ValueError(f"refinement passes must be >= 1, got {passes}")
        pred = (image.new_zeros(image.shape[0], 1, *image.shape[-2:]) if previous is None
                else previous)
        outputs = []
        for _ in range(passes):
            pred = self(torch.cat([image, pred.to(image.dtype)], 1))
            outputs.append(pred)
        return outputs


class FusedUNet(FusedMembers, nn.Module):
    """``k`` :class:`RefinementUNet` as ONE network: grouped (transposed) convolutions.

    Every layer of the U-Net is per channel except the convolutions and the skip
    concatenations, so ``k`` U-Nets side by side are one U-Net of ``k`` times the channels
    whose convolutions are grouped (``groups=k``: each sees only its member's channels) and
    whose concatenations interleave per member; BatchNorm's batch statistics are per channel,
    over the member's own batch. Member ``i`` holds the ``i``-th ``1/k`` of every parameter
    and buffer along its first dimension (a grouped transposed convolution's weight is
    ``[in, out / k, 4, 4]``: its input channels). Input ``[N, 4, S, S]`` (one batch, given to
    every member) or ``[k, N, 4, S, S]`` (a batch per member); output ``[k, N, 1, S, S]``.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"a fused U-Net needs at least one member, got k={k}")
        self.k = int(k)
        self.net = RefinementUNet(members=self.k)

    @classmethod
    def from_members(cls, members: list[RefinementUNet]) -> FusedUNet:
        if not members:
            raise ValueError("FusedUNet.from_members needs at least one RefinementUNet")
        fused = cls(len(members))
        return fused.fill(members)

    def member_root(self) -> nn.Module:
        return self.net  # names below it are the single model's

    def logits(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.repeat(1, self.k, 1, 1)
        else:  # [k, N, 4, S, S] -> [N, k*4, S, S]
            if x.shape[0] != self.k:
                raise ValueError(f"FusedUNet of {self.k} members got {x.shape[0]} batches")
            x = x.transpose(0, 1).flatten(1, 2)
        return self.net.logits(x).transpose(0, 1).unsqueeze(2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))


def padded_side(side: int, multiple: int = SIDE_MULTIPLE) -> int:
    return -(-side // multiple) * multiple


def pad_to_multiple(x: Tensor, multiple: int = SIDE_MULTIPLE, mode: str = "reflect") -> Tensor:
    """Pad [N, C, H, W] at the bottom and right so both sides are multiples of ``multiple``.

    Reflection keeps the border statistics image-like (zeros would look like a black strip);
    a side smaller than the padding falls back to replication.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_side(h, multiple) - h, padded_side(w, multiple) - w
    if ph == 0 and pw == 0:
        return x
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


# ----------------------------------------------------------------------------- tiled inference


def tile_starts(size: int, tile: int, margin: int) -> list[int]:
    """Tile origins along one axis: stride ``tile - 2 margin``, the last one flush with the end.

    With ``size``, ``tile`` and ``margin`` multiples of 8 and 16 as the config asks, every
    origin lies on the 16-px grid.
    """
    if size <= tile:
        return [0]
    stride = tile - 2 * margin
    if stride <= 0:
        raise ValueError(f"tile margin {margin} px must be less than half of the tile side "
                         f"{tile} px")
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def kept_span(start: int, tile: int, size: int, margin: int) -> tuple[int, int]:
    """The part ``[lo, hi)`` of a tile that is trusted: all but ``margin`` px at its edges
    inside the image (an image border is a border of whole-image inference too)."""
    lo = start + (margin if start > 0 else 0)
    hi = start + tile - (margin if start + tile < size else 0)
    return lo, hi


@torch.no_grad()
def predict_tiled(model: RefinementUNet, image: Tensor, passes: int, *, tile: int, margin: int,
                  batch: int,
                  autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                  ) -> list[Tensor]:
    """Road probabilities of ``passes`` refinement passes for images [N, 3, H, W] in [0, 1].

    The images are padded (reflection) to a multiple of 16 at the bottom/right, cut into
    ``tile`` x ``tile`` tiles whose origins lie on the 16-px grid and overlap by ``2 margin``,
    and every output pixel is taken from a tile in which it lies at least ``margin`` px from
    any cut edge. With ``margin >= RECEPTIVE_RADIUS`` (45) the result equals whole-image
    inference on the padded image up to float summation order, so ``tile`` and ``batch``
    (tiles per forward) only trade memory for speed. Each pass runs over the whole image
    before the next starts, because a tile of pass k needs pass k-1's prediction in its
    margins. ``autocast``: the job's autocast context. Returns K tensors [N, 1, H, W] (float32).
    """
    model.eval()
    device = next(model.parameters()).device
    n, _, h, w = image.shape
    x = pad_to_multiple(image.to(device, torch.float32))
    hp, wp = x.shape[-2:]
    th, tw = min(tile, hp), min(tile, wp)
    ys = [(s, *kept_span(s, th, hp, margin)) for s in tile_starts(hp, th, margin)]
    xs = [(s, *kept_span(s, tw, wp, margin)) for s in tile_starts(wp, tw, margin)]
    grid = [(i, y, xx) for i in range(n) for y in ys for xx in xs]
    pred = x.new_zeros(n, 1, hp, wp)
    outputs = []
    for _ in range(passes):
        inp = torch.cat([x, pred], 1)
        new = torch.empty_like(pred)
        for b in range(0, len(grid), batch):
            chunk = grid[b:b + batch]
            tiles = torch.stack([inp[i, :, y0:y0 + th, x0:x0 + tw]
                                 for i, (y0, _, _), (x0, _, _) in chunk])
            with autocast():
                out = model(tiles).float()
            for k, (i, (y0, ylo, yhi), (x0, xlo, xhi)) in enumerate(chunk):
                new[i, :, ylo:yhi, xlo:xhi] = out[k, :, ylo - y0:yhi - y0, xlo - x0:xhi - x0]
        pred = new
        outputs.append(pred[:, :, :h, :w])
    return outputs
