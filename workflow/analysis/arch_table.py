"""Architecture-level attributes (the thesis's Table 2.2), from ``architectures.yaml``.

The per-tap structure flags of ``lossnets.parquet`` (``skip_connections``, ``branching``,
``conv1x1``, ``batch_norm`` up to the tap) answer "what has the input passed through before
the features are read"; the thesis defines these attributes per architecture. This module
reads the per-architecture values (worked from each architecture's definition; the data file
says how each column is defined) and joins them into the attribute table as ``arch_<key>``
columns, so a correlation or figure can use either definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

ARCH_FILE = Path(__file__).with_name("architectures.yaml")
FLAGS = ("skip_connections", "branching", "conv1x1", "batch_norm")
COLUMNS = ("depth", *FLAGS)
# the names the joined columns get in the attribute table
JOINED = tuple(f"arch_{c}" for c in COLUMNS)


class ArchTableError(ValueError):
    pass


def load(path: str | Path = ARCH_FILE) -> pd.DataFrame:
    """One row per architecture: arch, depth, the four flags, source; checked."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ArchTableError(f"{path}: cannot read the architecture table ({e})") from e
    archs = (data or {}).get("architectures")
    if not isinstance(archs, dict) or not archs:
        raise ArchTableError(f"{path}: no `architectures` mapping (arch -> attributes)")
    rows = []
    for arch, v in archs.items():
        missing = [c for c in (*COLUMNS, "source") if c not in (v or {})]
        if missing:
            raise ArchTableError(f"{path}: architectures.{arch} lacks {missing}")
        bad = [c for c in FLAGS if not isinstance(v[c], bool)]
        if bad or not isinstance(v["depth"], int) or v["depth"] < 1:
            raise ArchTableError(f"{path}: architectures.{arch}: depth must be a positive "
                                 f"integer and {list(FLAGS)} true/false (check {bad or 'depth'})")
        rows.append({"arch": str(arch), **{c: v[c] for c in COLUMNS}, "source": str(v["source"])})
    df = pd.DataFrame(rows)
    df["arch"] = df["arch"].astype("string")
    df["depth"] = df["depth"].astype("Int64")
    return df


def join(attrs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``attrs`` (the loss-network attribute table) with the ``arch_<key>`` columns added.

    Every study architecture (``archs.ARCHS``) of ``attrs`` must have a row: a missing one
    would silently drop its loss networks from every correlation with an architecture
    attribute. The others (presets, custom entries: not in thesis Table 2.2) get NA."""
    from workflow.archs import ARCHS

    missing = sorted(set(attrs["arch"].astype(str)) & set(ARCHS)
                     - set(table["arch"].astype(str)))
    if missing:
        raise ArchTableError(f"workflow/analysis/{ARCH_FILE.name}: no row for the architectures "
                             f"{missing}; add them (depth, {', '.join(FLAGS)}, source)")
    right = table[["arch", *COLUMNS]].rename(columns=dict(zip(COLUMNS, JOINED, strict=True)))
    right = right.astype({c: "float" for c in JOINED})  # flags as 0/1 for the correlations
    out = attrs.drop(columns=[c for c in JOINED if c in attrs]).merge(
        right.astype({"arch": attrs["arch"].dtype}), on="arch", how="left")
    return out


def shown(table: pd.DataFrame, archs: Sequence[str] | None = None) -> pd.DataFrame:
    """The table as printed (Table 2.2): yes / no flags, only ``archs`` if given."""
    t = table if archs is None else table[table["arch"].isin(list(archs))]
    out = t.astype(object).copy()
    for c in FLAGS:
        out[c] = t[c].map({True: "yes", False: "no"})
    out["depth"] = t["depth"].astype(str)
    return out.reset_index(drop=True)
