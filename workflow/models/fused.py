"""K models of one architecture as one network: the member-slicing every fused model shares.

A fused network (:class:`~workflow.models.srnet.FusedSRNet`,
:class:`~workflow.models.unet.FusedUNet`, :class:`~workflow.models.autoencoder.FusedAutoencoder`)
holds member ``i``'s rows ``[i*n, (i+1)*n)`` of every parameter and buffer along its first
dimension (grouped convolutions put each member's channels there; batched layers put the
member index there); 0-dim buffers (BatchNorm's ``num_batches_tracked``) are shared, since
every member steps together. Its parameter names below :meth:`FusedMembers.member_root` are the
single model's, so a member's state dict is a slice, in and out.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["FusedMembers"]


class FusedMembers:
    """Mixin for an ``nn.Module`` with ``self.k`` members laid out as the module docstring says."""

    k: int

    def member_root(self) -> nn.Module:
        """The module whose parameter names are the single model's (default: this one)."""
        return self  # type: ignore[return-value]

    def member_slices(self, i: int) -> Iterator[tuple[str, Tensor]]:
        """(name, member ``i``'s part) of every parameter and buffer."""
        if not 0 <= i < self.k:
            raise IndexError(f"member {i} of a fused network of {self.k}")
        root = self.member_root()
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            if t.dim() == 0:
                yield name, t
            else:
                n = t.shape[0] // self.k
                yield name, t[i * n:(i + 1) * n]

    def fill(self, members: list[nn.Module]):
        """Take the members' dtype and device and load each one's weights: the end of every
        ``from_members``. Returns ``self``."""
        self.to(next(members[0].parameters()))  # type: ignore[attr-defined]
        for i, m in enumerate(members):
            self.load_member(i, m.state_dict())
        return self

    def member_state_dict(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s weights as the single model's state dict (copies)."""
        return {name: part.detach().clone() for name, part in self.member_slices(i)}

    def load_member(self, i: int, state: dict[str, Tensor]) -> None:
        """Set member ``i`` from the single model's state dict."""
        with torch.no_grad():
            for name, part in self.member_slices(i):
                part.copy_(state[name])
