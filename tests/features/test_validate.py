"""features.validate: every violation reported at once; conforming input returned typed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from features.errors import ContractError
from features.schema import (
    EPISODE_COLUMNS,
    PAIN_CONDITIONS,
    PATIENT_COLUMNS,
    PRIOR_COLUMNS,
    PRIOR_LEVELS,
    RISK_FLAGS,
    SEX_LEVELS,
)
from features.validate import guess_kind, validate


@dataclass(frozen=True)
class Mistake:
    """One malformed input: how to break a good episode frame and what the error must say."""

    column: str
    change: Callable[[pd.DataFrame], None]
    phrase: str  # what kind of problem the message must call it
    row: int | None = None  # 1-based data row the message must name, if any
    value: str | None = None  # the offending value the message must quote, if any


def _set(column: str, row: int, value: str) -> Callable[[pd.DataFrame], None]:
    def change(df: pd.DataFrame) -> None:
        df.loc[row - 1, column] = value

    return change


def _cell(column: str, row: int, value: str, phrase: str) -> Mistake:
    return Mistake(column, _set(column, row, value), phrase, row=row, value=value)


def _drop(column: str) -> Callable[[pd.DataFrame], None]:
    def change(df: pd.DataFrame) -> None:
        del df[column]

    return change


def _duplicate_episode_id(df: pd.DataFrame) -> None:
    df.loc[2, "episode_id"] = df.loc[0, "episode_id"]


def _no_rows(df: pd.DataFrame) -> None:
    df.drop(index=df.index, inplace=True)


LONG_ID = "p" * 65

MISTAKES = {
    "wrong type: age 'abc'": _cell("age", 2, "abc", "not a number"),
    "age below range": _cell("age", 3, "17", "out of range 18–110"),
    "age above range": _cell("age", 1, "111", "out of range 18–110"),
    "peg above range": _cell("peg", 2, "10.5", "out of range 0–10"),
    "phq9 above range": _cell("phq9", 4, "28", "out of range 0–27"),
    "gad7 below range": _cell("gad7", 2, "-1", "out of range 0–21"),
    "egfr above range": _cell("egfr", 3, "250", "out of range 0–200"),
    "optional bmi below range": _cell("bmi", 2, "9", "out of range 10–80"),
    "propensity zero": _cell("propensity", 2, "0", "out of range (0, 1]"),
    "propensity above one": _cell("propensity", 1, "1.5", "out of range (0, 1]"),
    "non-integer phq9": _cell("phq9", 2, "4.5", "not a whole number"),
    "unknown sex level": _cell("sex", 2, "F", "unknown level"),
    "unknown pain_condition": _cell("pain_condition", 3, "back", "unknown level"),
    "unknown prior level": _cell("prior_nsaid", 1, "maybe", "unknown level"),
    "missing required column": Mistake("peg", _drop("peg"), "required column is missing"),
    "missing required episode column": Mistake(
        "adverse_event", _drop("adverse_event"), "required column is missing"
    ),
    "empty required value": Mistake(
        "pain_intensity", _set("pain_intensity", 3, ""), "required value is empty", row=3
    ),
    "blank required value": Mistake("sex", _set("sex", 2, "   "), "required value is empty", row=2),
    "duplicate episode_id": Mistake(
        "episode_id", _duplicate_episode_id, "duplicate episode_id", row=3, value="e-001-0"
    ),
    "plan with unknown code": _cell(
        "plan", 2, "cbt+massage", "unknown component code(s) 'massage'"
    ),
    "plan with duplicate code": _cell("plan", 3, "pt+cbt+pt", "lists pt more than once"),
    "plan with too many components": _cell("plan", 1, "cbt+pt+yoga+mbsr", "4 non-drug components"),
    "plan with too many drugs": _cell("plan", 1, "nsaid+snri+opioid", "3 drug classes"),
    "forbidden snri+tca": _cell("plan", 4, "snri+tca", "forbidden combination snri + tca"),
    "forbidden opioid+gabapentinoid": _cell(
        "plan", 2, "gabapentinoid+opioid", "forbidden combination gabapentinoid + opioid"
    ),
    "bad risk-flag boolean": _cell("gi_bleed_history", 2, "perhaps", "not a boolean"),
    "bad required boolean": _cell("adverse_event", 3, "sometimes", "not a boolean"),
    "bad optional boolean": _cell("smoker", 1, "2", "not a boolean"),
    "impossible date": _cell("start_date", 2, "2024-13-45", "not an ISO date"),
    "non-ISO date": _cell("start_date", 3, "15/03/2024", "not an ISO date"),
    "incomplete date": _cell("start_date", 1, "2024-03", "not an ISO date"),
    "year only": _cell("start_date", 4, "2024", "not an ISO date"),
    "patient_id too long": _cell("patient_id", 2, LONG_ID, "longer than 64 characters"),
    "inf in a required numeric": _cell("pain_intensity", 2, "inf", "not a number"),
    "nan in a required numeric": _cell("peg_12wk", 4, "nan", "not a number"),
    "NA text in an optional numeric": _cell("bmi", 3, "NA", "not a number"),
    "zero data rows": Mistake("(table)", _no_rows, "no data rows"),
}


@pytest.mark.parametrize("mistake", MISTAKES.values(), ids=MISTAKES.keys())
def test_malformed_input_is_rejected_naming_column_row_and_value(episodes, mistake):
    mistake.change(episodes)
    with pytest.raises(ContractError) as info:
        validate(episodes, "episodes")
    message = str(info.value)
    assert f"column '{mistake.column}'" in message
    assert mistake.phrase in message
    assert "\n" not in message, "the message must be one paragraph"
    entries = [v for v in info.value.violations if v["column"] == mistake.column]
    assert entries, f"no structured violation for {mistake.column}: {info.value.violations}"
    entry = entries[0]
    assert mistake.phrase in entry["problem"]
    assert entry["message"] in message
    if mistake.row is not None:
        assert mistake.row in entry["rows"]
        assert entry["n_rows"] >= 1
        assert f"row(s) {', '.join(map(str, entry['rows']))}" in message
        assert str(mistake.row) in message
    if mistake.value is not None:
        assert mistake.value in entry["values"]
        assert repr(mistake.value) in message


def test_there_are_at_least_twenty_malformed_cases():
    assert len(MISTAKES) >= 20


def test_only_the_broken_column_is_reported(episodes):
    episodes.loc[1, "age"] = "17"
    with pytest.raises(ContractError) as info:
        validate(episodes, "episodes")
    assert [v["column"] for v in info.value.violations] == ["age"]
    assert info.value.violations[0]["rows"] == [2]
    assert info.value.violations[0]["values"] == ["17"]


def test_all_problems_collected_into_one_error(episodes):
    episodes.loc[0, "age"] = "abc"
    episodes.loc[1, "sex"] = "F"
    episodes.loc[2, "plan"] = "snri+tca"
    del episodes["gad7"]
    with pytest.raises(ContractError) as info:
        validate(episodes, "episodes")
    assert {v["column"] for v in info.value.violations} == {"age", "sex", "plan", "gad7"}
    assert str(info.value).startswith("4 problem(s) found")


def test_many_bad_rows_show_the_first_few_and_a_count(text_frame, episode_row):
    df = text_frame(episode_row, 40, "episode_id")
    df.loc[10:, "age"] = [str(200 + i) for i in range(30)]
    with pytest.raises(ContractError) as info:
        validate(df, "episodes")
    (entry,) = info.value.violations
    assert entry["rows"] == [11, 12, 13, 14, 15]
    assert entry["n_rows"] == 30
    assert entry["values"] == ["200", "201", "202", "203", "204"]
    assert "row(s) 11, 12, 13, 14, 15 and 25 more" in str(info.value)


def test_many_distinct_bad_plans_are_summarised(text_frame, episode_row):
    df = text_frame(episode_row, 8, "episode_id")
    df["plan"] = [f"bad{i}" for i in range(8)]
    with pytest.raises(ContractError) as info:
        validate(df, "episodes")
    plan_entries = [v for v in info.value.violations if v["column"] == "plan"]
    assert len(plan_entries) == 6  # five spelled out, then one summary
    assert plan_entries[-1]["problem"].startswith("3 more distinct invalid plan spellings")
    assert plan_entries[-1]["rows"] == [6, 7, 8]


def test_rows_are_positions_not_index_labels(episodes):
    episodes.index = [10, 20, 30, 40]
    episodes.loc[30, "sex"] = "F"
    with pytest.raises(ContractError) as info:
        validate(episodes, "episodes")
    assert info.value.violations[0]["rows"] == [3]


def test_message_stays_one_paragraph_with_newlines_in_values(episodes):
    episodes.loc[0, "sex"] = "fe\nmale"
    episodes.loc[1, "plan"] = "cbt\n+massage"
    with pytest.raises(ContractError) as info:
        validate(episodes, "episodes")
    assert "\n" not in str(info.value)
    assert "'fe\\nmale'" in str(info.value)


def test_long_bad_values_are_cut_in_the_message(episodes):
    episodes.loc[0, "sex"] = "x" * 500
    with pytest.raises(ContractError) as info:
        validate(episodes, "episodes")
    assert "x" * 500 not in str(info.value)
    assert "…" in str(info.value)
    assert info.value.violations[0]["values"] == ["x" * 500]


def test_duplicate_header_names_are_reported(episodes):
    df = pd.concat([episodes, episodes[["age"]]], axis=1)
    df.iloc[1, 1] = "17"  # the first 'age' (column 1) is still checked
    with pytest.raises(ContractError) as info:
        validate(df, "episodes")
    assert "column 'age': column name appears more than once" in str(info.value)
    assert "out of range" in str(info.value)


def test_missing_column_hint_points_at_a_misspelled_one(episodes):
    episodes = episodes.rename(columns={"peg": "PEG", "gad7": "gad_7"})
    with pytest.raises(ContractError) as info:
        validate(episodes, "episodes")
    message = str(info.value)
    assert "the file has a column 'PEG': rename it to 'peg'" in message
    assert "the file has a column 'gad_7': rename it to 'gad7'" in message
    assert "ignoring 2 column(s) not in the contract: 'PEG', 'gad_7'" in message


def test_not_a_dataframe():
    with pytest.raises(ContractError, match="expected a table of patients, got dict"):
        validate({"age": [50]}, "patients")


# --- what conforming input turns into -------------------------------------------------------

BOOLEAN_SPELLINGS = [
    ("true", True),
    ("false", False),
    ("1", True),
    ("0", False),
    ("yes", True),
    ("no", False),
    ("TRUE", True),
    ("Yes", True),
    ("FALSE", False),
    ("No", False),
    (" yes ", True),
]


@pytest.mark.parametrize(("spelling", "expected"), BOOLEAN_SPELLINGS)
def test_boolean_spellings_are_accepted(episodes, spelling, expected):
    for column in ("gi_bleed_history", "adverse_event", "smoker", "neuropathic_component"):
        episodes[column] = spelling
    frame = validate(episodes, "episodes").frame
    for column in ("gi_bleed_history", "adverse_event", "smoker", "neuropathic_component"):
        assert frame[column].tolist() == [expected] * 4, column


def test_absent_risk_flags_default_false_and_absent_priors_default_none(patients):
    patients = patients.drop(columns=[c for c in RISK_FLAGS + PRIOR_COLUMNS if c in patients])
    frame = validate(patients, "patients").frame
    for flag in RISK_FLAGS:
        assert frame[flag].dtype == bool
        assert not frame[flag].any(), flag
    for prior in PRIOR_COLUMNS:
        assert list(frame[prior].cat.categories) == list(PRIOR_LEVELS)
        assert (frame[prior] == "none").all(), prior


def test_empty_risk_flags_and_priors_take_their_defaults(patients):
    patients["heart_failure"] = ["", "true", ""]
    patients["prior_tca"] = ["", "intolerant", " "]
    frame = validate(patients, "patients").frame
    assert frame["heart_failure"].tolist() == [False, True, False]
    assert frame["prior_tca"].tolist() == ["none", "intolerant", "none"]


OPTIONAL = [c.name for c in EPISODE_COLUMNS if not c.required and c.default is None]


def test_optional_columns_may_be_absent(episodes):
    frame = validate(
        episodes.drop(columns=[c for c in OPTIONAL if c in episodes]), "episodes"
    ).frame
    assert list(frame.columns) == [c.name for c in EPISODE_COLUMNS]
    for name in OPTIONAL:
        assert frame[name].isna().all(), name


def test_optional_columns_may_be_empty(episodes):
    for name in OPTIONAL:
        episodes[name] = ""
    frame = validate(episodes, "episodes").frame
    for name in OPTIONAL:
        assert frame[name].isna().all(), name


def test_absent_and_empty_optional_columns_give_the_same_frame(episodes):
    absent = validate(episodes.drop(columns=[c for c in OPTIONAL if c in episodes]), "episodes")
    for name in OPTIONAL:
        episodes[name] = ""
    empty = validate(episodes, "episodes")
    pd.testing.assert_frame_equal(absent.frame, empty.frame)


def test_extra_columns_warn_by_name_and_are_dropped(patients, caplog):
    patients["favourite_colour"] = "blue"
    patients["Notes"] = ""
    with caplog.at_level(logging.WARNING, logger="features.validate"):
        result = validate(patients, "patients")
    assert "favourite_colour" not in result.frame and "Notes" not in result.frame
    assert len(result.warnings) == 1
    assert "'favourite_colour', 'Notes'" in result.warnings[0]
    assert "favourite_colour" in caplog.text and "Notes" in caplog.text


def test_good_patient_file_validates(patients):
    result = validate(patients, "patients")
    assert result.kind == "patients"
    assert result.warnings == []
    assert list(result.frame.columns) == [c.name for c in PATIENT_COLUMNS]
    assert len(result.frame) == 3
    assert result.frame["patient_id"].tolist() == ["p-001-0", "p-001-1", "p-001-2"]
    assert result.frame["age"].tolist() == [54, 71, 54]


def test_good_episode_file_validates_and_canonicalises_plans(episodes):
    episodes["plan"] = ["snri + pt + cbt", "nsaid", "gabapentinoid+acupuncture", "yoga+mbsr+opioid"]
    result = validate(episodes, "episodes")
    assert list(result.frame.columns) == [c.name for c in EPISODE_COLUMNS]
    assert result.frame["plan"].tolist() == [
        "cbt+pt+snri",
        "nsaid",
        "acupuncture+gabapentinoid",
        "mbsr+opioid+yoga",
    ]


def test_typed_output(episodes):
    episodes.loc[1, ["bmi", "pcs", "smoker", "start_date", "propensity"]] = ""
    frame = validate(episodes, "episodes").frame
    assert frame["age"].dtype == np.int64
    assert frame["phq9"].dtype == np.int64
    assert frame["pcs"].dtype == "Int64"
    assert frame["pcs"].isna().tolist() == [False, True, False, False]
    assert frame["pcs"].iloc[0] == 21
    assert frame["bmi"].dtype == np.float64
    assert np.isnan(frame["bmi"].iloc[1]) and frame["bmi"].iloc[0] == 27.5
    assert frame["propensity"].dtype == np.float64 and np.isnan(frame["propensity"].iloc[1])
    assert frame["peg"].dtype == np.float64
    assert isinstance(frame["sex"].dtype, pd.CategoricalDtype)
    assert list(frame["sex"].cat.categories) == list(SEX_LEVELS)
    assert list(frame["pain_condition"].cat.categories) == list(PAIN_CONDITIONS)
    assert frame["smoker"].dtype == "boolean" and frame["smoker"].isna().tolist()[1]
    assert frame["adverse_event"].dtype == bool
    assert frame["gi_bleed_history"].dtype == bool
    assert pd.api.types.is_datetime64_any_dtype(frame["start_date"])
    assert frame["start_date"].iloc[0] == pd.Timestamp("2024-03-15")
    assert pd.isna(frame["start_date"].iloc[1])
    assert frame["patient_id"].dtype == object and frame["plan"].dtype == object


def test_typed_output_is_a_fixed_point(episodes):
    first = validate(episodes, "episodes").frame
    again = validate(first, "episodes").frame
    pd.testing.assert_frame_equal(first, again)


def test_numeric_dtypes_are_checked_too(episodes):
    first = validate(episodes, "episodes").frame
    first["peg"] = [1.0, np.inf, 11.0, np.nan]
    with pytest.raises(ContractError) as info:
        validate(first, "episodes")
    messages = {(v["column"], v["problem"].split(" (")[0]) for v in info.value.violations}
    assert ("peg", "not a number") in messages
    assert ("peg", "out of range 0–10 points") in messages
    assert ("peg", "required value is empty") in messages


def test_request_kind_allows_missing_patient_id(patient_row):
    request = pd.DataFrame([{k: v for k, v in patient_row.items() if k != "patient_id"}])
    frame = validate(request, "request").frame
    assert frame["patient_id"].isna().all()
    empty_id = pd.DataFrame([{**patient_row, "patient_id": ""}])
    assert validate(empty_id, "request").frame["patient_id"].isna().all()
    with pytest.raises(ContractError, match="column 'patient_id': required column is missing"):
        validate(request, "patients")


def test_request_kind_accepts_json_typed_values(patient_row):
    payload = {**patient_row, "age": 54, "bmi": 27.5, "phq9": 9, "smoker": False, "pregnant": 0}
    frame = validate(pd.DataFrame([payload]), "request").frame
    assert frame.loc[0, "age"] == 54 and frame.loc[0, "smoker"] == False  # noqa: E712
    with pytest.raises(ContractError, match="column 'age': not a number"):
        validate(pd.DataFrame([{**payload, "age": True}]), "request")


def test_patient_kind_does_not_need_episode_columns(patients):
    frame = validate(patients, "patients").frame
    assert "plan" not in frame and "episode_id" not in frame


def test_guess_kind(patient_row, episode_row):
    assert guess_kind(patient_row) == "patients"
    assert guess_kind(episode_row) == "episodes"


@pytest.mark.parametrize("column", ["episode_id", "plan", "peg_12wk", "adverse_event"])
def test_any_episode_only_column_means_episodes(patient_row, column):
    assert guess_kind([*patient_row, column]) == "episodes"
    assert guess_kind([*patient_row, "start_date", "propensity"]) == "patients"


def test_unknown_kind_is_rejected(patients):
    with pytest.raises(ValueError, match="kind must be"):
        validate(patients, "visits")


def test_validates_100k_rows(text_frame, episode_row):
    n = 100_000
    df = text_frame(episode_row, n, "episode_id")
    rng = np.random.default_rng(0)
    df["age"] = rng.integers(18, 111, n).astype(str)
    df["plan"] = rng.choice(["cbt+pt+snri", "nsaid", "opioid + yoga"], n)
    df.loc[::7, "bmi"] = ""
    frame = validate(df, "episodes").frame
    assert len(frame) == n
    assert frame["bmi"].isna().sum() == len(range(0, n, 7))
    assert set(frame["plan"]) == {"cbt+pt+snri", "nsaid", "opioid+yoga"}
