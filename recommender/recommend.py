"""Score, gate and rank: the one path from patients to ranked plans.

The batch CLI, the offline evaluation and the HTTP service all call :func:`recommend`, so the
plans a clinician sees are exactly the plans that were evaluated. Excluded plans never
appear: eligibility comes from :mod:`recommender.safety` and ranking from
:mod:`recommender.ranking`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.catalog import PLANS
from features.schema import PATIENT_ID
from recommender.model import PlanEstimates, PlanOutcomeModel
from recommender.ranking import rank_plans
from recommender.safety import SafetyAssessment, assess

RANKED_COLUMNS = ("patient_id", "rank", "plan", "utility", "expected_improvement",
                  "improvement_low", "improvement_high", "p_response", "p_adverse_event")
MAX_TOP_K = 50


@dataclass
class Ranked:
    """Ranked plans for a batch: ``order[i, r]`` is the catalog index of patient i's rank r+1
    plan (-1 when fewer plans are allowed), with the estimates and safety assessment behind it."""

    order: np.ndarray
    estimates: PlanEstimates
    safety: SafetyAssessment
    coefficients: dict


def recommend(model: PlanOutcomeModel, patients: pd.DataFrame, top_k: int = 5) -> Ranked:
    """Rank every allowed plan for each patient in a validated patient frame."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    coef = model.patient_coefficients(patients)
    est = model.predict_plans(patients, coefficients=coef)
    safety = assess(patients)
    order = rank_plans(est.utility, safety.allowed_plans(), top_k)
    return Ranked(order, est, safety, coef)


def ranked_rows(ranked: Ranked, patient_ids) -> pd.DataFrame:
    """CONTRACT §7 rows: one per patient and rank, best first."""
    order = ranked.order
    n, k = order.shape
    pi, ri = np.nonzero(order >= 0)
    plan = order[pi, ri]
    est = ranked.estimates

    def pick(a):
        return np.round(a[pi, plan], 4)

    return pd.DataFrame({
        PATIENT_ID: np.asarray(patient_ids, dtype=object)[pi],
        "rank": ri + 1,
        "plan": np.asarray(PLANS, dtype=object)[plan],
        "utility": pick(est.utility),
        "expected_improvement": pick(est.expected_improvement),
        "improvement_low": pick(est.improvement_low),
        "improvement_high": pick(est.improvement_high),
        "p_response": pick(est.p_response),
        "p_adverse_event": pick(est.p_adverse_event),
    }, columns=list(RANKED_COLUMNS))
