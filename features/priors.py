"""Evidence priors: what the literature says before any clinic data is seen.

The outcome model starts boosting from these numbers and only moves away from them where
the data carry enough information (see :mod:`recommender.model`), so a small clinic's model
degrades to the evidence, not to noise. Every number cites ``clinical-evidence.md``.

Sign convention: *improvement* in PEG points (``peg - peg_12wk``), so a therapy that lowers
pain by 0.9 NRS points has a prior effect of +0.9. PEG and pain NRS share the 0-10 scale;
using NRS effects for PEG is an assumption (A) — PEG's pain item is the NRS, and its two
interference items move with it in the trials cited.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_CODES

# clinical-evidence §3.3 "Suggested simulator effect parameters" (A, derived from §3.1–3.2):
# mean additional NRS change vs usual care at 12 weeks, sign flipped to improvement.
# Columns: LBP, LBP radicular, OA, neuropathic, fibromyalgia/primary.
_EFFECT_TABLE = {
    #                   LBP  LBP-rad  OA   neuro fibro
    "pt": (0.9, 0.6, 1.0, 0.3, 0.8),
    "cbt": (0.5, 0.4, 0.4, 0.3, 0.5),
    "mbsr": (0.6, 0.4, 0.4, 0.3, 0.5),
    "acupuncture": (1.0, 0.6, 1.0, 0.3, 0.6),
    "diet": (0.2, 0.1, 0.4, 0.1, 0.2),
    "yoga": (0.5, 0.3, 0.6, 0.2, 0.7),
    "nsaid": (0.4, 0.3, 1.0, 0.0, 0.0),
    "snri": (0.7, 0.5, 0.8, 1.0, 1.0),
    "tca": (0.5, 0.5, 0.3, 1.2, 1.0),
    "gabapentinoid": (0.0, 0.0, 0.0, 0.8, 0.7),
    "muscle_relaxant": (0.2, 0.1, 0.0, 0.0, 0.3),
    "opioid": (0.7, 0.5, 0.5, 0.9, 0.0),
}
_GROUPS = ("lbp", "lbp_radicular", "oa", "neuropathic", "primary")
EFFECT_PRIOR = pd.DataFrame(_EFFECT_TABLE, index=list(_GROUPS)).T.loc[list(COMPONENT_CODES)]

# Conditions the table has no column for (A): neck pain is treated like non-radicular LBP
# (musculoskeletal spinal pain; ACP 2017 evidence pools them), headache and "other" like
# chronic primary pain (NICE NG193 scope). Radicular LBP = low_back with a neuropathic
# component (evidence §4 "Radicular back pain").
CONDITION_GROUP = {
    "low_back": "lbp",
    "neck": "lbp",
    "osteoarthritis": "oa",
    "neuropathic": "neuropathic",
    "fibromyalgia": "primary",
    "headache": "primary",
    "other": "primary",
}

# clinical-evidence §3.3 combination rule (A): total = sum of effects x 0.7 for two active
# components, x 0.6 for three or more (no trial supports full additivity).
COMBINATION_FACTOR = {1: 1.0, 2: 0.7}
COMBINATION_FACTOR_3PLUS = 0.6


def combination_factor(n_components: np.ndarray) -> np.ndarray:
    k = np.asarray(n_components)
    return np.where(k <= 1, 1.0, np.where(k == 2, COMBINATION_FACTOR[2], COMBINATION_FACTOR_3PLUS))


# clinical-evidence §5.1: treatment-limiting adverse-event probability attributable to each
# component over 12 weeks (excess over placebo/usual care where the source gives both).
AE_PRIOR = pd.Series(
    {
        "pt": 0.02,  # exercise: transient pain increase, serious AEs rare (WHO review 2023, V) — A
        "cbt": 0.005,  # no meaningful physical AEs (Williams 2020, M)
        "mbsr": 0.005,  # occasional distress with meditation (M)
        "acupuncture": 0.01,  # minor AEs ~4 %, rarely treatment-limiting (Zhao 2011, V) — A
        "diet": 0.005,  # low (A/M)
        "yoga": 0.02,  # as exercise (V) — A
        "nsaid": 0.05,  # GI complications 2-4x, CV events (CNT 2013, V) — A magnitude
        "snri": 0.07,  # AE withdrawal 15 % vs 8 % (Sultan 2008, V)
        "tca": 0.075,  # NNH 13.4 (Finnerup 2015, V)
        "gabapentinoid": 0.055,  # NNH 13.9 pregabalin / 25.6 gabapentin (Finnerup 2015, V), averaged
        "muscle_relaxant": 0.06,  # sedation, dizziness (Beers 2023 via summaries, V2) — A magnitude
        "opioid": 0.22,  # AE withdrawal 27 % vs 5 % (CFP table, V, condition unconfirmed)
    }
).loc[list(COMPONENT_CODES)]


def _labels(s: pd.Series) -> np.ndarray:
    """A column as an array of text labels, for equality tests against level names.

    Categorical and string columns (what validation produces) convert directly, missing values
    staying missing; anything else goes through ``astype(str)`` as before. The direct route is
    about 5x cheaper, which matters on the one-row frames the HTTP service scores (this runs
    four times per request)."""
    if isinstance(s.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(s.dtype):
        return s.to_numpy(dtype=object)
    return s.astype(str).to_numpy()


def condition_groups(patients: pd.DataFrame) -> np.ndarray:
    """Evidence-table column for each patient (array of group names)."""
    condition = _labels(patients["pain_condition"])
    cond = np.array([CONDITION_GROUP.get(str(c), np.nan) for c in condition], dtype=object)
    radicular = patients.get("neuropathic_component")
    if radicular is not None:
        if pd.api.types.is_bool_dtype(radicular.dtype):  # bool or nullable boolean
            rad = radicular.to_numpy(dtype=bool, na_value=False)
        else:
            rad = radicular.astype("boolean").fillna(False).to_numpy(dtype=bool)
        cond = np.where((condition == "low_back") & rad, "lbp_radicular", cond)
    return cond


# clinical-evidence §4 modifiers built into the prior (magnitudes the sheet gives are used;
# where it gives only a direction the magnitude is an assumption, A):
# - "Baseline pain severity" (E): higher baseline → larger absolute drop. Effects in §3.3 are
#   for trial populations with a baseline near 6/10 (A, Breivik: most moderate 5–7), so the
#   prior scales with PEG / 6, kept within [0.5, 1.5].
SEVERITY_REFERENCE_PEG = 6.0
SEVERITY_RANGE = (0.5, 1.5)
# - "Prior non-response to a drug class" (P/A): ×0.5 within class (sheet's magnitude); for
#   non-drug components the sheet is silent, ×0.75 (A).
# - "Prior response to a class" (A): higher chance on re-challenge, ×1.3 (A).
PRIOR_RESPONSE_FACTOR = {"no_response": {"drug": 0.5, "non-drug": 0.75}, "responded": 1.3}


def prior_effects(patients: pd.DataFrame) -> np.ndarray:
    """(n, 12) prior single-component improvement (PEG points) for each patient."""
    groups = condition_groups(patients)
    index = np.array([_GROUPS.index(g) for g in groups], dtype=int)
    peg = pd.to_numeric(patients["peg"], errors="coerce").to_numpy(dtype=float)
    no_response = np.zeros((len(index), len(COMPONENT_CODES)), bool)
    responded = np.zeros_like(no_response)
    for c, code in enumerate(COMPONENT_CODES):
        column = f"prior_{code}"
        if column in patients.columns:
            prior = _labels(patients[column])
            no_response[:, c] = prior == "no_response"
            responded[:, c] = prior == "responded"
    return _prior_effects(index, peg, no_response, responded)


def prior_effects_encoded(X: np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
    """:func:`prior_effects` read from the encoded matrix of the same validated patients
    (``features.encode.PatientEncoder``: level codes, 0/1 booleans, NaN = missing), with the
    same numbers bit for bit. The model holds that matrix already; reading it costs
    microseconds where re-reading ~15 pandas columns of a one-row request cost ~1 ms."""
    from features.schema import COLUMNS_BY_NAME

    names = list(feature_names)
    column = X[:, names.index("pain_condition")]
    if np.isnan(column).any():
        raise ValueError("pain_condition is missing for some patients; validate them first")
    levels = COLUMNS_BY_NAME["pain_condition"].levels
    group_of_level = np.array([_GROUPS.index(CONDITION_GROUP[level]) for level in levels])
    index = group_of_level[column.astype(int)]
    if "neuropathic_component" in names:
        radicular = np.nan_to_num(X[:, names.index("neuropathic_component")]) > 0
        index = np.where((column == levels.index("low_back")) & radicular,
                         _GROUPS.index("lbp_radicular"), index)
    no_response = np.zeros((len(X), len(COMPONENT_CODES)), bool)
    responded = np.zeros_like(no_response)
    for c, code in enumerate(COMPONENT_CODES):
        if f"prior_{code}" in names:
            codes = X[:, names.index(f"prior_{code}")]  # NaN compares unequal: neither
            prior_levels = COLUMNS_BY_NAME[f"prior_{code}"].levels
            no_response[:, c] = codes == prior_levels.index("no_response")
            responded[:, c] = codes == prior_levels.index("responded")
    return _prior_effects(index, X[:, names.index("peg")], no_response, responded)


def _prior_effects(group_index: np.ndarray, peg: np.ndarray, no_response: np.ndarray,
                   responded: np.ndarray) -> np.ndarray:
    """The evidence table row of each patient's group, scaled for severity and history."""
    from features.catalog import COMPONENT_BY_CODE

    table = EFFECT_PRIOR.to_numpy().T  # (5 groups, 12)
    effect = table[group_index].astype(float)
    severity = np.clip(np.nan_to_num(peg / SEVERITY_REFERENCE_PEG, nan=1.0), *SEVERITY_RANGE)
    effect *= severity[:, None]
    for c, code in enumerate(COMPONENT_CODES):
        kind = COMPONENT_BY_CODE[code].kind
        effect[no_response[:, c], c] *= PRIOR_RESPONSE_FACTOR["no_response"][kind]
        effect[responded[:, c], c] *= PRIOR_RESPONSE_FACTOR["responded"]
    return effect
