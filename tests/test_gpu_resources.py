"""GPU placement on workstations and laptops: the `gpu` resource of the GPU rules.

Every rule whose stage computes with torch (``plan.STAGES``, ``torch=True``) takes one unit of
the ``gpu`` resource unless ``device: cpu``, and a local run gets ``gpu=1`` by default (the
Snakefile), so ``snakemake --cores all`` on a many-core machine with one GPU runs one GPU job
at a time; ``--resources gpu=N`` allows N. ``device: mps`` plans like CUDA.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.snakemake_helpers import ROOT, snakemake
from tests.test_slurm import REAL_PROFILE, _gpu_rules, _load_profile
from workflow.plan import STAGES, Plan, load_config

RULE_FILES = sorted((ROOT / "rules").glob("*.smk"))


def _rules() -> dict[str, str]:
    """rule name -> its text, from every rules file."""
    out = {}
    for path in RULE_FILES:
        # rules inside an `if` too (super_resolution.fuse chooses between two train_sr)
        for block in re.split(r"(?m)^(?=[ \t]*rule \w+:)", path.read_text()):
            m = re.match(r"\s*rule (\w+):", block)
            if m:
                out[m.group(1)] = block
    return out


def _stage(block: str) -> tuple[str, str] | None:
    m = re.search(r'plan\.config_param\("(\w+)", "(\w+)"\)', block)
    return (m.group(1), m.group(2)) if m else None


def test_every_torch_rule_declares_the_gpu_resource():
    rules = _rules()
    gpu_rules = set()
    for name, block in rules.items():
        stage = _stage(block)
        declared = re.search(r'^\s+gpu=plan\.gpus\("(\w+)", "(\w+)"\),$', block, re.M)
        if stage and STAGES[stage[0]][stage[1]].torch:
            assert declared and declared.groups() == stage, f"rule {name} declares no gpu"
            gpu_rules.add(name)
        else:
            assert not declared, f"rule {name} computes no torch but takes a gpu"
    # the same rules the SLURM profile sends to the GPU partition
    assert gpu_rules == _gpu_rules(_load_profile(REAL_PROFILE, {}))
    # every torch stage has a rule of its own, or is folded into another stage's rule (run in
    # its process: delineation's eval, autoencoder's encode)
    owned = {_stage(b) for b in rules.values()} - {None}
    folded = {m for b in rules.values() for m in
              re.findall(r'plan\.config_param\("(\w+)", "(\w+)"\)', b)[1:]} - owned
    torch_stages = {(b, n) for b, st in STAGES.items() for n, s in st.items() if s.torch}
    assert torch_stages <= owned | folded, sorted(torch_stages - owned - folded)
    assert len(gpu_rules) == len(torch_stages - folded) + 1
    # (adaptation's evaluate stage serves two rules: the baseline and the runs)


@pytest.mark.parametrize("device, gpus", [
    ("auto", 1), ("cuda", 1), ("cuda:1", 1), ("mps", 1), ("cpu", 0)])
def test_gpus_follow_the_device(device, gpus):
    plan = Plan(load_config(ROOT / "config.yaml", overrides={"device": device}))
    assert plan.config["device"] == device  # the schema accepts every one of them
    assert plan.gpus("similarity", "score") == gpus
    assert plan.gpus("super_resolution", "train") == gpus
    assert plan.gpus("adaptation", "rankings") == 0  # torch-free stages never take one
    assert plan.gpus("probes", "images") == 0


@pytest.mark.parametrize("cap, wanted, got", [(None, 2, 2), (None, 8, 8), (1, 2, 1), (4, 2, 2),
                                              (4, 8, 4)])
def test_max_threads_caps_every_rule_s_threads(cap, wanted, got):
    plan = Plan(load_config(ROOT / "config.yaml", overrides={"max_threads": cap}))
    assert plan.threads(wanted) == got


def test_every_multi_thread_rule_takes_its_threads_from_the_plan():
    """A literal ``threads: N`` above 1 would ignore ``max_threads``."""
    for name, block in _rules().items():
        m = re.search(r"^\s+threads: (.+)$", block, re.M)
        if m and m.group(1).strip() != "1":
            assert re.fullmatch(r"plan\.threads\(\d+\)", m.group(1).strip()), (name, m.group(1))


def _what_is_left_command() -> list[str]:
    text = (ROOT / "docs" / "cluster.md").read_text()
    m = re.search(r"What is left to do: `uv run snakemake ([^`]+)`", text)
    assert m, "docs/cluster.md lost its 'What is left to do' command"
    return m.group(1).split()


def _job_table(out: str) -> dict[str, int]:
    m = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal\s+\d+", out, re.S)
    assert m, out[-3000:]
    return {rule: int(n) for rule, n in (line.split() for line in m.group(1).splitlines())}


def test_the_documented_what_is_left_command_lists_the_jobs_with_device_mps(tmp_path):
    """docs/cluster.md's command, on the demo config with device mps: the DAG resolves and the
    table lists every job still to run (here all of them), rule by rule."""
    args = _what_is_left_command()
    assert "-n" in args
    proc = snakemake(*args, "--configfile", str(ROOT / "config" / "demo.yaml"), "--config",
                     "device=mps", f"results_dir={tmp_path / 'results'}",
                     f"resources_dir={tmp_path / 'resources'}", timeout=300)
    table = _job_table(proc.stdout + proc.stderr)
    plan = Plan(load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml",
                            overrides={"device": "mps"}))
    assert table["score_similarity"] == len(plan.jobs("similarity"))
    # super_resolution.fuse (the demo's): one train_sr job per architecture and scale scores
    # its models too
    assert table["train_sr"] == len(plan.fused_groups("super_resolution"))
    assert "eval_sr" not in table
    # autoencoder.fuse (the demo's): one train_autoencoder job per architecture and dataset
    assert table["train_autoencoder"] == len(plan.fused_groups("autoencoder"))
    assert table["probes_score"] == len(plan.jobs("probes"))
    assert table["prepare_dataset"] == len({d for b in plan.enabled() for d in plan.datasets(b)})


def _intervals(log: str, rule: str) -> dict[int, tuple[int, int, datetime, datetime]]:
    """jobid -> (line of its start, line of its end, start time, end time) from Snakemake's
    log, where every job start and end is a timestamp line followed by the event."""
    stamp, started, ended = None, {}, {}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]", line.strip())
        if m:
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif re.fullmatch(rf"(local)?rule {rule}:", line.strip()):
            jobid = next(int(x.split(":")[1]) for x in lines[i:i + 20]
                         if x.strip().startswith("jobid:"))
            started[jobid] = (i, stamp)
        elif m := re.match(rf"Finished jobid: (\d+) \(Rule: {rule}\)", line.strip()):
            ended[int(m.group(1))] = (i, stamp)
    assert started.keys() == ended.keys(), (started, ended)
    return {j: (started[j][0], ended[j][0], started[j][1], ended[j][1]) for j in started}


@pytest.mark.slow
def test_two_gpu_jobs_on_one_gpu_never_overlap(tmp_path):
    """Two probe scorings (GPU rules of one thread each) with `--cores 2` and device auto on
    this CPU machine: without the gpu resource they would run side by side. No --resources is
    given, so this checks the default `gpu=1` of a local run, which is what
    `--resources gpu=1` sets explicitly."""
    from workflow.benchmarks.probes import images

    results = tmp_path / "results"
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(yaml.safe_dump({
        "device": "auto", "benchmarks": ["probes"], "results_dir": str(results),
        "resources_dir": str(tmp_path / "resources"),
        "probes": {"lossnets": ["alexnet/1", "squeezenet1_1/1"], "comparisons": ["mean"],
                   "channel_norm": [False], "pixel_baselines": []}}))
    plan = Plan(load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml", cfg))
    assert plan.gpus("probes", "score") == 1
    # the probe images up front, in this process (the rule's own config): only the two
    # scorings run under Snakemake
    images(plan.stage_config("probes", "images"), results / "probes" / "images" / "manifest.json")
    proc = snakemake("--cores", "2", "--configfile", str(ROOT / "config" / "demo.yaml"),
                     str(cfg), "--", "probes", timeout=600)
    log = proc.stdout + proc.stderr
    assert re.search(r"Provided resources: .*\bgpu\b.*\b1\b", log), log[-3000:]
    jobs = sorted(_intervals(log, "probes_score").values())
    assert len(jobs) == 2 and "probes_images" not in log, log[-3000:]
    (s1, e1, t_s1, t_e1), (s2, e2, t_s2, t_e2) = jobs
    # the second starts only after the first finished: in Snakemake's event order and in time
    assert s1 < e1 < s2 < e2, log[-3000:]
    assert t_s1 <= t_e1 <= t_s2 <= t_e2
    for arch in ("alexnet", "squeezenet1_1"):
        assert (results / "probes" / arch / "1" / "scores.parquet").exists()
    assert Path(results / "logs" / "probes" / "alexnet" / "1.log").exists()


def test_the_demo_dag_with_every_fusion_off_trains_one_model_per_job(tmp_path):
    """super_resolution / delineation / autoencoder .fuse false on the demo: the DAG resolves
    with one training job per model (and SR's eval_sr per model), the fused jobs gone."""
    overlay = tmp_path / "no-fusion.yaml"
    overlay.write_text("super_resolution: {fuse: false}\ndelineation: {fuse: false}\n"
                       "autoencoder: {fuse: false}\n")
    proc = snakemake("-n", "--quiet", "rules", "--cores", "1", "--configfile",
                     str(ROOT / "config" / "demo.yaml"), str(overlay), "--config",
                     f"results_dir={tmp_path / 'results'}",
                     f"resources_dir={tmp_path / 'resources'}", timeout=300)
    table = _job_table(proc.stdout + proc.stderr)
    plan = Plan(load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml", overlay))
    for rule, benchmark in (("train_sr", "super_resolution"), ("eval_sr", "super_resolution"),
                            ("train_delineation", "delineation"),
                            ("train_autoencoder", "autoencoder")):
        assert table[rule] == len(plan.jobs(benchmark)), rule
        assert len(plan.fused_groups(benchmark)) == len(plan.jobs(benchmark))
