"""What the fused training commands share (``super_resolution_fused``, ``delineation_fused``,
``autoencoder_fused``): member names, the one-group check, finding a member's finished model,
and scoring every member after training.

A fused job trains the members of ONE group of the plan (``workflow.plan.FUSED_BY``); each
member is a model the per-model command would train, named ``"<net> run<r>"`` (its metrics
are ``eval_<name>/<metric>`` in the group's metrics.csv). A member whose model file holds its
exact resume key (fused or alone) is not trained again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from workflow.files import write_parquet
from workflow.job import Job
from workflow.training import load_model

__all__ = ["check_group", "finished_model", "member_name", "score_members"]


def member_name(net: str, run: int) -> str:
    """A fused member's name: its metrics are ``eval_<name>/<metric>`` in metrics.csv."""
    return f"{net} run{int(run)}"


def check_group(ids: Sequence[str], runs: Sequence[int], groups: Sequence[str], what: str,
                key: str) -> list[str]:
    """The members' names; refuses members of more than one group (``groups``: each
    member's) and repeated or no members. ``what`` names the job, ``key`` its config key."""
    found = sorted(set(groups))
    if len(found) != 1:
        raise ValueError(f"a fused {what} job trains the models of one loss-network "
                         f"architecture, got {found}; the plan groups members by its key "
                         f"fields ({key})")
    names = [member_name(i, r) for i, r in zip(ids, runs, strict=True)]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"fused members must be distinct and at least one: {names}")
    return names


def finished_model(paths: Sequence[Path], exact: str) -> Path | None:
    """The first of ``paths`` whose model file was trained under the exact key ``exact``."""
    for path in paths:
        if not Path(path).exists():
            continue
        try:
            meta = load_model(path, {}, map_location="cpu")
        except Exception:  # unreadable: train it again (atomic writes make this rare)
            continue
        if meta.get("key") == exact:
            return Path(path)
    return None


def score_members(job: Job, eval_config: dict[str, Any], scores: Path | None,
                  evaluate: Sequence[Callable[[Job], pd.DataFrame]]) -> pd.DataFrame:
    """Score every member (``evaluate[i](job)``: member ``i``'s evaluation, as the per-model
    eval command runs it) in a job of the eval stage's own config (precision, provenance,
    its own clock); ``scores`` gets all members' rows."""
    if scores is None:
        raise ValueError("a fused job with an eval config needs --scores (the group's summary "
                         "file)")
    frames = [one(Job.create(eval_config, job.settings)) for one in evaluate]
    table = pd.concat(frames, ignore_index=True)
    write_parquet(table, scores)
    return table
