"""The one training loop every benchmark uses, and the one file format of a trained model.

The harness owns everything around a step: placing the modules on the job's device, its
bf16 autocast, channels_last, optional ``torch.compile``, seeding, the optimizer/scheduler
step, a NaN/Inf guard, the progress bar, the metrics log, model selection, early stopping
and atomic, resumable checkpoints. A benchmark only says how to compute one step's loss and
how to evaluate. Device, precision and threads come from the :class:`workflow.job.Job`;
the harness resolves nothing itself.

:func:`save_model` / :func:`load_model` write and read every model a benchmark keeps (an SR
network, a U-Net, an autoencoder, an adapter, the harness's own ``best.pt``): one file with
``{"format", "modules": {name: state_dict}, "meta": {...}}``.

Usage::

    from workflow.training import Trainer, TrainConfig

    net = SRNet(scale=4)
    opt = make_adam(net.parameters(), lr=1e-3, device=job.device)  # fused on CUDA

    def step_fn(step: int):
        idx = torch.randint(0, n_train, (4,), device=trainer.device)  # global RNG: checkpointed
        lr, hr = batch(idx)
        loss = feature_loss(extractor, taps, net(lr), hr)  # under the job's autocast
        return loss, 4                                             # (loss, items) or just loss

    def eval_fn(step: int) -> dict[str, float]:                   # no_grad, modules in eval mode
        return {"psnr": validation_psnr(net)}

    trainer = Trainer(
        job, "results/sr/alexnet/2/x4/run0", modules={"model": net}, optimizer=opt,
        step_fn=step_fn, eval_fn=eval_fn, aux_modules={"lossnet": extractor},
        config=TrainConfig(max_steps=200_000, eval_every=10_000, checkpoint_every=1_000,
                           select_metric="psnr", select_mode="max", seed=0),
    )
    result = trainer.fit()   # resumes from workdir/last.pt when one exists
    result.best_checkpoint   # workdir/best.pt; load it with load_model(path, {"model": net})

Semantics
---------
* ``step`` passed to ``step_fn`` is the 0-based index of the step being computed;
  ``trainer.step`` counts completed optimizer steps. The harness zeroes the grads,
  calls ``step_fn`` under autocast, runs backward, clips (``grad_clip_norm``), steps
  the optimizer and then the scheduler (once per step), then calls
  ``post_step(step_count)`` under ``no_grad`` (e.g. clamp weights >= 0).
* Randomness inside ``step_fn`` must come from the global RNGs (python, numpy,
  torch CPU/CUDA) or from a ``torch.Generator`` passed as ``generators=``: all of
  them are checkpointed, so a resumed run is bit-identical on CPU (same thread
  count). ``eval_fn`` runs with those RNGs forked, so evaluating never changes the
  training trajectory.
* Evaluation: every ``eval_every`` steps and after the last step, under
  ``torch.no_grad()`` with every module in eval mode (back to train mode after).
  ``eval_fn`` is not wrapped in autocast (use ``trainer.autocast()`` to opt in).
* Model selection: ``select_metric`` / ``select_mode`` ("max" | "min") keep
  ``best.pt`` (module weights only) for the best evaluation. Without a
  ``select_metric``, ``best.pt`` holds the final weights, so downstream rules can
  always read ``best.pt``. ``patience`` stops after that many evaluations without an
  improvement larger than ``min_delta``. With ``restore_best`` (default) the
  modules hold the best weights when ``fit`` returns.
* Checkpoints: ``workdir/last.pt`` every ``checkpoint_every`` steps, at the end, and
  on SIGTERM / SIGUSR1 (SLURM preemption, ``--signal=USR1@120``) / SIGINT (Ctrl-C). It
  holds every module's state, the optimizer, scheduler, GradScaler (if one is passed), the
  step, best-metric info, early-stopping counters, the metrics history and every RNG state.
  All writes are atomic (temp name + rename). ``key=`` (:func:`resume_key`: the stage's
  result-relevant config, the job's identity and the content of every input) decides
  what a checkpoint belongs to: a ``last.pt`` with another key is never resumed; it is
  moved aside to ``workdir/superseded/<its key>/`` (with its ``best.pt`` and
  ``metrics.csv``) and the log says in one line what changed. Paths, intervals and
  placement are no part of a key, so moving the data folder or changing
  ``checkpoint_every`` resumes.
* Fused members: ``members=[Member(...)]`` trains several models held in one set of
  modules (e.g. ``FusedSRNet``), each with its own model selection: ``eval_fn`` returns
  ``"<member>/<metric>"`` keys, each member's best goes to its own ``best.pt`` (with its own
  key's fingerprint), ``restore_best`` restores each, ``result.extra["members"]`` reports
  them; the checkpoint carries every member's best. With ``patience`` each member stops on
  its own (:meth:`Trainer.active_members`: the ones still training, for ``step_fn`` to leave
  the stopped ones out of the loss); the run stops when every member has stopped, and
  ``result.extra["members"][name]["stopped_step"]`` says when each did.
* One writer: ``fit`` holds an exclusive lock on ``workdir/.trainer.lock``; a second
  trainer on the same folder (a rerun while an orphaned one still runs) stops at once,
  naming the pid that holds it. A trainer started by Snakemake (``LOSSNET_OWNER_PID`` in
  its environment, set by the Snakefile) checkpoints and exits when that Snakemake
  process is gone (killed with SIGKILL), instead of running on unnoticed.
* Signals: the handlers only set a flag; at the next step boundary the harness
  writes ``last.pt`` and raises ``Preempted`` (a ``SystemExit``) with exit code
  ``PREEMPTED_EXIT_CODE`` = 75 (EX_TEMPFAIL, "try again"), so Snakemake's
  ``--retries`` / a SLURM requeue reruns the job, which resumes from ``last.pt``.
* NaN guard: losses stay on the device (no per-step sync) and are checked at every
  log / eval / checkpoint boundary *before* anything is written; a non-finite loss
  raises ``NonFiniteLossError`` naming the first bad step and its value, and
  ``last.pt`` stays the last good state.
* Metrics log: ``workdir/metrics.csv`` (rewritten atomically), one row per log or
  eval step: ``step, loss`` (mean over the window), ``lr, items_per_s, steps_per_s,
  wall_s`` and ``eval_<name>`` columns.
* Precision and device are the job's (``workflow.job``): ``"auto"`` is bf16 autocast on
  CUDA and fp32 on CPU; ``"fp32"`` reproduces the reference numerics (TF32 off).
  ``channels_last`` (default: the job's, on CUDA only) converts the modules' 4-D weights;
  ``compile`` calls ``Module.compile()`` on modules and aux modules in place (state
  dict keys are unchanged, so checkpoints stay portable).
* Step capture (config ``step_capture``, a setting of every training stage): ``graphs``
  runs the whole step (zero_grad, the benchmark's forward and loss, backward, the optimizer
  step) through ``torch.compile(mode="reduce-overhead")``, which replays CUDA graphs of the
  compiled pieces instead of launching each kernel from Python. ``auto`` (default) does so on
  CUDA for runs of at least ``CAPTURE_MIN_STEPS`` steps (a shorter run does not earn back its
  compile time), ``off`` never. When tracing or compiling fails, the step that failed runs
  eagerly from the state before it and every later step too; the log says why. The weights,
  the optimizer state and the checkpoints are the same objects either way, so a run resumes
  whichever way its steps ran.
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from workflow.files import atomic_path, content_id, payload_bytes
from workflow.job import Job, seed_everything

LOCK_WAIT_S = 60.0  # how long a trainer waits for another one on its folder to exit
PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: the job was stopped by a signal; rerun to resume
CHECKPOINT_FORMAT = 1
MODEL_FORMAT = "lossnet-bench/model-1"


def resume_key(job: Job, inputs: Mapping[str, str | os.PathLike | None] | None = None,
               continues: tuple[str, ...] = (), arch: str | None = None, **identity: Any
               ) -> dict[str, Any]:
    """What a training run's checkpoints belong to, as a JSON-able dict.

    ``job.config`` (the stage's result-relevant config: settings such as intervals, batch
    sizes for evaluation or the device are not in it) less the ``continues`` keys (those a
    finished run may be extended by, e.g. ``iterations``), the job's ``identity`` (net,
    run, scale...), and the content (:func:`workflow.files.content_id`) of every input:
    the prepared data, upstream models, and the weights file of the loss network ``arch``.
    """
    ins = {name: content_id(p) for name, p in sorted((inputs or {}).items()) if p is not None}
    weights = job.weights_file(arch) if arch else None
    if weights is not None:
        ins["lossnet_weights"] = content_id(weights)
    return {"config": {k: v for k, v in job.config.items() if k not in continues},
            "job": dict(identity), "inputs": ins}


def key_fingerprint(key: Mapping[str, Any]) -> str:
    """The short hash of a resume key that checkpoints and model files carry."""
    return _key_hash(key)


def _key_hash(key: Mapping[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def describe_change(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> str:
    """One line naming what differs between two resume keys."""
    if not old or not new:
        return "it was written without a resume key (by an older version or another run)"
    a, b = _flat(old), _flat(new)
    parts = []
    for k in sorted(a.keys() | b.keys()):
        if a.get(k, "<none>") == b.get(k, "<none>"):
            continue
        where = k.replace("inputs.", "input ", 1) if k.startswith("inputs.") else k
        if k.startswith("inputs."):
            parts.append(f"{where} changed")
        else:
            parts.append(f"{where} {a.get(k, '<none>')!r} -> {b.get(k, '<none>')!r}")
    return "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more" if len(parts) > 6 else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN or Inf loss."""


CAPTURE_MIN_STEPS = 2000  # step_capture auto: shorter runs do not earn back the compile time
CAPTURE_MODES = ("auto", "graphs", "off")


def capture_mode(job: Any, steps: int) -> bool:
    """Whether a run of ``steps`` steps captures its step (setting ``step_capture``)."""
    raw = getattr(job, "settings", {}).get("step_capture", "off")
    mode = "off" if raw is False else str(raw)  # YAML reads an unquoted off as false
    if mode not in CAPTURE_MODES:
        raise ValueError(f"step_capture {mode!r} is not one of {', '.join(CAPTURE_MODES)} "
                         f"(config key step_capture)")
    if mode == "auto":
        return job.device.type == "cuda" and steps >= CAPTURE_MIN_STEPS
    return mode == "graphs"


def _snapshot(trainer: Trainer) -> dict[str, Any]:
    """Copies of what a step changes: the modules' and the optimizer's state, the RNGs."""
    import copy

    return {"modules": {k: copy.deepcopy(m.state_dict()) for k, m in trainer.modules.items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
            "generators": {k: g.get_state() for k, g in trainer.generators.items()}}


def _restore(trainer: Trainer, snap: dict[str, Any]) -> None:
    for k, m in trainer.modules.items():
        m.load_state_dict(snap["modules"][k])
    trainer.optimizer.load_state_dict(snap["optimizer"])
    torch.set_rng_state(snap["rng"])
    if snap["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(snap["cuda_rng"])
    for k, g in trainer.generators.items():
        g.set_state(snap["generators"][k])


class Preempted(SystemExit):
    """Raised after the checkpoint written on SIGTERM/SIGUSR1; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class TrainConfig:
    """Settings of one training run (plain values; the benchmark fills them from its config)."""

    max_steps: int
    eval_every: int | None = None  # steps between evaluations; None/0: only after the last step
    checkpoint_every: int | None = 1000  # steps between last.pt writes; None/0: only at the end
    compile: bool = False
    seed: int = 0
    select_metric: str | None = None  # key of eval_fn's dict used for best.pt / early stopping
    select_mode: str = "max"  # max | min
    patience: int | None = None  # evaluations without improvement before stopping
    min_delta: float = 0.0  # an improvement must exceed this
    log_every: int = 100
    channels_last: bool | None = None  # None: the job's (on for CUDA, off for CPU)
    grad_clip_norm: float | None = None
    restore_best: bool = True
    progress: bool = True
    capture_backend: str | None = None  # torch.compile backend of step capture (None: inductor)

    def __post_init__(self) -> None:
        if int(self.max_steps) < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.select_mode not in ("max", "min"):
            raise ValueError(f"select_mode must be 'max' or 'min', got {self.select_mode!r}")
        if self.patience is not None and int(self.patience) < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if int(self.log_every) < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


@dataclass
class TrainResult:
    best_checkpoint: Path | None
    best_metric: float | None
    best_step: int | None
    steps: int
    history: pd.DataFrame
    stop_reason: str  # max_steps | early_stop | already_done
    last_checkpoint: Path
    wall_time_s: float
    resumed_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "early_stop"


@dataclass
class Member:
    """One model of a fused training run (several models trained as one set of modules).

    Each member keeps its own model selection: ``eval_fn`` returns its metrics under
    ``"<name>/<metric>"``, and the best evaluation by ``select_metric`` writes the member's
    weights (``state()``: ``{module name: state_dict}``) to ``workdir/best.pt``, in the one
    model format with the member's own ``key`` fingerprint. ``load(modules)`` puts such
    weights back into the fused modules (``restore_best``).
    """

    name: str
    workdir: Path
    state: Callable[[], Mapping[str, Mapping[str, Tensor]]]
    load: Callable[[Mapping[str, Mapping[str, Tensor]]], None]
    key: Mapping[str, Any] | None = None

    @property
    def best_path(self) -> Path:
        return Path(self.workdir) / "best.pt"


# ----------------------------------------------------------------------------- RNG state


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    return state


def _set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        if k not in state["generators"]:
            raise KeyError(f"checkpoint has no state for generator {k!r}")
        g.set_state(state["generators"][k])


def _tuplify(x: Any) -> Any:
    # random.setstate needs tuples; a round trip through some loaders yields lists
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


@contextmanager
def _forked_rng(device: torch.device):
    """Run a block without disturbing any global RNG (python, numpy, torch, CUDA)."""
    py, npst = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


# ----------------------------------------------------------------------------- checkpoints


def save_model(path: str | Path, modules: Mapping[str, nn.Module | Mapping[str, Tensor]],
               meta: Mapping[str, Any] | None = None) -> Path:
    """Write a trained model: every module's weights (on the CPU) and ``meta``, atomically.

    ``modules`` maps names to modules or to state dicts. ``meta`` holds what a reader needs
    to rebuild the modules (sizes, the loss network) and the training's provenance.
    """
    state = {"format": MODEL_FORMAT,
             "modules": {k: {n: t.detach().to("cpu", copy=True) for n, t in
                             (m.state_dict() if isinstance(m, nn.Module) else m).items()}
                         for k, m in modules.items()},
             "meta": dict(meta or {})}
    with atomic_path(path, need=payload_bytes(state)) as tmp:
        torch.save(state, tmp)
    return Path(path)


ModulesOrBuilder = Mapping[str, nn.Module] | Callable[[dict[str, Any]], Mapping[str, nn.Module]]


def load_model(path: str | Path, modules: ModulesOrBuilder | None = None,
               map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the weights of a file of :func:`save_model` (or a harness ``last.pt``) into
    ``modules``; return its ``meta``.

    ``modules`` may be a function of the meta that builds them (an autoencoder needs its
    size first). Every name must be in the file: a typo would otherwise leave random weights.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path} (has its training job run?)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    saved = state.get("modules", {})
    meta = dict(state.get("meta", {}))
    if callable(modules):
        modules = modules(meta)
    missing = [k for k in (modules or {}) if k not in saved]
    if missing:
        raise KeyError(f"{path} holds modules {sorted(saved)}, not {missing}")
    for name, m in (modules or {}).items():
        m.load_state_dict(saved[name])
    return meta


def constant_then_linear(total_steps: int, constant_steps: int) -> Callable[[int], float]:
    """LR factor for ``LambdaLR``: 1 for ``constant_steps``, then linear to 0 at ``total_steps``
    (LPIPS's schedule: 5 epochs constant, 5 decaying)."""
    decay = max(1, total_steps - constant_steps)

    def factor(step: int) -> float:
        return 1.0 if step < constant_steps else max(0.0, (total_steps - step) / decay)

    return factor


def adam_fused(device: torch.device | str) -> bool:
    """Whether :func:`make_adam` fuses Adam for parameters trained on ``device``.

    On CUDA: yes (one kernel updates every parameter, instead of several per tensor: the
    per-step launch count is what bounds a small model's step there). On the CPU: no.
    torch's fused CPU Adam rounds differently from the default implementation (4e-8 after
    20 steps of a small MLP), so fusing there would change every CPU number and break
    resuming a checkpoint written before; the CPU path stays torch's default, bit for bit.
    """
    return torch.device(device).type == "cuda"


def make_adam(params: Any, lr: float, device: torch.device | str,
              betas: tuple[float, float] | Any = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam as every benchmark builds it, for parameters trained on ``device`` (the job's:
    the harness may move the modules there after this): fused where :func:`adam_fused`."""
    b1, b2 = (float(b) for b in betas)
    fused = {"fused": True} if adam_fused(device) else {}
    return torch.optim.Adam(params, lr=float(lr), betas=(b1, b2), **fused)


def _member_start() -> dict[str, Any]:
    """A fused member's selection state before its first evaluation."""
    return {"metric": None, "step": None, "modules": None, "bad_evals": 0, "stopped": None}


def _is_better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


# ----------------------------------------------------------------------------- trainer


StepOutput = Tensor | tuple[Tensor, int | float | Tensor]


class Trainer:
    """One training run in ``workdir``; see the module docstring for the contract."""

    def __init__(
        self,
        job: Job,
        workdir: str | Path,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        step_fn: Callable[[int], StepOutput],
        config: TrainConfig,
        scheduler: Any | None = None,
        eval_fn: Callable[[int], Mapping[str, float]] | None = None,
        post_step: Callable[[int], None] | None = None,
        *,
        aux_modules: Mapping[str, nn.Module] | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        key: Mapping[str, Any] | None = None,
        description: str | None = None,
        members: list[Member] | None = None,
    ) -> None:
        if not modules:
            raise ValueError("Trainer needs at least one module to train (modules={'model': net})")
        self.workdir = Path(workdir)
        self.modules = dict(modules)
        self.aux_modules = dict(aux_modules or {})
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step_fn = step_fn
        self.eval_fn = eval_fn
        self.post_step = post_step
        self.cfg = config
        self.generators = dict(generators or {})
        self.scaler = scaler
        self.key = dict(key) if key is not None else None
        self.fingerprint = _key_hash(self.key) if self.key is not None else None
        self.description = description or self.workdir.name
        if config.select_metric is not None and eval_fn is None:
            raise ValueError(f"select_metric={config.select_metric!r} needs an eval_fn")
        if config.patience is not None and config.select_metric is None:
            raise ValueError("patience (early stopping) needs a select_metric")
        self.members = list(members or [])
        if self.members and config.select_metric is None:
            raise ValueError("fused members need a select_metric (each member's own model "
                             "selection)")
        if len({m.name for m in self.members}) != len(self.members):
            raise ValueError(f"member names repeat: {[m.name for m in self.members]}")
        # per member: {"metric", "step", "modules"} of its best evaluation so far, and its
        # early stopping: evaluations without improvement, the step it stopped at (or None)
        self.member_best: dict[str, dict[str, Any]] = {
            m.name: _member_start() for m in self.members}

        self.job = job
        self.device = job.device
        self.precision = job.precision
        self.channels_last = (job.channels_last if config.channels_last is None
                              else bool(config.channels_last))
        for m in [*self.modules.values(), *self.aux_modules.values()]:
            # Module.to keeps the Parameter objects, so an optimizer built before stays valid
            m.to(self.device)
            if self.channels_last:
                m.to(memory_format=torch.channels_last)
        if config.compile:
            for m in [*self.modules.values(), *self.aux_modules.values()]:
                m.compile()

        self.capture = capture_mode(job, int(config.max_steps))
        self._captured: Callable[[int], Any] | None = None
        self._capture_ok = False
        self.step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self._best_modules: dict[str, Any] | None = None
        self.finished: str | None = None
        self.history: dict[int, dict[str, float]] = {}
        self._stop_signal: int | None = None
        self._pending: list[tuple[int, Tensor]] = []  # (step, detached loss) awaiting the NaN check
        self._items = 0.0
        self._t_window = time.perf_counter()
        self._steps_window = 0

    # ------------------------------------------------------------------ paths and helpers

    @property
    def last_path(self) -> Path:
        return self.workdir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.workdir / "best.pt"

    @property
    def metrics_path(self) -> Path:
        return self.workdir / "metrics.csv"

    def autocast(self):
        """The job's autocast context (bf16 on CUDA by default, no-op in fp32)."""
        return self.job.autocast()

    def to_device(self, x: Tensor) -> Tensor:
        """Move a batch to the device, channels_last for 4-D tensors when the harness uses it."""
        return self.job.to_device(x, self.channels_last)

    def _say(self, msg: str) -> None:
        print(f"[train {self.description}] {msg}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "key": self.key,
            "config": asdict(self.cfg),
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "best": {"metric": self.best_metric, "step": self.best_step,
                     "path": str(self.best_path) if self.best_step is not None else None,
                     # a copy, so best.pt can be rebuilt if a workflow manager deleted it
                     "modules": self._best_modules},
            "early_stopping": {"bad_evals": self.bad_evals},
            **({"members": self.member_best} if self.members else {}),
            "finished": self.finished,
            "history": [{"step": s, **row} for s, row in sorted(self.history.items())],
            "rng": _rng_state(self.generators),
        }

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        for k, m in self.modules.items():
            if k not in ckpt["modules"]:
                raise KeyError(f"{self.last_path} has no module {k!r} "
                               f"(holds {sorted(ckpt['modules'])})")
            m.load_state_dict(ckpt["modules"][k])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.best_metric = ckpt["best"]["metric"]
        self.best_step = ckpt["best"]["step"]
        self._best_modules = ckpt["best"].get("modules")
        if self._best_modules is not None and not self.best_path.exists():
            self._write_best(self._best_modules, self.best_step, self.best_metric)
        self.bad_evals = int(ckpt["early_stopping"]["bad_evals"])
        for m in self.members:
            best = ckpt["members"][m.name]
            self.member_best[m.name] = {**_member_start(), **best}
            if best["modules"] is not None and not m.best_path.exists():
                self._write_member_best(m)
        self.finished = ckpt["finished"]
        self.history = {int(r["step"]): {k: v for k, v in r.items() if k != "step"}
                        for r in ckpt["history"]}
        _set_rng_state(ckpt["rng"], self.generators)

    def save_checkpoint(self) -> Path:
        state = self.state_dict()
        with atomic_path(self.last_path, need=payload_bytes(state)) as tmp:
            torch.save(state, tmp)
        return self.last_path

    def _save_best(self, metric: float | None) -> None:
        modules = {k: {n: t.detach().to("cpu", copy=True) for n, t in m.state_dict().items()}
                   for k, m in self.modules.items()}
        self._best_modules = modules if self.cfg.select_metric is not None else None
        self._write_best(modules, self.step, metric)

    def _write_best(self, modules: Mapping[str, Any], step: int | None,
                    metric: float | None) -> None:
        save_model(self.best_path, modules, {"fingerprint": self.fingerprint, "step": step,
                                             "metric": metric,
                                             "select_metric": self.cfg.select_metric})

    def _write_member_best(self, m: Member) -> None:
        best = self.member_best[m.name]
        save_model(m.best_path, best["modules"],
                   {"fingerprint": _key_hash(m.key) if m.key is not None else None,
                    "step": best["step"], "metric": best["metric"],
                    "select_metric": self.cfg.select_metric, "member": m.name})

    def active_members(self) -> list[str]:
        """The names of the members still training (all of them without ``patience``)."""
        return [m.name for m in self.members if self.member_best[m.name]["stopped"] is None]

    def _evaluate_members(self, metrics: Mapping[str, float]) -> bool:
        """Each member's own model selection and early stopping (a stopped member's metrics
        are ignored); True when every member has stopped."""
        sel, patience = self.cfg.select_metric, self.cfg.patience
        for m in self.members:
            if self.member_best[m.name]["stopped"] is not None:
                continue
            name = f"{m.name}/{sel}"
            if name not in metrics:
                raise KeyError(f"eval_fn returned {sorted(metrics)}, which lacks {name!r} "
                               f"(member {m.name}'s select_metric)")
            value, best = metrics[name], self.member_best[m.name]
            if _is_better(value, best["metric"], self.cfg.select_mode, self.cfg.min_delta):
                state = {k: {n: t.detach().to("cpu", copy=True) for n, t in sd.items()}
                         for k, sd in m.state().items()}
                self.member_best[m.name] = {**best, "metric": value, "step": self.step,
                                            "modules": state, "bad_evals": 0}
                self._write_member_best(m)
                verdict = "new best"
            else:
                best["bad_evals"] = int(best.get("bad_evals", 0)) + 1
                verdict = (f"best {best['metric']:.5g} at step {best['step']}"
                           + (f", {best['bad_evals']}/{patience} without improvement"
                              if patience is not None else ""))
                if patience is not None and best["bad_evals"] >= patience:
                    best["stopped"] = self.step
                    verdict += "; it stops here, the others train on"
            self._say(f"step {self.step}: {m.name} validation {sel} {value:.5g} ({verdict})")
        return bool(self.members) and not self.active_members()

    def _try_resume(self) -> int | None:
        if not self.last_path.exists():
            return None
        try:
            ckpt = torch.load(self.last_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated file cannot exist (atomic writes), but say what to do
            raise RuntimeError(f"cannot read checkpoint {self.last_path} ({e}); delete it to "
                               f"restart this training run from scratch") from e
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("fingerprint") != self.fingerprint:
            what = (describe_change(ckpt.get("key"), self.key)
                    if ckpt.get("format") == CHECKPOINT_FORMAT else
                    f"checkpoint format {ckpt.get('format')} != {CHECKPOINT_FORMAT}")
            kept = self._set_aside(str(ckpt.get("fingerprint") or "unkeyed"))
            self._say(f"not resuming {self.last_path}: {what}; kept it in {kept}, training "
                      f"afresh")
            return None
        self.load_state_dict(ckpt)
        return self.step

    def _set_aside(self, name: str) -> Path:
        """Move last.pt, best.pt and metrics.csv to ``workdir/superseded/<name>[-n]/``."""
        dest = self.workdir / "superseded" / name
        n = 1
        while dest.exists():
            dest, n = self.workdir / "superseded" / f"{name}-{n}", n + 1
        dest.mkdir(parents=True)
        for p in (self.last_path, self.best_path, self.metrics_path):
            if p.exists():
                os.replace(p, dest / p.name)
        for i, m in enumerate(self.members):  # each member's best.pt of the superseded run
            if m.best_path.exists():
                os.replace(m.best_path, dest / f"best.member{i}.pt")
        return dest

    @contextmanager
    def _single_writer(self):
        """Hold ``workdir/.trainer.lock`` while training (released when the process dies)."""
        path = self.workdir / ".trainer.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline, said = time.monotonic() + LOCK_WAIT_S, False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.workdir} is being trained by another process ({holder}); two "
                        f"writers would interleave their checkpoints. Wait for it to finish "
                        f"or stop it, then rerun") from None
                if not said:  # e.g. the trainer of a killed Snakemake, checkpointing
                    self._say(f"waiting up to {LOCK_WAIT_S:.0f}s for {holder} to release "
                              f"{path}")
                    said = True
                time.sleep(0.5)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _owner_gone(self) -> int | None:
        """The pid of the Snakemake process that started this job, if it has died."""
        pid = int(os.environ.get("LOSSNET_OWNER_PID") or 0)
        if pid <= 1 or pid == os.getpid():
            return None
        now = time.monotonic()
        if now - getattr(self, "_owner_checked", 0.0) < 1.0:
            return None
        self._owner_checked = now
        return None if _alive(pid) else pid

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    @contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        # SIGINT too: Ctrl-C reaches every process of the terminal's group, the trainer
        # included; it checkpoints at the next step instead of losing the steps since the last
        sigs = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1")
                                                 else [])
        old = {s: signal.signal(s, self._on_signal) for s in sigs}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ the loop

    def _set_train(self, mode: bool) -> None:
        for m in self.modules.values():
            m.train(mode)

    def check_losses(self) -> float | None:
        """NaN/Inf guard over the pending losses (one device sync); returns their mean."""
        if not self._pending:
            return None
        vals = torch.stack([v for _, v in self._pending]).float().cpu()
        bad = ~torch.isfinite(vals)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            step, value = self._pending[i][0], float(vals[i])
            self._pending.clear()
            raise NonFiniteLossError(
                f"{self.description}: non-finite loss {value} at step {step} (0-based step index). "
                f"The last good checkpoint is "
                f"{self.last_path if self.last_path.exists() else 'none'}."
                f" Lower the learning rate, set precision: fp32, or check the inputs for NaN.")
        self._pending.clear()
        return float(vals.mean())

    def _log_row(self, **values: float) -> None:
        self.history.setdefault(self.step, {}).update(values)

    def _flush_log(self) -> None:
        loss = self.check_losses()
        now = time.perf_counter()
        dt = max(now - self._t_window, 1e-9)
        if loss is not None and self._steps_window:
            self._log_row(loss=loss, lr=float(self.optimizer.param_groups[0]["lr"]),
                          items_per_s=self._items / dt, steps_per_s=self._steps_window / dt,
                          wall_s=now - self._t_start)
        self._items, self._steps_window = 0.0, 0
        self._t_window = now

    def _reset_window(self) -> None:
        # time spent evaluating or writing checkpoints is not training throughput
        self._t_window = time.perf_counter()

    def write_metrics(self) -> None:
        rows = [{"step": s, **r} for s, r in sorted(self.history.items())]
        df = pd.DataFrame(rows, columns=["step"] if not rows else None)
        with atomic_path(self.metrics_path) as tmp:
            df.to_csv(tmp, index=False)

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"step": s, **r} for s, r in sorted(self.history.items())])

    def train_step(self, step: int) -> None:
        """One optimisation step (public for benchmarks that time the harness itself)."""
        loss, n = self._captured_step(step) if self.capture else self._optimize(step)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step = step + 1
        if self.post_step is not None:
            with torch.no_grad():
                self.post_step(self.step)
        self._pending.append((step, loss.detach()))
        self._items += float(n)
        self._steps_window += 1

    def _captured_step(self, step: int) -> tuple[Tensor, Any]:
        """The step through ``torch.compile`` (see the module docstring); on a failure the
        eager step from the state before it, and eager from then on."""
        if self._captured is None:
            kwargs = ({"backend": self.cfg.capture_backend} if self.cfg.capture_backend
                      else {"mode": "reduce-overhead" if self.device.type == "cuda"
                            else "default"})
            # a later recompilation that fails (another batch shape) runs that frame eagerly
            torch._dynamo.config.suppress_errors = True
            self._captured = torch.compile(self._optimize, **kwargs)
            self._say(f"step capture on ({kwargs})")
        # the first captured step may fail part-way (after a compiled piece ran): keep the
        # state before it, so the eager step starts from exactly that state
        before = None if self._capture_ok else _snapshot(self)
        try:
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration of the graphs
            loss, n = self._captured(step)
            # a CUDA graph's output is overwritten by its next replay: keep a copy
            out = (loss.detach().clone(), n)
        except Exception as e:
            self.capture = False
            why = str(e).splitlines()[0] if str(e) else ""
            if before is not None:
                _restore(self, before)
                self._say(f"step capture failed at step {step} ({type(e).__name__}: {why}); "
                          f"running eagerly from the state before it")
            else:  # after good captured steps: this step may have run in part
                self._say(f"step capture failed at step {step} ({type(e).__name__}: {why}); "
                          f"running eagerly from here (this step ran again eagerly)")
            return self._optimize(step)
        self._capture_ok = True
        return out

    def _optimize(self, step: int) -> tuple[Tensor, Any]:
        """zero_grad, the benchmark's forward and loss, backward, the optimizer step."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.step_fn(step)
        loss, n = (out if isinstance(out, tuple) else (out, 0))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(f"step_fn must return a scalar loss tensor (or (loss, n_items)), got "
                            f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip_norm:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self._params(), self.cfg.grad_clip_norm)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            if self.cfg.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(self._params(), self.cfg.grad_clip_norm)
            opt.step()
        return loss, n

    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _evaluate(self) -> bool:
        """Run eval_fn, update best.pt and the patience counter; True when training should stop."""
        assert self.eval_fn is not None
        self._set_train(False)
        try:
            with torch.no_grad(), _forked_rng(self.device):
                metrics = {k: float(v) for k, v in dict(self.eval_fn(self.step)).items()}
        finally:
            self._set_train(True)
        self._log_row(**{f"eval_{k}": v for k, v in metrics.items()})
        sel = self.cfg.select_metric
        if self.members:
            return self._evaluate_members(metrics)
        if sel is None:
            self._say(f"step {self.step}: " + ", ".join(f"{k} {v:.5g}"
                                                        for k, v in metrics.items()))
            return False
        if sel not in metrics:
            raise KeyError(f"eval_fn returned {sorted(metrics)}, which lacks select_metric {sel!r}")
        value = metrics[sel]
        others = "".join(f", {k} {v:.5g}" for k, v in metrics.items() if k != sel)
        if _is_better(value, self.best_metric, self.cfg.select_mode, self.cfg.min_delta):
            self.best_metric, self.best_step, self.bad_evals = value, self.step, 0
            self._save_best(value)
            verdict = "new best"
        else:
            self.bad_evals += 1
            verdict = (f"best {self.best_metric:.5g} at step {self.best_step}"
                       + (f", {self.bad_evals}/{self.cfg.patience} without improvement"
                          if self.cfg.patience is not None else ""))
        self._say(f"step {self.step}: validation {sel} {value:.5g} ({verdict}){others}")
        return self.cfg.patience is not None and self.bad_evals >= self.cfg.patience

    def fit(self) -> TrainResult:
        """Train to ``max_steps`` (or early stop), resuming from ``workdir/last.pt`` if present."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._single_writer():
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        self._t_start = time.perf_counter()
        seed_everything(cfg.seed)
        resumed = self._try_resume()
        if resumed is not None:
            self._say(f"resumed from {self.last_path} at step {resumed}")
        if self.finished == "early_stop" or (self.finished and self.step >= cfg.max_steps):
            return self._finish("already_done", resumed)
        self.finished = None
        self._set_train(True)
        stop_reason = "max_steps"
        interactive = sys.stderr.isatty()
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.description, file=sys.stderr,
                   disable=not cfg.progress, mininterval=1.0 if interactive else 30.0,
                   dynamic_ncols=interactive, unit="step")
        self._reset_window()
        try:
            with self._signals():
                while self.step < cfg.max_steps:
                    self.train_step(self.step)
                    bar.update(1)
                    s = self.step
                    last = s >= cfg.max_steps
                    do_eval = self.eval_fn is not None and (
                        last or (bool(cfg.eval_every) and s % int(cfg.eval_every) == 0))
                    do_ckpt = bool(cfg.checkpoint_every) and s % int(cfg.checkpoint_every) == 0
                    if s % cfg.log_every == 0 or do_eval or do_ckpt or last or self._stop_signal:
                        self._flush_log()  # NaN guard before anything is written
                        if "loss" in self.history.get(s, {}):
                            bar.set_postfix(loss=f"{self.history[s]['loss']:.4g}", refresh=False)
                    stop = self._evaluate() if do_eval else False
                    if stop:
                        stop_reason = "early_stop"
                        self.finished = "early_stop"
                    elif last:
                        self.finished = "max_steps"
                    gone = self._owner_gone() if self._stop_signal is None else None
                    if gone is not None:
                        self._stop_signal = -gone
                    if do_ckpt or do_eval or stop or last or self._stop_signal is not None:
                        self.save_checkpoint()
                        self.write_metrics()
                        self._reset_window()
                    if self._stop_signal is not None and self._stop_signal < 0:
                        msg = (f"the Snakemake process that started this job (pid "
                               f"{-self._stop_signal}) is gone; checkpoint written at step "
                               f"{s} to {self.last_path}; run the same snakemake command "
                               f"again to resume")
                        self._say(msg)
                        raise Preempted(f"{self.description}: {msg}")
                    if self._stop_signal is not None:
                        name = signal.Signals(self._stop_signal).name
                        msg = (f"{name} received; checkpoint written at step {s} to "
                               f"{self.last_path}; exiting with code {PREEMPTED_EXIT_CODE} so the "
                               f"job is retried and resumes")
                        self._say(msg)  # SystemExit with an int code prints nothing itself
                        raise Preempted(f"{self.description}: {msg}")
                    if stop and self.members:
                        self._say(f"early stop at step {s}: every member has stopped")
                        break
                    if stop:
                        self._say(f"early stop at step {s}: {cfg.select_metric} did not "
                                  f"improve in {cfg.patience} evaluations (best "
                                  f"{self.best_metric:.5g} at step {self.best_step})")
                        break
        finally:
            bar.close()
        if cfg.max_steps == 0 or (resumed is not None and resumed >= cfg.max_steps):
            self.finished = "max_steps"
            self.save_checkpoint()
            self.write_metrics()
        return self._finish(stop_reason, resumed)

    def _finish(self, reason: str, resumed: int | None) -> TrainResult:
        if self.members:
            return self._finish_members(reason, resumed)
        if self.cfg.select_metric is None:
            self.best_step = self.step
            self._save_best(None)
        if self.cfg.restore_best and self.best_path.exists() and self.cfg.select_metric is not None:
            load_model(self.best_path, self.modules, map_location=self.device)
        if not self.metrics_path.exists():
            self.write_metrics()
        return TrainResult(
            best_checkpoint=self.best_path if self.best_path.exists() else None,
            best_metric=self.best_metric, best_step=self.best_step, steps=self.step,
            history=self.history_frame(), stop_reason=reason, last_checkpoint=self.last_path,
            wall_time_s=time.perf_counter() - self._t_start, resumed_from=resumed,
        )

    def _finish_members(self, reason: str, resumed: int | None) -> TrainResult:
        """A fused run's result: ``extra["members"][name]`` = ``{"best_checkpoint",
        "best_metric", "best_step", "stopped_step"}`` (``stopped_step``: where its early
        stopping stopped it, None when it trained to the end); with ``restore_best`` each
        member holds its best."""
        out = {}
        for m in self.members:
            best = self.member_best[m.name]
            if self.cfg.restore_best and best["modules"] is not None:
                m.load(best["modules"])
            out[m.name] = {"best_checkpoint": m.best_path if m.best_path.exists() else None,
                           "best_metric": best["metric"], "best_step": best["step"],
                           "stopped_step": best.get("stopped")}
        if not self.metrics_path.exists():
            self.write_metrics()
        return TrainResult(
            best_checkpoint=None, best_metric=None, best_step=None, steps=self.step,
            history=self.history_frame(), stop_reason=reason, last_checkpoint=self.last_path,
            wall_time_s=time.perf_counter() - self._t_start, resumed_from=resumed,
            extra={"members": out})
