"""A loss network whose own parameters train: LPIPS ``tune`` / ``scratch`` and the adapted net.

The extractors of :mod:`workflow.lossnets` are frozen and always in eval mode (a loss
network is a fixed measure). :class:`TrainableBackbone` wraps one so that its parameters
take gradients, and decides its mode itself: ``train_mode=True`` puts the layers in train
mode while the harness trains (what the lpips package's trainer does for ``tune`` and
``scratch``: it builds ``LPIPS(..., eval_mode=False)``, so BatchNorm would use batch
statistics; the feature trunks of AlexNet, VGG-16 and SqueezeNet have neither BatchNorm nor
dropout, so for the LPIPS sets the mode changes nothing); ``train_mode=False`` keeps them in
eval mode while the parameters train (frozen BatchNorm statistics). Scoring always runs in
eval mode. Only the layers up to the deepest tap exist in a child-index extractor; in a
node-name one the layers after it never run, so they get no gradient and Adam leaves them
as they are.

The wrapper's state dict is the extractor's under ``net.``: a model file holding it
(:func:`workflow.training.save_model`, module ``backbone``) is loaded into a freshly built
extractor of the same loss network (:func:`workflow.models.adapter.load_adapter` with
``extra``: :func:`skeleton`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TrainableBackbone", "clamp_1x1_", "trainable_parameters"]


class TrainableBackbone(nn.Module):
    """``extractor`` (a frozen :class:`~workflow.lossnets.FeatureExtractor` or
    :class:`~workflow.lossnets.NodeExtractor`) with every parameter trainable."""

    def __init__(self, extractor: nn.Module, train_mode: bool = True) -> None:
        super().__init__()
        self.net = extractor
        self.train_mode = bool(train_mode)
        for p in self.net.parameters():
            p.requires_grad_(True)
        self.train(False)

    def train(self, mode: bool = True) -> TrainableBackbone:
        # the extractors' own train() always means eval: set their children directly
        self.training = bool(mode)
        for child in self.net.children():
            child.train(bool(mode) and self.train_mode)
        return self

    @property
    def taps(self) -> tuple:
        return self.net.taps

    def forward(self, x: Tensor) -> dict:
        return self.net(x)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that take gradients, each once."""
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def clamp_1x1_(module: nn.Module) -> int:
    """Project the weights of every 1x1 convolution of ``module`` to >= 0, as the lpips
    package's trainer does after every step (``clamp_weights``: every module with a 1x1
    kernel, which for ``tune`` / ``scratch`` includes the trunk's own 1x1 convolutions, e.g.
    SqueezeNet's fire modules). Returns how many were clamped."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1):
            m.weight.clamp_(min=0.0)
            n += 1
    return n
