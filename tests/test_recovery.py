"""Running the same command again after an interruption (workflow.recovery, docs/reruns.md):
stale locks of dead runs are removed, litter of dead writers is swept, a failed attempt's
log survives its retry, and Snakemake killed during training (SIGKILL, Ctrl-C) completes on
the unchanged command with the scores of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.snakemake_helpers import ROOT, SNAKEMAKE, snakemake
from workflow import recovery


def _py(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_stale_locks_are_removed_only_when_no_run_is_alive(tmp_path):
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("x\n")
    sm = str(tmp_path / ".snakemake")
    claim = f"from workflow.recovery import claim; print(len(claim({sm!r})))"
    alive = _py(claim + "\nimport time; print('up', flush=True); time.sleep(60)")
    try:
        assert alive.stdout.readline().strip() == "1"  # no one else alive: stale, removed
        assert alive.stdout.readline().strip() == "up"
        (locks / "1.output.lock").write_text("y\n")  # now a living run's lock
        other = _py(claim)
        out, err = other.communicate(timeout=60)
        assert out.strip() == "0" and (locks / "1.output.lock").exists(), err
    finally:
        alive.kill()
        alive.wait()
    out, err = _py(claim).communicate(timeout=60)  # its holder died (SIGKILL): stale now
    assert out.strip() == "1" and "stale lock" in err and not list(locks.iterdir())


def test_sweep_removes_litter_of_dead_writers_only(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = recovery.HOST
    dead = tmp_path / "a" / f".last.pt.tmp~{host}~{gone.pid}~abcdefgh.pt"
    live = tmp_path / "a" / f"{recovery.tmp_prefix('scores.parquet')}abcdefgh.parquet"
    stage = tmp_path / f".prepare~{host}~{gone.pid}~xyz12345"
    far_fresh = tmp_path / ".x.npy.tmp~node7~12~abcdefgh.npy"
    far_old = tmp_path / ".y.npy.tmp~node7~13~abcdefgh.npy"
    keep = tmp_path / "a" / ".hidden.parquet"
    dead.parent.mkdir()
    for p in (dead, live, far_fresh, far_old, keep):
        p.write_bytes(b"0")
    (stage / "inner").mkdir(parents=True)
    day = time.time() - recovery.OTHER_HOST_GRACE_S - 60
    os.utime(far_old, (day, day))
    said = []
    removed = recovery.sweep([tmp_path, tmp_path / "missing"], say=said.append)
    assert set(removed) == {dead, stage, far_old}
    assert live.exists() and far_fresh.exists() and keep.exists() and not stage.exists()
    assert said and "3 temporary" in said[0]
    # below a shallow root (the raw datasets) only the datasets' own entries are looked at
    raw = tmp_path / "raw"
    top = raw / "bapps" / f".checksums.json.tmp~{host}~{gone.pid}~abcdefgh.json"
    deep = raw / "bapps" / "dataset" / "2afc" / f".x.png.tmp~{host}~{gone.pid}~abcdefgh.png"
    deep.parent.mkdir(parents=True)
    top.write_bytes(b"0")
    deep.write_bytes(b"0")
    assert recovery.sweep([tmp_path], say=said.append, shallow=[raw]) == [top]
    assert deep.exists()


def test_failed_attempt_keeps_its_log(tmp_path):
    log = tmp_path / "job.log"
    for attempt in (1, 2):
        with open(log, "w") as f:  # what `> {log}` does on every attempt
            rc = subprocess.run([sys.executable, "-m", "workflow", "results", "gather", "--out",
                                 str(tmp_path / "s.parquet"), str(tmp_path / "missing.parquet")],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        assert rc != 0
        kept = log.with_name(f"job.log.attempt{attempt}")
        assert kept.read_text() == log.read_text() and "missing.parquet" in kept.read_text()


# ------------------------------------------------------------------ killed during training

SMALL = {"benchmarks": ["super_resolution"],
         "super_resolution": {"lossnets": ["alexnet/2"], "lpips_sets": False, "scales": [4],
                              "iterations": 60, "eval_every": 30, "checkpoint_every": 5,
                              "log_every": 50,
                              "fuse": False}}  # one model per job: its train/last.pt is watched


def _start(args) -> subprocess.Popen:
    cmd = [*SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), *args]
    return subprocess.Popen(cmd, cwd=Path(args[-1]).parent.parent,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _interrupt(proc: subprocess.Popen, ckpt, after_step: int, sig: signal.Signals) -> int:
    """Send ``sig`` once the trainer's checkpoint is past ``after_step``; its step then."""
    import torch

    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, "snakemake ended before the interruption"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            try:
                step = int(torch.load(ckpt, weights_only=True)["step"]) if ckpt.exists() else -1
            except Exception:  # replaced while reading
                step = -1
            if step > after_step:
                break
            time.sleep(0.2)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        else:
            os.kill(proc.pid, signal.SIGKILL)  # Snakemake alone: its trainer is orphaned
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return step


def _scores(results) -> pd.DataFrame:
    df = pd.read_parquet(results / "scores.parquet").drop(columns=["wall_time_s"])
    return df.sort_values(list(df.columns)).reset_index(drop=True)


@pytest.mark.slow
def test_interrupted_twice_during_training_the_same_command_completes(tmp_path):
    """Ctrl-C during training, the same command, SIGKILL of Snakemake during training, the
    same command: it completes, the trainer resumed each time, the scores equal those of an
    uninterrupted run, and no temporary file or staging folder is left."""
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(SMALL))

    def command(results):  # one command line, run again unchanged
        return ["--cores", "2", "--configfile", str(ROOT / "config" / "demo.yaml"),
                str(tmp_path / "small.yaml"), "--config", f"results_dir={results}",
                f"resources_dir={tmp_path / 'resources'}", "--", str(results / "scores.parquet")]

    snakemake(*command(tmp_path / "reference"), workdir=tmp_path, timeout=900)
    results = tmp_path / "interrupted"
    ckpt = results / "super_resolution" / "alexnet" / "2" / "x4" / "run0" / "train" / "last.pt"
    first = _interrupt(_start(command(results)), ckpt, 0, signal.SIGINT)
    assert not (results / "scores.parquet").exists()
    second = _interrupt(_start(command(results)), ckpt, first, signal.SIGKILL)
    assert not (results / "scores.parquet").exists()
    snakemake(*command(results), workdir=tmp_path, timeout=900)
    log = (results / "logs" / "super_resolution" / "alexnet" / "2" / "train_x4_run0.log")
    assert "resumed from" in log.read_text()
    assert second > first >= 0
    pd.testing.assert_frame_equal(_scores(results), _scores(tmp_path / "reference"))
    litter = [p for d in (results, tmp_path / "resources") for p in d.rglob("*")
              if ".tmp~" in p.name or p.name.startswith((".prepare~", ".synth~", ".extract~"))]
    assert litter == []
