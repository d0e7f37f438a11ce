"""Pooled effect modifiers: clinical-evidence §4 modifiers whose *direction* the sheet gives but
whose *magnitude* the data must estimate, as plan-basis columns with one coefficient each.

Each modifier is a per-patient, per-component term ``F_j(x, c)``; the plan-basis column is
``Σ_c weight(a, c) · F_j(x, c)`` (weight = the combination-scaled component matrix), so its
coefficient γ_j says, for example, "a component the patient already responded to works
γ × its prior effect better than the evidence table alone says". One coefficient is estimated
from every component's episodes at once instead of twelve times from each component's few:
individual heterogeneity is large (§3.3: SD ≈ 1.5–2 × the mean effect) and per-component trees
cannot find it in tens of thousands of noisy episodes, while a pooled term can. Each
coefficient starts at 0 (the evidence prior as it is) and the exactly solved, ridge-penalised
average correction (recommender.boosting.linear_shift) moves it only as far as the data say;
where a modifier does not act, its coefficient stays near 0.

The candidates are the §4 rows that modify a treatment's *effect* (E or P), chosen from the
sheet, not from any data:

* own history (``history_<level>``): "prior non-response to a drug class" (P/A), "prior
  response to a class" (A); partial response and intolerance are recorded levels too.
* same-kind history (``same_kind_<level>``): "lower response to another drug of the same
  mechanism" (P/A) and the placebo-responder phenotype that "helps both placebo and active"
  (P): what the patient's history with the *other* components of the same kind (drug /
  non-drug) says about this one, for responded and no-response.
* ``psych_phq9_band``: "psychologically loaded patients → CBT/MBSR better" (A/P; the sheet
  suggests a small interaction per PHQ-9 band above mild, §1.1 bands).
* ``neuropathic_features``: "neuropathic features predict extra benefit" of gabapentinoids and
  SNRIs (P, "treat as weak").

Not modelled here: the obesity + knee OA diet-and-exercise synergy (P), a pair term that does
not decompose by component; the trees may pick it up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from features.catalog import COMPONENT_BY_CODE, COMPONENT_CODES
from features.schema import PRIOR_LEVELS

HISTORY_LEVELS = ("responded", "partial", "no_response", "intolerant")
SAME_KIND_LEVELS = ("responded", "no_response")
PSYCH = ("cbt", "mbsr")
NEUROPATHIC_DRUGS = ("gabapentinoid", "snri")

MODIFIERS: tuple[str, ...] = (
    *(f"history_{level}" for level in HISTORY_LEVELS),
    *(f"same_kind_{level}" for level in SAME_KIND_LEVELS),
    "psych_phq9_band",
    "neuropathic_features",
)
# Patient columns a modifier's contribution is attributed to in explanations.
SOURCES: tuple[str, ...] = (*(f"prior_{c}" for c in COMPONENT_CODES), "phq9",
                            "neuropathic_component")

_N = len(COMPONENT_CODES)
_INDEX = {c: i for i, c in enumerate(COMPONENT_CODES)}
_KIND = np.array([COMPONENT_BY_CODE[c].kind for c in COMPONENT_CODES])
# same[c, c'] = 1 if c' is another component of c's kind.
_SAME_KIND = (_KIND[:, None] == _KIND[None, :]) & ~np.eye(_N, dtype=bool)


def _column(X: np.ndarray, names: Sequence[str], name: str) -> np.ndarray:
    """One column of the encoded matrix (all-missing if the encoder has no such feature)."""
    return X[:, names.index(name)] if name in names else np.full(len(X), np.nan)


def _history(X: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """(n, 12) recorded history labels, read from the encoded level codes ('none' where
    missing): the encoded matrix is what the model already holds, and reading it costs
    microseconds where re-reading twelve pandas columns of a one-row request cost ~2 ms."""
    levels = np.array(PRIOR_LEVELS, dtype=object)
    codes = np.column_stack([_column(X, names, f"prior_{c}") for c in COMPONENT_CODES])
    return np.where(np.isnan(codes), "none", levels[np.nan_to_num(codes).astype(int)])


def modifier_terms(X: np.ndarray, feature_names: Sequence[str], component_effects: np.ndarray,
                   *, sources: bool = False):
    """(n, J, 12) the terms F_j(x, c), J = len(MODIFIERS), for patients encoded by
    :class:`features.encode.PatientEncoder` (``X`` with columns ``feature_names``), given
    their prior single-component effects (``features.priors.prior_effects``).

    With ``sources=True`` also returns (n, J, 12, len(SOURCES)) weights that split each term
    over the patient columns that switched it on (rows sum to 1 where the term is non-zero),
    so explanations can name them.
    """
    effects = np.asarray(component_effects, float)
    n = len(effects)
    names = list(feature_names)
    history = _history(X, names)
    terms = np.zeros((n, len(MODIFIERS), _N))
    src = np.zeros((n, len(MODIFIERS), _N, len(SOURCES))) if sources else None
    j = 0
    for level in HISTORY_LEVELS:
        hit = history == level
        terms[:, j] = np.where(hit, effects, 0.0)
        if sources:
            src[:, j, np.arange(_N), np.arange(_N)] = hit
        j += 1
    for level in SAME_KIND_LEVELS:
        hit = (history == level).astype(float)  # (n, 12)
        count = hit @ _SAME_KIND.T  # (n, 12): other same-kind components at this level
        terms[:, j] = effects * count
        if sources:
            share = hit[:, None, :] * _SAME_KIND[None] / np.maximum(count, 1)[:, :, None]
            src[:, j, :, :_N] = share
        j += 1
    # PHQ-9 bands above mild (§1.1): 10–14 → 1, 15–19 → 2, ≥ 20 → 3; missing → 0.
    band = np.clip(np.nan_to_num((_column(X, names, "phq9") - 5) // 5, nan=0.0), 0, 3)
    for code in PSYCH:
        terms[:, j, _INDEX[code]] = band
    if sources:
        src[:, j, :, SOURCES.index("phq9")] = 1.0
    j += 1
    neuro = np.nan_to_num(_column(X, names, "neuropathic_component")) > 0
    for code in NEUROPATHIC_DRUGS:
        terms[:, j, _INDEX[code]] = effects[:, _INDEX[code]] * neuro
    if sources:
        src[:, j, :, SOURCES.index("neuropathic_component")] = 1.0
    return (terms, src) if sources else terms
