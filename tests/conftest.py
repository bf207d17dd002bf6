"""Shared fixtures: the repository root, a tiny torch thread budget, the CI skip policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Tests that must not be skipped in CI: a skip with one of these markers in its reason fails
# the run when CI is set (the live-SLURM test skips only where SLURM cannot be installed).
MUST_RUN_IN_CI = ("SLURM-UNAVAILABLE",)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
