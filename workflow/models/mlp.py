"""The grid of small MLPs that classify autoencoder codes (docs/autoencoder.md), and how the
grid trains.

Seven nets with hidden layers ``HIDDEN_GRID`` and LeakyReLU activations, trained against
one-hot targets with MSE. They are small, so all seven train together on one device: one
``MLPGrid`` holds them, the training loss is the sum of the nets' losses (the nets share no
parameter, so each gets exactly its own gradient and its own Adam state), and a
``GridSelection`` keeps every net's own early-stopping state and best weights.
:func:`fit_grid` runs that training through :class:`workflow.training.Trainer`.

Per-net early stopping monitors validation accuracy: a net improves when its accuracy is
strictly higher than its best so far (ties keep the earlier epoch); after ``patience``
evaluations without improvement the net stops training (its parameters get no gradient,
so Adam leaves them alone) and its best weights are the ones it keeps.

Selection rule (the reference never wrote one down): the reported score is the test
accuracy of the net with the highest best validation accuracy; ties go to the net that
comes first in ``HIDDEN_GRID`` (the simpler one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workflow.datasets.bank import EpochSampler
from workflow.job import Job, seed_everything
from workflow.training import TrainConfig, Trainer, make_adam

__all__ = ["HIDDEN_GRID", "GridSelection", "MLPGrid", "build_mlp", "fit_grid", "mlp_name",
           "select_best"]

HIDDEN_GRID: tuple[tuple[int, ...], ...] = ((), (32,), (64,), (32, 32), (64, 32), (64, 64),
                                            (128, 128))


def mlp_name(hidden: Sequence[int]) -> str:
    """``"mlp[64,32]"``; ``"mlp[]"`` for the linear model (the scores table's variant)."""
    return "mlp[" + ",".join(str(h) for h in hidden) + "]"


def build_mlp(in_features: int, hidden: Sequence[int], n_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LeakyReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


class MLPGrid(nn.Module):
    """Several MLPs on the same input; ``forward(z) -> [K, N, n_classes]``."""

    def __init__(self, in_features: int, n_classes: int,
                 hidden_grid: Sequence[Sequence[int]] = HIDDEN_GRID):
        super().__init__()
        self.hidden_grid = tuple(tuple(int(h) for h in hs) for hs in hidden_grid)
        if not self.hidden_grid:
            raise ValueError("the MLP grid is empty")
        self.in_features = int(in_features)
        self.n_classes = int(n_classes)
        self.nets = nn.ModuleList(build_mlp(in_features, hs, n_classes) for hs in self.hidden_grid)

    @property
    def names(self) -> list[str]:
        return [mlp_name(hs) for hs in self.hidden_grid]

    def __len__(self) -> int:
        return len(self.nets)

    def forward(self, z: Tensor) -> Tensor:
        return torch.stack([net(z) for net in self.nets])

    def loss(self, z: Tensor, labels: Tensor, active: Tensor | None = None) -> Tensor:
        """Sum over the active nets of MSE(net(z), one_hot(labels)).

        Inactive nets are not run at all, so their parameters receive no gradient and an
        optimizer with ``set_to_none`` gradients leaves them (and their moments) untouched.
        """
        target = nn.functional.one_hot(labels, self.n_classes).to(z.dtype)
        total = z.new_zeros(())
        for k, net in enumerate(self.nets):
            if active is None or bool(active[k]):
                total = total + torch.mean((net(z).float() - target.float()) ** 2)
        return total

    @torch.no_grad()
    def accuracy(self, z: Tensor, labels: Tensor, batch_size: int = 8192) -> Tensor:
        """Accuracy of every net, ``[K]`` float64 (argmax of the outputs)."""
        correct = torch.zeros(len(self), dtype=torch.float64, device=z.device)
        for i in range(0, z.shape[0], batch_size):
            pred = self(z[i:i + batch_size]).argmax(-1)
            correct += (pred == labels[i:i + batch_size]).sum(-1).double()
        return correct / max(1, z.shape[0])


class GridSelection(nn.Module):
    """Per-net early stopping on validation accuracy, with each net's best weights.

    A module so the training harness checkpoints it with the grid (bit-exact resume).
    ``improvements`` counts every improvement of an active net; it stops growing exactly
    when the last net has gone ``patience`` evaluations without improving, so a harness
    that early-stops on it with the same patience stops when every net has stopped.
    """

    def __init__(self, grid: MLPGrid, patience: int):
        super().__init__()
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)
        k = len(grid)
        self.best = MLPGrid(grid.in_features, grid.n_classes, grid.hidden_grid)
        self.best.load_state_dict(grid.state_dict())
        self.best.requires_grad_(False)
        self.register_buffer("best_acc", torch.full((k,), -1.0, dtype=torch.float64))
        self.register_buffer("best_step", torch.full((k,), -1, dtype=torch.long))
        self.register_buffer("since_best", torch.zeros(k, dtype=torch.long))
        self.register_buffer("active", torch.ones(k, dtype=torch.bool))
        self.register_buffer("improvements", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, grid: MLPGrid, val_acc: Tensor, step: int) -> None:
        for k in range(len(grid)):
            if not bool(self.active[k]):
                continue
            if float(val_acc[k]) > float(self.best_acc[k]):
                self.best.nets[k].load_state_dict(grid.nets[k].state_dict())
                self.best_acc[k] = float(val_acc[k])
                self.best_step[k] = int(step)
                self.since_best[k] = 0
                self.improvements += 1
            else:
                self.since_best[k] += 1
                if int(self.since_best[k]) >= self.patience:
                    self.active[k] = False

    @property
    def done(self) -> bool:
        return not bool(self.active.any())


def select_best(val_acc: Sequence[float] | Tensor) -> int:
    """Index of the net with the highest validation accuracy; ties -> the first in grid order."""
    vals = [float(v) for v in val_acc]
    if not vals:
        raise ValueError("no validation accuracies to select from")
    best = 0
    for k, v in enumerate(vals):
        if v > vals[best]:
            best = k
    return best


def fit_grid(job: Job, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
             hidden: Sequence[Sequence[int]], *, epochs: int, patience: int, batch_size: int,
             lr: float, seed: int, workdir: Path, n_classes: int = 10,
             checkpoint_every: int | None = None, key: Mapping[str, Any] | None = None
             ) -> tuple[GridSelection, int]:
    """Train every MLP of the grid together with Adam, one evaluation per epoch, resuming
    from ``workdir``.

    Args: ``train`` / ``val`` (codes, labels) on the job's device; ``seed`` initialises the
    nets and seeds the epoch order (trailing batches of one code are dropped).
    Returns: the selection state of the last improvement (each net's best weights, its
    validation accuracy and step) and the steps per epoch.
    """
    (train_z, train_y), (val_z, val_y) = train, val
    seed_everything(seed)  # initialisation; the harness reseeds the training RNGs itself
    grid = MLPGrid(train_z.shape[1], n_classes, [tuple(h) for h in hidden])
    selection = GridSelection(grid, int(patience))
    opt = make_adam(grid.parameters(), lr, job.device)
    sampler = EpochSampler(len(train_z), int(batch_size), seed, job.device, min_batch=2)
    spe = sampler.steps_per_epoch
    state: dict[str, Any] = {"active": None, "epoch": -1}

    def step_fn(step: int):
        if state["epoch"] != step // spe:  # nets stop only at evaluations, i.e. at epoch ends
            state["active"], state["epoch"] = selection.active.tolist(), step // spe
        idx = sampler(step)
        return grid.loss(train_z[idx], train_y[idx], state["active"]), len(idx)

    def eval_fn(step: int) -> dict[str, float]:
        acc = grid.accuracy(val_z, val_y)
        selection.update(grid, acc, step)
        return {"improvements": float(selection.improvements),
                "active": float(selection.active.sum()), "best_val_accuracy": float(acc.max())}

    # every net improving counts, so the harness's patience stops exactly when the last net
    # has gone `patience` epochs without improving (see GridSelection)
    config = TrainConfig(max_steps=int(epochs) * spe, eval_every=spe,
                         checkpoint_every=checkpoint_every or spe, seed=seed,
                         select_metric="improvements", select_mode="max",
                         patience=int(patience), log_every=max(1, min(100, spe)))
    Trainer(job, workdir, modules={"grid": grid, "selection": selection}, optimizer=opt,
            step_fn=step_fn, eval_fn=eval_fn, config=config, key=key,
            description=f"mlps {workdir}").fit()
    return selection, spe
