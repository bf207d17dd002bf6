"""Speed measurements (workflow/perf/): the figures they compute by formula, and smoke runs."""

from __future__ import annotations

import pytest

from workflow.lossnets import all_lossnets, build_extractor
from workflow.perf import similarity as sb


def test_forward_flops_of_alexnet_by_hand():
    # alexnet at 64 px up to relu5: 2 x MACs of the five convolutions (ReLU / pooling uncounted)
    # conv1 64x3x11x11 on 15x15, conv2 192x64x5x5 on 7x7, conv3..5 3x3 on 3x3
    by_hand = 2 * (64 * 3 * 121 * 15 * 15 + 192 * 64 * 25 * 7 * 7
                   + (384 * 192 + 256 * 384 + 256 * 256) * 9 * 3 * 3)
    ex = build_extractor("alexnet", lossnets=all_lossnets(["alexnet"], lpips_sets=["alexnet"]),
                         weights="random")
    assert sb.forward_flops(ex, 64) == by_hand == 79_046_016


def test_conv_ceiling_flops_by_hand():
    import torch

    x, conv = sb.conv_ceiling_case(torch.device("cpu"))
    assert sb.conv_flops(conv, x) == 2 * 64 * 16 * 16 * 256 * 256 * 9


def test_bench_command_prints_every_column(capsys):
    import torch

    pytest.importorskip("lpips")
    threads = torch.get_num_threads()
    try:
        assert sb.main(["--archs", "alexnet", "--triplets", "6", "--batch", "3", "--repeats", "1",
                        "--threads", "1", "--no-write"]) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets the process-wide count
    out = capsys.readouterr().out
    assert "alexnet: lpips" in out and "ratio" in out and "GFLOP/s" in out
    row = next(line for line in out.splitlines() if line.startswith("| alexnet |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 8 and cells[3] == "5 x 10" and float(cells[4]) > 0


def test_dag_measurement_parses_the_job_count(tmp_path, monkeypatch):
    """`perf dag` counts the jobs of a dry run from Snakemake's job table."""
    import subprocess

    from workflow.perf import dag

    class Done:
        returncode = 0
        stdout = "Job stats:\njob   count\n---  -----\nall  1\ntotal  750\n"
        stderr = ""

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    cpu, wall, jobs = dag.dry_run(tmp_path, tmp_path, bytecode=True)
    assert jobs == 750 and cpu >= 0 and wall >= 0


def test_sr_table_has_ms_per_step_in_every_row():
    import argparse

    import torch

    from workflow.perf import super_resolution as psr

    base = {"precision": "fp32", "channels_last": False, "compile": False, "batch": 4}
    rows = [{"lossnet": "alexnet/2", "config": name, **base, "sec_per_step": sec,
             "images_per_s": 4 / sec, "gflop_per_step": 170.0, "tflops": 0.17 / sec}
            for name, sec in (("reference", 0.25), ("default", 0.2))]
    md = psr._markdown(rows, {"reference": base, "default": base}, torch.device("cpu"),
                       argparse.Namespace(scale=4, size=288, repeats=3), 2, 1, "fp32")
    table = [line for line in md.splitlines() if line.startswith("|")]
    header, body = table[0], table[2:]
    assert "| ms/step |" in header and len(body) == 2
    col = [c.strip() for c in header.strip("|").split("|")].index("ms/step")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert {len(c) for c in cells} == {len(cells[0])}  # header, rule and rows align
    assert [float(c[col]) for c in cells[2:]] == [250.0, 200.0]  # 1000 x s/step
    assert [c[col + 1] for c in cells[2:]] == ["16.00", "20.00"]  # images/s = 4 / s
