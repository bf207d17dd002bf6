"""Shared fixtures: the repository root, a tiny torch thread budget, the CI skip policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Tests that must not be skipped in CI: a skip with one of these markers in its reason fails
# the run when CI is set (the live-SLURM test skips only where SLURM cannot be installed).
MUST_RUN_IN_CI = ("SLURM-UNAVAILABLE", "SSL-EXTRA-MISSING")


# The files that take longest (end-to-end Snakemake runs) go first, so that under pytest-xdist
# (`-n auto --dist loadfile`, pyproject.toml) no long file starts last and runs alone.
SLOW_FIRST = ("test_demo.py", "test_slurm.py", "test_recovery.py", "test_fetch.py",
              "test_analysis.py", "test_user_folders.py", "test_data_rules.py")


def pytest_configure(config: pytest.Config) -> None:
    # one torch thread per xdist worker (the workers share the cores), two without xdist
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device (tools/gpu-check runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not os.environ.get("CI"):
        return
    bad = [
        r for r in terminalreporter.stats.get("skipped", [])
        if any(m in str(r.longrepr) for m in MUST_RUN_IN_CI)
    ]
    if bad:
        terminalreporter.write_line(
            f"CI: {len(bad)} test(s) that must run in CI were skipped: {[r.nodeid for r in bad]}",
            red=True,
        )
        config._ci_forbidden_skip = True


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if getattr(session.config, "_ci_forbidden_skip", False) or _forbidden_skips(session):
        session.exitstatus = 1


def _forbidden_skips(session: pytest.Session) -> bool:
    if not os.environ.get("CI"):
        return False
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return False
    return any(
        any(m in str(r.longrepr) for m in MUST_RUN_IN_CI)
        for r in reporter.stats.get("skipped", [])
    )


# ----------------------------------------------------------------------------- shared data


@pytest.fixture(scope="session")
def demo_plan(tmp_path_factory):
    """The demo config (config.yaml + config/demo.yaml), complete, with its folders in tmp."""
    from workflow.plan import Plan, load_config

    tmp = tmp_path_factory.mktemp("plan")
    config = load_config(ROOT / "config.yaml", ROOT / "config" / "demo.yaml",
                         overrides={"resources_dir": str(tmp / "resources"),
                                    "results_dir": str(tmp / "results")})
    return Plan(config)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, demo_plan):
    """``prepared(name, **sizes) -> folder``: the dataset's own ``synthesize`` + ``prepare``
    with the demo's synthetic sizes (or ``sizes`` replacing some), made once per session."""
    import json

    from workflow.datasets import registry

    root = tmp_path_factory.mktemp("datasets")
    made: dict[str, Path] = {}

    def get(name: str, **sizes) -> Path:
        options = json.loads(demo_plan.data_options(name, "synthesize"))
        options["synthetic"] = {**options.get("synthetic", {}), **sizes}
        key = f"{name}-" + "-".join(f"{k}{v}" for k, v in sorted(options["synthetic"].items()))
        if key not in made:
            raw, out = root / key / "raw", root / key / "prepared"
            registry.synthesize(name, raw, seed=0, options=options)
            registry.prepare(name, raw, out, json.loads(demo_plan.data_options(name, "prepare")))
            made[key] = out
        return made[key]

    return get


@pytest.fixture
def cpu_job(demo_plan):
    """``cpu_job(benchmark=None, stage=None, arch=None, **settings) -> Job`` on the CPU (fp32,
    the thread budget of the tests), with the demo's stage config and settings."""
    from workflow.job import Job

    def make(benchmark: str | None = None, stage: str | None = None, arch: str | None = None,
             **settings) -> Job:
        config, base = {"precision": "fp32", "weights": "random"}, {}
        if benchmark is not None:
            config = {**demo_plan.stage_config(benchmark, stage, arch), "precision": "fp32"}
            base = demo_plan.stage_settings(benchmark, stage)
        return Job.create(config, {**base, "device": "cpu", "threads": torch.get_num_threads(),
                                   **settings})

    return make
