"""features.io: tables by extension; what is written reads back to the same typed frame."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from features.errors import ContractError
from features.io import _first_bad_byte, read_table, write_table
from features.validate import validate


@pytest.fixture
def typed_episodes(episodes) -> pd.DataFrame:
    """A small validated episode frame with a missing value in every kind of optional column."""
    episodes.loc[1, ["bmi", "pcs", "smoker", "neuropathic_component", "start_date"]] = ""
    episodes.loc[2, ["propensity", "egfr", "isi"]] = ""
    episodes.loc[3, ["heart_failure", "prior_pt", "adverse_event"]] = ["yes", "responded", "1"]
    episodes.loc[0, "patient_id"] = "007"  # leading zeros must survive a CSV round trip
    return validate(episodes, "episodes").frame


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".CSV"])
def test_round_trip_gives_the_same_typed_frame(tmp_path, typed_episodes, suffix):
    path = write_table(typed_episodes, tmp_path / "sub" / f"episodes{suffix}")
    assert path.exists()
    again = validate(read_table(path), "episodes").frame
    pd.testing.assert_frame_equal(again, typed_episodes)
    assert again.loc[0, "patient_id"] == "007"


def test_csv_is_read_as_text(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("patient_id,age,bmi\n007,54,\n", encoding="utf-8")
    df = read_table(path)
    assert df.loc[0, "patient_id"] == "007"
    assert df.loc[0, "age"] == "54"
    assert pd.isna(df.loc[0, "bmi"])


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffpatient_id,age\np1,54\n".encode())
    assert list(read_table(path).columns) == ["patient_id", "age"]


def test_repeated_header_name_is_kept_for_the_validator(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("patient_id,age,age\np1,54,55\n", encoding="utf-8")
    assert list(read_table(path).columns) == ["patient_id", "age", "age"]


@pytest.mark.parametrize("body", ["a,b\n1,2,3\n", "a,b\n1,2\n4\n"])
def test_ragged_rows_are_an_error_not_shifted(tmp_path, body):
    path = tmp_path / "ragged.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ContractError, match="ragged.csv: cannot be read as csv") as info:
        read_table(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("data.txt", b"a,b\n", "unsupported file type '.txt'"),
        ("data", b"a,b\n", "unsupported file type '(none)'"),
        ("empty.csv", b"", "the file is empty"),
        ("empty.parquet", b"", "the file is empty"),
        (
            "latin1.csv",
            "patient_id\nJosé\n".encode("latin-1"),
            "not UTF-8 text (byte 0xe9 on line 2",
        ),
        ("fake.parquet", b"patient_id\np1\n", "cannot be read as parquet"),
    ],
)
def test_unreadable_files_give_a_contract_error(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ContractError, match=re.escape(match)):
        read_table(path)


def test_missing_file(tmp_path):
    with pytest.raises(ContractError, match="no such file"):
        read_table(tmp_path / "nope.csv")


def test_write_refuses_unknown_extension(tmp_path, typed_episodes):
    with pytest.raises(ContractError, match="unsupported file type '.xlsx'"):
        write_table(typed_episodes, tmp_path / "out.xlsx")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 20])
def test_bad_byte_is_located_across_read_blocks(tmp_path, chunk):
    path = tmp_path / "mixed.csv"
    path.write_bytes("a,b\né,ü\n".encode() + b"x,\xff\n")
    assert _first_bad_byte(path, chunk) == "byte 0xff on line 3, byte offset 12"
