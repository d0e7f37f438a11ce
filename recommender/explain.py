"""SHAP explanations of a plan's utility, and of why one plan ranks above another.

The model is linear in the plan basis (see :mod:`recommender.model`): for patient x and plan a

    utility(x, a) = baseline(x) + ψ(a)·τ(x) − λ·P_AE(x, a)

``baseline(x)`` is the same for every plan, so what distinguishes plans is the *plan part*
``ψ(a)·τ(x) − λ·P_AE``. Its SHAP values are exact linear combinations of LightGBM's TreeSHAP
values for each coefficient output (``pred_contrib``), plus the evidence prior's deviation
from the average patient, which depends only on the pain condition and is attributed to it.
The adverse-event part is explained in log-odds and mapped to probability with the secant
slope, so contributions add up exactly:

    plan part = base value + Σ_f contribution_f      (PEG points)

and for a contrast A vs B the contributions sum to utility(A) − utility(B).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_BY_CODE, COMPONENT_CODES, PLAN_INDEX, PLANS
from features.modifiers import SOURCES, modifier_terms
from features.priors import prior_effects_encoded
from features.schema import COLUMNS_BY_NAME

_LABELS = {
    "phq9": "PHQ-9", "gad7": "GAD-7", "peg": "PEG", "pcs": "pain catastrophising (PCS)",
    "isi": "insomnia severity (ISI)", "egfr": "eGFR", "bmi": "BMI", "age": "age",
    "pain_intensity": "pain intensity", "pain_duration_months": "pain duration (months)",
    "pain_condition": "pain condition", "neuropathic_component": "neuropathic component",
    "activity_min_week": "activity (min/week)", "alcohol_units_week": "alcohol (units/week)",
    "diet_quality": "diet quality",
}
_N = len(COMPONENT_CODES)


def feature_label(name: str) -> str:
    if name in _LABELS:
        return _LABELS[name]
    if name.startswith("prior_"):
        return f"prior response to {name[6:].replace('_', ' ')}"
    return COLUMNS_BY_NAME[name].description if name in COLUMNS_BY_NAME else name


def _display(name: str, raw: float) -> str:
    col = COLUMNS_BY_NAME.get(name)
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return "missing"
    if col is not None and col.levels:
        return col.levels[int(raw)]
    if col is not None and col.dtype == "bool":
        return "yes" if raw else "no"
    return f"{round(float(raw), 1):g}"


def _parts(model, patient: pd.DataFrame, plan_idx: np.ndarray, shared: dict | None = None):
    """Base value (P,) and per-feature contributions (P, d) of the plan part, for one patient.

    Also returns the per-(component, feature) effect contributions (P, K, d) for phrasing.
    ``shared`` (from :func:`explain_each`) holds this patient's encoded row ``X``, evidence
    prior ``prior`` and TreeSHAP values ``phi_tau``/``phi_beta``, computed for a whole batch;
    without it they are computed here. Either way the numbers are the same.
    """
    if shared is None:
        X = model.encoder_.transform(patient)
        phi_tau = model.effect_model_.contributions(X)[0]  # (K', d+1)
        phi_beta = model.ae_model_.contributions(X)[0]  # (K_AE, d+1)
        raw_prior = prior_effects_encoded(X, model.encoder_.feature_names_)
    else:
        X, phi_tau, phi_beta = shared["X"], shared["phi_tau"], shared["phi_beta"]
        raw_prior = shared["prior"]
    prior = model._prior_theta(patient, raw_prior)[0]
    d = X.shape[1]
    shift = model.effect_model_.gamma_[:, 0]  # the exactly-solved average correction (K')
    if not model.orthogonalize:
        phi_tau, shift = phi_tau[1:], shift[1:]
    B = model.plan_basis(patient, plan_idx, prior=raw_prior, X=X)[0]  # (P, K)
    prior_dev = prior - model.tau_prior_mean_
    base_eff = B @ (model.tau_prior_mean_ + shift + phi_tau[:, d])
    per_comp = B[:, :, None] * phi_tau[None, :, :d]  # (P, K, d)
    eff = per_comp.sum(1)
    names = model.encoder_.feature_names_
    cond = names.index("pain_condition")
    eff[:, cond] += B @ prior_dev
    per_comp[:, :, cond] += B * prior_dev[None, :]
    k = model.effect_basis_.shape[1]
    if model.n_modifiers_:
        # Pooled-modifier columns are component terms: fold their trees' contributions into
        # their components for phrasing, and give their learned average (specific to this
        # patient's history, mood or phenotype, not the average patient's) to the patient
        # columns that switched each term on (features.modifiers.SOURCES).
        terms, sources = modifier_terms(X, names, raw_prior, sources=True)
        terms, sources = terms[0], sources[0]  # (J, 12), (J, 12, S)
        weights = model.effect_basis_[plan_idx, :_N]  # (P, 12)
        per_comp[:, :_N] += weights[:, :, None] * np.einsum("jc,jf->cf", terms, phi_tau[k + 1:, :d])
        level = (shift + phi_tau[:, d])[k + 1:]  # (J,)
        by_source = np.einsum("pc,j,jc,jcs->pcs", weights, level, terms, sources)  # (P, 12, S)
        base_eff = base_eff - by_source.sum((1, 2))
        for i, column in enumerate(SOURCES):
            f = names.index(column)
            eff[:, f] += by_source[:, :, i].sum(1)
            per_comp[:, :_N, f] += by_source[:, :, i]
        per_comp = per_comp[:, : k + 1]

    A = model.ae_basis_[plan_idx]
    beta0 = model._prior_ae(1)[0]
    logit_base = A @ (beta0 + model.ae_model_.gamma_[:, 0] + phi_beta[:, d])
    logit_f = A @ phi_beta[:, :d]  # (P, d)
    logit = logit_base + logit_f.sum(1)
    p, p_base = 1 / (1 + np.exp(-logit)), 1 / (1 + np.exp(-logit_base))
    gap = logit - logit_base
    slope = np.where(np.abs(gap) > 1e-9, (p - p_base) / np.where(np.abs(gap) > 1e-9, gap, 1), p * (1 - p))
    lam = model.lambda_ae
    harm = -lam * slope[:, None] * logit_f
    return base_eff - lam * p_base, eff + harm, per_comp, harm, X[0]


def _phrase(name: str, value: str, comp_contrib: np.ndarray, harm: float, total: float) -> str:
    label = feature_label(name)
    col = COLUMNS_BY_NAME.get(name)
    categorical = col is not None and (col.levels or col.dtype == "bool")
    subject = f"{label} ({value})" if categorical else f"{label} of {value}"
    if np.abs(comp_contrib).max(initial=0) >= abs(harm):
        j = int(np.argmax(np.abs(comp_contrib)))
        what = (f"the expected benefit of {COMPONENT_BY_CODE[COMPONENT_CODES[j]].name}"
                if j < _N else "the expected benefit of a plan this size")
        verb = "raised" if comp_contrib[j] > 0 else "lowered"
        return f"{subject} {verb} {what} by {abs(comp_contrib[j]):.2f} points"
    verb = "lowered" if harm < 0 else "raised"
    return f"{subject} {verb} the utility through adverse-event risk by {abs(harm):.2f} points"


def _items(model, contrib, per_comp, harm, x, top_n: int) -> list[dict]:
    names = model.encoder_.feature_names_
    order = np.argsort(-np.abs(contrib), kind="stable")
    items = []
    for f in order[:top_n]:
        if abs(contrib[f]) < 5e-4:
            break
        value = _display(names[f], x[f])
        items.append({"feature": names[f], "value": value, "shap": round(float(contrib[f]), 4),
                      "phrase": _phrase(names[f], value, per_comp[:, f], harm[f], contrib[f])})
    rest = float(contrib[order[len(items):]].sum())
    if abs(rest) >= 5e-4:
        items.append({"feature": "other features", "value": "", "shap": round(rest, 4),
                      "phrase": f"all other features together moved it by {rest:+.2f} points"})
    return items


def explain_plans(model, patient: pd.DataFrame, plans, top_n: int = 6, *,
                  _shared: dict | None = None) -> list[dict]:
    """Explanation of each plan's utility for one patient (a one-row validated frame)."""
    idx = np.array([PLAN_INDEX[p] if isinstance(p, str) else int(p) for p in plans])
    base, contrib, per_comp, harm, x = _parts(model, patient, idx, _shared)
    out = []
    for k, i in enumerate(idx):
        out.append({
            "plan": PLANS[i], "base_value": round(float(base[k]), 4),
            "plan_effect": round(float(base[k] + contrib[k].sum()), 4),
            "contributions": _items(model, contrib[k], per_comp[k], harm[k], x, top_n),
            "note": "SHAP values in PEG points on this plan's utility relative to usual care; "
                    "base_value is the average patient's; they add up to plan_effect",
        })
    return out


def explain_each(model, patients: pd.DataFrame | None, plans: list, top_n: int = 6, *,
                 coefficients: dict | None = None) -> list[list[dict]]:
    """:func:`explain_plans` for each patient of a validated frame, as if alone:
    ``result[i] == explain_plans(model, patients.iloc[[i]], plans[i], top_n)``.

    The encoding, the evidence prior and the two TreeSHAP passes run once for the batch
    (they are row by row, so each row is what it would be alone); the products with the plan
    basis run per patient. ``coefficients`` may pass
    :meth:`~recommender.model.PlanOutcomeModel.patient_coefficients` of the same frame (its
    ``X`` and ``prior``), saving the encoding and prior a second time. With both ``X`` and ``prior`` in ``coefficients``
    the frame is not read and may be None.
    """
    coef = coefficients or {}
    X, prior = coef.get("X"), coef.get("prior")
    if patients is None and (X is None or prior is None):
        raise ValueError("explain_each needs the patient frame, or coefficients with X and prior")
    n = len(patients) if patients is not None else len(X)
    if len(plans) != n:
        raise ValueError(f"{len(plans)} plan lists for {n} patients")
    wanted = [i for i, p in enumerate(plans) if len(p)]
    if not wanted:
        return [[] for _ in plans]
    X = model.encoder_.transform(patients) if X is None else X
    prior = prior_effects_encoded(X, model.encoder_.feature_names_) if prior is None else prior
    rows = X[wanted]
    phi_tau = model.effect_model_.contributions(rows)
    phi_beta = model.ae_model_.contributions(rows)
    out: list[list[dict]] = [[] for _ in plans]
    for j, i in enumerate(wanted):
        shared = {"X": X[i : i + 1], "prior": prior[i : i + 1], "phi_tau": phi_tau[j],
                  "phi_beta": phi_beta[j]}
        one = patients.iloc[i : i + 1] if patients is not None else None
        out[i] = explain_plans(model, one, plans[i], top_n, _shared=shared)
    return out


def explain_contrast(model, patient: pd.DataFrame, plan_a: str, plan_b: str, top_n: int = 8) -> dict:
    """Which features make plan A rank above (or below) plan B, summing to the utility gap."""
    idx = np.array([PLAN_INDEX[plan_a], PLAN_INDEX[plan_b]])
    base, contrib, per_comp, harm, x = _parts(model, patient, idx)
    diff = contrib[0] - contrib[1]
    base_gap = float(base[0] - base[1])
    items = _items(model, diff, per_comp[0] - per_comp[1], harm[0] - harm[1], x, top_n)
    gap = base_gap + float(diff.sum())
    return {
        "plan_a": plan_a, "plan_b": plan_b, "utility_gap": round(gap, 4),
        "average_patient_gap": round(base_gap, 4),
        "contributions": items,
        "summary": (f"{plan_a} is expected to be {abs(gap):.2f} PEG points "
                    f"{'better' if gap >= 0 else 'worse'} than {plan_b} for this patient "
                    f"({base_gap:+.2f} for the average patient)"),
    }
