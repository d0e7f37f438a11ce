"""The pooled effect-modifier terms (features.modifiers)."""

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_CODES
from features.encode import PatientEncoder
from features.modifiers import MODIFIERS, SOURCES, modifier_terms
from features.schema import FEATURE_COLUMNS

ENCODER = PatientEncoder(feature_names_=FEATURE_COLUMNS)

IDX = {c: i for i, c in enumerate(COMPONENT_CODES)}


def _terms(frame: pd.DataFrame, effects: np.ndarray, **kw):
    return modifier_terms(ENCODER.transform(frame), FEATURE_COLUMNS, effects, **kw)


def _frame(**prior) -> pd.DataFrame:
    row = {"phq9": 16, "neuropathic_component": True}
    row.update({f"prior_{c}": prior.get(c, "none") for c in COMPONENT_CODES})
    return pd.DataFrame([row])


def test_terms_follow_the_patients_history_mood_and_phenotype():
    effects = np.arange(1, 13, dtype=float)[None, :]  # a distinct prior effect per component
    terms = _terms(_frame(pt="responded", nsaid="no_response", tca="no_response"),
                           effects)[0]
    t = dict(zip(MODIFIERS, terms, strict=False))
    assert t["history_responded"][IDX["pt"]] == effects[0, IDX["pt"]]
    assert np.count_nonzero(t["history_responded"]) == 1
    assert np.count_nonzero(t["history_no_response"]) == 2
    # Same kind: every other non-drug component sees one responded (pt); pt itself does not.
    assert t["same_kind_responded"][IDX["pt"]] == 0
    assert t["same_kind_responded"][IDX["yoga"]] == effects[0, IDX["yoga"]]
    assert t["same_kind_responded"][IDX["nsaid"]] == 0  # a drug: pt is not its kind
    # Two other drugs had no response for snri; nsaid sees one (tca).
    assert t["same_kind_no_response"][IDX["snri"]] == 2 * effects[0, IDX["snri"]]
    assert t["same_kind_no_response"][IDX["nsaid"]] == effects[0, IDX["nsaid"]]
    # PHQ-9 16 is band 2, for CBT and MBSR only; neuropathic features for gabapentinoid/SNRI.
    assert t["psych_phq9_band"][IDX["cbt"]] == 2 and t["psych_phq9_band"][IDX["mbsr"]] == 2
    assert np.count_nonzero(t["psych_phq9_band"]) == 2
    assert np.count_nonzero(t["neuropathic_features"]) == 2


def test_sources_split_each_term_over_the_columns_that_switched_it_on():
    frame = _frame(pt="responded", yoga="responded", nsaid="no_response")
    terms, sources = _terms(frame, np.ones((1, 12)), sources=True)
    terms, sources = terms[0], sources[0]
    on = terms != 0
    np.testing.assert_allclose(sources[on].sum(-1), 1.0)
    j = MODIFIERS.index("same_kind_responded")
    # cbt's same-kind term comes from pt and yoga in equal shares.
    share = dict(zip(SOURCES, sources[j, IDX["cbt"]], strict=False))
    assert share["prior_pt"] == share["prior_yoga"] == 0.5


def test_missing_columns_and_values_switch_nothing_on():
    frame = pd.DataFrame({"phq9": [np.nan]})
    terms = _terms(frame, np.ones((1, 12)))
    assert not terms.any()
