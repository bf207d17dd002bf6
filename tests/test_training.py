"""The training harness: bit-exact resume, signals, NaN guard, model selection, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from torch import nn

from workflow.job import Job
from workflow.training import (
    PREEMPTED_EXIT_CODE,
    NonFiniteLossError,
    Preempted,
    TrainConfig,
    Trainer,
    adam_fused,
    constant_then_linear,
    load_model,
    make_adam,
    save_model,
)

CPU = Job(device=torch.device("cpu"), precision="fp32")


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout(0.3), nn.Conv2d(4, 3, 3, padding=1))


def _make(workdir, init_seed=0, hook=None, eval_fn=None, key=None, **cfg):
    """A trainer whose data and dropout come from the global RNG (so resume must restore it)."""
    net = _net(init_seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    losses: list[float] = []

    def step_fn(step: int):
        if hook is not None:
            hook(step)
        x = torch.rand(2, 3, 8, 8)
        loss = ((net(x) - x.flip(-1)) ** 2).mean()
        losses.append(float(loss.detach()))
        return loss, 2

    def default_eval(step: int) -> dict[str, float]:
        torch.rand(5)  # eval randomness must not shift the training trajectory
        return {"score": -float(sum(p.abs().sum() for p in net.parameters()))}

    base = dict(max_steps=12, eval_every=4, checkpoint_every=4, seed=3, log_every=2,
                select_metric="score", progress=False)
    base.update(cfg)
    tr = Trainer(CPU, workdir, {"model": net}, opt, step_fn, TrainConfig(**base), scheduler=sched,
                 eval_fn=eval_fn or default_eval, key=key)
    return tr, net, losses


def _weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigterm_is_bit_identical(tmp_path):
    ref, ref_net, ref_losses = _make(tmp_path / "ref", restore_best=False)
    ref_result = ref.fit()
    assert ref_result.steps == 12 and ref_result.stop_reason == "max_steps"

    def kill_at_5(step):
        if step == 5:  # a real signal: the handler only sets a flag
            os.kill(os.getpid(), signal.SIGTERM)

    tr, _, losses_a = _make(tmp_path / "run", hook=kill_at_5, restore_best=False)
    with pytest.raises(Preempted) as exc:
        tr.fit()
    assert exc.value.code == PREEMPTED_EXIT_CODE
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["step"] == 6  # written at the boundary right after the interrupted step
    # the handler is uninstalled after fit
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler)

    # a fresh process would build the model from another init: resume must overwrite it
    tr2, net2, losses_b = _make(tmp_path / "run", init_seed=99, restore_best=False)
    res = tr2.fit()
    assert res.resumed_from == 6 and res.steps == 12
    assert _same(_weights(ref_net), _weights(net2))
    assert losses_a + losses_b == ref_losses
    h_ref = pd.read_csv(tmp_path / "ref" / "metrics.csv")
    h_run = pd.read_csv(tmp_path / "run" / "metrics.csv")
    pd.testing.assert_series_equal(h_ref["loss"].dropna().reset_index(drop=True),
                                   h_run["loss"].dropna().reset_index(drop=True))


def test_resume_after_crash_between_checkpoints(tmp_path):
    ref, ref_net, _ = _make(tmp_path / "ref", restore_best=False)
    ref.fit()

    def crash_at_10(step):
        if step == 10:
            raise RuntimeError("node died")

    tr, _, _ = _make(tmp_path / "run", hook=crash_at_10, restore_best=False)
    with pytest.raises(RuntimeError, match="node died"):
        tr.fit()
    tr2, net2, losses = _make(tmp_path / "run", init_seed=7, restore_best=False)
    res = tr2.fit()
    assert res.resumed_from == 8 and len(losses) == 4  # steps 8..11 are redone
    assert _same(_weights(ref_net), _weights(net2))


def test_sigterm_in_subprocess_exits_with_retry_code(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from torch import nn
        from workflow.job import Job
        from workflow.training import Trainer, TrainConfig
        torch.manual_seed(0)
        net = nn.Linear(3, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        def step_fn(step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            x = torch.randn(4, 3)
            return (net(x) ** 2).mean()
        Trainer(Job.create({{"precision": "fp32"}}, {{"device": "cpu"}}), {str(tmp_path)!r},
                {{"model": net}}, opt, step_fn,
                TrainConfig(max_steps=50, checkpoint_every=100, progress=False)).fit()
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == PREEMPTED_EXIT_CODE, p.stderr
    assert "SIGUSR1" in p.stderr
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 4


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(tmp_path):
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step_fn(step):
        loss = (net(torch.ones(1, 2)) ** 2).sum()
        return loss * float("inf") if step == 5 else loss

    tr = Trainer(CPU, tmp_path, {"model": net}, opt, step_fn,
                 TrainConfig(max_steps=20, checkpoint_every=4, log_every=100, progress=False))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss (inf|nan) at step 5\b"):
        tr.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 4


def test_best_checkpoint_is_selected_and_restored(tmp_path):
    scores = iter([1.0, 3.0, 2.0, 0.5])
    snapshots = {}

    def eval_fn(step):
        snapshots[step] = _weights(net)
        return {"psnr": next(scores)}

    tr, net, _ = _make(tmp_path, eval_fn=eval_fn, max_steps=16, select_metric="psnr",
                       select_mode="max")
    res = tr.fit()
    assert res.best_step == 8 and res.best_metric == 3.0
    assert _same(_weights(net), snapshots[8])  # restore_best put the step-8 weights back
    fresh = _net(5)
    meta = load_model(res.best_checkpoint, {"model": fresh})
    assert meta["step"] == 8 and _same(_weights(fresh), snapshots[8])
    hist = pd.read_csv(tmp_path / "metrics.csv")
    assert hist.dropna(subset=["eval_psnr"])["eval_psnr"].tolist() == [1.0, 3.0, 2.0, 0.5]
    assert {"step", "loss", "lr", "items_per_s", "eval_psnr"} <= set(hist.columns)


def test_early_stopping_min_mode(tmp_path):
    scores = iter([5.0, 4.0, 4.5, 6.0, 1.0])
    tr, _, losses = _make(tmp_path, eval_fn=lambda s: {"loss": next(scores)}, max_steps=40,
                          eval_every=2, select_metric="loss", select_mode="min", patience=2)
    res = tr.fit()
    # evals at 2, 4, 6, 8: best 4.0 at step 4, then two evaluations without improvement
    assert res.stop_reason == "early_stop" and res.steps == 8 and len(losses) == 8
    assert res.best_step == 4 and res.best_metric == 4.0
    again, _, losses2 = _make(tmp_path, eval_fn=lambda s: {"loss": 0.0}, max_steps=40,
                              eval_every=2, select_metric="loss", select_mode="min", patience=2)
    assert again.fit().stop_reason == "already_done" and losses2 == []


def test_logged_loss_and_post_step(tmp_path):
    calls = []
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.25)

    def post_step(step):
        calls.append(step)
        net.weight.clamp_(min=0.5)

    def step_fn(step):
        return net(torch.ones(1, 1)).sum()  # d/dw = 1: w -> w - 0.25, clamped at 0.5

    tr = Trainer(CPU, tmp_path, {"model": net}, opt, step_fn,
                 TrainConfig(max_steps=4, log_every=4, progress=False),
                 post_step=post_step)
    tr.fit()
    assert calls == [1, 2, 3, 4]
    assert float(net.weight.detach()) == 0.5
    # losses are w before each step: 1.0, 0.75, 0.5, 0.5 -> mean 0.6875
    assert pd.read_csv(tmp_path / "metrics.csv")["loss"].tolist() == [0.6875]


def test_another_resume_key_trains_afresh_and_keeps_the_old_run(tmp_path, capsys):
    key = {"config": {"lr": 0.01}, "job": {"run": 0}, "inputs": {"coco": "sha256:aa"}}
    tr, _, _ = _make(tmp_path, max_steps=4, key=key)
    tr.fit()
    old = {p: (tmp_path / p).read_bytes() for p in ("last.pt", "best.pt", "metrics.csv")}
    # the same key resumes the finished run: nothing trains
    again, _, losses = _make(tmp_path, max_steps=4, key=dict(key))
    assert again.fit().resumed_from == 4 and losses == []
    capsys.readouterr()
    changed = {**key, "inputs": {"coco": "sha256:bb"}, "config": {"lr": 0.02}}
    tr2, _, losses = _make(tmp_path, max_steps=4, key=changed)
    res = tr2.fit()
    assert res.resumed_from is None and len(losses) == 4
    err = capsys.readouterr().err
    assert "config.lr 0.01 -> 0.02" in err and "input coco changed" in err
    kept = tmp_path / "superseded" / tr.fingerprint
    assert {p: (kept / p).read_bytes() for p in old} == old  # moved aside, byte for byte
    # a checkpoint written without a key (an older version) is not resumed either
    tr3, _, losses = _make(tmp_path, max_steps=4)
    assert tr3.fit().resumed_from is None and len(losses) == 4
    assert "without a resume key" in capsys.readouterr().err
    assert (tmp_path / "superseded" / tr2.fingerprint / "last.pt").exists()


def test_resume_key_is_content_not_paths_or_intervals(tmp_path):
    from workflow.training import resume_key

    a, b = tmp_path / "a", tmp_path / "moved" / "b"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "manifest.json").write_text('{"counts": {"train": 3}}\n')
    job = Job(device=torch.device("cpu"), precision="fp32", config={"lr": 1e-3, "iterations": 9})
    k = resume_key(job, {"coco": a}, continues=("iterations",), net="alexnet/2", run=0)
    assert k == resume_key(job, {"coco": b}, continues=("iterations",), net="alexnet/2", run=0)
    assert "iterations" not in k["config"] and k["job"] == {"net": "alexnet/2", "run": 0}
    (b / "manifest.json").write_text('{"counts": {"train": 2}}\n')
    assert k != resume_key(job, {"coco": b}, continues=("iterations",), net="alexnet/2", run=0)
    # the loss network's weights file is an input by content
    w = tmp_path / "w.pt"
    torch.save({"x": torch.ones(2)}, w)
    wjob = Job(device=torch.device("cpu"), precision="fp32", weights=str(w), config={})
    k1 = resume_key(wjob, arch="alexnet")
    torch.save({"x": torch.zeros(2)}, w)
    assert k1 != resume_key(wjob, arch="alexnet") and "lossnet_weights" in k1["inputs"]


def test_content_id_ignores_write_stamps(tmp_path):
    import time

    import numpy as np

    from workflow.files import content_id, save_npz
    from workflow.training import save_model

    save_npz(tmp_path / "a.npz", {"z": np.arange(6.0)})
    first = content_id(tmp_path / "a.npz")
    time.sleep(1.1)  # zip members carry the write time
    save_npz(tmp_path / "a.npz", {"z": np.arange(6.0)})
    assert content_id(tmp_path / "a.npz") == first
    net = nn.Linear(2, 2)
    save_model(tmp_path / "m.pt", {"model": net}, {"wall_time_s": 1.0})
    m1 = content_id(tmp_path / "m.pt")
    save_model(tmp_path / "m.pt", {"model": net}, {"wall_time_s": 2.0})
    assert content_id(tmp_path / "m.pt") == m1
    with torch.no_grad():
        net.weight[0, 0] += 1
    save_model(tmp_path / "m.pt", {"model": net}, {"wall_time_s": 2.0})
    assert content_id(tmp_path / "m.pt") != m1


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("workflow.training.LOCK_WAIT_S", 1.0)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(tmp_path / ".trainer.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"pid %d on here" % os.getpid())
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        tr, _, losses = _make(tmp_path, max_steps=4)
        with pytest.raises(RuntimeError, match=f"another process \\(pid {holder.pid} on here"):
            tr.fit()
        assert losses == [] and not (tmp_path / "last.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    tr, _, losses = _make(tmp_path, max_steps=4)  # the lock dies with its holder
    assert tr.fit().steps == 4


def test_trainer_stops_when_its_snakemake_is_gone(tmp_path, monkeypatch, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    monkeypatch.setenv("LOSSNET_OWNER_PID", str(gone.pid))
    tr, _, losses = _make(tmp_path, max_steps=50, checkpoint_every=0, eval_every=0,
                          select_metric=None)
    with pytest.raises(Preempted) as e:
        tr.fit()
    assert e.value.code == PREEMPTED_EXIT_CODE and len(losses) == 1
    assert f"pid {gone.pid}) is gone" in capsys.readouterr().err
    monkeypatch.setenv("LOSSNET_OWNER_PID", str(os.getpid()))  # alive: resumes and finishes
    tr, _, losses = _make(tmp_path, max_steps=50, checkpoint_every=0, eval_every=0,
                          select_metric=None)
    assert tr.fit().resumed_from == 1 and len(losses) == 49


def test_best_checkpoint_rebuilt_when_deleted_before_resume(tmp_path):
    # Snakemake deletes a failed job's declared outputs; last.pt carries a copy of the best weights
    scores = {4: 2.0, 8: 1.0, 12: 0.5}
    snapshots = {}

    def eval_fn(step):
        snapshots[step] = _weights(net)
        return {"psnr": scores[step]}

    def kill_at_5(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)

    tr, net, _ = _make(tmp_path, hook=kill_at_5, eval_fn=eval_fn, select_metric="psnr")
    with pytest.raises(Preempted):
        tr.fit()
    (tmp_path / "best.pt").unlink()
    tr2, net, _ = _make(tmp_path, init_seed=4, eval_fn=eval_fn, select_metric="psnr")
    res = tr2.fit()
    assert res.best_step == 4 and res.best_metric == 2.0
    fresh = _net(1)
    assert load_model(tmp_path / "best.pt", {"model": fresh})["step"] == 4
    assert _same(_weights(fresh), snapshots[4]) and _same(_weights(net), snapshots[4])


def test_saved_model_round_trip_and_errors(tmp_path):
    """One model format: weights of every module plus meta; a builder may need the meta."""
    net = _net(7)
    path = save_model(tmp_path / "m.pt", {"model": net}, {"width": 4, "note": "x"})
    fresh = _net(8)
    meta = load_model(path, lambda m: {"model": fresh} if m["width"] == 4 else {})
    assert meta == {"width": 4, "note": "x"} and _same(_weights(net), _weights(fresh))
    with pytest.raises(KeyError, match="holds modules"):
        load_model(path, {"modle": _net(0)})
    with pytest.raises(FileNotFoundError, match="has its training job run"):
        load_model(tmp_path / "missing.pt", {"model": fresh})


def test_constant_then_linear_schedule():
    f = constant_then_linear(10, 4)
    # 1 for the constant steps, then (total - step) / (total - constant), down to 0
    assert [f(s) for s in (0, 3, 4, 7, 10, 12)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]


def test_checkpoint_on_a_full_disk_says_disk_full_at_its_path(tmp_path, monkeypatch):
    """The free space is checked before the write (needed vs available), and a write that
    fails on a full disk (torch's stream loses errno) is reported as such, never as an
    iostream error; the last good checkpoint survives."""
    import shutil
    from collections import namedtuple

    from workflow.files import DiskFullError, payload_bytes

    tr, _, _ = _make(tmp_path, max_steps=4, eval_every=100)
    tr.fit()
    good = (tmp_path / "last.pt").read_bytes()
    need = payload_bytes(tr.state_dict())
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(DiskFullError) as e:
        tr.save_checkpoint()
    assert str(e.value).startswith(f"disk full at {tmp_path}: last.pt needs")
    assert f"{need:,} bytes" in str(e.value) and "4,096 bytes) available" in str(e.value)

    def failing_save(obj, f, *a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: Usage(10**9, 10**9 - need - (16 << 20), need + (16 << 20)))
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr("workflow.files.NEARLY_FULL", need + (32 << 20))  # "now full"
    with pytest.raises(DiskFullError, match=f"disk full at {tmp_path / 'last.pt'} while "
                                            f"writing last.pt .*iostream error"):
        tr.save_checkpoint()
    assert (tmp_path / "last.pt").read_bytes() == good
    # no temporary file is left (the trainer's lock file stays: unlinking a lock is racy)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        ".trainer.lock"]


def test_make_adam_fuses_on_cuda_and_keeps_the_cpu_path_bit_identical():
    assert adam_fused("cuda") and adam_fused(torch.device("cuda", 1))
    assert not adam_fused("cpu") and not adam_fused(torch.device("cpu"))
    # built for a CUDA job before the harness moves the modules there (CPU parameters)
    assert make_adam(_net(0).parameters(), 1e-3, "cuda").defaults["fused"] is True

    def trajectory(make):
        net = _net(0)
        opt = make(net.parameters())
        g = torch.Generator().manual_seed(4)
        for _ in range(5):
            opt.zero_grad()
            x = torch.rand(2, 3, 8, 8, generator=g)
            ((net.eval()(x) - x) ** 2).mean().backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()], opt.state_dict()

    ours, ours_state = trajectory(lambda p: make_adam(p, "0.01", CPU.device, [0.5, 0.99]))
    plain, plain_state = trajectory(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.5, 0.99)))
    assert ours_state["param_groups"][0]["fused"] is None
    assert all(torch.equal(a, b) for a, b in zip(ours, plain, strict=True))
    for k, st in plain_state["state"].items():
        assert all(torch.equal(st[n], ours_state["state"][k][n]) for n in st)


def test_every_adam_is_built_by_make_adam(repo_root):
    """One constructor: a new call site that builds Adam itself would miss the fused path."""
    import re

    own = re.compile(r"\bAdam\(")
    files = sorted((repo_root / "workflow").rglob("*.py"))
    found = [f"{p.relative_to(repo_root)}:{i}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if own.search(line) and "def make_adam" not in line
             and not (p.name == "training.py" and "return torch.optim.Adam(" in line)]
    assert found == []


@pytest.mark.gpu
def test_a_cuda_step_in_bf16_channels_last_fused_and_without_host_sync(tmp_path):
    """The SR benchmark's harness step on CUDA (bf16 autocast, channels_last, fused Adam)
    makes no host sync and starts where the fp32 CPU step does (bf16 tolerance)."""
    from argparse import Namespace

    from workflow.archs import LossNet
    from workflow.perf.report import run_job
    from workflow.perf.super_resolution import build

    net = LossNet.parse("alexnet/2")
    job = run_job(Namespace(device="cuda", threads=None), "auto")
    assert job.precision == "bf16" and job.channels_last
    gpu = build(job, net, 4, 4, 64, True, False, tmp_path / "gpu")
    cpu_job = run_job(Namespace(device="cpu", threads=None), "fp32")
    cpu = build(cpu_job, net, 4, 4, 64, False, False, tmp_path / "cpu")
    assert gpu.optimizer.defaults["fused"] is True
    before = [p.detach().clone() for p in gpu.modules["model"].parameters()]
    gpu.train_step(0)
    cpu.train_step(0)
    first_gpu, first_cpu = gpu.check_losses(), cpu.check_losses()
    assert first_gpu == pytest.approx(first_cpu, rel=3e-2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside a step raises
    try:
        for step in range(1, 4):
            gpu.train_step(step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert gpu.check_losses() is not None  # finite (the NaN guard raises otherwise)
    conv = next(m for m in gpu.modules["model"].modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    after = list(gpu.modules["model"].parameters())
    assert all(p.device.type == "cuda" for p in after)
    assert any(not torch.equal(a.cpu(), b.cpu()) for a, b in zip(after, before, strict=True))


# ----------------------------------------------------------------------------- fused members


def _members_trainer(workdir, hook=None):
    """Two linear models as one module (a weight row each); member a scores best at step 4,
    member b at step 8 (scripted), so each keeps its own best.pt."""
    from workflow.training import Member

    torch.manual_seed(0)
    fused = nn.Linear(3, 2)
    opt = torch.optim.Adam(fused.parameters(), lr=1e-2)

    def step_fn(step: int):
        if hook is not None:
            hook(step)
        x = torch.rand(4, 3)
        return ((fused(x) - x.sum(1, keepdim=True)) ** 2).mean(0).sum(), 4

    script = {"a": {4: 3.0, 8: 1.0, 12: 2.0}, "b": {4: 1.0, 8: 3.0, 12: 2.0}}

    def eval_fn(step: int):
        return {f"{m}/score": script[m][step] for m in script}

    def member(i: int, name: str) -> Member:
        def state():
            return {"model": {"weight": fused.weight[i:i + 1], "bias": fused.bias[i:i + 1]}}

        def load(mods):
            with torch.no_grad():
                fused.weight[i:i + 1] = mods["model"]["weight"]
                fused.bias[i:i + 1] = mods["model"]["bias"]

        return Member(name, workdir / name, state, load, key={"job": {"net": name}})

    snapshots = {}

    def post_step(step: int):
        snapshots[step] = fused.weight.detach().clone()

    tr = Trainer(CPU, workdir / "group", {"fused": fused}, opt, step_fn,
                 TrainConfig(max_steps=12, eval_every=4, checkpoint_every=4, seed=1,
                             log_every=2, select_metric="score", progress=False),
                 eval_fn=eval_fn, post_step=post_step, key={"members": ["a", "b"]},
                 members=[member(0, "a"), member(1, "b")])
    return tr, fused, snapshots


def test_fused_members_keep_their_own_selection_and_resume_bit_exactly(tmp_path):
    ref, ref_net, snaps = _members_trainer(tmp_path / "ref")
    res = ref.fit()
    best = res.extra["members"]
    assert (best["a"]["best_step"], best["b"]["best_step"]) == (4, 8)
    assert (best["a"]["best_metric"], best["b"]["best_metric"]) == (3.0, 3.0)
    for i, (name, step) in enumerate((("a", 4), ("b", 8))):
        saved = torch.load(tmp_path / "ref" / name / "best.pt", weights_only=True)
        assert torch.equal(saved["modules"]["model"]["weight"], snaps[step][i:i + 1])
        assert saved["meta"]["step"] == step and saved["meta"]["member"] == name
        assert torch.equal(ref_net.weight[i:i + 1], snaps[step][i:i + 1])  # restore_best

    def crash_at_10(step):
        if step == 10:
            raise RuntimeError("node died")

    tr, _, _ = _members_trainer(tmp_path / "run", hook=crash_at_10)
    with pytest.raises(RuntimeError, match="node died"):
        tr.fit()
    (tmp_path / "run" / "b" / "best.pt").unlink()  # rebuilt from the checkpoint
    tr2, net2, _ = _members_trainer(tmp_path / "run")
    res2 = tr2.fit()
    assert res2.resumed_from == 8 and res2.extra["members"]["b"]["best_step"] == 8
    assert torch.equal(net2.weight, ref_net.weight) and torch.equal(net2.bias, ref_net.bias)
    assert (tmp_path / "run" / "b" / "best.pt").exists()


def test_fused_members_stop_early_each_on_its_own_and_resume(tmp_path):
    """patience 2: member a (best at step 4) stops at step 12, member b (improving) trains to
    step 20; a's metrics are no longer read once it stopped, active_members() drops it, its
    best.pt stays its step-4 weights, and a run killed after a stopped trains on from there."""
    from workflow.training import Member

    script = {"a": [3.0, 2.0, 1.0, 9.0, 9.0], "b": [1.0, 2.0, 3.0, 4.0, 5.0]}
    seen, active = [], []

    def trainer(workdir, hook=None):
        torch.manual_seed(0)
        fused = nn.Linear(3, 2)
        opt = torch.optim.Adam(fused.parameters(), lr=1e-2)

        def step_fn(step: int):
            if hook is not None:
                hook(step)
            active.append(tuple(tr.active_members()))
            x = torch.rand(4, 3)
            return ((fused(x) - x.sum(1, keepdim=True)) ** 2).mean(0).sum(), 4

        def eval_fn(step: int):
            seen.append(step)
            return {f"{m}/score": script[m][step // 4 - 1] for m in tr.active_members()}

        def member(i: int, name: str) -> Member:
            def load(mods):
                with torch.no_grad():
                    fused.weight[i:i + 1] = mods["model"]["weight"]

            return Member(name, workdir / name,
                          lambda: {"model": {"weight": fused.weight[i:i + 1]}}, load)

        tr = Trainer(CPU, workdir / "group", {"fused": fused}, opt, step_fn,
                     TrainConfig(max_steps=20, eval_every=4, checkpoint_every=4, seed=1,
                                 select_metric="score", patience=2, progress=False),
                     eval_fn=eval_fn, members=[member(0, "a"), member(1, "b")])
        return tr, fused

    tr, fused = trainer(tmp_path / "ref")
    res = tr.fit()
    got = res.extra["members"]
    assert (got["a"]["best_step"], got["a"]["stopped_step"]) == (4, 12)
    assert (got["b"]["best_step"], got["b"]["stopped_step"]) == (20, None)
    assert res.stop_reason == "max_steps" and res.steps == 20
    assert active[:12] == [("a", "b")] * 12 and active[12:] == [("b",)] * 8
    saved = torch.load(tmp_path / "ref" / "a" / "best.pt", weights_only=True)
    assert saved["meta"]["step"] == 4
    ref_weight = fused.weight.detach().clone()

    def crash_at_14(step):
        if step == 14:
            raise RuntimeError("node died")

    tr2, _ = trainer(tmp_path / "run", hook=crash_at_14)
    with pytest.raises(RuntimeError, match="node died"):
        tr2.fit()
    active.clear()
    tr3, fused3 = trainer(tmp_path / "run")
    res3 = tr3.fit()
    assert res3.resumed_from == 12 and active == [("b",)] * 8
    assert res3.extra["members"]["a"]["stopped_step"] == 12
    assert torch.equal(fused3.weight, ref_weight)
    # every member stopped: the run stops
    script["a"] = script["b"] = [5.0, 4.0, 3.0, 2.0, 1.0]
    active.clear()
    tr4, _ = trainer(tmp_path / "both")
    res4 = tr4.fit()
    assert res4.stop_reason == "early_stop" and res4.steps == 12
    assert {m["stopped_step"] for m in res4.extra["members"].values()} == {12}


# ----------------------------------------------------------------------------- step capture


def test_step_capture_mode_follows_the_setting():
    from workflow.training import CAPTURE_MIN_STEPS, capture_mode

    def job(device, mode):
        return Job(device=torch.device(device), precision="fp32",
                   settings={} if mode is None else {"step_capture": mode})

    assert not capture_mode(job("cpu", "auto"), 10**6)  # auto: CUDA only
    assert capture_mode(job("cuda", "auto"), CAPTURE_MIN_STEPS)
    assert not capture_mode(job("cuda", "auto"), CAPTURE_MIN_STEPS - 1)
    assert capture_mode(job("cpu", "graphs"), 1)
    assert not capture_mode(job("cuda", "off"), 10**6)
    assert not capture_mode(job("cuda", False), 10**6)  # YAML's unquoted off
    assert not capture_mode(job("cuda", None), 10**6)  # a job without the setting
    with pytest.raises(ValueError, match="config key step_capture"):
        capture_mode(job("cpu", "always"), 1)


def _capture_trainer(workdir, capture: bool, **cfg):
    """A small trainer (BatchNorm, dropout and data from the global RNG, Adam) whose step runs
    through torch.compile when ``capture`` (backend ``eager`` on the CPU: dynamo traces the
    step as it does on a GPU, and the traced pieces run as traced). No bias before the
    BatchNorm: its gradient is zero up to rounding, which Adam would blow up to lr-sized
    steps of noise."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Dropout(0.3), nn.Conv2d(4, 3, 3, padding=1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def step_fn(step: int):
        x = torch.rand(2, 3, 8, 8)
        return ((net(x) - x.flip(-1)) ** 2).mean(), 2

    base = dict(max_steps=6, checkpoint_every=3, seed=3, log_every=3, progress=False,
                capture_backend="eager", restore_best=False)
    base.update(cfg)
    job = Job(device=CPU.device, precision="fp32",
              settings={"step_capture": "graphs" if capture else "off"})
    return Trainer(job, workdir, {"model": net}, opt, step_fn, TrainConfig(**base)), net


def test_captured_steps_train_as_eager_steps_and_resume_bit_exactly(tmp_path, capsys):
    eager, eager_net = _capture_trainer(tmp_path / "eager", False)
    eager.fit()
    tr, net = _capture_trainer(tmp_path / "captured", True)
    tr.fit()
    assert "step capture on" in capsys.readouterr().err
    # the traced optimizer step may round differently from the eager one: fp32 rounding only
    for k, v in _weights(eager_net).items():
        torch.testing.assert_close(_weights(net)[k], v, atol=1e-6, rtol=1e-6, msg=k)
    # interrupted after 3 captured steps, resumed under capture: bit for bit the straight run
    half, _ = _capture_trainer(tmp_path / "half", True, max_steps=3)
    half.fit()
    rest, rest_net = _capture_trainer(tmp_path / "half", True)
    assert rest.fit().resumed_from == 3
    assert _same(_weights(rest_net), _weights(net))


def test_a_failed_capture_runs_the_step_eagerly_from_the_state_before_it(tmp_path, capsys,
                                                                         monkeypatch):
    """The compiled step fails after a part of it ran (here: a whole step, then the error):
    the harness restores the state before it, says why, and trains on eagerly."""
    def broken_compile(fn, **kwargs):
        def run(step):
            fn(step)  # the weights, the optimizer and the RNG moved...
            raise RuntimeError("capture broke\nsecond line")  # ...then it failed
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager, eager_net = _capture_trainer(tmp_path / "eager", False)
    eager.fit()
    tr, net = _capture_trainer(tmp_path / "captured", True)
    tr.fit()
    err = capsys.readouterr().err
    assert "step capture failed at step 0 (RuntimeError: capture broke); running eagerly" in err
    assert _same(_weights(net), _weights(eager_net))


@pytest.mark.gpu
def test_a_captured_cuda_step_trains_without_falling_back(tmp_path, capsys):
    """step_capture graphs on CUDA (torch.compile reduce-overhead, CUDA graphs): the SR
    harness step captures without a fallback and its losses follow the eager run's."""
    from argparse import Namespace

    from workflow.archs import LossNet
    from workflow.perf.report import run_job
    from workflow.perf.super_resolution import build
    from workflow.training import capture_mode

    net = LossNet.parse("alexnet/2")
    trainers = {}
    for mode in ("off", "graphs"):
        job = run_job(Namespace(device="cuda", threads=None), "auto")
        job.settings = {**job.settings, "step_capture": mode}
        tr = build(job, net, 4, 4, 64, True, False, tmp_path / mode)
        tr.capture = capture_mode(job, 10**6)
        losses = []
        for step in range(6):
            tr.train_step(step)
            losses.append(tr.check_losses())
        trainers[mode] = losses
    assert "step capture failed" not in capsys.readouterr().err
    assert trainers["graphs"] == pytest.approx(trainers["off"], rel=5e-2)
