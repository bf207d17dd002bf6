"""Helpers for the tests of training commands."""

from __future__ import annotations

from collections.abc import Callable


def kill_at(monkeypatch, step: int) -> Callable[[], None]:
    """Make ``Trainer.train_step`` raise ``KeyboardInterrupt`` at ``step`` (a kill between
    two checkpoints); returns the function that puts the real step back."""
    from workflow.training import Trainer

    real = Trainer.train_step

    def killed(self, s):
        if s == step:
            raise KeyboardInterrupt("killed")
        return real(self, s)

    monkeypatch.setattr(Trainer, "train_step", killed)
    return lambda: monkeypatch.setattr(Trainer, "train_step", real)


def assert_first_adam_step(have, want, grad, lr, eps, name):
    """Adam's first step moves x by lr * g / (|g| + eps). Where |g| is well above eps (1e3x)
    and not negligible in its tensor (1e-3 of the largest), that ratio does not depend on
    the gradient's last bits, so the result must match to fp32 rounding; where g == 0 (a dead
    unit) nothing moves. Elsewhere g / (|g| + eps) follows the gradient's rounding (one batched
    pass in the code, three here; thread count and load change the reduction order), and only
    the bound of a step holds: each moves by <= lr, and the projection to >= 0 does not widen
    a gap. Returns the fraction checked exactly."""
    import torch

    g = grad.abs() if grad is not None else torch.zeros_like(want)
    sure = (g > max(1e-3 * float(g.max()), 1e3 * eps)) | (g == 0)
    torch.testing.assert_close(have[sure], want[sure], rtol=1e-5, atol=1e-8,
                               msg=lambda m: f"{name}: {m}")
    assert float((have - want).abs().max()) <= 2 * lr * (1 + 1e-4), name
    return sure.float().mean()
