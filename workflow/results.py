"""The scores schema: one tidy table of every benchmark's summary rows, and its provenance.

Every benchmark job writes its *summary rows* in the tidy scores schema below
(``SCORE_COLUMNS``) and, separately, whatever per-sample table it likes; the
``gather`` rule concatenates the summaries into ``results/scores.parquet``.

Columns of the scores table
---------------------------
benchmark    similarity | super_resolution | delineation | autoencoder | adaptation | probes
dataset      e.g. bapps-2afc, bapps-jnd, set5, roads, svhn
split        e.g. val, test, or a BAPPS subset such as traditional / pooled / mean
arch, layer  the loss network ("alexnet", "2" / "lpips"); "" for a pixel baseline
comparison   spatial | mean | sort | spatial+mean | spatial+sort | "" (n/a)
channel_norm True / False / <NA>
variant      benchmark-specific (e.g. "x4/standard", "K2/relaxed", "baseline", "adapted")
ranking      adaptation ranking index, <NA> elsewhere
run          seed index, <NA> where not repeated
metric       2afc | jnd_ap | srcc | krcc | plcc | psnr | ssim | quality | accuracy | ...
value, n     the score and how many samples it averages
ci_low,      a confidence interval of the value where the benchmark computes one (the
ci_high      similarity family's bootstrap, docs/similarity.md), else <NA>
provenance   config_hash, code_version, weights_id, device, precision, wall_time_s
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from workflow.files import write_parquet

SCORE_COLUMNS: dict[str, str] = {
    "benchmark": "string",
    "dataset": "string",
    "split": "string",
    "arch": "string",
    "layer": "string",
    "comparison": "string",
    "channel_norm": "boolean",
    "variant": "string",
    "ranking": "Int64",
    "run": "Int64",
    "metric": "string",
    "value": "float64",
    "n": "Int64",
    "ci_low": "float64",
    "ci_high": "float64",
    "config_hash": "string",
    "code_version": "string",
    "weights_id": "string",
    "device": "string",
    "precision": "string",
    "wall_time_s": "float64",
}
PROVENANCE = ("config_hash", "code_version", "weights_id", "device", "precision", "wall_time_s")
# columns a summary written before they existed may lack: read as <NA>
LATER_COLUMNS = ("ci_low", "ci_high")



def config_hash(section: Any) -> str:
    """A short stable hash of a config subsection (for the provenance columns)."""
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


_CODE_VERSION: str | None = None


def code_version() -> str:
    """``git describe`` of the checkout, with ``-dirty`` when it has changes; else the package
    version."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        try:
            _CODE_VERSION = subprocess.run(
                ["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                cwd=Path(__file__).resolve().parent, timeout=10, check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            from importlib.metadata import PackageNotFoundError, version

            try:
                _CODE_VERSION = version("lossnet-bench")
            except PackageNotFoundError:
                _CODE_VERSION = "unknown"
    return _CODE_VERSION


def score_frame(rows: Iterable[Mapping[str, Any]], **common: Any) -> pd.DataFrame:
    """Rows (dicts) -> a DataFrame in the scores schema.

    ``common`` fills columns shared by every row (e.g. benchmark, provenance).
    Missing columns become <NA>; unknown columns are an error (a typo would
    otherwise silently vanish).
    """
    records = [{**common, **r} for r in rows]
    unknown = {k for r in records for k in r} - set(SCORE_COLUMNS)
    if unknown:
        raise KeyError(f"not columns of the scores table: {sorted(unknown)}")
    df = pd.DataFrame.from_records(records, columns=list(SCORE_COLUMNS))
    if "code_version" in df and df["code_version"].isna().all():
        df["code_version"] = code_version()
    return df.astype(SCORE_COLUMNS)


def validate_scores(df: pd.DataFrame, source: str = "scores") -> pd.DataFrame:
    df = df.assign(**{c: float("nan") for c in LATER_COLUMNS if c not in df.columns})
    missing = [c for c in SCORE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing scores columns {missing}")
    return df[list(SCORE_COLUMNS)].astype(SCORE_COLUMNS)


def gather(inputs: Iterable[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Concatenate per-job summary files into one tidy table (atomically written)."""
    frames = [validate_scores(pd.read_parquet(p), str(p)) for p in inputs]
    df = (pd.concat(frames, ignore_index=True) if frames
          else pd.DataFrame(columns=list(SCORE_COLUMNS)).astype(SCORE_COLUMNS))
    write_parquet(df, out)
    return df


KEY_COLUMNS = ("benchmark", "dataset", "split", "arch", "layer", "comparison", "channel_norm",
               "variant", "ranking", "run", "metric")


class ScoresDiffer(ValueError):
    """Two scores tables that differ; the message says where."""


def compare(inputs: list[str | os.PathLike], columns: list[str] | None = None) -> pd.DataFrame:
    """Compare two scores tables row by row (matched on the key columns), provenance aside.

    Values must be equal bit for bit (NaN equals NaN). ``columns``: compare only these (default:
    every non-key, non-provenance column: ``value`` and ``n``). Raises :class:`ScoresDiffer`
    listing what differs; returns the joined table when they agree.
    """
    if len(inputs) != 2:
        raise ScoresDiffer(f"compare takes two scores tables, got {len(inputs)}")
    a, b = (validate_scores(pd.read_parquet(p), str(p)) for p in inputs)
    keys = list(KEY_COLUMNS)
    cols = columns or [c for c in SCORE_COLUMNS if c not in keys and c not in PROVENANCE]
    problems = []
    for name, df in (("first", a), ("second", b)):
        dup = df.duplicated(keys, keep=False)
        if dup.any():
            problems.append(f"{inputs[0 if name == 'first' else 1]}: {int(dup.sum())} rows "
                            f"share their key columns")
    joined = a[keys + cols].merge(b[keys + cols], on=keys, how="outer", suffixes=("_a", "_b"),
                                  indicator=True)
    for side, label in (("left_only", inputs[0]), ("right_only", inputs[1])):
        only = joined[joined["_merge"] == side]
        if len(only):
            where = only.groupby(["benchmark", "metric"], observed=True).size().to_dict()
            problems.append(f"{len(only)} rows only in {label}: {where}")
    both = joined[joined["_merge"] == "both"]
    for c in cols:
        x, y = both[f"{c}_a"], both[f"{c}_b"]
        same = (x == y).fillna(False) | (x.isna() & y.isna())
        if not same.all():
            bad = both[~same]
            where = bad.groupby(["benchmark", "dataset", "split"], observed=True).size()
            problems.append(f"{c}: {int((~same).sum())} of {len(both)} rows differ, e.g. "
                            f"{where.head(5).to_dict()}")
    print(f"{len(both)} rows matched on {', '.join(keys)}; compared {', '.join(cols)}")
    if problems:
        raise ScoresDiffer("the scores tables differ:\n  " + "\n  ".join(problems))
    print("identical")
    return joined
