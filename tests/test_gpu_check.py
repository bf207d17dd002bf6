"""tools/gpu-check: its no-CUDA mode, its plan (every device perf command) and its report."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu-check"


def _module():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("smi", ["absent", "failing"])
def test_without_cuda_it_says_so_writes_nothing_and_exits_0(tmp_path, smi):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi == "failing":  # the tool is installed but finds no driver / no GPU
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        fake.chmod(0o755)
    before = sorted(p.name for p in ROOT.iterdir())
    out = tmp_path / "gpu.md"
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True,
                       text=True, env={**os.environ, "PATH": str(bin_dir)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "no CUDA device: nothing measured"
    assert time.monotonic() - t < 10
    assert not out.exists() and sorted(p.name for p in ROOT.iterdir()) == before
    assert os.access(SCRIPT, os.X_OK) and SCRIPT.read_text().startswith("#!/usr/bin/env python3")


def test_the_plan_runs_every_device_perf_command_on_cuda_into_the_scratch_file(tmp_path, capsys):
    import importlib

    from workflow.cli import PERF

    gc = _module()
    scratch = tmp_path / "s.md"
    steps = gc.plan(scratch)
    assert steps[0][1][-4:] == ["-m", "gpu", "-p", "no:cacheprovider"]
    perf = {cmd[cmd.index("perf") + 1]: cmd for _, cmd, _ in steps[1:]}
    assert set(perf) | set(gc.NOT_DEVICE) == set(PERF) and not set(perf) & set(gc.NOT_DEVICE)
    for name, cmd in perf.items():
        assert cmd[-4:] == ["--device", "cuda", "--out", str(scratch)]  # never BENCHMARKS.md
        with pytest.raises(SystemExit) as ex:  # each command takes every flag it is given
            importlib.import_module(f"workflow.perf.{name}").main(["--help"])
        assert ex.value.code == 0
        usage = capsys.readouterr().out
        flags = [a for a in cmd[cmd.index("perf") + 2:] if a.startswith("--")]
        assert all(f in usage for f in flags), (name, flags)
    # one 8-minute budget; each step's own cap fits in it (the deadline cuts what is left)
    assert gc.BUDGET_S == 480 and all(cap < gc.BUDGET_S for _, _, cap in [*gc.SETUP, *steps])


def test_a_command_past_its_timeout_is_stopped_and_reported(capsys):
    gc = _module()
    t = time.monotonic()
    r = gc.run_limited("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], 1.5)
    assert r["status"] == "timed out after 2 s" and time.monotonic() - t < 10
    assert gc.run_limited("late", ["true"], 0.5)["status"] == "not run: the budget was spent"
    ok = gc.run_limited("echo", [sys.executable, "-c", "print('hi')"], 30)
    assert ok["status"] == "ok" and ok["output"] == "hi\n"
    bad = gc.run_limited("bad", [sys.executable, "-c", "raise SystemExit(3)"], 30)
    assert bad["status"] == "failed (exit 3)"


def test_report_holds_the_gpu_every_status_and_the_perf_sections():
    gc = _module()
    written = ("# Benchmarks\n\nheader\n\n<!-- bench:super_resolution-cuda -->\n## sr\n| a |\n"
               "<!-- /bench:super_resolution-cuda -->\n\n<!-- bench:delineation -->\n## del\n"
               "<!-- /bench:delineation -->\n")
    perf = gc.sections(written)
    assert perf.startswith("<!-- bench:super_resolution-cuda -->") and "header" not in perf
    assert perf.count("<!-- /bench:") == 2
    results = [{"name": "gpu tests", "status": "ok", "wall_s": 12.34,
                "output": "....\n4 passed, 1 skipped in 12.00s\n"},
               {"name": "perf adaptation", "status": "timed out after 50 s", "wall_s": 50.0,
                "output": ""}]
    md = gc.render("- GPU: NVIDIA H100 80GB HBM3, 81559 MiB, 550.54", results, perf, 480, 301)
    assert "- GPU: NVIDIA H100 80GB HBM3" in md and "in 301 s of a 480 s budget" in md
    assert "| gpu tests | ok: 4 passed, 1 skipped in 12.00s | 12.3 |" in md
    assert "| perf adaptation | timed out after 50 s | 50.0 |" in md
    assert md.rstrip().endswith("<!-- /bench:delineation -->")
    assert "`perf dag`" in md and "`perf prepare`" in md
