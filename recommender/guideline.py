"""Guideline rules as a ranking policy — the baseline every learned model must beat.

Implements clinical-evidence §6.2 (decision table by pain type) scored as in §6.3:
``score(plan) = Σ guideline weight(component, pain type) − burden penalty``, with "do not
start" components excluded and plans capped at one drug class and two non-drug components
(§6.3 default, A). Profile US_ACP_CDC (ACP 2017, CDC 2022, EULAR 2016, ACR 2019) is the
default; UK_NICE drops acupuncture for LBP/OA, duloxetine for LBP and pregabalin for
fibromyalgia (§6.1 conflicts). Safety rules still apply on top (the caller intersects with
:mod:`recommender.safety`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_CODES, DRUG, plan_matrix
from features.priors import condition_groups

Profile = Literal["US_ACP_CDC", "UK_NICE"]
DO_NOT_START = -100.0

# Weights: 3 = first line, 2 = recommended / first-line drug, 1 = second line,
# DO_NOT_START = "do not start" in §6.2. Missing = not mentioned (0).
_TABLE: dict[str, dict[str, float]] = {
    # Chronic primary pain / fibromyalgia (NICE NG193, EULAR 2016)
    "primary": {
        "pt": 3,
        "cbt": 2,
        "yoga": 2,
        "mbsr": 2,
        "acupuncture": 1,
        "tca": 2,
        "snri": 2,
        "gabapentinoid": 1,
        "opioid": DO_NOT_START,
        "nsaid": DO_NOT_START,
    },
    # Chronic non-specific LBP (NICE NG59, ACP 2017)
    "lbp": {
        "pt": 3,
        "cbt": 2,
        "mbsr": 2,
        "yoga": 2,
        "acupuncture": 1,
        "nsaid": 2,
        "snri": 1,
        "gabapentinoid": DO_NOT_START,
        "opioid": DO_NOT_START,
        "tca": DO_NOT_START,
        "muscle_relaxant": DO_NOT_START,
    },
    # Sciatica / radicular LBP
    "lbp_radicular": {
        "pt": 3,
        "cbt": 1,
        "nsaid": 1,
        "gabapentinoid": DO_NOT_START,
        "opioid": DO_NOT_START,
    },
    # Knee/hip OA (NICE NG226, ACR 2019)
    "oa": {"pt": 3, "diet": 2, "yoga": 2, "nsaid": 2, "snri": 1, "opioid": DO_NOT_START},
    # Peripheral neuropathic (NICE CG173)
    "neuropathic": {
        "pt": 2,
        "cbt": 1,
        "tca": 2,
        "snri": 2,
        "gabapentinoid": 2,
        "nsaid": DO_NOT_START,
        "opioid": DO_NOT_START,
    },
}
# Headache: acupuncture first (Vickers), CBT/relaxation, amitriptyline prophylaxis (§6.2).
_HEADACHE = {"acupuncture": 3, "cbt": 2, "tca": 2, "opioid": DO_NOT_START, "nsaid": DO_NOT_START}
_UK_DROPS = {"lbp": ("acupuncture", "snri"), "oa": ("acupuncture",), "primary": ("gabapentinoid",)}
BURDEN_PER_COMPONENT = 0.5  # §6.3 burden penalty (A)
MAX_DRUGS, MAX_NON_DRUG = 1, 2  # §6.3 cap (A)


def component_weights(patients: pd.DataFrame, profile: Profile = "US_ACP_CDC") -> np.ndarray:
    """(n, 12) guideline weight of each component for each patient."""
    groups = condition_groups(patients)
    conditions = patients["pain_condition"].astype(str).to_numpy()
    age = pd.to_numeric(patients["age"]).to_numpy()
    phq9 = pd.to_numeric(patients["phq9"]).to_numpy()
    isi = pd.to_numeric(patients.get("isi", pd.Series(np.nan, index=patients.index))).to_numpy()
    w = np.zeros((len(patients), len(COMPONENT_CODES)))
    idx = {c: i for i, c in enumerate(COMPONENT_CODES)}
    for g, table in _TABLE.items():
        rows = groups == g
        for comp, weight in table.items():
            if profile == "UK_NICE" and comp in _UK_DROPS.get(g, ()):
                weight = DO_NOT_START if weight > 0 else weight
            w[rows, idx[comp]] = weight
    head = conditions == "headache"
    w[head] = 0
    for comp, weight in _HEADACHE.items():
        w[head, idx[comp]] = weight
    # Neuropathic drug choice by comorbidity (§6.2): depression → duloxetine,
    # insomnia → amitriptyline if < 65; ≥ 65 → avoid amitriptyline.
    neuro = groups == "neuropathic"
    w[neuro & (phq9 >= 10), idx["snri"]] += 0.5
    w[neuro & (isi >= 15) & (age < 65), idx["tca"]] += 0.5
    w[(age >= 65) & (w[:, idx["tca"]] > 0), idx["tca"]] = DO_NOT_START
    return w


def guideline_scores(patients: pd.DataFrame, profile: Profile = "US_ACP_CDC") -> np.ndarray:
    """(n, 839) guideline score per plan; plans outside the §6.3 cap or containing a
    "do not start" component score -inf."""
    m = plan_matrix().astype(float)
    drug = np.array([c in DRUG for c in COMPONENT_CODES])
    n_drug, n_non = m[:, drug].sum(1), m[:, ~drug].sum(1)
    w = component_weights(patients, profile)
    score = w @ m.T - BURDEN_PER_COMPONENT * m.sum(1)[None, :]
    # A drug with weight ≤ 0 for this condition is not a guideline choice.
    uses_unlisted_drug = ((w[:, drug] <= 0).astype(float) @ m[:, drug].T) > 0
    forbidden = ((w <= DO_NOT_START / 2).astype(float) @ m.T) > 0
    capped = (n_drug > MAX_DRUGS) | (n_non > MAX_NON_DRUG)
    return np.where(forbidden | uses_unlisted_drug | capped[None, :], -np.inf, score)
