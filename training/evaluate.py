"""Evaluate a fitted model on held-out episodes (always) and on simulator truth (when given).

Everything is computed on the same patients for the model and the baselines (guideline rules,
clinicians as logged, random allowed, plain S-learner), through the production path
:func:`recommender.recommend.recommend`, so offline numbers describe what clinicians would get.

    evaluate(bundle, test, *, train=None, truth=None, config) -> Evaluation
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_CODES, PLAN_INDEX, PLANS, plan_matrix
from features.schema import ADVERSE_EVENT, PEG, PEG_12WK, PLAN, PROPENSITY, RESPONDER_FRACTION
from recommender.ranking import rank_plans
from recommender.recommend import recommend
from recommender.safety import assess, floor_violations
from training.baselines import SLearner, guideline_ranking
from training.ope import off_policy_value
from training.truth import (
    TruthSet,
    component_pehe,
    ndcg_at_k,
    normalized_value,
    plan_pehe,
    policy_value,
)

log = logging.getLogger(__name__)
CHUNK = 4000
_SINGLE_PLANS = [PLAN_INDEX[code] for code in COMPONENT_CODES]
S_LEARNER_MAX_PATIENTS = 2000  # the S-learner scores n × 839 rows: subsample for speed
AGE_BANDS = [17, 34, 49, 64, 79, 120]
AGE_LABELS = ["18-34", "35-49", "50-64", "65-79", "80+"]


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # file name -> matplotlib Figure
    value_for_promotion: float | None = None  # true normalized value with truth, else DR value


def _passes(model, patients: pd.DataFrame, logged: np.ndarray | None, top_k: int = 5,
            profile: str = "US_ACP_CDC") -> dict:
    """Score patients in chunks; keep only per-patient summaries (bounded memory)."""
    keep: dict[str, list] = {}

    def put(name, value):
        keep.setdefault(name, []).append(value)

    for start in range(0, len(patients), CHUNK):
        chunk = patients.iloc[start:start + CHUNK]
        ranked = recommend(model, chunk, top_k=top_k)
        est, allowed = ranked.estimates, ranked.safety.allowed_plans()
        rows = np.arange(len(chunk))
        u = est.utility
        put("order", ranked.order)
        put("guideline", guideline_ranking(chunk, allowed, 1, profile)[:, 0])
        put("q_random", np.where(allowed, u, 0).sum(1) / np.maximum(allowed.sum(1), 1))
        put("n_allowed", allowed.sum(1))
        # Single-component plans' expected improvement; √PEHE centres it per patient, so the
        # baseline cancels and this compares like with like against the truth's single plans.
        put("component_effects", est.expected_improvement[:, _SINGLE_PLANS])
        put("u", u.astype(np.float32))
        if logged is not None:
            a = logged[start:start + CHUNK]
            put("allowed_logged", allowed[rows, a])
            for name in ("utility", "expected_improvement", "improvement_low", "improvement_high",
                         "p_adverse_event", "p_response"):
                put(f"{name}_logged", getattr(est, name)[rows, a])
        put("floor_violations", sum(
            floor_violations(chunk, ranked.order[:, r]).sum()
            for r in range(ranked.order.shape[1]) if (ranked.order[:, r] >= 0).all()))
        put("ei", est.expected_improvement.astype(np.float32))
    out = {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else np.array(v)) for k, v in keep.items()}
    return out


def _reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> pd.DataFrame:
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    df = pd.DataFrame({"bin": which, "p": p, "y": y}).groupby("bin").agg(
        n=("y", "size"), mean_predicted=("p", "mean"), observed_rate=("y", "mean"))
    return df.reset_index()


def _reliability_figure(tables: dict[str, pd.DataFrame]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    for name, t in tables.items():
        ax.plot(t["mean_predicted"], t["observed_rate"], marker="o", label=name)
    hi = max(0.05, max(t[["mean_predicted", "observed_rate"]].to_numpy().max() for t in tables.values()))
    ax.set(xlim=(0, hi * 1.05), ylim=(0, hi * 1.05), xlabel="predicted probability",
           ylabel="observed rate", title="Reliability on held-out episodes")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def _subgroups(patients: pd.DataFrame, per_patient_value: np.ndarray, choice: np.ndarray,
               value_name: str) -> pd.DataFrame:
    m = plan_matrix()
    n_comp = m[choice].sum(1)
    has_drug = m[choice][:, 6:].sum(1) > 0
    has_opioid = m[choice][:, 11] > 0
    frame = pd.DataFrame({
        "sex": patients["sex"].astype(str).to_numpy(),
        "age_band": pd.cut(pd.to_numeric(patients["age"]), AGE_BANDS, labels=AGE_LABELS).astype(str),
        "pain_condition": patients["pain_condition"].astype(str).to_numpy(),
        value_name: per_patient_value, "n_components": n_comp, "with_drug": has_drug,
        "with_opioid": has_opioid, "plan": np.asarray(PLANS, dtype=object)[choice],
    })
    parts = []
    for dim in ("sex", "age_band", "pain_condition"):
        g = frame.groupby(dim, observed=True)
        t = g.agg(n=(value_name, "size"), **{value_name: (value_name, "mean")},
                  mean_components=("n_components", "mean"), share_with_drug=("with_drug", "mean"),
                  share_with_opioid=("with_opioid", "mean"),
                  most_common_plan=("plan", lambda s: s.value_counts().index[0]))
        t.insert(0, "level", t.index.astype(str))
        t.insert(0, "dimension", dim)
        parts.append(t.reset_index(drop=True))
    return pd.concat(parts, ignore_index=True)


def evaluate(bundle, test: pd.DataFrame, *, train: pd.DataFrame | None = None,
             truth: TruthSet | None = None, config=None, progress=None) -> Evaluation:
    """Evaluate ``bundle`` (``.model``, ``.policy``) on held-out episodes and optional truth."""
    say = progress or (lambda msg: log.info(msg))
    model, policy = bundle.model, getattr(bundle, "policy", None)
    lam = float(model.lambda_ae)
    seed = getattr(config, "seed", 0)
    profile = getattr(config, "guideline_profile", "US_ACP_CDC")
    ev = Evaluation()
    M = ev.metrics

    # ---------------------------------------------------------------- held-out episodes
    say(f"evaluating on {len(test)} held-out episodes")
    a = test[PLAN].map(PLAN_INDEX).to_numpy().astype(int)
    y = (pd.to_numeric(test[PEG]) - pd.to_numeric(test[PEG_12WK])).to_numpy(float)
    ae = test[ADVERSE_EVENT].astype(float).to_numpy()
    responder = (pd.to_numeric(test[PEG_12WK]) <= RESPONDER_FRACTION * pd.to_numeric(test[PEG])).to_numpy(float)
    P = _passes(model, test, a, profile=profile)
    reward = y - lam * ae

    M["test_episodes"] = float(len(test))
    M["rmse_improvement_logged"] = float(np.sqrt(np.mean((P["expected_improvement_logged"] - y) ** 2)))
    inside = (y >= P["improvement_low_logged"]) & (y <= P["improvement_high_logged"])
    M["interval_coverage"] = float(inside.mean())
    M["interval_target"] = float(model.interval_level)
    M["interval_mean_width"] = float(np.mean(P["improvement_high_logged"] - P["improvement_low_logged"]))
    size = plan_matrix()[a].sum(1)
    ev.tables["interval_coverage_by_plan_size"] = (
        pd.DataFrame({"plan_size": size, "covered": inside}).groupby("plan_size")["covered"]
        .agg(["size", "mean"]).rename(columns={"size": "n", "mean": "coverage"}).reset_index())
    p_ae = P["p_adverse_event_logged"]
    M["ae_brier"] = float(np.mean((p_ae - ae) ** 2))
    M["ae_brier_constant"] = float(np.mean((ae.mean() - ae) ** 2))
    M["ae_log_loss"] = float(-np.mean(ae * np.log(np.clip(p_ae, 1e-9, 1)) + (1 - ae) * np.log(np.clip(1 - p_ae, 1e-9, 1))))
    M["response_brier"] = float(np.mean((P["p_response_logged"] - responder) ** 2))
    rel_ae = _reliability(p_ae, ae)
    rel_resp = _reliability(P["p_response_logged"], responder)
    M["ae_ece"] = float(np.average(np.abs(rel_ae["mean_predicted"] - rel_ae["observed_rate"]), weights=rel_ae["n"]))
    ev.tables["reliability_adverse_event"] = rel_ae
    ev.tables["reliability_response"] = rel_resp
    ev.figures["reliability.png"] = _reliability_figure({"adverse event": rel_ae, "response": rel_resp})

    # Logging propensities: known when the data carry them, else the chain model's estimate.
    X = model.encoder_.transform(test)
    known = PROPENSITY in test.columns and test[PROPENSITY].notna().all()
    p_est = policy.probability(X, a) if policy is not None else None
    if known:
        p_logged = pd.to_numeric(test[PROPENSITY]).to_numpy(float)
        if p_est is not None:
            M["propensity_model_mean_abs_log_error"] = float(np.mean(np.abs(np.log(p_est) - np.log(p_logged))))
    elif p_est is not None:
        p_logged = p_est
    else:
        p_logged = None
    M["propensity_known"] = float(known)

    top1 = P["order"][:, 0]
    M["safety_floor_violations_test"] = float(P["floor_violations"].sum())
    ope_rows = []
    if p_logged is not None:
        rows = np.arange(len(test))
        q_logged = P["utility_logged"]
        u = P["u"]
        policies = {
            "model": ((top1 == a).astype(float), u[rows, top1]),
            "guideline": ((P["guideline"] == a).astype(float), u[rows, P["guideline"]]),
            # Uniform over allowed plans: π_e(a_i | x_i) = 1{a_i allowed} / #allowed.
            "random_allowed": (P["allowed_logged"] / np.maximum(P["n_allowed"], 1), P["q_random"]),
        }
        for name, (pt, qt) in policies.items():
            res = off_policy_value(reward, p_logged, pt, qt, q_logged, seed=seed)
            M.update(res.as_metrics(f"ope_{name}"))
            ope_rows.append({"policy": name, **{k.replace(f"ope_{name}_", ""): v for k, v in res.as_metrics(f"ope_{name}").items()}})
        M["logged_value"] = float(reward.mean())
        ope_rows.append({"policy": "clinicians_as_logged", "ips": reward.mean(), "snips": reward.mean(),
                         "dr": reward.mean(), "ess": float(len(reward)), "match_rate": 1.0, "evaluable": 1.0})
        # Overlap diagnostics: support of the logging policy at the logged and recommended plans.
        M["overlap_logged_propensity_p05"] = float(np.quantile(p_logged, 0.05))
        M["overlap_logged_propensity_median"] = float(np.median(p_logged))
        if policy is not None:
            p_rec = policy.probability(X, top1)
            M["overlap_recommended_propensity_median"] = float(np.median(p_rec))
            M["overlap_recommended_out_of_support"] = float(np.mean(p_rec <= 1e-3))
        _, e_hat = model._nuisance(X)
        comp = e_hat[:, :12]
        M["overlap_component_propensity_in_0.02_0.98"] = float(np.mean((comp > 0.02) & (comp < 0.98)))
        ev.tables["ope"] = pd.DataFrame(ope_rows)
        dr_terms = u[rows, top1] + (top1 == a) / p_logged * (reward - q_logged)
        ev.tables["subgroups_test"] = _subgroups(test, dr_terms, top1, "dr_value")
        ev.value_for_promotion = M["ope_model_dr"]

    # ---------------------------------------------------------------- truth
    if truth is not None:
        say(f"evaluating against simulator truth for {len(truth.patients)} patients")
        T = _passes(model, truth.patients, None, profile=profile)
        ut = truth.utility(lam)
        choice = {"model": T["order"][:, 0], "guideline": T["guideline"]}
        if train is not None:
            say("fitting the plain S-learner baseline")
            n_jobs = config.model.n_jobs if config is not None else 2
            s = SLearner(lambda_ae=lam, random_state=seed, n_jobs=n_jobs).fit(
                train, train[PLAN], (pd.to_numeric(train[PEG]) - pd.to_numeric(train[PEG_12WK])),
                train[ADVERSE_EVENT].astype(int))
            sub = np.arange(min(len(truth.patients), S_LEARNER_MAX_PATIENTS))
            allowed = assess(truth.patients.iloc[sub]).allowed_plans()
            s_choice = rank_plans(s.utility(truth.patients.iloc[sub]), allowed, 1)[:, 0]
        rows_tbl = []
        for name, ch in choice.items():
            nv = normalized_value(truth, ch, lam)
            M.update({f"truth_{name}_{k}": v for k, v in nv.items()})
            rows_tbl.append({"policy": name, **nv})
        if train is not None:
            sub_truth = TruthSet(truth.patients.iloc[sub], truth.expected_improvement[sub],
                                 truth.p_adverse_event[sub], truth.floor_allowed[sub])
            nv = normalized_value(sub_truth, s_choice, lam)
            M.update({f"truth_s_learner_{k}": v for k, v in nv.items()})
            rows_tbl.append({"policy": "s_learner", **nv, "note": f"first {len(sub)} truth patients"})
        # Clinicians as logged: their mean realised utility on held-out episodes, placed on the
        # truth scale (same population, different patients: an approximation, labelled so).
        nv_model = normalized_value(truth, choice["model"], lam)
        rng_v, orc_v = nv_model["random_allowed_value"], nv_model["oracle_value"]
        logged_v = float(reward.mean())
        M["truth_logged_normalized_value_approx"] = (logged_v - rng_v) / (orc_v - rng_v)
        rows_tbl.append({"policy": "clinicians_as_logged (approx.)", "value": logged_v,
                         "normalized_value": M["truth_logged_normalized_value_approx"]})
        rows_tbl.append({"policy": "random_allowed", "value": rng_v, "normalized_value": 0.0})
        ev.tables["baselines_truth"] = pd.DataFrame(rows_tbl)
        M["truth_normalized_value"] = M["truth_model_normalized_value"]
        M["truth_regret"] = M["truth_model_regret"]
        M["truth_ndcg_at_5"] = ndcg_at_k(ut, truth.floor_allowed, T["order"], 5)
        M["truth_component_pehe"] = component_pehe(truth, T["component_effects"])
        M["truth_plan_pehe"] = plan_pehe(truth, T["ei"].astype(float))
        M["truth_ae_rmse"] = float(np.sqrt(np.mean(
            (recommend(model, truth.patients.iloc[:500], 1).estimates.p_adverse_event
             - truth.p_adverse_event[:500]) ** 2)))
        M["safety_floor_violations_truth"] = float(T["floor_violations"].sum())
        ev.tables["subgroups_truth"] = _subgroups(truth.patients, policy_value(ut, choice["model"]),
                                                  choice["model"], "true_value")
        ev.value_for_promotion = M["truth_normalized_value"]
    return ev

