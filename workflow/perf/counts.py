"""FLOPs and kernel ops of one training step, counted the same way by every perf command.

* FLOPs: ``torch.utils.flop_counter`` with one correction, :func:`conv_backward_flop`: torch's
  formula (2.x) counts a grouped convolution's weight gradient as dense over all input
  channels, ``groups`` times too many, which would bill a fused network (K models as one of
  grouped convolutions) for work it does not do.
* ops: the aten ops dispatched (:class:`OpCounter`), about one kernel launch each on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

__all__ = ["OpCounter", "conv_backward_flop", "step_counts"]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (each one kernel launch on a GPU, roughly)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                       transposed, _output_padding, groups, output_mask, out_shape,
                       **kwargs) -> int:
    """Convolution backward FLOPs, grouped and transposed convolutions counted right: the
    input gradient and the weight gradient each do the forward's multiplications exactly."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape),
                              transposed=bool(transposed))
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FLOP_MAPPING = {torch.ops.aten.convolution_backward: conv_backward_flop}


def step_counts(trainer: Any, step: int = 0) -> tuple[int, int]:
    """(FLOPs, aten ops) of one harness step ``trainer.train_step(step)``."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as fc, OpCounter() as oc:
        trainer.train_step(step)
    trainer.check_losses()
    return int(fc.get_total_flops()), oc.ops
