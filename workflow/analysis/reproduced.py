"""Published vs reproduced: every number of ``published.yaml`` beside this run's.

One row per published number (:func:`published_vs_reproduced`): the published value, the
reproduced one (the mean over the matching rows: runs, rankings), their difference in the
paper's unit, the tolerance, and a verdict in ``within_tolerance``:

- ``yes`` / ``no``: the run reproduces the paper's conditions and the difference is / is not
  within the tolerance;
- ``not comparable: <why>``: the number exists but was made under other conditions (a config
  key the entry requires has another value, e.g. ``data.source synthetic``; or the matching
  rows carry other values than the entry expects, e.g. ``weights_id random``); the reproduced
  value and difference are still shown;
- ``not run``: no row at the entry's coordinates (the benchmark, loss network or variant did
  not run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from workflow.analysis.published import COORDINATES, Entry, matches

COLUMNS = ["id", "paper", "table", "row", "what", *COORDINATES, "from_table", "column", "where",
           "published", "reproduced", "difference", "tolerance", "within_tolerance", "rows",
           "scale", "decimals", "tolerance_reason", "citation", "note"]
NOT_RUN = "not run"
EPS = 1e-9  # float slack of scale x value (0.706 * 100 = 70.60000000000001)


def _py(v: Any) -> Any:
    """A cell as a plain Python value (None for <NA> / NaN / "")."""
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    return None if v == "" else v


def _select(df: pd.DataFrame, coords: Mapping[str, Any]) -> pd.DataFrame:
    keep = np.ones(len(df), dtype=bool)
    for col, want in coords.items():
        if col not in df.columns:
            return df.iloc[:0]
        cells = [_py(v) for v in df[col].tolist()]
        keep &= np.array([matches(c, want) for c in cells], dtype=bool)
    return df[keep]


def _shown(v: Any) -> str:
    return "empty" if v is None else str(v)


def _verdict(entry: Entry, hit: pd.DataFrame, run_config: Mapping[str, Any] | None
             ) -> tuple[pd.DataFrame, list[str]]:
    """The comparable rows of ``hit`` and the reasons the number is not comparable."""
    why = []
    for key, want in entry.requires.items():
        if run_config is None or key not in run_config:
            why.append(f"config key {key} not given to the analysis")
        elif not matches(_py(run_config[key]), want):
            why.append(f"{key} {_shown(run_config[key])} (the paper's: {want})")
    ok = np.ones(len(hit), dtype=bool)
    for col, want in entry.expect.items():
        cells = [_py(v) for v in hit[col].tolist()] if col in hit.columns else [None] * len(hit)
        good = np.array([matches(c, want) for c in cells], dtype=bool)
        ok &= good
        if not good.any():
            seen = sorted({_shown(c) for c in cells})
            why.append(f"{col} {', '.join(seen)} (the paper's: {want})")
    if ok.any():
        hit = hit[ok]
    return hit, why


def published_vs_reproduced(scores: pd.DataFrame, entries: Sequence[Entry],
                            run_config: Mapping[str, Any] | None = None,
                            tables: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The comparison table (columns :data:`COLUMNS`), one row per entry in file order.

    ``scores``: the scores table; ``run_config``: ``{dotted config key: value}`` of this run
    for the keys the entries require (None: unknown, so those entries are not comparable);
    ``tables``: the analysis tables an entry may read (``from_table``).
    """
    tables = tables or {}
    out = []
    for e in entries:
        row: dict[str, Any] = {
            "id": e.id, "paper": e.paper, "table": e.table, "row": e.row, "what": e.what,
            "published": e.published, "tolerance": e.tolerance, "scale": e.scale,
            "decimals": e.decimals, "tolerance_reason": e.tolerance_reason,
            "citation": e.citation, "note": e.note, "from_table": e.from_table,
            "column": e.column,
            "where": None, "reproduced": np.nan, "difference": np.nan, "rows": 0}
        if e.from_table is None:
            row.update({c: e.coords.get(c) for c in COORDINATES})
            source, value_col = scores, "value"
        else:
            row["where"] = ", ".join(f"{k}={v}" for k, v in e.coords.items())
            source, value_col = tables.get(e.from_table), e.column
        hit = _select(source, e.coords) if source is not None else None
        if hit is None or hit.empty or value_col not in hit.columns:
            row["within_tolerance"] = NOT_RUN
            out.append(row)
            continue
        hit, why = _verdict(e, hit, run_config)
        values = pd.to_numeric(hit[value_col], errors="coerce").astype(float)
        if values.isna().all():
            row["within_tolerance"] = NOT_RUN
            out.append(row)
            continue
        reproduced = float(values.mean()) * e.scale
        diff = reproduced - e.published
        row.update(reproduced=reproduced, difference=diff, rows=int(values.notna().sum()))
        if why:
            row["within_tolerance"] = "not comparable: " + "; ".join(why)
        else:
            row["within_tolerance"] = "yes" if abs(diff) <= e.tolerance + EPS else "no"
        out.append(row)
    df = pd.DataFrame(out, columns=COLUMNS)
    df["channel_norm"] = df["channel_norm"].astype("boolean")
    df["rows"] = df["rows"].astype("Int64")
    for c in ("published", "reproduced", "difference", "tolerance", "scale"):
        df[c] = df[c].astype(float)
    return df


def _number(v: float | None, decimals: int, sign: bool = False) -> str:
    if v is None:
        return ""
    return f"{v:+.{decimals}f}" if sign else f"{v:.{decimals}f}"


def display(df: pd.DataFrame) -> pd.DataFrame:
    """The table for reading: numbers as the paper prints them (2AFC and JND in percent with
    one decimal, counts whole, correlations with three), differences with one more decimal."""
    rows = []
    for rec in df.to_dict("records"):
        r = {k: _py(v) for k, v in rec.items()}
        d = int(r["decimals"])
        if r["from_table"] is None:
            net = f"{r['arch']}/{r['layer']}" if r["arch"] is not None else ""
            method = r["comparison"] or ""
            if r["channel_norm"] is not None:
                method += " (norm.)" if r["channel_norm"] else " (no norm.)"
            parts = (r["benchmark"], f"{r['dataset']}/{r['split']}", net, method.strip(),
                     r["variant"], r["metric"])
            what = ", ".join(str(x) for x in parts if x)
        else:
            what = f"{r['from_table']}: {r['column']} where {r['where']}"
        rows.append({
            "number": r["id"],
            "source": f"{r['paper']}, {r['table']}: {r['row']}",
            "scores": what,
            "published": _number(r["published"], d),
            "reproduced": _number(r["reproduced"], d),
            "difference": _number(r["difference"], d + 1, sign=True),
            "tolerance": f"{r['tolerance']:.{d}f}" if d else f"{r['tolerance']:g}",
            "within tolerance": r["within_tolerance"],
        })
    return pd.DataFrame(rows, columns=["number", "source", "scores", "published", "reproduced",
                                       "difference", "tolerance", "within tolerance"])


def summary(df: pd.DataFrame) -> dict[str, int]:
    """How many numbers got each verdict (``not comparable`` counted together)."""
    verdict = df["within_tolerance"].where(~df["within_tolerance"].str.startswith(
        "not comparable"), "not comparable")
    return {k: int(v) for k, v in verdict.value_counts().items()}
