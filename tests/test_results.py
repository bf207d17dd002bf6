"""The scores schema, the atomic writers, gather, and the command dispatcher."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from workflow.bench.report import update_section
from workflow.results import (
    SCORE_COLUMNS,
    atomic_path,
    config_hash,
    gather_scores,
    score_frame,
    write_parquet,
)


def test_score_frame_fills_schema_and_common_columns():
    df = score_frame([{"metric": "2afc", "value": 0.7, "n": 10}], benchmark="similarity", arch="alexnet")
    assert list(df.columns) == list(SCORE_COLUMNS)
    assert df.loc[0, "benchmark"] == "similarity" and df.loc[0, "value"] == 0.7
    assert pd.isna(df.loc[0, "ranking"]) and pd.isna(df.loc[0, "channel_norm"])
    assert df["n"].dtype == "Int64"


def test_score_frame_rejects_unknown_columns():
    with pytest.raises(KeyError, match="valeu"):
        score_frame([{"metric": "x", "valeu": 1.0}])


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]


def test_gather_concatenates_and_validates(tmp_path):
    a = write_parquet(score_frame([{"metric": "m", "value": 1.0}], benchmark="a"), tmp_path / "a.parquet")
    b = write_parquet(score_frame([{"metric": "m", "value": 2.0}], benchmark="b"), tmp_path / "b.parquet")
    df = gather_scores([a, b], tmp_path / "scores.parquet")
    assert df["value"].tolist() == [1.0, 2.0]
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet"):
        gather_scores([tmp_path / "bad.parquet"], tmp_path / "s2.parquet")
    assert not (tmp_path / "s2.parquet").exists()


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_benchmarks_file_sections_are_replaced_not_duplicated(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    update_section("x", "first", path)
    update_section("y", "other", path)
    update_section("x", "second", path)
    text = path.read_text()
    assert text.count("<!-- bench:x -->") == 1 and "second" in text and "first" not in text
    assert "other" in text


def test_cli_lists_commands_and_rejects_unknown():
    ok = subprocess.run([sys.executable, "-m", "workflow", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "results" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "workflow", "nosuchcommand"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
