"""The refinement U-Net of the road-delineation benchmark (REFERENCE.md, after Mosinska et al. 2018).

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
(per axis). Tiled inference whose tiles overlap by at least that margin, with tile origins on
multiples of 16, reproduces whole-image inference (``workflow.benchmarks.delineation``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ENCODER_CHANNELS = (4, 8, 16, 32, 32)
SIDE_MULTIPLE = 16  # four stride-2 stages
# Interval analysis: a stride-2 conv (k4, p1) output i reads inputs 2i-1..2i+2, a transposed
# one (k4, s2, p1) output o reads inputs ceil(o/2)-1..floor((o+1)/2). Following every path
# (skips included) back to the input, the widest reach over the 16 phases is 45 px per side;
# the tests confirm it with gradients.
RECEPTIVE_RADIUS = 45


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class RefinementUNet(nn.Module):
    """``forward(x) -> road probability [N, 1, S, S]`` for ``x`` = [N, 4, S, S] (RGB + prediction).

    ``logits(x)`` is the same before the sigmoid (train with BCE-with-logits: it is the same
    loss, numerically stable, and safe under bf16 autocast where plain BCE is refused).
    """

    def __init__(self) -> None:
        super().__init__()
        c = ENCODER_CHANNELS
        self.down = nn.ModuleList(_down(c[i], c[i + 1]) for i in range(4))
        # transposed convolution of the block, then BatchNorm + ReLU of the concatenation
        self.up = nn.ModuleList([
            nn.ConvTranspose2d(c[4], c[3], 4, stride=2, padding=1),       # 32 -> 32, ++ d3
            nn.ConvTranspose2d(2 * c[3], c[2], 4, stride=2, padding=1),   # 64 -> 16, ++ d2
            nn.ConvTranspose2d(2 * c[2], c[1], 4, stride=2, padding=1),   # 32 -> 8,  ++ d1
            nn.ConvTranspose2d(2 * c[1], 1, 4, stride=2, padding=1),      # 16 -> 1
        ])
        self.up_norm = nn.ModuleList(nn.BatchNorm2d(2 * c[i]) for i in (3, 2, 1))

    def logits(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != ENCODER_CHANNELS[0]:
            raise ValueError(f"RefinementUNet expects [N, 4, H, W] (RGB + prediction), got {tuple(x.shape)}")
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
            h = F.relu(norm(torch.cat([up(h), skips.pop()], 1)))
        return self.up[3](h)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))

    def refine(self, image: Tensor, passes: int, previous: Tensor | None = None) -> list[Tensor]:
        """Run ``passes`` refinement passes on RGB ``image`` [N, 3, S, S]; return every pass's output.

        Pass 1 sees ``previous`` (default: zeros) as channel 4, pass k the output of pass k - 1.
        """
        if passes < 1:
            raise ValueError(f"refinement passes must be >= 1, got {passes}")
        pred = image.new_zeros(image.shape[0], 1, *image.shape[-2:]) if previous is None else previous
        outputs = []
        for _ in range(passes):
            pred = self(torch.cat([image, pred.to(image.dtype)], 1))
            outputs.append(pred)
        return outputs


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
