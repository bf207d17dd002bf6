"""The scores schema (workflow/results.py): typed rows, gathering, provenance hashes."""

from __future__ import annotations

import pandas as pd
import pytest

from workflow.files import write_parquet
from workflow.perf.report import update_section
from workflow.results import SCORE_COLUMNS, config_hash, gather, score_frame


def test_score_frame_fills_schema_and_common_columns():
    df = score_frame([{"metric": "2afc", "value": 0.7, "n": 10}], benchmark="similarity",
                     arch="alexnet")
    assert list(df.columns) == list(SCORE_COLUMNS)
    assert df.loc[0, "benchmark"] == "similarity" and df.loc[0, "value"] == 0.7
    assert pd.isna(df.loc[0, "ranking"]) and pd.isna(df.loc[0, "channel_norm"])
    assert df["n"].dtype == "Int64"


def test_score_frame_rejects_unknown_columns():
    with pytest.raises(KeyError, match="valeu"):
        score_frame([{"metric": "x", "valeu": 1.0}])


def test_gather_concatenates_and_validates(tmp_path):
    a = write_parquet(score_frame([{"metric": "m", "value": 1.0}], benchmark="a"),
                      tmp_path / "a.parquet")
    b = write_parquet(score_frame([{"metric": "m", "value": 2.0}], benchmark="b"),
                      tmp_path / "b.parquet")
    df = gather([a, b], tmp_path / "scores.parquet")
    assert df["value"].tolist() == [1.0, 2.0]
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet"):
        gather([tmp_path / "bad.parquet"], tmp_path / "s2.parquet")
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


def test_compare_finds_every_kind_of_difference(tmp_path, capsys):
    from workflow.cli import main
    from workflow.results import ScoresDiffer, compare

    rows = [{"metric": "m", "split": s, "value": v, "n": 3} for s, v in (("a", 0.1), ("b", 0.2))]
    base = write_parquet(score_frame(rows, benchmark="x", device="cpu"), tmp_path / "a.parquet")
    # provenance may differ; value, n and the set of rows may not
    same = write_parquet(score_frame(rows, benchmark="x", device="cuda", wall_time_s=9.0),
                         tmp_path / "same.parquet")
    assert len(compare([base, same])) == 2
    # 0.1 is 0x1.999999999999ap-4: one unit in the last place more must count as a change
    changed = [dict(rows[0], value=float.fromhex("0x1.999999999999bp-4")), rows[1]]
    other = write_parquet(score_frame(changed + [dict(rows[1], split="c")], benchmark="x"),
                          tmp_path / "b.parquet")
    with pytest.raises(ScoresDiffer) as e:
        compare([base, other])
    assert "value: 1 of 2 rows differ" in str(e.value) and "1 rows only in" in str(e.value)
    assert main(["results", "compare", str(base), str(other), "--columns", "n"]) == 1
    assert "only in" in capsys.readouterr().err
