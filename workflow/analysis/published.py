"""The published numbers of the studies (``published.yaml`` next to this file), checked and
flattened into one entry per number.

Torch- and pandas-free: the plan reads it while Snakemake builds the DAG (the config keys the
entries require become a param of ``analysis_tables``). The comparison with a run's scores is
:mod:`workflow.analysis.reproduced`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")

# the coordinate columns of the scores table that name a number (results.SCORE_COLUMNS without
# ranking and run, which are averaged over, and the value / provenance columns)
COORDINATES = ("benchmark", "dataset", "split", "arch", "layer", "comparison", "channel_norm",
               "variant", "metric")
GROUP_KEYS = {"id", "what", "paper", "table", "tolerance", "tolerance_reason", "scale",
              "decimals", "requires", "expect", "scores", "from_table", "column", "where",
              "values"}
VALUE_KEYS = {"row", "published", "note"}


class PublishedError(ValueError):
    """The data file is malformed; the message names the file, the group and the fix."""


@dataclass(frozen=True)
class Entry:
    """One published number and how to find and judge its reproduction.

    ``coords``: every scores coordinate (None = empty / <NA>) for a scores entry, or the
    ``where`` filters of an analysis-table entry (``from_table`` set, ``column`` the value).
    """

    id: str
    group: str
    what: str
    paper: str
    citation: str
    table: str
    row: str
    published: float
    tolerance: float
    tolerance_reason: str
    scale: float
    decimals: int
    coords: dict[str, Any]
    requires: dict[str, Any] = field(default_factory=dict)
    expect: dict[str, Any] = field(default_factory=dict)
    from_table: str | None = None
    column: str | None = None
    note: str = ""

    @property
    def source(self) -> str:
        return f"{self.paper}, {self.table}, row {self.row}"


def _fail(path: Path, where: str, msg: str) -> PublishedError:
    return PublishedError(f"{path}: {where}: {msg}")


def _number(path: Path, where: str, key: str, v: Any, minimum: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(path, where, f"{key} must be a number, got {v!r}")
    if minimum is not None and v < minimum:
        raise _fail(path, where, f"{key} must be >= {minimum}, got {v!r}")
    return float(v)


def _text(path: Path, where: str, group: Mapping[str, Any], key: str) -> str:
    v = group.get(key)
    if not isinstance(v, str) or not v.strip():
        raise _fail(path, where, f"{key} is missing or empty: every number needs it (docs/"
                                 f"analysis.md, \"Published vs reproduced\")")
    return " ".join(v.split())


def _mapping(path: Path, where: str, group: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = group.get(key, {})
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise _fail(path, where, f"{key} must be a mapping, got {v!r}")
    return dict(v)


def load(path: str | Path = PUBLISHED_FILE) -> list[Entry]:
    """Every published number of ``path``, checked: each has a paper listed under ``papers``,
    its table and row, a number, a tolerance >= 0 with its reason, and coordinates."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PublishedError(f"{path}: cannot read the published numbers: {e}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("groups"), list):
        raise PublishedError(f"{path}: expected a mapping with `papers` and a list `groups`")
    papers = doc.get("papers") or {}
    entries: list[Entry] = []
    seen: set[str] = set()
    for gi, group in enumerate(doc["groups"]):
        where = f"groups[{gi}]"
        if not isinstance(group, Mapping):
            raise _fail(path, where, "a group must be a mapping")
        gid = _text(path, where, group, "id")
        where = f"group {gid}"
        unknown = set(group) - GROUP_KEYS
        if unknown:
            raise _fail(path, where, f"unknown keys {sorted(unknown)}; "
                                     f"use {', '.join(sorted(GROUP_KEYS))}")
        paper = _text(path, where, group, "paper")
        if paper not in papers:
            raise _fail(path, where, f"paper {paper!r} is not listed under `papers` "
                                     f"({', '.join(sorted(papers))}); add its citation there")
        table = _text(path, where, group, "table")
        reason = _text(path, where, group, "tolerance_reason")
        tolerance = _number(path, where, "tolerance", group.get("tolerance"), 0)
        scale = _number(path, where, "scale", group.get("scale", 1), None)
        decimals = group.get("decimals", 1)
        if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
            raise _fail(path, where, f"decimals must be an integer >= 0, got {decimals!r}")
        requires = _mapping(path, where, group, "requires")
        expect = _mapping(path, where, group, "expect")
        from_table = group.get("from_table")
        if from_table is None:
            if "scores" not in group or "column" in group or "where" in group:
                raise _fail(path, where, "give `scores` (coordinates in the scores table) or "
                                         "`from_table`, `column` and `where` (an analysis table)")
            base = _mapping(path, where, group, "scores")
            allowed = set(COORDINATES)
        else:
            if "scores" in group or not isinstance(group.get("column"), str):
                raise _fail(path, where, "an analysis-table group needs `column` (the value's "
                                         "column) and `where` (filters), and no `scores`")
            base = _mapping(path, where, group, "where")
            allowed = None
        values = group.get("values")
        if not isinstance(values, list) or not values:
            raise _fail(path, where, "values must be a non-empty list")
        for vi, value in enumerate(values):
            vwhere = f"{where} values[{vi}]"
            if not isinstance(value, Mapping):
                raise _fail(path, vwhere, "a value must be a mapping")
            own = {k: v for k, v in value.items() if k not in VALUE_KEYS}
            bad = set(own) - allowed if allowed is not None else set()
            bad |= set(own) & set(base)
            if bad:
                raise _fail(path, vwhere, f"keys {sorted(bad)} are not coordinates "
                                          f"({', '.join(COORDINATES)}) or repeat the group's")
            coords = {**base, **own}
            if allowed is not None:
                unknown = set(coords) - allowed
                if unknown:
                    raise _fail(path, where, f"scores keys {sorted(unknown)} are not "
                                             f"coordinates ({', '.join(COORDINATES)})")
                clash = set(coords) & set(expect)
                if clash:
                    raise _fail(path, vwhere, f"{sorted(clash)} are both coordinates and "
                                              f"expectations; keep them in one place")
                # a column neither given nor expected must be empty in the row
                coords = {c: coords.get(c) for c in COORDINATES if c not in expect}
            published = _number(path, vwhere, "published", value.get("published"))
            row = _text(path, vwhere, value, "row")
            eid = f"{gid}/" + "/".join(str(v) for k, v in own.items())
            if eid in seen:
                raise _fail(path, vwhere, f"{eid} appears twice")
            seen.add(eid)
            entries.append(Entry(
                id=eid, group=gid, what=" ".join(str(group.get("what", "")).split()),
                paper=paper, citation=" ".join(str(papers[paper]).split()), table=table,
                row=row, published=published, tolerance=tolerance, tolerance_reason=reason,
                scale=scale, decimals=decimals, coords=coords, requires=requires,
                expect=expect, from_table=from_table,
                column=group.get("column"), note=str(value.get("note", ""))))
    return entries


def requirements(entries: list[Entry]) -> list[str]:
    """The dotted config keys the entries require, sorted."""
    return sorted({k for e in entries for k in e.requires})


def config_values(config: Mapping[str, Any], keys: list[str], path: Path = PUBLISHED_FILE
                  ) -> dict[str, Any]:
    """``{dotted key: value}`` of the complete config, for the keys the entries require."""
    out = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise PublishedError(f"{path}: requires config key {key}, which the config "
                                     f"does not have; name a key of workflow/schemas/")
            node = node[part]
        out[key] = node
    return out


def matches(value: Any, want: Any) -> bool:
    """``value`` (a row's or the config's) against an expectation: one value, a list of
    values, or a glob (a string with ``*``)."""
    if isinstance(want, list):
        return any(matches(value, w) for w in want)
    if value is None:
        return want is None
    if isinstance(want, bool) or isinstance(value, bool):
        return bool(value) == want if isinstance(want, bool) else str(value) == str(want)
    if isinstance(want, str) and "*" in want:
        return fnmatch.fnmatchcase(str(value), want)
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        try:
            return float(value) == float(want)
        except (TypeError, ValueError):
            return False
    return str(value) == str(want)
