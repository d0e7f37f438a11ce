"""features.validate.validate_records: each record judged exactly as ``validate`` judges it
alone — the same typed row and dtypes, the same warnings, the same error — whether its fast
path or the full validator decides."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

from features.errors import ContractError
from features.schema import columns_for
from features.validate import _fast_record, validate, validate_records

COLUMNS = columns_for("request")
GOOD = {
    "patient_id": "MRN-1",
    "age": 58,
    "sex": "female",
    "pain_condition": "low_back",
    "pain_duration_months": 30,
    "pain_intensity": 6.5,
    "peg": 6.2,
    "phq9": 12,
    "gad7": 8,
    "bmi": 29.5,
    "egfr": 85,
    "smoker": False,
    "neuropathic_component": True,
    "gi_bleed_history": False,
    "pcs": 20,
    "prior_nsaid": "partial",
}

# Values of every kind a JSON client might send, valid or not, typed or as text.
ODD = [
    None, "", " ", "  58 ", "58", "58.0", 58.0, 58.5, -0.0, 0, 1, 2, 110, 111, 2**53 + 1,
    10**400, 1e300, True, False, "true", "TRUE", "Yes", "no", "1.0", "0.0", " yes", "nan",
    "None", "inf", "female", " female", "Female", "low_back", "partial", "intolerant",
    "none", "x" * 64, "x" * 65, "MRN\x1f", "\u00e9t\u00e9", "\u200bid", "a b", [1], {"a": 1},
]


def _single(record: dict):
    """What ``validate`` says about the record alone: (frame, warnings) or the error."""
    try:
        checked = validate(pd.DataFrame([record]), "request")
    except ContractError as err:
        return err
    return checked.frame, checked.warnings


def _assert_same(records: list[dict]) -> None:
    batch = validate_records(records, "request")
    assert len(batch.rows) == len(records)
    for i, record in enumerate(records):
        alone = _single(record)
        if isinstance(alone, ContractError):
            assert batch.rows[i] is None and batch.values[i] is None
            assert str(batch.errors[i]) == str(alone)
            assert batch.errors[i].violations == alone.violations
            continue
        frame, warnings = alone
        assert batch.errors[i] is None, batch.errors[i]
        row = batch.frame.iloc[[batch.rows[i]]].reset_index(drop=True)
        assert_frame_equal(row, frame, check_exact=True)
        assert batch.warnings[i] == warnings
        # the plain values are what the service stores and hashes: same JSON
        plain = {c: (None if pd.isna(v) else (v.item() if hasattr(v, "item") else v))
                 for c, v in frame.iloc[0].items()}
        assert json.dumps(batch.values[i]) == json.dumps(plain)


def test_plain_records_take_the_fast_path_and_match_validate():
    assert _fast_record(GOOD, COLUMNS) is not None
    minimal = {k: GOOD[k] for k in ("age", "sex", "pain_condition", "pain_duration_months",
                                     "pain_intensity", "peg", "phq9", "gad7")}
    assert _fast_record(minimal, COLUMNS) is not None
    _assert_same([GOOD, minimal, {**GOOD, "extra": 1, "name": "x"}])


@pytest.mark.parametrize("column", ["patient_id", "age", "sex", "bmi", "smoker", "pcs",
                                    "gi_bleed_history", "prior_nsaid"])
def test_every_odd_value_is_judged_as_validate_judges_it(column):
    _assert_same([{**GOOD, column: value} for value in ODD])


def test_a_batch_mixes_good_bad_and_slow_path_records():
    records = [GOOD, {**GOOD, "age": 300}, {**GOOD, "age": "61", "smoker": "YES"},
               {}, {**GOOD, "sex": "F", "peg": None}, {**GOOD, "top": 1}, GOOD]
    batch = validate_records(records)
    assert [r is None for r in batch.rows] == [False, True, False, True, True, False, False]
    assert len(batch.frame) == 4
    _assert_same(records)


def test_warnings_are_logged_as_validate_logs_them(caplog):
    with caplog.at_level(logging.WARNING, logger="features.validate"):
        validate_records([{**GOOD, "name": "x"}])
    assert "ignoring 1 column(s) not in the contract: 'name'" in caplog.text


def test_no_records_give_an_empty_typed_frame():
    batch = validate_records([])
    assert batch.rows == [] and len(batch.frame) == 0
    assert list(batch.frame.columns) == [c.name for c in COLUMNS]


_value = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 700), st.floats(allow_nan=False),
    st.sampled_from(ODD[:-2]), st.text(max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([c.name for c in COLUMNS] + ["other"]), _value),
                max_size=6), st.integers(1, 3))
def test_random_changes_to_a_good_record(changes, copies):
    record = dict(GOOD)
    for name, value in changes:
        record[name] = value
    _assert_same([record] * copies + [GOOD])
