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
