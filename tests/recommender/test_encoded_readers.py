"""The encoded matrix as the one columnar form: encoding typed values directly, and reading
the evidence prior and the safety table from the matrix, give exactly what the validated
frame gives. The HTTP service relies on this to score a request without building a frame."""

from __future__ import annotations

import numpy as np
import pytest

from features.encode import PatientEncoder
from features.io import profile_records
from features.priors import prior_effects, prior_effects_encoded
from features.validate import typed_frame, validate_records
from recommender.safety import assess
from training.simulate import simulate_episodes


def _records() -> list[dict]:
    """Simulated profiles, plus the spellings that go through the full validator (text
    numbers, yes/no booleans, blanks for missing optionals) and sparse profiles."""
    records = profile_records(simulate_episodes(400, seed=11, progress=False))
    for i, r in enumerate(records[:40]):
        if i % 4 == 0:
            r["phq9"] = str(r["phq9"])
            r["smoker"] = "yes"
        elif i % 4 == 1:
            r["bmi"] = ""
            r["neuropathic_component"] = "no"
            r["prior_nsaid"] = "intolerant"
        elif i % 4 == 2:
            for key in ("bmi", "egfr", "pcs", "isi", "neuropathic_component", "smoker",
                        "activity_min_week", "alcohol_units_week", "diet_quality"):
                r.pop(key, None)
        else:
            r.update({"egfr": 25.0, "gi_bleed_history": True, "prior_opioid": "no_response",
                      "pain_condition": "low_back", "neuropathic_component": True})
    return records


@pytest.fixture(scope="module")
def checked():
    out = validate_records(_records(), "request")
    assert all(e is None for e in out.errors)
    return out


@pytest.fixture(scope="module")
def encoded(checked):
    frame = checked.frame
    encoder = PatientEncoder().fit(frame)
    return frame, encoder, encoder.transform(frame)


def test_transform_values_is_transform_of_the_typed_frame(checked, encoded):
    frame, encoder, X = encoded
    values = [v for v in checked.values if v is not None]
    np.testing.assert_array_equal(encoder.transform_values(values), X)
    # one at a time, as the service encodes a request that arrives alone
    for i in (0, 1, 2, 3, 399):
        np.testing.assert_array_equal(encoder.transform_values([values[i]]), X[i : i + 1])
    assert np.isnan(X).any()  # the sparse profiles exercised the missing-value path


def test_typed_frame_rebuilds_the_validated_frame(checked):
    values = [v for v in checked.values if v is not None]
    rebuilt = typed_frame(values, "request")
    assert rebuilt.dtypes.equals(checked.frame.dtypes)
    assert rebuilt.equals(checked.frame)


def test_prior_effects_read_from_the_matrix_are_the_frame_s(encoded):
    frame, encoder, X = encoded
    np.testing.assert_array_equal(prior_effects_encoded(X, encoder.feature_names_),
                                  prior_effects(frame))


def test_safety_read_from_the_matrix_is_the_frame_s(encoded):
    frame, encoder, X = encoded
    from_frame = assess(frame)
    from_matrix = assess(None, encoded=(X, encoder.feature_names_))
    for name in ("rule_hits", "pair_hits", "count_hits", "count_base", "blocked", "review",
                 "warn", "gate_words"):
        np.testing.assert_array_equal(getattr(from_matrix, name), getattr(from_frame, name))
    np.testing.assert_array_equal(from_matrix.allowed_plans(), from_frame.allowed_plans())
    assert from_frame.blocked.any()  # the eGFR / GI-bleed profiles hit blocking rules
    for i in (0, 3, 7):
        assert from_matrix.exclusions(i) == from_frame.exclusions(i)


def test_bad_inputs_to_the_encoded_readers_are_named(encoded, checked):
    frame, encoder, X = encoded
    value = dict(next(v for v in checked.values if v is not None))
    with pytest.raises(ValueError, match="pain_condition = 'knee'.*not one of its levels"):
        encoder.transform_values([{**value, "pain_condition": "knee"}])
    with pytest.raises(ValueError, match="not fitted"):
        PatientEncoder().transform_values([value])
    missing = X[:2].copy()
    missing[1, encoder.feature_names_.index("pain_condition")] = np.nan
    with pytest.raises(ValueError, match="pain_condition is missing"):
        prior_effects_encoded(missing, encoder.feature_names_)
    with pytest.raises(ValueError, match="frame or its encoded matrix"):
        assess(None)
