"""Score, gate and rank: the one path from patients to ranked plans.

The batch CLI, the offline evaluation and the HTTP service all call :func:`recommend`, so the
plans a clinician sees are exactly the plans that were evaluated. Excluded plans never
appear: eligibility comes from :mod:`recommender.safety` and ranking from
:mod:`recommender.ranking`.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    plan (-1 when fewer plans are allowed), with the estimates and safety assessment behind it.

    From :func:`recommend_each`, one patient's share of a batch: ``order`` and ``estimates``
    have one row, ``safety`` is the batch's assessment and ``row`` this patient's row in it
    (``safety.exclusions(ranked.row)``); otherwise ``row`` is 0."""

    order: np.ndarray
    estimates: PlanEstimates
    safety: SafetyAssessment
    coefficients: dict
    row: int = 0


def recommend(model: PlanOutcomeModel, patients: pd.DataFrame, top_k: int = 5) -> Ranked:
    """Rank every allowed plan for each patient in a validated patient frame."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    coef = model.patient_coefficients(patients)
    est = model.predict_plans(patients, coefficients=coef)
    safety = _assess(model, patients, coef)
    order = rank_plans(est.utility, safety.allowed_plans(), top_k)
    return Ranked(order, est, safety, coef)


def recommend_each(
    model: PlanOutcomeModel,
    patients: pd.DataFrame | None,
    top_k: Sequence[int] | int = 5,
    *,
    X: np.ndarray | None = None,
) -> list[Ranked]:
    """:func:`recommend` for each patient of a validated frame *as if alone*, for the HTTP
    service's micro-batches: ``result[i]`` equals ``recommend(model, patients.iloc[[i]],
    top_k[i])`` bit for bit.

    The per-call work that does not depend on how many patients there are (column access,
    encoding, one tree pass per booster, the safety table) is done once for the batch; those
    steps are row by row, so each row is what it would be alone. The plan products and the
    ranking, where a matrix product over several rows could round differently than over one,
    run per patient on that patient's one-row slices. ``X``, when given, must equal
    ``model.encoder_.transform(patients)``, e.g. ``transform_values`` of the validated
    records the frame was built from; the frame is then not read and may be None, as the
    HTTP service passes it.
    """
    if patients is None and X is None:
        raise ValueError("recommend_each needs the patient frame or its encoded matrix X")
    n = len(patients) if X is None else len(X)
    ks = [top_k] * n if isinstance(top_k, int) else [int(k) for k in top_k]
    if len(ks) != n:
        raise ValueError(f"{len(ks)} top_k values for {n} patients")
    for k in ks:
        if not 1 <= k <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {k}")
    if n == 0:
        return []
    coef = model.patient_coefficients(patients, X=X)
    safety = _assess(model, patients, coef)
    allowed = safety.allowed_plans()
    out = []
    for i, k in enumerate(ks):
        one = patients.iloc[i : i + 1] if patients is not None else None
        coef_i = {
            name: value[i : i + 1] if isinstance(value, np.ndarray) else value
            for name, value in coef.items()
        }
        est = model.predict_plans(one, coefficients=coef_i)
        order = rank_plans(est.utility, allowed[i : i + 1], k)
        out.append(Ranked(order, est, safety, coef_i, row=i))
    return out


def _assess(model: PlanOutcomeModel, patients: pd.DataFrame | None, coef: dict) -> SafetyAssessment:
    """The safety table, reading the columns the model encoded from its matrix (identical
    results; the frame is read only for what the encoding lacks)."""
    return assess(patients, encoded=(coef["X"], model.encoder_.feature_names_))


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
