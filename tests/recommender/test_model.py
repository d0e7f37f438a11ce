"""The plan-outcome model: sklearn conventions, recovery of planted effects, what
orthogonalisation buys under confounding, leaning on the evidence prior with thin data, and
exact additivity of its explanations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from features.catalog import (
    COMPONENT_BY_CODE,
    COMPONENT_CODES,
    COMPONENT_INDEX,
    N_PLANS,
    PLAN_INDEX,
    PLANS,
    plan_matrix,
)
from features.encode import effect_basis
from features.priors import prior_effects
from features.validate import validate
from recommender.explain import explain_contrast, explain_plans
from recommender.model import PlanOutcomeModel
from recommender.recommend import recommend
from recommender.safety import assess
from training.baselines import guideline_ranking
from training.simulate import simulate_episodes, simulate_truth
from training.truth import TruthSet, normalized_value

CONDITIONS = ["low_back", "neck", "osteoarthritis", "fibromyalgia", "neuropathic", "headache", "other"]
FAST = dict(max_rounds=120, n_jobs=1, random_state=0)


def _patients(n: int, rng: np.random.Generator) -> pd.DataFrame:
    df = pd.DataFrame({
        "patient_id": [f"Q{i:06d}" for i in range(n)],
        "age": rng.integers(18, 80, n), "sex": rng.choice(["female", "male"], n),
        "pain_condition": rng.choice(CONDITIONS, n),
        "pain_duration_months": rng.uniform(3, 120, n).round(1),
        "pain_intensity": rng.uniform(3, 10, n).round(1), "peg": rng.uniform(3, 10, n).round(1),
        "phq9": rng.integers(0, 28, n), "gad7": rng.integers(0, 22, n),
    })
    return validate(df, "patients").frame


def _toy(n: int, seed: int, *, confounding: float, cbt_boost: float = 0.0,
         acupuncture: float | None = None):
    """Episodes with known component effects τ (n, 12) and a severity-confounded policy.

    Sicker patients (high PEG) get larger plans and opioids, and also improve more on their
    own (regression to the mean) — so naive comparisons favour aggressive plans.
    """
    rng = np.random.default_rng(seed)
    pat = _patients(n, rng)
    tau = prior_effects(pat)
    tau[:, COMPONENT_INDEX["cbt"]] += cbt_boost * (pat["phq9"].to_numpy() >= 15)
    if acupuncture is not None:
        tau[:, COMPONENT_INDEX["acupuncture"]] = acupuncture
    basis, _ = effect_basis()
    m = plan_matrix().astype(float)
    sev = (pat["peg"].to_numpy() - 6.5) / 2
    logits = confounding * np.outer(sev, m.sum(1) * 0.8 + m[:, COMPONENT_INDEX["opioid"]] * 2.0)
    logits -= 0.6 * m.sum(1)[None, :]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    a = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    baseline = 0.4 + 0.5 * sev * 2
    effect = (basis[a, :12] * tau).sum(1)
    y = baseline + effect + rng.normal(0, 1.0, n)
    ae = rng.random(n) < 0.03 + 0.15 * m[a, COMPONENT_INDEX["opioid"]]
    ep = pat.copy()
    ep["plan"] = [PLANS[i] for i in a]
    ep["improvement"], ep["adverse_event"] = y, ae.astype(int)
    return ep, tau


def _fit(ep: pd.DataFrame, **kw) -> PlanOutcomeModel:
    return PlanOutcomeModel(**{**FAST, **kw}).fit(
        ep, plans=ep["plan"], improvement=ep["improvement"], adverse_event=ep["adverse_event"],
        groups=ep["patient_id"])


def _centred_rmse(est: np.ndarray, true: np.ndarray) -> float:
    est = est - est.mean(1, keepdims=True)
    true = true - true.mean(1, keepdims=True)
    return float(np.sqrt(np.mean((est - true) ** 2)))


def test_follows_scikit_learn_conventions():
    model = PlanOutcomeModel(lambda_ae=1.5, random_state=3)
    assert clone(model).get_params() == model.get_params()
    assert not hasattr(model, "effect_model_")
    with pytest.raises(ValueError, match="not fitted"):
        model.predict_plans(_patients(3, np.random.default_rng(0)))


def test_recovers_a_planted_main_effect_against_a_wrong_prior():
    """Acupuncture is planted at +2.5 PEG points where the evidence prior says ~1; with enough
    data the model must follow the data, not the prior."""
    ep, _ = _toy(6000, seed=4, confounding=0.5, acupuncture=2.5)
    model = _fit(ep)
    test = _patients(2000, np.random.default_rng(9))
    est = model.predict_plans(test)
    contrast = (est.expected_improvement[:, PLAN_INDEX["acupuncture"]]
                - est.expected_improvement[:, PLAN_INDEX["diet"]])
    true = 2.5 - prior_effects(test)[:, COMPONENT_INDEX["diet"]]
    assert contrast.mean() == pytest.approx(true.mean(), abs=0.3)


def test_recovers_a_planted_effect_modifier():
    """CBT is planted +1.5 points better for PHQ-9 >= 15. Trees on the orthogonalised loss find
    the modifier from data alone (no prior); measured recovery at 6000 episodes is about half of
    it, so the test asks for the right direction and at least 40 % of the size."""
    ep, _ = _toy(6000, seed=1, confounding=0.5, cbt_boost=1.5)
    model = _fit(ep, use_prior=False)
    test = _patients(2000, np.random.default_rng(9))
    est = model.predict_plans(test)
    contrast = (est.expected_improvement[:, PLAN_INDEX["cbt"]]
                - est.expected_improvement[:, PLAN_INDEX["diet"]])
    high = test["phq9"].to_numpy() >= 15
    gap = contrast[high].mean() - contrast[~high].mean()
    assert 0.6 <= gap <= 2.0, gap


def test_recovers_a_planted_history_modifier_pooled_over_components():
    """Components the patient responded to before work twice their evidence effect and those
    without response not at all (the sheet gives only ×1.3 and ×0.5/×0.75). Each pooled
    modifier coefficient is estimated from every component's episodes: the fitted multipliers
    land near the planted ones, and explanations name the history column."""
    rng = np.random.default_rng(4)
    n = 6000
    pat = _patients(n, rng)
    for c in COMPONENT_CODES:
        pat[f"prior_{c}"] = rng.choice(["none", "responded", "no_response"], n, p=[.6, .2, .2])
    pat = validate(pat, "patients").frame
    prior = prior_effects(pat)  # already ×1.3 / ×0.5 / ×0.75 for the recorded history
    hist = np.column_stack([pat[f"prior_{c}"].astype(str) for c in COMPONENT_CODES])
    kind = np.array([COMPONENT_BY_CODE[c].kind for c in COMPONENT_CODES])
    plain = np.where(kind == "drug", 0.5, 0.75)
    base = np.where(hist == "responded", prior / 1.3, np.where(hist == "no_response", prior / plain, prior))
    tau = base * np.where(hist == "responded", 2.0, np.where(hist == "no_response", 0.0, 1.0))
    basis, _ = effect_basis()
    a = rng.integers(0, N_PLANS, n)
    y = 0.5 + (basis[a, :12] * tau).sum(1) + rng.normal(0, 1.0, n)
    ep = pat.copy()
    ep["plan"] = [PLANS[i] for i in a]
    ep["improvement"], ep["adverse_event"] = y, (rng.random(n) < 0.05).astype(int)
    model = _fit(ep)
    gamma = dict(zip(model.effect_names_, model.effect_model_.gamma_[:, 0], strict=False))
    # Planted, relative to the prior: responded 2.0 / 1.3 - 1 = +0.54; no response -1.
    assert gamma["history_responded"] == pytest.approx(2.0 / 1.3 - 1, abs=0.2)
    assert gamma["history_no_response"] == pytest.approx(-1.0, abs=0.2)
    test = _patients(400, np.random.default_rng(8))
    test["prior_pt"] = "responded"
    test = validate(test, "patients").frame
    est = model.predict_plans(test)
    coef = model.patient_coefficients(test)
    item = explain_plans(model, test.iloc[[0]], ["pt"], top_n=50)[0]
    names = [c["feature"] for c in item["contributions"]]
    assert "prior_pt" in names
    total = item["base_value"] + sum(c["shap"] for c in item["contributions"])
    assert total == pytest.approx(est.utility[0, PLAN_INDEX["pt"]] - coef["baseline"][0], abs=2e-3)


def test_orthogonalisation_reduces_confounding_bias():
    """The measurement behind the design: on a strongly confounded fixture, residualising on
    the logging policy (R-learner) estimates component effects with less error than the
    naive joint fit on the same data (both without the evidence prior)."""
    ep, _ = _toy(8000, seed=2, confounding=2.0)
    test = _patients(1500, np.random.default_rng(5))
    true = prior_effects(test)
    errors = {}
    for orth in (True, False):
        model = _fit(ep, use_prior=False, orthogonalize=orth)
        errors[orth] = _centred_rmse(model.component_effects(test), true)
    assert errors[True] < 0.85 * errors[False], errors


def test_thin_data_stay_near_the_evidence_and_beat_guideline_rules():
    episodes = validate(simulate_episodes(150, seed=21, progress=False), "episodes").frame
    model = PlanOutcomeModel(**FAST).fit(
        episodes, plans=episodes["plan"], improvement=episodes["peg"] - episodes["peg_12wk"],
        adverse_event=episodes["adverse_event"].astype(int), groups=episodes["patient_id"])
    patients, long = simulate_truth(400, seed=22)
    patients = validate(patients, "patients").frame
    effects = model.component_effects(patients)
    prior = prior_effects(patients)
    # With 150 episodes the component effects move little from the prior (their average
    # correction is shrunk with the weight of 50 prior episodes per coefficient).
    assert np.abs((effects - effects.mean(1, keepdims=True))
                  - (prior - prior.mean(1, keepdims=True))).mean() < 0.25
    truth = TruthSet(patients,
                     long["expected_improvement"].to_numpy().reshape(-1, N_PLANS),
                     long["p_adverse_event"].to_numpy().reshape(-1, N_PLANS),
                     long["floor_allowed"].to_numpy().reshape(-1, N_PLANS))
    ranked = recommend(model, patients, top_k=1)
    allowed = assess(patients).allowed_plans()
    model_nv = normalized_value(truth, ranked.order[:, 0])["normalized_value"]
    guide_nv = normalized_value(truth, guideline_ranking(patients, allowed, 1)[:, 0])["normalized_value"]
    assert model_nv >= guide_nv, (model_nv, guide_nv)


@pytest.fixture(scope="module")
def simulated_model():
    ep = validate(simulate_episodes(3000, seed=3, progress=False), "episodes").frame
    model = PlanOutcomeModel(**FAST).fit(
        ep, plans=ep["plan"], improvement=ep["peg"] - ep["peg_12wk"],
        adverse_event=ep["adverse_event"].astype(int), groups=ep["patient_id"])
    return model, ep


def test_estimates_are_coherent(simulated_model):
    model, ep = simulated_model
    patients = ep.head(50)
    est = model.predict_plans(patients)
    assert est.utility.shape == (50, N_PLANS)
    assert np.all(est.improvement_low <= est.expected_improvement + 1e-9)
    assert np.all(est.expected_improvement <= est.improvement_high + 1e-9)
    assert np.all((est.p_adverse_event > 0) & (est.p_adverse_event < 1))
    assert np.all((est.p_response >= 0) & (est.p_response <= 1))
    np.testing.assert_allclose(est.utility, est.expected_improvement - 2.0 * est.p_adverse_event)
    peg = ep["peg"].head(50).to_numpy()[:, None]
    assert np.all(est.expected_improvement <= peg + 1e-9)  # cannot improve below PEG 0


def test_explanations_add_up_exactly(simulated_model):
    model, ep = simulated_model
    patient = ep.iloc[[7]]
    coef = model.patient_coefficients(patient)
    est = model.predict_plans(patient)
    plans = ["cbt+pt", "nsaid+opioid", "acupuncture+mbsr+snri+yoga"]
    for item in explain_plans(model, patient, plans, top_n=50):
        total = item["base_value"] + sum(c["shap"] for c in item["contributions"])
        served = est.utility[0, PLAN_INDEX[item["plan"]]] - coef["baseline"][0]
        assert total == pytest.approx(served, abs=2e-3)
        assert item["plan_effect"] == pytest.approx(served, abs=1e-3)
    contrast = explain_contrast(model, patient, "cbt+pt", "nsaid+opioid", top_n=50)
    gap = est.utility[0, PLAN_INDEX["cbt+pt"]] - est.utility[0, PLAN_INDEX["nsaid+opioid"]]
    assert contrast["utility_gap"] == pytest.approx(gap, abs=1e-3)
    parts = contrast["average_patient_gap"] + sum(c["shap"] for c in contrast["contributions"])
    assert parts == pytest.approx(gap, abs=2e-3)
    assert all(c["phrase"] for c in contrast["contributions"])
