"""Hand-made contract rows, as text (the way a CSV arrives), for the features tests."""

from __future__ import annotations

import pandas as pd
import pytest

# One conforming patient, every §2 column spelled as text. Risk flags and prior responses are
# mostly left out on purpose: they are optional with defaults.
_PATIENT_ROW: dict[str, str] = {
    "patient_id": "p-001",
    "age": "54",
    "sex": "female",
    "bmi": "27.5",
    "pain_condition": "low_back",
    "neuropathic_component": "false",
    "pain_duration_months": "18",
    "pain_intensity": "6.5",
    "peg": "6.3",
    "phq9": "9",
    "gad7": "6",
    "pcs": "21",
    "isi": "12",
    "smoker": "no",
    "activity_min_week": "90",
    "alcohol_units_week": "4",
    "diet_quality": "55",
    "egfr": "88",
    "gi_bleed_history": "false",
    "pregnant": "0",
    "prior_nsaid": "partial",
    "prior_opioid": "none",
}

_EPISODE_ROW: dict[str, str] = {
    **_PATIENT_ROW,
    "episode_id": "e-001",
    "plan": "cbt+pt+snri",
    "peg_12wk": "4.1",
    "adverse_event": "false",
    "start_date": "2024-03-15",
    "propensity": "0.12",
}


def _text_frame(row: dict[str, str], n: int, id_column: str | None = None) -> pd.DataFrame:
    df = pd.DataFrame([row] * n, dtype="str")
    if id_column:
        df[id_column] = [f"{row[id_column]}-{i}" for i in range(n)]
    return df


@pytest.fixture
def patient_row() -> dict[str, str]:
    """One conforming patient, every value as text."""
    return dict(_PATIENT_ROW)


@pytest.fixture
def episode_row() -> dict[str, str]:
    """One conforming episode, every value as text."""
    return dict(_EPISODE_ROW)


@pytest.fixture
def text_frame():
    """``text_frame(row, n, id_column=None)``: n copies of row, id_column made unique."""
    return _text_frame


@pytest.fixture
def patients() -> pd.DataFrame:
    """Three conforming patients (text)."""
    df = _text_frame(_PATIENT_ROW, 3, "patient_id")
    df.loc[1, ["sex", "pain_condition", "age"]] = ["male", "neuropathic", "71"]
    return df


@pytest.fixture
def episodes() -> pd.DataFrame:
    """Four conforming episodes (text), two of them for the same patient."""
    df = _text_frame(_EPISODE_ROW, 4, "episode_id")
    df["patient_id"] = ["p-1", "p-1", "p-2", "p-3"]
    df["plan"] = ["cbt+pt+snri", "nsaid", "acupuncture+gabapentinoid", "mbsr+opioid+yoga"]
    return df
