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


def test_study_projection_is_models_x_steps_x_measured_seconds(monkeypatch, demo_plan):
    """The projection's arithmetic, with the step timers replaced by fixed seconds: hours =
    models x steps per model (from the config and the study's dataset sizes) x mean s/step."""
    import math

    from workflow.job import Job
    from workflow.perf import study

    seconds = {"alexnet": 0.5, "vgg19": 1.5}
    monkeypatch.setattr(study, "sr_step_s", lambda job, arch, *a: seconds[arch])
    monkeypatch.setattr(study, "ae_step_s", lambda job, net, *a: seconds[net.split("/")[0]])
    monkeypatch.setattr(study, "delineation_step_s",
                        lambda job, net, *a: seconds[net.split("/")[0]])
    monkeypatch.setattr(study, "adaptation_step_s", lambda job, net, *a: 2.0)
    job = Job.create({"precision": "fp32"}, {"device": "cpu"})
    rows = {r["benchmark"]: r for r in study.projection(demo_plan, job, ["alexnet", "vgg19"],
                                                        1, 0)}
    cfg = demo_plan.config
    sr = rows["super_resolution"]
    assert sr["models"] == len(demo_plan.jobs("super_resolution"))
    assert sr["hours"] == pytest.approx(sr["models"] * cfg["super_resolution"]["iterations"]
                                        * 1.0 / 3600)
    ae = cfg["autoencoder"]
    for d in ae["datasets"]:
        r = rows[f"autoencoder ({d})"]
        n = min(study.AE_TRAIN_IMAGES[d], ae["train"]["max_images"] or math.inf)
        per_epoch = math.ceil((1 - ae["val_fraction"]) * n / ae["train"]["batch_size"])
        assert r["steps_per_model"] == ae["train"]["epochs"] * per_epoch
        assert r["hours"] == pytest.approx(r["models"] * r["steps_per_model"] * 1.0 / 3600)
    dl = cfg["delineation"]
    assert rows["delineation"]["steps_per_model"] == dl["epochs"] * math.ceil(
        study.ROADS_TRAIN_TILES / dl["batch_size"])
    md = study.markdown(list(rows.values()), job, ["alexnet", "vgg19"], 1, 0, startup=2.0,
                        gpu_jobs=360, snakemake_s=3.0, configfiles=["config/demo.yaml"])
    train_h = sum(r["hours"] for r in rows.values())
    assert f"Training: {train_h:,.1f} CPU-hours" in md
    assert f"with start-up {train_h + 360 * 2.0 / 3600:,.1f} (local)" in md
    assert f"or {train_h + 360 * 5.0 / 3600:,.1f} on SLURM" in md


def test_study_counts_the_rules_that_ask_for_a_gpu():
    from workflow.perf import study

    gpu = study.gpu_rules()
    assert {"train_sr", "train_delineation", "train_autoencoder"} <= gpu
    assert "download_dataset" not in gpu and "gather_scores" not in gpu
