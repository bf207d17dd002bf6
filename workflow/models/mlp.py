"""The grid of small MLPs that classify autoencoder codes (docs/autoencoder.md), and how the
grid trains.

Seven nets with hidden layers ``HIDDEN_GRID`` and LeakyReLU activations, trained against
one-hot targets with MSE. They are small, so all seven train together on one device as one
batched model: ``MLPGrid`` stacks the heads of equal depth into ``[K, out, in]`` weights
(one batched matrix product per layer and depth, one forward and one backward per step),
the training loss is the sum of the heads' losses (they share no parameter entry, so each
gets exactly its own gradient and Adam moments), and a ``GridSelection`` keeps every head's
own early-stopping state and best weights. :func:`fit_grid` runs that training through
:class:`workflow.training.Trainer`. Each head equals the separate net ``build_mlp`` builds
(same initialisation, same updates; tested against seven separate nets and Adams).

Per-net early stopping monitors validation accuracy: a net improves when its accuracy is
strictly higher than its best so far (ties keep the earlier epoch); after ``patience``
evaluations without improvement the net stops training (its loss leaves the sum, so its
gradient is zero, and its Adam first moments are zeroed, so Adam adds exactly zero to it)
and its best weights are the ones it keeps.

Selection rule (the reference never wrote one down): the reported score is the test
accuracy of the net with the highest best validation accuracy; ties go to the net that
comes first in ``HIDDEN_GRID`` (the simpler one).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workflow.datasets.bank import EpochSampler
from workflow.job import Job, seed_everything
from workflow.training import TrainConfig, Trainer, make_adam

__all__ = ["BEST_VARIANT", "HIDDEN_GRID", "GridSelection", "MLPGrid", "build_mlp", "fit_grid",
           "mlp_name", "score_rows", "select_best"]

HIDDEN_GRID: tuple[tuple[int, ...], ...] = ((), (32,), (64,), (32, 32), (64, 32), (64, 64),
                                            (128, 128))
BEST_VARIANT = "best-val-mlp"  # the scores' variant of the selected head (the reported score)


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
    """Several MLPs on the same input as one batched model; ``forward(z) -> [K, N, n_classes]``.

    The heads are stacked by depth (number of hidden layers): each depth is one group whose
    layer ``i`` is a ``[K_g, out, in]`` weight (``nn.Linear``'s layout, so each head's
    product is computed as the separate net computes it) and a ``[K_g, 1, out]`` bias, widths
    padded with zeros to the widest head of the group, and runs as one batched matrix product
    (``baddbmm``) per layer: three groups (depths 0, 1, 2) instead of seven nets, one
    forward and one backward per step. A padded unit has zero weights in and out, so its
    pre-activation, its output and every gradient reaching a padded entry are exactly zero,
    and Adam (zero moments, zero gradient) leaves it at zero: each head computes exactly
    what the separate net ``build_mlp(in_features, hidden, n_classes)`` would. The heads are
    initialised as those separate nets are, built one after the other in grid order.
    """

    def __init__(self, in_features: int, n_classes: int,
                 hidden_grid: Sequence[Sequence[int]] = HIDDEN_GRID):
        super().__init__()
        self.hidden_grid = tuple(tuple(int(h) for h in hs) for hs in hidden_grid)
        if not self.hidden_grid:
            raise ValueError("the MLP grid is empty")
        self.in_features = int(in_features)
        self.n_classes = int(n_classes)
        nets = [build_mlp(in_features, hs, n_classes) for hs in self.hidden_grid]
        depths = list(dict.fromkeys(len(hs) for hs in self.hidden_grid))
        # head k -> (group, position in the group); the groups' outputs in grid order
        self.where: list[tuple[int, int]] = [(0, 0)] * len(nets)
        self.weights, self.biases = nn.ModuleList(), nn.ModuleList()
        order: list[int] = []
        for g, depth in enumerate(depths):
            heads = [k for k, hs in enumerate(self.hidden_grid) if len(hs) == depth]
            order += heads
            dims = [self.in_features,
                    *(max(self.hidden_grid[k][i] for k in heads) for i in range(depth)),
                    self.n_classes]
            ws = nn.ParameterList(nn.Parameter(torch.zeros(len(heads), dims[i + 1], dims[i]))
                                  for i in range(depth + 1))
            bs = nn.ParameterList(nn.Parameter(torch.zeros(len(heads), 1, dims[i + 1]))
                                  for i in range(depth + 1))
            self.weights.append(ws)
            self.biases.append(bs)
            for j, k in enumerate(heads):
                self.where[k] = (g, j)
        self.register_buffer("order", torch.tensor(order).argsort(), persistent=False)
        self._in_order = order == sorted(order)
        with torch.no_grad():
            for k, net in enumerate(nets):
                for (w, b), lin in zip(self.head_params(k), net[::2], strict=True):
                    w.copy_(lin.weight)
                    b.copy_(lin.bias[None])

    @property
    def names(self) -> list[str]:
        return [mlp_name(hs) for hs in self.hidden_grid]

    def __len__(self) -> int:
        return len(self.hidden_grid)

    def head_params(self, k: int) -> list[tuple[Tensor, Tensor]]:
        """Head ``k``'s (weight ``[out, in]``, bias ``[1, out]``) per layer: views of its
        unpadded entries in the stacks (writing them writes the model)."""
        g, j = self.where[k]
        dims = [self.in_features, *self.hidden_grid[k], self.n_classes]
        return [(w[j, :dims[i + 1], :dims[i]], b[j, :, :dims[i + 1]])
                for i, (w, b) in enumerate(zip(self.weights[g], self.biases[g], strict=True))]

    def head(self, k: int) -> nn.Sequential:
        """Head ``k`` as the separate net it equals (a copy, ``build_mlp``'s layout)."""
        net = build_mlp(self.in_features, self.hidden_grid[k], self.n_classes)
        with torch.no_grad():
            for (w, b), lin in zip(self.head_params(k), net[::2], strict=True):
                lin.weight.copy_(w)
                lin.bias.copy_(b[0])
        return net

    @torch.no_grad()
    def copy_head(self, src: MLPGrid, k: int) -> None:
        """Head ``k``'s weights from ``src`` (a grid of the same shape), padding included."""
        g, j = self.where[k]
        for mine, theirs in ((self.weights[g], src.weights[g]), (self.biases[g], src.biases[g])):
            for a, b in zip(mine, theirs, strict=True):
                a[j].copy_(b[j])

    @torch.no_grad()
    def stop_head(self, optimizer: torch.optim.Optimizer, k: int) -> None:
        """Freeze head ``k`` under Adam: zero its first moments. With its loss left out (zero
        gradient) Adam then adds exactly zero to it at every later step, as it would to a
        separate net that no longer runs."""
        g, j = self.where[k]
        for p in [*self.weights[g], *self.biases[g]]:
            state = optimizer.state.get(p, {})
            if "exp_avg" in state:
                state["exp_avg"][j].zero_()

    def forward(self, z: Tensor) -> Tensor:
        outs = []
        for ws, bs in zip(self.weights, self.biases, strict=True):
            h = z.expand(len(ws[0]), *z.shape)
            for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
                h = torch.baddbmm(b, h, w.mT)
                if i < len(ws) - 1:
                    h = nn.functional.leaky_relu(h)
            outs.append(h)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out if self._in_order else out[self.order]

    def loss(self, z: Tensor, labels: Tensor, active: Tensor | Sequence[bool] | None = None
             ) -> Tensor:
        """Sum over the active heads of MSE(head(z), one_hot(labels)).

        An inactive head's loss is left out (``where``, not a product, so not even a
        non-finite value of it reaches the sum): its gradient is exactly zero.
        """
        target = nn.functional.one_hot(labels, self.n_classes).float()
        per = torch.mean((self(z).float() - target) ** 2, dim=(1, 2))
        if active is None:
            return per.sum()
        mask = torch.as_tensor(active, dtype=torch.bool, device=per.device)
        return torch.where(mask, per, torch.zeros_like(per)).sum()

    @torch.no_grad()
    def accuracy(self, z: Tensor, labels: Tensor, batch_size: int = 8192) -> Tensor:
        """Accuracy of every head, ``[K]`` float64 (argmax of the outputs)."""
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
    def update(self, grid: MLPGrid, val_acc: Tensor, step: int) -> list[int]:
        """One evaluation; returns the heads that stop at it (see :meth:`MLPGrid.stop_head`)."""
        stopped = []
        for k in range(len(grid)):
            if not bool(self.active[k]):
                continue
            if float(val_acc[k]) > float(self.best_acc[k]):
                self.best.copy_head(grid, k)
                self.best_acc[k] = float(val_acc[k])
                self.best_step[k] = int(step)
                self.since_best[k] = 0
                self.improvements += 1
            else:
                self.since_best[k] += 1
                if int(self.since_best[k]) >= self.patience:
                    self.active[k] = False
                    stopped.append(k)
        return stopped

    @property
    def done(self) -> bool:
        return not bool(self.active.any())

    def report(self, test_z: Tensor, test_y: Tensor, steps_per_epoch: int) -> dict[str, list]:
        """Per head, in grid order: ``mlp`` (name), ``hidden`` (JSON), ``val_accuracy`` (its
        best), ``test_accuracy`` (of its best weights), ``best_epoch`` (evaluations done at
        its best; -1 if none) and ``selected`` (the selection rule's head)."""
        val = self.best_acc.cpu().tolist()
        chosen = select_best(val)
        return {"mlp": self.best.names,
                "hidden": [json.dumps(list(h)) for h in self.best.hidden_grid],
                "val_accuracy": val,
                "test_accuracy": self.best.accuracy(test_z, test_y).cpu().tolist(),
                "best_epoch": [int(s) // steps_per_epoch if s >= 0 else -1
                               for s in self.best_step.tolist()],
                "selected": [k == chosen for k in range(len(val))]}


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


def score_rows(report: Mapping[str, list], n_val: int, n_test: int) -> list[dict[str, Any]]:
    """Scores rows (split, variant, metric, value, n) of a :meth:`GridSelection.report`: the
    selected head's test and validation accuracy as variant ``best-val-mlp``, then every
    head's validation and test accuracy under its own name."""
    k = report["selected"].index(True)
    picks = [("test", BEST_VARIANT, report["test_accuracy"][k], n_test),
             ("val", BEST_VARIANT, report["val_accuracy"][k], n_val)]
    for i, name in enumerate(report["mlp"]):
        picks += [("val", name, report["val_accuracy"][i], n_val),
                  ("test", name, report["test_accuracy"][i], n_test)]
    return [{"split": sp, "variant": v, "metric": "accuracy", "value": x, "n": n}
            for sp, v, x, n in picks]


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
            state["active"], state["epoch"] = selection.active.clone(), step // spe
        idx = sampler(step)
        return grid.loss(train_z[idx], train_y[idx], state["active"]), len(idx)

    def eval_fn(step: int) -> dict[str, float]:
        acc = grid.accuracy(val_z, val_y)
        for k in selection.update(grid, acc, step):
            grid.stop_head(opt, k)  # Adam leaves a stopped head exactly where it is
        return {"improvements": float(selection.improvements),
                "active": float(selection.active.sum()), "best_val_accuracy": float(acc.max())}

    # every net improving counts, so the harness's patience stops exactly when the last net
    # has gone `patience` epochs without improving (see GridSelection)
    config = TrainConfig(max_steps=int(epochs) * spe, eval_every=spe,
                         checkpoint_every=checkpoint_every or spe, seed=seed,
                         select_metric="improvements", select_mode="max",
                         patience=int(patience), log_every=max(1, min(100, spe)))
    Trainer(job, workdir, modules={"grid": grid, "selection": selection}, optimizer=opt,
            step_fn=step_fn, eval_fn=eval_fn, config=config,
            # the stacked layout is part of what a checkpoint is (one of separate nets is not)
            key=None if key is None else {**key, "layout": "stacked heads"},
            description=f"mlps {workdir}").fit()
    return selection, spe
