"""``painplan validate FILE`` (CONTRACT §6), including the issue's acceptance check:

"A CSV with a dozen different mistakes is rejected with one message listing all of them."
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from features.io import write_table
from training.cli import main

# (column, 1-based data row, bad value): a dozen-plus different mistakes, each in its own
# column, spread over the rows of a 15-row episode file.
MISTAKES = [
    ("age", 1, "abc"),
    ("sex", 2, "F"),
    ("patient_id", 3, "x" * 65),
    ("peg", 3, "10.5"),
    ("phq9", 4, "4.5"),
    ("gad7", 5, "-1"),
    ("pain_condition", 6, "back"),
    ("prior_nsaid", 7, "maybe"),
    ("gi_bleed_history", 8, "perhaps"),
    ("plan", 9, "snri+tca"),
    ("start_date", 10, "2024-13-45"),
    ("propensity", 11, "0"),
    ("adverse_event", 12, "sometimes"),
    ("egfr", 13, "250"),
    ("bmi", 14, "inf"),
]


def _write_csv(frame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_a_dozen_mistakes_are_rejected_in_one_message(tmp_path, text_frame, episode_row, capsys):
    df = text_frame(episode_row, 15, "episode_id")
    for column, row, value in MISTAKES:
        df.loc[row - 1, column] = value
    df.loc[1, "pain_intensity"] = ""  # required value left empty, row 2
    df.loc[14, "episode_id"] = df.loc[0, "episode_id"]  # duplicate id, rows 1 and 15
    path = _write_csv(df, tmp_path / "clinic_extract.csv")
    assert len({c for c, _, _ in MISTAKES}) >= 12

    code = main(["validate", str(path)])

    out, err = capsys.readouterr()
    assert code != 0
    assert out == ""
    paragraph = err.strip()
    assert "\n" not in paragraph, "one paragraph, no traceback"
    assert paragraph.startswith("painplan validate: error: 17 problem(s) found")
    for column, row, value in MISTAKES:
        assert f"column '{column}'" in paragraph, column
        assert repr(value) in paragraph, (column, value)
        assert f"at row(s) {row} " in paragraph, (column, row)
    assert "column 'pain_intensity': required value is empty at row(s) 2" in paragraph
    assert "column 'episode_id': duplicate episode_id" in paragraph
    assert "at row(s) 1, 15" in paragraph


def test_good_csv_exits_zero(tmp_path, episodes, capsys):
    path = _write_csv(episodes, tmp_path / "good.csv")
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "4 episodes row(s) conform" in out
    assert err == ""


def test_good_parquet_patient_file_exits_zero(tmp_path, patients, capsys):
    path = write_table(patients, tmp_path / "patients.parquet")
    assert main(["validate", str(path)]) == 0
    assert "3 patients row(s) conform" in capsys.readouterr().out


def test_kind_option_overrides_the_guess(tmp_path, episodes, capsys, caplog):
    path = _write_csv(episodes, tmp_path / "episodes.csv")
    with caplog.at_level(logging.WARNING):
        assert main(["validate", "--kind", "patients", str(path)]) == 0
    assert "4 patients row(s) conform" in capsys.readouterr().out
    assert "'episode_id', 'plan'" in caplog.text


def test_extra_columns_are_a_warning_not_an_error(tmp_path, episodes, capsys, caplog):
    episodes["ward"] = "B2"
    path = _write_csv(episodes, tmp_path / "extra.csv")
    with caplog.at_level(logging.WARNING):
        assert main(["validate", str(path)]) == 0
    assert "'ward'" in caplog.text
    assert "conform" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("episodes.xlsx", b"PK\x03\x04", "unsupported file type '.xlsx'"),
        ("latin1.csv", "patient_id,sex\nJosé,male\n".encode("latin-1"), "not UTF-8 text"),
        ("empty.csv", b"", "the file is empty"),
        ("header_only.csv", b"patient_id,age\n", "no data rows"),
    ],
)
def test_unreadable_files_fail_cleanly(tmp_path, capsys, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code != 0
    assert says in err
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_missing_file_fails_cleanly(tmp_path, capsys):
    code = main(["validate", str(tmp_path / "nowhere.csv")])
    err = capsys.readouterr().err
    assert code != 0
    assert "nowhere.csv: no such file" in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    from features.errors import ContractError

    with pytest.raises(ContractError):
        main(["--debug", "validate", str(tmp_path / "nowhere.csv")])


def test_validate_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate", "--help"])
    assert info.value.code == 0
    assert "usage: painplan validate" in capsys.readouterr().out


def test_installed_entry_point_help():
    exe = shutil.which("painplan", path=str(Path(sys.executable).parent))
    assert exe, "the painplan console script is not installed next to this Python"
    done = subprocess.run([exe, "validate", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: painplan validate" in done.stdout and "FILE" in done.stdout
