"""SLURM: the profiles, the job shell, and the demo DAG on a live single-node cluster.

The live test starts a throwaway cluster on 127.0.0.1 with tests/slurm/start-slurm.sh
(partitions `cpu` and `gpu`, fake GPUs of model `fakegpu`, node feature `ci_node`; needs
root, installs Debian's slurm-wlm and munge when missing), runs a reduced demo DAG
(similarity + super-resolution) through the CI profile tests/slurm/profile and, at the same
time, locally, and checks from SLURM's own records and the job logs that

* GPU rules ran on the `gpu` partition with a GPU of the profile's model (`gpu_model`) on a
  node with the profile's feature (`constraint`), CPU rules on `cpu`, every job with the CPUs
  of its `cpus_per_task` (the run is started with --cores 2) and the profile's QOS
  (`slurm-qos`, read from the sbatch lines: without accounting SLURM does not record it),
  downloads and synthesis (localrules) on the submitting host, and grouped rules in one
  submission;
* a training job signalled like a time-limit warning (`scancel --signal=TERM`, what the
  profile's `--signal=TERM@300` does) writes a checkpoint, exits 75, is retried and resumes
  from that checkpoint's step;
* the scores equal those of the local run (provenance columns aside), so the interrupted
  and resumed training reproduced the uninterrupted one exactly;

and stops every daemon it started. Where SLURM cannot be installed (not root, no apt-get)
it is skipped with a reason that starts with SLURM-UNAVAILABLE, which .ci/run counts as a
failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml
import yte

from workflow.results import PROVENANCE

REPO = Path(__file__).resolve().parents[1]
START_SLURM = REPO / "tests" / "slurm" / "start-slurm.sh"
CI_PROFILE = REPO / "tests" / "slurm" / "profile"
REAL_PROFILE = REPO / "slurm" / "config.yaml"
JOB_SHELL = REPO / "slurm" / "job-shell.sh"
SKIP_TAG = "SLURM-UNAVAILABLE"

RUN_TIMEOUT_S = 1500  # hard limit (timeout -s KILL) of each snakemake run; ~8 min on 2 idle cores
TRAIN_RULE = "train_sr"
SR_NET, SR_SCALE = "squeezenet1_1/2", 4
SR_ITERATIONS, SR_CHECKPOINT_EVERY = 16, 4


def _load_profile(path: Path, env: dict[str, str] | None = None) -> dict:
    """A profile as Snakemake reads it (YTE-rendered when it asks for it)."""
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        with open(path) as f:
            return yte.process_yaml(f, require_use_yte=True)
    finally:
        os.environ.clear()
        os.environ.update(old)


def _strip_quotes(value: object) -> str:
    # profile resource strings are Python expressions: "'gpu'" -> gpu
    s = str(value)
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s


def _gpu_rules(profile: dict) -> set[str]:
    return {r for r, res in profile["set-resources"].items() if res.get("gpu")}


def _signal_rules(profile: dict) -> dict[str, str]:
    return {r: _strip_quotes(res["slurm_extra"]) for r, res in profile["set-resources"].items()
            if "--signal" in str(res.get("slurm_extra", ""))}


# ----------------------------------------------------------------------------- no cluster


CLUSTER_ENV = {"LOSSNET_SLURM_CPU_PARTITION": "short", "LOSSNET_SLURM_GPU_PARTITION": "a100",
               "LOSSNET_SLURM_ACCOUNT": "proj42", "LOSSNET_SLURM_STATUS_COMMAND": "squeue",
               "LOSSNET_SLURM_QOS": "normal", "LOSSNET_SLURM_GPU_CONSTRAINT": "a100|h100",
               "LOSSNET_SLURM_CPU_CONSTRAINT": "skylake", "LOSSNET_SLURM_GPU_MODEL": "a100",
               "LOSSNET_SLURM_EXTRA": "--mail-type=FAIL"}


def test_real_profile_reads_the_cluster_from_environment() -> None:
    prof = _load_profile(REAL_PROFILE, CLUSTER_ENV)
    assert prof["executor"] == "slurm"
    assert prof["slurm-status-command"] == "squeue"
    assert prof["slurm-qos"] == "normal"  # the plugin's setting: sbatch --qos for every job
    dr = prof["default-resources"]
    assert _strip_quotes(dr["slurm_partition"]) == "short"
    assert _strip_quotes(dr["slurm_account"]) == "proj42"
    assert _strip_quotes(dr["slurm_extra"]) == "--mail-type=FAIL"
    assert _strip_quotes(dr["constraint"]) == "skylake"
    for rule in _gpu_rules(prof):
        res = prof["set-resources"][rule]
        assert _strip_quotes(res["slurm_partition"]) == "a100", rule
        assert _strip_quotes(res["constraint"]) == "a100|h100", rule
        assert _strip_quotes(res["gpu_model"]) == "a100", rule
    for rule, extra in _signal_rules(prof).items():
        assert extra == "--mail-type=FAIL --signal=TERM@300", rule
    # without the variables: the documented defaults, and no account, QOS or constraint
    bare = _load_profile(REAL_PROFILE, {})
    assert not {"slurm_account", "slurm_extra", "constraint"} & set(bare["default-resources"])
    assert "slurm-qos" not in bare
    assert not any({"constraint", "gpu_model"} & set(r) for r in bare["set-resources"].values())
    assert _strip_quotes(bare["default-resources"]["slurm_partition"]) == "cpu"
    assert bare["slurm-status-command"] == "sacct"
    # a CPU constraint alone never reaches the GPU jobs (their nodes have other features)
    cpu_only = _load_profile(REAL_PROFILE, {"LOSSNET_SLURM_CPU_CONSTRAINT": "skylake"})
    for rule in _gpu_rules(cpu_only):
        assert _strip_quotes(cpu_only["set-resources"][rule]["constraint"]) == "", rule


class _Resources(dict):
    """A job's resources as the plugin reads them (``.get`` and attributes)."""

    def __getattr__(self, name: str):
        return self.get(name)


def _dry_run_jobs(out: str) -> dict[str, dict]:
    """rule -> threads and resources of its first job, from `snakemake -n` output."""
    jobs: dict[str, dict] = {}
    for block in re.split(r"\n(?=\s*(?:local)?rule \w+:\n)", out):  # grouped ones indented
        m = re.match(r"\s*(?:local)?rule (\w+):\n", block)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        if not m or not res or m.group(1) in jobs:
            continue
        values = dict(item.split("=", 1) for item in res.group(1).split(", "))
        jobs[m.group(1)] = {"threads": int(threads.group(1)) if threads else 1, "resources": {
            k: int(v) if v.isdigit() else v for k, v in values.items()}}
    return jobs


def test_sbatch_options_from_the_profile_with_cores_2(tmp_path: Path) -> None:
    """`snakemake --profile slurm --cores 2 -n` on the demo with a QOS, constraints and a GPU
    model set: each job's threads and resources as Snakemake plans them, turned into the sbatch
    line by the plugin's own code. A GPU rule asks for its 4 CPUs although --cores 2 caps its
    threads at 2, and nothing is put in slurm_extra that the plugin refuses."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra
    from snakemake_interface_common.exceptions import WorkflowError

    from tests.snakemake_helpers import snakemake

    env = {**os.environ, **CLUSTER_ENV}
    old = dict(os.environ)
    os.environ.update(env)
    try:
        proc = snakemake("--profile", "slurm", "--cores", "2", "-n", "--configfile",
                         str(REPO / "config" / "demo.yaml"), "--config",
                         f"results_dir={tmp_path / 'results'}",
                         f"resources_dir={tmp_path / 'resources'}", timeout=300)
    finally:
        os.environ.clear()
        os.environ.update(old)
    jobs = _dry_run_jobs(proc.stdout + proc.stderr)
    prof = _load_profile(REAL_PROFILE, CLUSTER_ENV)
    settings = types.SimpleNamespace(requeue=True, no_requeue=False, qos=prof["slurm-qos"],
                                     reservation=None)
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "",
              "partition": "", "workdir": ""}
    assert {"train_sr", "score_similarity", "prepare_dataset"} <= set(jobs), sorted(jobs)
    for rule, job in jobs.items():
        if rule not in prof["set-resources"]:
            continue
        fake = types.SimpleNamespace(resources=_Resources(job["resources"]),
                                     threads=job["threads"])
        validate_slurm_extra(fake)  # raises for an option the plugin manages
        sbatch = get_submit_command(fake, params, settings) + set_gres_string(fake)
        assert "--qos=normal" in sbatch, (rule, sbatch)
        cpus = prof["set-threads"].get(rule, 1)
        assert f"--cpus-per-task={cpus}" in sbatch, (rule, job, sbatch)
        if rule in _gpu_rules(prof):
            assert job["threads"] == 2 < cpus == 4  # capped by --cores 2; SLURM still gets 4
            assert "-C 'a100|h100'" in sbatch and "--gpus=a100:1" in sbatch, (rule, sbatch)
        else:
            assert "-C skylake" in sbatch and "--gpus" not in sbatch, (rule, sbatch)
    # the examples the docs used to give are refused by the plugin
    for extra, word in (("--qos=normal", "quality-of-service"),
                        ("--constraint=a100", "node-constraints")):
        with pytest.raises(WorkflowError, match=word):
            validate_slurm_extra(types.SimpleNamespace(resources=_Resources(slurm_extra=extra)))


def test_ci_profile_mirrors_real_profile() -> None:
    real, ci = _load_profile(REAL_PROFILE, {}), _load_profile(CI_PROFILE / "config.yaml", {})
    assert _gpu_rules(ci) == _gpu_rules(real)
    assert _signal_rules(ci) == _signal_rules(real)
    assert set(_signal_rules(real)) <= _gpu_rules(real)
    assert ci["groups"] == real["groups"] and ci["group-components"] == real["group-components"]
    for key in ("resources", "set-resource-scopes"):
        assert ci[key] == real[key], key
    assert ci["default-resources"]["shell_exec"] == real["default-resources"]["shell_exec"]
    assert _strip_quotes(real["default-resources"]["shell_exec"]) == "slurm/job-shell.sh"
    assert os.access(JOB_SHELL, os.X_OK), f"{JOB_SHELL} must be executable (chmod +x)"
    for rule in _gpu_rules(real):
        assert _strip_quotes(ci["set-resources"][rule]["slurm_partition"]) == "gpu", rule
    # SLURM's CPUs (cpus_per_task) are the threads the job runs with (set-threads)
    for rule, threads in real["set-threads"].items():
        assert real["set-resources"][rule]["cpus_per_task"] == threads, rule
    for rule in _gpu_rules(real):
        res = ci["set-resources"][rule]
        assert {"gpu_model", "constraint", "cpus_per_task"} <= set(res), rule
    # long training jobs are never grouped: each must be retried and resumed on its own
    assert not {"train_sr", "train_delineation", "train_autoencoder",
                "adaptation_train"} & set(real["groups"])


def test_profile_rule_names_exist() -> None:
    # Snakemake silently ignores resources, threads and groups of a rule that does not exist,
    # so a renamed rule would quietly lose its GPU: every name must be a rule of the workflow.
    sources = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
    rules = {m for p in sources for m in re.findall(r"^\s*rule (\w+):", p.read_text(), re.M)}
    for prof in (_load_profile(REAL_PROFILE, {}), _load_profile(CI_PROFILE / "config.yaml", {})):
        for key in ("set-resources", "set-threads", "groups"):
            unknown = set(prof.get(key, {})) - rules
            assert not unknown, f"profile {key} names no rule of the workflow: {sorted(unknown)}"


_TRAINER = r"""
import os, signal, sys, time
done = sys.argv[1]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
open(done + ".ready", "w").close()
while not stop:
    time.sleep(0.05)
time.sleep(1.0)                     # "writing the checkpoint"
open(done, "w").write("checkpoint")
sys.exit(75)
"""


def _signal_group_when_ready(proc: subprocess.Popen, ready: Path) -> None:
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, "the fake trainer ended before it was signalled"
        assert time.monotonic() < deadline, "the fake trainer never started"
        time.sleep(0.05)
    # SLURM signals every process of the job step: the shell and the trainer alike
    os.killpg(proc.pid, signal.SIGTERM)


@pytest.mark.parametrize("shell", ["job-shell", "bash"])
def test_job_shell_waits_for_a_signalled_trainer(tmp_path: Path, shell: str) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    done = tmp_path / "done"
    # redirected like every rule's command (bash would exec a bare last command itself)
    cmd = f"{sys.executable} {script} {done} > {tmp_path / 'trainer.log'} 2>&1"
    argv = [str(JOB_SHELL), "-c", cmd] if shell == "job-shell" else ["bash", "-c",
                                                                     f"set -euo pipefail; {cmd}"]
    proc = subprocess.Popen(argv, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        _signal_group_when_ready(proc, Path(f"{done}.ready"))
        rc = proc.wait(timeout=60)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if shell == "job-shell":
        # the shell outlived the signal, waited for the checkpoint and passed on exit code 75
        assert rc == 75, stderr
        assert done.read_text() == "checkpoint"
        assert "[job-shell] SIGTERM received" in stderr
        assert "[job-shell] host=" in stderr
    else:
        # why the wrapper exists: plain bash dies at once, before the checkpoint is written
        assert rc == -signal.SIGTERM
        assert not done.exists()
        time.sleep(1.5)  # the orphaned trainer finishes on its own; let it before tmp cleanup


# ----------------------------------------------------------------------------- live cluster


def _unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return f"{SKIP_TAG}: the test cluster needs Linux (running on {sys.platform})"
    if os.geteuid() != 0:
        return (f"{SKIP_TAG}: starting slurmd and installing slurm-wlm need root "
                f"(run the tests as root, as CI does)")
    have = all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch", "squeue"))
    if not have and not shutil.which("apt-get"):
        return f"{SKIP_TAG}: SLURM is not installed and apt-get is missing to install it"
    return None


def _daemons_running(env: dict[str, str]) -> bool:
    out = subprocess.run([str(START_SLURM), "status"], capture_output=True, text=True, env=env,
                         timeout=60)
    states = dict(line.split(None, 1) for line in out.stdout.splitlines()[:3] if " " in line)
    return all(states.get(d, "down").strip() != "down" for d in ("munged", "slurmctld", "slurmd"))


@pytest.fixture(scope="module")
def slurm_env():
    """Start the single-node cluster (unless already up); stop what this fixture started."""
    reason = _unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    # two fake GPUs, so the similarity group and the training job can run side by side
    env["SLURM_CI_FAKE_GPUS"] = "2"
    # jobs run `python -m workflow`: the interpreter running the tests, whatever PATH says
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    already_up = _daemons_running(env)
    install = subprocess.run([str(START_SLURM), "install"], capture_output=True, text=True,
                             env=env, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"{SKIP_TAG}: installing slurm-wlm + munge with apt-get failed:\n"
                    f"{install.stderr[-3000:]}")
    start = subprocess.run([str(START_SLURM), "start"], capture_output=True, text=True,
                           env=env, timeout=300)
    if start.returncode != 0:
        pytest.fail(f"start-slurm.sh start failed (rc {start.returncode}):\n"
                    f"{start.stdout}\n{start.stderr[-5000:]}")
    m = re.search(r"export SLURM_CONF=(\S+)", start.stdout)
    assert m, start.stdout
    env["SLURM_CONF"] = m.group(1)
    try:
        yield env
    finally:
        if not already_up:
            stop = subprocess.run([str(START_SLURM), "stop"], capture_output=True, text=True,
                                  env=env, timeout=120)
            assert stop.returncode == 0, stop.stderr
            assert not _daemons_running(env), "a SLURM daemon survived start-slurm.sh stop"


def _scontrol_jobs(env: dict[str, str]) -> dict[int, dict[str, str]]:
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True,
                         env=env, timeout=30)
    jobs = {}
    for line in out.stdout.splitlines():
        rec = dict(re.findall(r"(\w+)=(\S*)", line))
        if rec.get("JobId", "").isdigit():
            jobs[int(rec["JobId"])] = rec
    return jobs


def _test_config(tmp: Path) -> Path:
    """config/demo.yaml reduced to what keeps the test short: two similarity jobs (one
    group submission) and one super-resolution training long enough to be interrupted."""
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["benchmarks"] = ["similarity", "super_resolution"]
    cfg["similarity"].update(lossnets=["alexnet/1", "squeezenet1_1/1"], lpips_sets=False,
                             pixel_baselines=[], datasets=["bapps"])
    cfg["super_resolution"].update(
        lossnets=[SR_NET], lpips_sets=False, scales=[SR_SCALE], runs=1,
        fuse=False,  # one model per job: its train/last.pt is what the test interrupts
        iterations=SR_ITERATIONS, checkpoint_every=SR_CHECKPOINT_EVERY,
        eval_every=SR_ITERATIONS // 2, log_every=SR_CHECKPOINT_EVERY)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class _Run:
    """One snakemake process in its own session, killed (with its children) on close."""

    def __init__(self, name: str, args: list[str], tmp: Path, env: dict[str, str]) -> None:
        self.log = tmp / f"{name}.snakemake.log"
        self._fh = open(self.log, "w")
        cmd = ["timeout", "-s", "KILL", str(RUN_TIMEOUT_S), sys.executable, "-m", "snakemake",
               *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._fh.close()


def _job_log(logdir: Path, jobid: int) -> str:
    hits = list(logdir.rglob(f"{jobid}.log"))
    return hits[0].read_text(errors="replace") if hits else ""


def _rules_in(log: str) -> set[str]:
    return set(re.findall(r"^\s*(?:local)?rule (\w+):", log, re.M))


def _scores(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path).drop(columns=list(PROVENANCE), errors="ignore")
    keys = [c for c in df.columns if c not in ("value", "n")]
    return df.sort_values(keys).reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_demo_dag_on_live_slurm(slurm_env: dict[str, str], tmp_path: Path) -> None:
    env = slurm_env
    config = _test_config(tmp_path)
    out = {k: tmp_path / k for k in ("slurm", "local")}
    target = {k: str(v / "results" / "scores.parquet") for k, v in out.items()}
    logdir = tmp_path / "slurm_logs"
    ci_profile = _load_profile(CI_PROFILE / "config.yaml")
    gpu_rules = _gpu_rules(ci_profile)
    arch, layer = SR_NET.split("/")
    sr_dir = out["slurm"] / "results" / "super_resolution" / arch / layer / f"x{SR_SCALE}" / "run0"
    train_log = (out["slurm"] / "results" / "logs" / "super_resolution" / arch / layer
                 / f"train_x{SR_SCALE}_run0.log")

    # every sbatch call the plugin makes, recorded on its way to the real sbatch (this cluster
    # keeps no accounting, so a job's QOS is accepted but shows as (null) in scontrol)
    shim, sbatch_log = tmp_path / "bin", tmp_path / "sbatch_calls.log"
    shim.mkdir()
    (shim / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {sbatch_log}\n'
                                 f'exec {shutil.which("sbatch", path=env["PATH"])} "$@"\n')
    (shim / "sbatch").chmod(0o755)
    env = {**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}"}

    before = set(_scontrol_jobs(env))

    def ours(rec: dict[str, str]) -> bool:
        # a job of this run logs into this run's folder (another run may share the cluster)
        return rec.get("StdOut", "").startswith(str(logdir))

    common = ["--configfile", str(config)]
    runs = {
        "slurm": _Run("slurm", ["--profile", str(CI_PROFILE), "--cores", "2", *common,
                                "--slurm-logdir", str(logdir), "--config",
                                f"results_dir={out['slurm']}/results",
                                f"resources_dir={out['slurm']}/resources", "--", target["slurm"]],
                      tmp_path, env),
        # the reference: the same DAG on this host, at the same time, with the same threads
        "local": _Run("local", ["--cores", "2", "--max-threads", "1", *common, "--config",
                                f"results_dir={out['local']}/results",
                                f"resources_dir={out['local']}/resources", "--", target["local"]],
                      tmp_path, env),
    }
    seen: dict[int, dict[str, str]] = {}  # every SLURM record of this run, latest state
    killed: int | None = None
    stopped_log = ""  # the training log of the signalled attempt (the retry overwrites it)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S + 60
        while not all(r.done() for r in runs.values()):
            assert time.monotonic() < deadline, "runs did not end in time"
            for jid, rec in _scontrol_jobs(env).items():
                if jid not in before and ours(rec):
                    seen[jid] = rec
            if killed is None and (sr_dir / "train" / "last.pt").exists():
                running = [j for j, r in seen.items() if r.get("JobState") == "RUNNING"
                           and r.get("Comment", "").startswith(f"rule_{TRAIN_RULE}_")]
                if running:
                    # what the profile's --signal=TERM@300 does: SIGTERM to the job step
                    subprocess.run(["scancel", "--signal=TERM", str(running[0])], env=env,
                                   check=True, timeout=30)
                    killed = running[0]
            if train_log.exists():
                text = train_log.read_text(errors="replace")
                if "received; checkpoint written at step" in text:
                    stopped_log = text
            time.sleep(0.5)
        for jid, rec in _scontrol_jobs(env).items():
            if jid not in before and ours(rec):
                seen[jid] = rec
    finally:
        for r in runs.values():
            r.close()
        leftover = [str(j) for j, r in _scontrol_jobs(env).items()
                    if j not in before and ours(r) and r.get("JobState") in ("PENDING", "RUNNING")]
        if leftover:
            subprocess.run(["scancel", *leftover], env=env, timeout=30)

    logs = {jid: _job_log(logdir, jid) for jid in seen}
    report = "\n\n".join(f"== SLURM job {j} {r.get('JobState')} {r.get('Comment')}\n"
                         f"{logs[j][-3000:]}" for j, r in sorted(seen.items()))
    for name, run in runs.items():
        assert run.proc.returncode == 0, (
            f"{name} run failed (rc {run.proc.returncode}):\n{run.tail()}\n{report}")

    # -- placement, from SLURM's records and from inside each job
    rules_by_job = {jid: _rules_in(log) for jid, log in logs.items()}
    ran = set().union(*rules_by_job.values()) if rules_by_job else set()
    assert {"prepare_dataset", "score_similarity", TRAIN_RULE, "eval_sr"} <= ran, report
    assert not {"synthesize_dataset", "download_dataset", "download_weights",
                "gather_scores"} & ran, "localrules must run on the submitting host"
    for jid, rec in seen.items():
        rules, log = rules_by_job[jid], logs[jid]
        shells = re.findall(r"\[job-shell\] host=.*", log)  # one per rule job it ran
        assert shells, f"job {jid} ({rules}) has no [job-shell] line:\n{log[-3000:]}"
        # the CPUs SLURM granted are the profile's cpus_per_task, whatever --cores said
        cpus = {str(ci_profile["set-resources"].get(r, {}).get(
            "cpus_per_task", ci_profile["default-resources"]["cpus_per_task"])) for r in rules}
        assert {rec["NumCPUs"]} == cpus, (jid, rules, rec)
        if rules & gpu_rules:
            assert rec["Partition"] == "gpu", (jid, rules, rec)
            # the GPU model and the node constraint, through the plugin's resources
            assert re.search(r"gpu:fakegpu[:=]1\b", rec.get("TresPerJob", "")), (jid, rules, rec)
            assert rec["Features"] == "ci_node", (jid, rules, rec)
            for line in shells:
                assert "partition=gpu" in line and "slurm_gpus_on_node=1" in line, line
                assert "cuda_visible_devices=none" not in line, line
        else:
            assert rec["Partition"] == "cpu", (jid, rules, rec)
            assert "gpu" not in rec.get("TresPerJob", ""), (jid, rules, rec)
            assert rec["Features"] in ("", "(null)"), (jid, rules, rec)
            for line in shells:
                assert "partition=cpu" in line and "slurm_gpus_on_node=0" in line, line
        for line in shells:
            assert f"slurm_cpus_per_task={rec['NumCPUs']}" in line, line
    # the QOS (the plugin's slurm-qos setting) went into every submission
    calls = sbatch_log.read_text().splitlines()
    assert len(calls) == len(seen), (calls, sorted(seen))
    assert all(f"--qos={ci_profile['slurm-qos']}" in call.split("--wrap")[0]
               for call in calls), calls
    # the two similarity jobs shared one submission (groups + group-components)
    sim_jobs = [j for j, rules in rules_by_job.items() if "score_similarity" in rules]
    assert len(sim_jobs) == 1, f"score_similarity ran in SLURM jobs {sim_jobs}:\n{report}"
    assert len(re.findall(r"\[job-shell\] host=", logs[sim_jobs[0]])) == 2, logs[sim_jobs[0]]

    # -- preemption: signal -> checkpoint -> exit 75 -> retry -> resume
    assert killed is not None, (
        f"{TRAIN_RULE} was never caught running after its first checkpoint; make the test "
        f"training longer (SR_ITERATIONS)\n{report}")
    assert "[job-shell] SIGTERM received" in logs[killed], logs[killed]
    assert "returned non-zero exit status 75" in logs[killed], logs[killed]
    m = re.search(r"SIGTERM received; checkpoint written at step (\d+)", stopped_log)
    assert m, f"the signalled attempt's log shows no checkpoint:\n{stopped_log}"
    step = int(m.group(1))
    assert SR_CHECKPOINT_EVERY <= step < SR_ITERATIONS
    retries = [j for j, rules in rules_by_job.items() if TRAIN_RULE in rules and j > killed]
    assert len(retries) == 1 and seen[retries[0]]["JobState"] == "COMPLETED", report
    final_log = train_log.read_text(errors="replace")
    assert re.search(rf"resumed from \S+last\.pt at step {step}\b", final_log), final_log

    # -- the same numbers as the local run: the resumed training reproduced the uninterrupted one
    slurm_scores, local_scores = _scores(Path(target["slurm"])), _scores(Path(target["local"]))
    assert set(slurm_scores["benchmark"]) == {"similarity", "super_resolution"}
    pd.testing.assert_frame_equal(slurm_scores, local_scores, check_exact=True)
