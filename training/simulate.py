"""Literature-calibrated synthetic cohort of chronic-pain treatment episodes, with known truth.

The simulator is a structural causal model whose every number sits in
``training/configs/simulator.yaml`` with its ``clinical-evidence.md`` citation:

* **Patients** (:func:`draw_cohort`): condition mix, age and sex by condition; a latent
  distress factor drives correlated PHQ-9, GAD-7, PCS, ISI, pain and PEG; lifestyle, eGFR and
  the CONTRACT §2 risk flags (logistic in age, BMI, mood, alcohol …); realistic missingness.
  Hidden from the extract: per-component responsiveness ``r_c`` (correlated within mechanism
  groups), a placebo-responder factor and adverse-event susceptibility. The same latent state
  writes the ``prior_<code>`` history, so prior response is informative, as in real care.
* **Outcome** (:func:`true_outcomes`): improvement = peg − peg_12wk. Mean = natural history
  (usual care, regression to the mean, prognostic terms) + the plan's effect: §3.3 effects by
  condition with individual heterogeneity, §4 modifiers, sub-additive combination and falling
  adherence. ``peg_12wk = clip(peg − μ + ε, 0, 10)`` and the truth's expected improvement is
  the closed-form mean of that clipped normal. AE probability: §5.1 rates × risk multipliers,
  combined as 1 − Π(1 − p) × §5.3 interaction factors.
* **Logging policy** (:func:`logging_policy`): clinicians' softmax over the 839 plans with
  condition habits, chart history and severity-driven aggressiveness (the confounding), which
  mostly respects the CONTRACT §5 floor; the logged ``propensity`` is the exact probability.

Truth and episodes call the same :func:`true_outcomes`, so they cannot drift apart. All
randomness comes from one :class:`numpy.random.SeedSequence` split into named streams; the
same seed gives a byte-identical frame.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, ndtr  # scipy and threadpoolctl ship with scikit-learn
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from features.catalog import COMPONENT_CODES, COMPONENT_INDEX, N_PLANS, PLANS
from features.errors import ConfigError
from features.io import SUFFIXES, write_table
from features.schema import (
    COLUMNS_BY_NAME,
    EPISODE_COLUMNS,
    PAIN_CONDITIONS,
    PATIENT_COLUMNS,
    PRIOR_COLUMNS,
    PRIOR_LEVELS,
    RISK_FLAGS,
    SEX_LEVELS,
)
from training.sim_config import SimulatorConfig

log = logging.getLogger(__name__)

TRUTH_COLUMNS = (
    "patient_id",
    "plan",
    "expected_improvement",
    "p_adverse_event",
    "utility",
    "floor_allowed",
)


def _contract_range(column: str) -> tuple[float, float]:
    """A column's CONTRACT §2/§3 range, from the one schema (never retyped here)."""
    spec = COLUMNS_BY_NAME[column]
    if spec.min is None or spec.max is None:
        raise ValueError(f"features.schema declares no range for {column!r}")
    return spec.min, spec.max


PEG_MIN, PEG_MAX = _contract_range("peg_12wk")  # peg_12wk is clipped to the PEG scale
_DAYS_PER_MONTH = 365.25 / 12

_COND = {name: i for i, name in enumerate(PAIN_CONDITIONS)}
_SEX = {name: i for i, name in enumerate(SEX_LEVELS)}
_PRIOR = {name: i for i, name in enumerate(PRIOR_LEVELS)}
_FLAG = {name: i for i, name in enumerate(RISK_FLAGS)}
_NONE, _RESPONDED, _PARTIAL = _PRIOR["none"], _PRIOR["responded"], _PRIOR["partial"]
_NO_RESPONSE, _INTOLERANT = _PRIOR["no_response"], _PRIOR["intolerant"]
_PT, _CBT, _MBSR, _DIET = (COMPONENT_INDEX[c] for c in ("pt", "cbt", "mbsr", "diet"))
_NSAID, _SNRI, _TCA, _OPIOID = (COMPONENT_INDEX[c] for c in ("nsaid", "snri", "tca", "opioid"))
# Optional contract columns that an extract may leave empty, in the order of Cohort.missing.
OPTIONAL_COLUMNS = (
    "bmi",
    "neuropathic_component",
    "pcs",
    "isi",
    "smoker",
    "activity_min_week",
    "alcohol_units_week",
    "diet_quality",
    "egfr",
)
_OPT = {name: i for i, name in enumerate(OPTIONAL_COLUMNS)}
_PLAN_ARRAY = np.asarray(PLANS, dtype=object)


# ============================================================================================
# Patients
# ============================================================================================


def _take(rows: Any, index: np.ndarray | slice) -> Any:
    """Index every array of a (nested) dataclass of per-row arrays."""
    return replace(
        rows,
        **{
            f.name: _take(v, index) if is_dataclass(v := getattr(rows, f.name)) else v[index]
            for f in fields(rows)
        },
    )


def _concat(parts: list[Any]) -> Any:
    """Stack (nested) dataclasses of per-row arrays."""
    head = parts[0]
    return replace(
        head,
        **{
            f.name: (_concat if is_dataclass(getattr(head, f.name)) else np.concatenate)(
                [getattr(p, f.name) for p in parts]
            )
            for f in fields(head)
        },
    )


@dataclass(frozen=True)
class Cohort:
    """Patients at the start of an episode: the extract's view plus the hidden state.

    Every field is an array with one entry (or row) per patient. Observed columns hold the true
    value even where the extract leaves it empty (``missing``); the outcome depends on the truth,
    the clinician only on what is recorded.
    """

    patient_id: np.ndarray  # str
    age: np.ndarray  # int years
    sex: np.ndarray  # code into SEX_LEVELS
    condition: np.ndarray  # code into PAIN_CONDITIONS
    neuropathic: np.ndarray  # bool, true neuropathic component
    duration: np.ndarray  # months
    pain: np.ndarray  # NRS 0–10
    peg: np.ndarray  # PEG 0–10
    phq9: np.ndarray
    gad7: np.ndarray
    pcs: np.ndarray
    isi: np.ndarray
    smoker: np.ndarray  # bool
    activity: np.ndarray  # min/week
    alcohol: np.ndarray  # units/week
    diet: np.ndarray  # 0–100
    bmi: np.ndarray
    egfr: np.ndarray
    flags: np.ndarray  # (n, 15) bool, RISK_FLAGS order
    prior: np.ndarray  # (n, 12) code into PRIOR_LEVELS
    missing: np.ndarray  # (n, 9) bool, OPTIONAL_COLUMNS left empty in the extract
    responsiveness: np.ndarray  # (n, 12) r_c ~ N(0, 1)
    expectation: np.ndarray  # (n,) placebo-responder factor ~ N(0, 1)
    ae_susceptibility: np.ndarray  # (n, 12) ~ N(0, 1)

    def __len__(self) -> int:
        return len(self.age)

    def take(self, index: np.ndarray | slice) -> Cohort:
        """The patients at ``index`` (an index array, a boolean mask or a slice)."""
        return _take(self, index)

    def observed(self, column: str) -> np.ndarray:
        """A numeric optional column as the extract shows it (NaN where not recorded)."""
        values = {
            "bmi": self.bmi,
            "pcs": self.pcs,
            "isi": self.isi,
            "egfr": self.egfr,
            "activity_min_week": self.activity,
            "alcohol_units_week": self.alcohol,
            "diet_quality": self.diet,
            "smoker": self.smoker,
            "neuropathic_component": self.neuropathic,
        }[column]
        return np.where(self.missing[:, _OPT[column]], np.nan, values.astype(float))

    def floor_exclusions(self) -> np.ndarray:
        """(n, 12) components the CONTRACT §5 floor excludes, from the recorded profile."""
        return _floor_exclusions(self.observed("egfr"), self.flags, self.prior == _INTOLERANT)

    def frame(self) -> pd.DataFrame:
        """The contract patient columns (CONTRACT §2), typed, missing optional values empty."""
        miss = {name: self.missing[:, i] for i, name in enumerate(OPTIONAL_COLUMNS)}

        def number(values: np.ndarray, name: str) -> np.ndarray:
            return np.where(miss[name], np.nan, values.astype(float))

        def integer(values: np.ndarray, name: str) -> pd.arrays.IntegerArray:
            return pd.arrays.IntegerArray(values.astype(np.int64), miss[name].copy())

        def boolean(values: np.ndarray, name: str) -> pd.arrays.BooleanArray:
            return pd.arrays.BooleanArray(values.astype(bool), miss[name].copy())

        data = {
            "patient_id": self.patient_id.astype(object),
            "age": self.age.astype(np.int64),
            "sex": np.asarray(SEX_LEVELS, dtype=object)[self.sex],
            "bmi": number(self.bmi, "bmi"),
            "pain_condition": np.asarray(PAIN_CONDITIONS, dtype=object)[self.condition],
            "neuropathic_component": boolean(self.neuropathic, "neuropathic_component"),
            "pain_duration_months": self.duration.astype(float),
            "pain_intensity": self.pain.astype(float),
            "peg": self.peg.astype(float),
            "phq9": self.phq9.astype(np.int64),
            "gad7": self.gad7.astype(np.int64),
            "pcs": integer(self.pcs, "pcs"),
            "isi": integer(self.isi, "isi"),
            "smoker": boolean(self.smoker, "smoker"),
            "activity_min_week": number(self.activity, "activity_min_week"),
            "alcohol_units_week": number(self.alcohol, "alcohol_units_week"),
            "diet_quality": number(self.diet, "diet_quality"),
            "egfr": number(self.egfr, "egfr"),
        }
        for j, name in enumerate(RISK_FLAGS):
            data[name] = self.flags[:, j].astype(bool)
        levels = np.asarray(PRIOR_LEVELS, dtype=object)
        for j, name in enumerate(PRIOR_COLUMNS):
            data[name] = levels[self.prior[:, j]]
        return pd.DataFrame(data, columns=[c.name for c in PATIENT_COLUMNS])


def _score(
    rng: np.random.Generator,
    latent: np.ndarray,
    spec: Mapping[str, float],
    lo: float,
    hi: float,
    decimals: int | None = None,
) -> np.ndarray:
    """A questionnaire score loading on ``latent``: clip(round(mean + sd·z), lo, hi)."""
    loading = spec["loading"]
    z = loading * latent + math.sqrt(1 - loading**2) * rng.standard_normal(len(latent))
    value = spec["mean"] + spec["sd"] * z
    value = np.rint(value) if decimals is None else np.round(value, decimals)
    return np.clip(value, lo, hi)


def _pseudonyms(rng: np.random.Generator, n: int, prefix: str) -> np.ndarray:
    """Unique, seeded, non-sequential ids such as ``P004711`` (no link to row order)."""
    width = max(6, len(str(10 * n)))
    numbers = rng.choice(10**width - 1, size=n, replace=False) + 1
    return np.char.add(prefix, np.char.zfill(numbers.astype(str), width))


def draw_cohort(
    n: int, *, rng: np.random.Generator, config: SimulatorConfig, id_prefix: str = "P"
) -> Cohort:
    """Draw ``n`` patients at their first episode (profile, hidden state and prior history)."""
    people = _draw_demographics(n, rng, config)
    symptoms = _draw_symptoms(people, rng, config)
    distress = symptoms.pop("distress")
    lifestyle = _draw_lifestyle(people, symptoms, distress, rng, config)
    flags = _draw_risk_flags(people, symptoms, lifestyle, rng, config)
    missing = _draw_missingness(people["age"], rng, config)
    hidden = _draw_hidden_state(n, rng, config)
    cohort = Cohort(
        patient_id=_pseudonyms(rng, n, id_prefix),
        **people,
        **symptoms,
        **lifestyle,
        flags=flags,
        prior=np.zeros((n, len(COMPONENT_CODES)), dtype=np.int8),
        missing=missing,
        **hidden,
    )
    return replace(cohort, prior=_draw_prior_history(cohort, rng, config))


def _draw_demographics(
    n: int, rng: np.random.Generator, config: SimulatorConfig
) -> dict[str, np.ndarray]:
    """Condition (§2.4), age and sex by condition (§2.1), neuropathic features, duration."""
    t, c = config.tables, config.cohort
    condition = rng.choice(len(PAIN_CONDITIONS), size=n, p=t.condition_mix)
    mean, sd = t.age_mean_sd[condition].T
    age = np.clip(np.rint(rng.normal(mean, sd)), c.age_min, c.age_max).astype(np.int64)
    u_sex = rng.random(n)
    female = rng.random(n) < t.female_share[condition]
    sex = np.select(
        [u_sex < c.sex_other_share, u_sex < c.sex_other_share + c.sex_unknown_share, female],
        [_SEX["other"], _SEX["unknown"], _SEX["female"]],
        default=_SEX["male"],
    )
    neuropathic = rng.random(n) < t.neuropathic_prob[condition]
    duration = c.duration_median_months * np.exp(c.duration_log_sd * rng.standard_normal(n))
    duration = np.clip(np.round(duration, 1), c.duration_min, c.duration_max)
    return {
        "condition": condition,
        "age": age,
        "sex": sex,
        "neuropathic": neuropathic,
        "duration": duration,
    }


def _draw_symptoms(
    people: dict[str, np.ndarray], rng: np.random.Generator, config: SimulatorConfig
) -> dict[str, np.ndarray]:
    """One latent distress factor makes mood, catastrophizing, sleep and pain co-vary (§2.2)."""
    t, q, d = config.tables, config.questionnaires, config.distress
    n = len(people["age"])
    distress = (
        t.distress_shift[people["condition"]]
        + d.age_slope_per_decade * (people["age"] - 50) / 10
        + d.female_shift * (people["sex"] == _SEX["female"])
        + rng.standard_normal(n)
    )
    scores = {
        "phq9": _score(rng, distress, q.phq9, *_contract_range("phq9")).astype(np.int64),
        "gad7": _score(rng, distress, q.gad7, *_contract_range("gad7")).astype(np.int64),
        "pcs": _score(rng, distress, q.pcs, *_contract_range("pcs")).astype(np.int64),
        "isi": _score(rng, distress, q.isi, *_contract_range("isi")).astype(np.int64),
    }
    pain = _score(rng, distress, q.pain, *_contract_range("pain_intensity"), decimals=1)
    # PEG = mean of three integer items (§1.1 Krebs 2009): the pain item and two interference
    # items that follow pain and distress.
    items = [np.rint(pain)]
    for _ in range(2):
        noise = q.peg_interference_noise_sd * rng.standard_normal(n)
        item = pain + q.peg_interference_offset + q.peg_interference_distress * distress + noise
        items.append(np.clip(np.rint(item), PEG_MIN, PEG_MAX))
    peg = (items[0] + items[1] + items[2]) / 3
    return {"distress": distress, "pain": pain, "peg": peg, **scores}


def _draw_lifestyle(
    people: dict[str, np.ndarray],
    symptoms: dict[str, np.ndarray],
    distress: np.ndarray,
    rng: np.random.Generator,
    config: SimulatorConfig,
) -> dict[str, np.ndarray]:
    """Smoking (§2.3 Orhurhu 2015), BMI, eGFR, activity, alcohol and diet (mostly A)."""
    t, life = config.tables, config.lifestyle
    condition, age, sex = people["condition"], people["age"], people["sex"]
    n = len(age)
    base = t.smoker_prob[condition]
    logit_smoke = (
        np.log(base / (1 - base))
        + life.smoker_distress_logit * distress
        + life.smoker_age_logit_per_decade * (age - 50) / 10
    )
    smoker = rng.random(n) < expit(logit_smoke)
    spread = np.exp(life.bmi_log_sd * rng.standard_normal(n) - life.bmi_log_sd**2 / 2)
    bmi = (life.bmi_mean + t.bmi_shift[condition]) * spread
    bmi = np.clip(np.round(bmi, 1), life.bmi_min, life.bmi_max)
    egfr = (
        life.egfr_at_40
        - life.egfr_decline_per_year_after_40 * np.maximum(age - 40, 0)
        + life.egfr_neuropathic_shift * (condition == _COND["neuropathic"])
        + life.egfr_sd * rng.standard_normal(n)
    )
    egfr = np.clip(np.rint(egfr), life.egfr_min, life.egfr_max)
    active = rng.random(n) >= life.activity_zero_prob
    pain_shift = life.activity_pain_log_slope * (
        symptoms["pain"] - config.questionnaires.pain["mean"]
    )
    activity = life.activity_median * np.exp(
        life.activity_log_sd * rng.standard_normal(n) + pain_shift
    )
    activity = np.where(
        active, np.clip(np.round(activity / 5) * 5, *_contract_range("activity_min_week")), 0.0
    )
    drinks = rng.random(n) >= life.alcohol_zero_prob
    male_factor = np.where(sex == _SEX["male"], life.alcohol_male_factor, 1.0)
    alcohol = (
        life.alcohol_median * male_factor * np.exp(life.alcohol_log_sd * rng.standard_normal(n))
    )
    alcohol = np.where(
        drinks, np.clip(np.round(alcohol * 2) / 2, *_contract_range("alcohol_units_week")), 0.0
    )
    diet = (
        life.diet_mean + life.diet_sd * rng.standard_normal(n) + life.diet_distress_slope * distress
    )
    diet = np.clip(np.rint(diet), *_contract_range("diet_quality"))
    return {
        "smoker": smoker,
        "bmi": bmi,
        "egfr": egfr,
        "activity": activity,
        "alcohol": alcohol,
        "diet": diet,
    }


def _draw_risk_flags(
    people: dict[str, np.ndarray],
    symptoms: dict[str, np.ndarray],
    lifestyle: dict[str, np.ndarray],
    rng: np.random.Generator,
    config: SimulatorConfig,
) -> np.ndarray:
    """(n, 15) CONTRACT §2 flags: logistic in standardised predictors and earlier flags."""
    condition, age, sex = people["condition"], people["age"], people["sex"]
    predictors: dict[str, np.ndarray | float] = {
        "intercept": 1.0,
        "age10": (age - 50) / 10,
        "bmi5": (lifestyle["bmi"] - 28) / 5,
        "phq9_5": (symptoms["phq9"] - 8) / 5,
        "depression": symptoms["phq9"] >= 10,
        "anxiety": symptoms["gad7"] >= 10,
        "heavy_alcohol": lifestyle["alcohol"] > config.lifestyle.heavy_alcohol_units,
        "smoker": lifestyle["smoker"],
        "male": sex == _SEX["male"],
        "neuropathic_condition": condition == _COND["neuropathic"],
        "headache_condition": condition == _COND["headache"],
    }
    flags = np.zeros((len(age), len(RISK_FLAGS)), dtype=bool)
    for name, coefs in config.risk_flags.items():  # config order: later flags may use earlier
        logit = sum(coef * predictors[k] for k, coef in coefs.items())
        drawn = rng.random(len(age)) < expit(logit)
        if name == "pregnant":  # biologically constrained: women under 45 only (A)
            drawn &= (sex == _SEX["female"]) & (age < 45)
        flags[:, _FLAG[name]] = drawn
        predictors[name] = drawn
    return flags


def _draw_missingness(
    age: np.ndarray, rng: np.random.Generator, config: SimulatorConfig
) -> np.ndarray:
    """(n, 9) which optional columns the extract leaves empty (A; BMI/eGFR more in the young)."""
    missing = np.zeros((len(age), len(OPTIONAL_COLUMNS)), dtype=bool)
    for j, name in enumerate(OPTIONAL_COLUMNS):
        spec = config.missingness[name]
        if isinstance(spec, Mapping):
            p = expit(spec["intercept"] + spec["age10"] * (age - 50) / 10)
        else:
            p = spec
        missing[:, j] = rng.random(len(age)) < p
    return missing


def _draw_hidden_state(
    n: int, rng: np.random.Generator, config: SimulatorConfig
) -> dict[str, np.ndarray]:
    """Responsiveness r_c, placebo-responder factor and AE susceptibility (never recorded).

    r_c = global · placebo factor + group · mechanism factor + own part (§4 treatment
    expectation P; §3.3 heterogeneity); AE susceptibility shares one factor across components.
    """
    t = config.tables
    k = len(COMPONENT_CODES)
    expectation = rng.standard_normal(n)
    group = rng.standard_normal((n, t.n_groups))
    own = rng.standard_normal((n, k))
    own_loading = np.sqrt(1 - t.global_loading**2 - t.group_loading**2)
    responsiveness = (
        t.global_loading * expectation[:, None]
        + t.group_loading * group[:, t.group_id]
        + own_loading * own
    )
    rho = config.responsiveness.ae_susceptibility_shared
    shared = rng.standard_normal(n)[:, None]
    ae_susceptibility = rho * shared + math.sqrt(1 - rho**2) * rng.standard_normal((n, k))
    return {
        "responsiveness": responsiveness,
        "expectation": expectation,
        "ae_susceptibility": ae_susceptibility,
    }


def _draw_prior_history(
    cohort: Cohort, rng: np.random.Generator, config: SimulatorConfig
) -> np.ndarray:
    """prior_<c> before the first episode, written by the same latent state as the outcome.

    A past trial's recorded result is the patient's own effect of that component (which carries
    ``r_c``) plus noise; intolerance follows the patient's AE risk for it. So prior response is
    informative about the next response, as clinicians assume.
    """
    t, h = config.tables, config.prior_history
    n = len(cohort)
    factor = np.clip(
        (cohort.duration / config.cohort.duration_median_months) ** h.duration_exponent,
        h.duration_factor_min,
        h.duration_factor_max,
    )
    p_tried = 1 - (1 - t.tried_prob[cohort.condition]) ** factor[:, None]
    tried = rng.random(p_tried.shape) < p_tried
    result = _individual_benefit(cohort, config) + h.outcome_noise_sd * rng.standard_normal(
        p_tried.shape
    )
    outcome = np.where(
        result >= h.responded_threshold,
        _RESPONDED,
        np.where(result >= h.partial_threshold, _PARTIAL, _NO_RESPONSE),
    )
    p_intolerant = np.clip(_component_ae_probability(cohort, config) * h.intolerance_scale, 0, 1)
    intolerant = rng.random((n, len(COMPONENT_CODES))) < p_intolerant
    return np.where(tried, np.where(intolerant, _INTOLERANT, outcome), _NONE).astype(np.int8)


# ============================================================================================
# Structural equations: one code path for logged episodes and for the truth
# ============================================================================================


@dataclass(frozen=True)
class ComponentTerms:
    """Per-patient, per-component pieces of the outcome model (before plan-level combination)."""

    benefit: np.ndarray  # (n, 12) PEG-point improvement of each component on its own
    ae_probability: np.ndarray  # (n, 12) P(treatment-limiting AE) of each component on its own
    usual_care: np.ndarray  # (n,) mean improvement with no active component
    adherence: np.ndarray  # (n,) share of a one-component plan actually received
    synergy: np.ndarray  # (n,) extra benefit of a plan holding both diet and pt


@dataclass(frozen=True)
class Outcomes:
    """True outcomes of plans: shape (n,) when paired, (n, m) for n patients × m plans."""

    mean_change: np.ndarray  # μ: mean of peg − peg_12wk before clipping to 0–10
    expected_improvement: np.ndarray  # E[peg − peg_12wk] including the clipping
    p_adverse_event: np.ndarray


def _individual_benefit(cohort: Cohort, config: SimulatorConfig) -> np.ndarray:
    """(n, 12) each patient's own effect: §3.3 mean by condition + heterogeneity via r_c."""
    t = config.tables
    base = t.benefit[cohort.condition]
    # §3.3 / §4 "Radicular back pain" E: low back pain with a neuropathic component uses the
    # LBP-radicular column.
    radicular = (cohort.condition == _COND["low_back"]) & cohort.neuropathic
    base = np.where(radicular[:, None], t.benefit_radicular[None, :], base)
    # §3.3: individual heterogeneity SD ≈ 1.5–2 × |mean|; zero-mean effects stay zero (Enke 2018).
    return base + config.responsiveness.heterogeneity_ratio * np.abs(base) * cohort.responsiveness


def _ae_conditions(cohort: Cohort, config: SimulatorConfig) -> dict[str, np.ndarray]:
    conditions = {
        "age65": cohort.age >= 65,
        "egfr_lt30": cohort.egfr < 30,
        "egfr_lt60": cohort.egfr < 60,
    }
    conditions.update({name: cohort.flags[:, j] for j, name in enumerate(RISK_FLAGS)})
    return conditions


def _component_ae_probability(cohort: Cohort, config: SimulatorConfig) -> np.ndarray:
    """(n, 12) §5.1 base rates × risk multipliers × latent susceptibility × prior intolerance."""
    t, ae = config.tables, config.adverse_events
    conditions = _ae_conditions(cohort, config)
    log_factor = np.zeros((len(cohort), len(COMPONENT_CODES)))
    for when, mask, log_f in t.ae_rules:
        log_factor += conditions[when][:, None] * (mask * log_f)[None, :]
    sd = config.responsiveness.ae_susceptibility_sd
    log_factor += sd * cohort.ae_susceptibility - sd**2 / 2  # mean-one log-normal multiplier
    log_factor += (cohort.prior == _INTOLERANT) * math.log(ae.prior_intolerant_factor)
    return np.minimum(t.ae_base * np.exp(log_factor), ae.component_cap)


def _usual_care(cohort: Cohort, config: SimulatorConfig) -> np.ndarray:
    """Mean 12-week improvement without active treatment (§2.5, §4 prognostic terms)."""
    nh = config.natural_history
    return (
        nh.usual_care_intercept
        + nh.regression_to_mean * (cohort.peg - nh.reference_peg)
        + nh.pcs_high * (cohort.pcs >= nh.pcs_threshold)
        + nh.depression * (cohort.phq9 >= 10)
        + nh.insomnia * (cohort.isi >= nh.insomnia_threshold)
        + nh.smoker * cohort.smoker
        + nh.expectation * cohort.expectation
    )


def component_terms(cohort: Cohort, config: SimulatorConfig) -> ComponentTerms:
    """Apply the §4 modifiers that act on single components."""
    m, t = config.modifiers, config.tables
    # §4 "Baseline pain severity" E: absolute response scales with baseline.
    severity = np.clip(
        cohort.peg / m.severity_reference_peg, m.severity_scale_min, m.severity_scale_max
    )
    benefit = _individual_benefit(cohort, config) * severity[:, None]
    # §4 prior non-response within a drug class P/A: ×0.5.
    benefit = benefit * np.where(
        (cohort.prior == _NO_RESPONSE) & t.is_drug, m.prior_no_response_factor, 1.0
    )
    synergy = np.zeros(len(cohort))
    if config.assumed_modifiers:
        a = m.assumed
        benefit = benefit * np.where(cohort.prior == _RESPONDED, a["prior_responded_factor"], 1.0)
        # PHQ-9 bands above mild: 10–14 → 1, 15–19 → 2, ≥ 20 → 3 (§1.1).
        band = np.clip((cohort.phq9 - 5) // 5, 0, 3)
        benefit[:, [_CBT, _MBSR]] += a["psych_benefit_per_phq9_band"] * band[:, None]
        obese_oa = (cohort.condition == _COND["osteoarthritis"]) & (
            cohort.bmi >= a["oa_obesity_bmi"]
        )
        synergy = a["oa_obesity_diet_pt_synergy"] * obese_oa
    adherence = 1 - config.adherence.depression * (cohort.phq9 >= 10)
    return ComponentTerms(
        benefit=benefit,
        ae_probability=_component_ae_probability(cohort, config),
        usual_care=_usual_care(cohort, config),
        adherence=adherence,
        synergy=synergy,
    )


def _clipped_normal_mean(mean: np.ndarray, sd: float, lo: float, hi: float) -> np.ndarray:
    """E[clip(X, lo, hi)] for X ~ N(mean, sd²), in closed form."""
    a, b = (lo - mean) / sd, (hi - mean) / sd
    cdf_a, cdf_b = ndtr(a), ndtr(b)
    pdf_a, pdf_b = np.exp(-a * a / 2), np.exp(-b * b / 2)
    return (
        lo * cdf_a
        + hi * (1 - cdf_b)
        + mean * (cdf_b - cdf_a)
        + sd * (pdf_a - pdf_b) / math.sqrt(2 * math.pi)
    )


def true_outcomes(
    cohort: Cohort,
    plans: np.ndarray,
    *,
    config: SimulatorConfig,
    paired: bool = False,
    terms: ComponentTerms | None = None,
) -> Outcomes:
    """True expected improvement and AE probability of plans for patients.

    Parameters
    ----------
    cohort : the patients (with their hidden state).
    plans : (m, 12) 0/1 component matrix, columns in ``COMPONENT_CODES`` order. A row of zeros
        is usual care with no active component (not a catalog plan; used as the reference).
    paired : if True, ``m == len(cohort)`` and row i of ``plans`` is patient i's plan; results
        have shape (n,). Otherwise every patient × every plan; results have shape (n, m).
    """
    plans = np.atleast_2d(np.asarray(plans, dtype=float))
    if paired and len(plans) != len(cohort):
        raise ValueError(
            f"paired=True needs one plan per patient, got {len(plans)} plans for "
            f"{len(cohort)} patients"
        )
    terms = component_terms(cohort, config) if terms is None else terms
    adh, comb = config.adherence, config.combination
    size = plans.sum(axis=1)
    # §3.3 combination rule (A): sub-additive.
    combination = np.where(
        size >= 3, comb.factor_three_plus, np.where(size == 2, comb.factor_two, 1.0)
    )
    diet_and_pt = plans[:, _DIET] * plans[:, _PT]
    interaction = _plan_interaction(plans, config)

    # Paired: patient i with plan i, shape (n,). Otherwise patients × plans, shape (n, m).
    patient: Callable[[np.ndarray], np.ndarray] = _identity if paired else _as_column
    plan: Callable[[np.ndarray], np.ndarray] = _identity if paired else _as_row

    def total(per_component: np.ndarray) -> np.ndarray:
        """Sum a per-component (n, 12) quantity over each plan's components."""
        return np.einsum("ic,ic->i", per_component, plans) if paired else per_component @ plans.T

    # Adherence (A; §4 Cherkin 2016 attendance) falls with each extra component.
    adherence = np.maximum(
        patient(terms.adherence) - adh.per_extra_component * plan(np.maximum(size - 1, 0)),
        adh.minimum,
    )
    effect = (
        (total(terms.benefit) + patient(terms.synergy) * plan(diet_and_pt))
        * plan(combination)
        * adherence
    )
    mean_change = patient(terms.usual_care) + effect
    peg = patient(cohort.peg)
    sd = config.natural_history.noise_sd
    expected = peg - _clipped_normal_mean(peg - mean_change, sd, PEG_MIN, PEG_MAX)
    p_ae = _plan_ae(total(np.log1p(-terms.ae_probability)), plan(interaction), config)
    return Outcomes(mean_change=mean_change, expected_improvement=expected, p_adverse_event=p_ae)


def _plan_interaction(plans: np.ndarray, config: SimulatorConfig) -> np.ndarray:
    """(m,) §5.3 class–class interaction factor of each plan's adverse-event risk."""
    pairs = config.tables.interaction_pairs
    return np.exp((plans[:, pairs[:, 0]] * plans[:, pairs[:, 1]]) @ config.tables.interaction_log)


def _plan_ae(log_no_ae: np.ndarray, interaction: np.ndarray, config: SimulatorConfig) -> np.ndarray:
    """Plan AE probability: independent component AEs, 1 − Π(1 − p_c), times the §5.3
    class–class interaction factor, capped."""
    return np.minimum(-np.expm1(log_no_ae) * interaction, config.adverse_events.plan_cap)


def _identity(v: np.ndarray) -> np.ndarray:
    return v


def _as_column(v: np.ndarray) -> np.ndarray:
    return np.asarray(v)[:, None]


def _as_row(v: np.ndarray) -> np.ndarray:
    return np.asarray(v)[None, :]


# ============================================================================================
# The clinicians: safety floor knowledge and the confounded logging policy
# ============================================================================================


def _floor_exclusions(egfr: np.ndarray, flags: np.ndarray, intolerant: np.ndarray) -> np.ndarray:
    """CONTRACT §5 safety floor: (n, 12) components excluded (missing eGFR does not exclude)."""

    def f(name: str) -> np.ndarray:
        return flags[:, _FLAG[name]]

    excluded = np.array(intolerant, dtype=bool, copy=True)
    with np.errstate(invalid="ignore"):
        low_egfr = np.asarray(egfr, dtype=float) < 30
    excluded[:, _NSAID] |= low_egfr | f("gi_bleed_history") | f("heart_failure") | f("pregnant")
    excluded[:, _SNRI] |= f("maoi")
    excluded[:, _TCA] |= f("maoi") | f("cardiac_conduction_disease") | f("suicidal_ideation")
    excluded[:, _OPIOID] |= f("opioid_use_disorder") | f("benzodiazepine") | f("maoi")
    return excluded


def _bool_column(patients: pd.DataFrame, name: str) -> np.ndarray:
    if name not in patients:
        return np.zeros(len(patients), dtype=bool)  # CONTRACT §2: absent flag = false
    return pd.array(patients[name], dtype="boolean").fillna(False).to_numpy(dtype=bool)


def safety_floor_exclusions(patients: pd.DataFrame) -> np.ndarray:
    """(n, 12) bool: components the CONTRACT §5 floor excludes for each patient.

    ``patients`` is a typed patient or episode frame (as written by this module or returned by
    :func:`features.validate.validate`). This is the logging clinicians' knowledge of the floor;
    the product's own, stricter safety rules live elsewhere.
    """
    n = len(patients)
    egfr = (
        pd.to_numeric(patients["egfr"], errors="coerce").to_numpy(dtype=float)
        if "egfr" in patients
        else np.full(n, np.nan)
    )
    flags = np.column_stack([_bool_column(patients, name) for name in RISK_FLAGS])
    intolerant = np.column_stack(
        [
            (patients[col].astype(object).to_numpy() == "intolerant")
            if col in patients
            else np.zeros(n, bool)
            for col in PRIOR_COLUMNS
        ]
    )
    return _floor_exclusions(egfr, flags, intolerant)


def floor_allowed_plans(excluded: np.ndarray, config: SimulatorConfig) -> np.ndarray:
    """(n, 839) bool: plans with no floor-excluded component."""
    return (excluded.astype(float) @ config.tables.plans.T) == 0


def _severity(cohort: Cohort, config: SimulatorConfig) -> np.ndarray:
    """Clinician-visible severity: weighted z-scores of baseline PEG, pain and PHQ-9."""
    w, ref = config.policy.severity_weights, config.policy.severity_reference
    values = {"peg": cohort.peg, "pain": cohort.pain, "phq9": cohort.phq9}
    return sum(w[k] * (values[k] - ref[k][0]) / ref[k][1] for k in w)


def _policy_conditions(cohort: Cohort, config: SimulatorConfig) -> dict[str, np.ndarray]:
    """What a clinician can read in the record (missing values count as 'not present')."""
    with np.errstate(invalid="ignore"):
        conditions = {
            "age65": cohort.age >= 65,
            "depression": cohort.phq9 >= 10,
            "insomnia": cohort.observed("isi") >= config.natural_history.insomnia_threshold,
            "oa_obese": (cohort.condition == _COND["osteoarthritis"])
            & (cohort.observed("bmi") >= config.policy.obesity_bmi),
            "smoker": cohort.observed("smoker") == 1,
        }
    conditions.update({name: cohort.flags[:, j] for j, name in enumerate(RISK_FLAGS)})
    return conditions


def policy_scores(cohort: Cohort, config: SimulatorConfig) -> np.ndarray:
    """(n, 839) clinicians' utilities of every plan (softmax logits), from observed data only.

    utility(plan) = Σ over its components of (habit by condition + chart history + severity ×
    slope + soft rules) + size preference + severity × size slope; computed as one matrix product.
    """
    t, pol = config.tables, config.policy
    severity = pol.confounding * _severity(cohort, config)
    utility = (
        t.habit[cohort.condition]
        + t.prior_utility[cohort.prior]
        + severity[:, None] * t.severity_slope
    )
    conditions = _policy_conditions(cohort, config)
    for when, mask, u in t.soft_rules:
        utility += conditions[when][:, None] * (mask * u)[None, :]
    size = t.plan_size.astype(int)
    patient_side = np.column_stack([utility, severity, np.ones(len(cohort))])
    plan_side = np.vstack(
        [t.plans.T, pol.severity_size_slope * (size - 1), t.size_preference[size]]
    )
    return patient_side @ plan_side


def logging_policy(cohort: Cohort, config: SimulatorConfig) -> np.ndarray:
    """(n, 839) probability that the clinician picks each plan; rows sum to 1.

    For a patient the CONTRACT §5 floor constrains (some plan is excluded), the clinician keeps
    to the allowed plans with probability 1 − v and picks among the floor-breaking plans with
    probability v (``floor_violation_rate``, the real-world violation rate), each time by a
    softmax of the same utilities. Unconstrained patients choose among all plans. Every plan
    thus has a positive probability when v > 0: overlap is imperfect but never zero.
    """
    scores = policy_scores(cohort, config)
    allowed = floor_allowed_plans(cohort.floor_exclusions(), config)
    weight = np.exp(scores - scores.max(axis=1, keepdims=True))  # one exp for both branches
    in_sum = np.einsum("ij,ij->i", weight, allowed)
    out_sum = np.einsum("ij,ij->i", weight, ~allowed)
    v = config.policy.floor_violation_rate
    # Share of the floor-breaking branch: v when both branches exist, 0 if nothing is excluded,
    # 1 if nothing is allowed.
    share = np.where(out_sum > 0, np.where(in_sum > 0, v, 1.0), 0.0)
    scale_in = (1 - share) / np.where(in_sum > 0, in_sum, 1.0)
    scale_out = share / np.where(out_sum > 0, out_sum, 1.0)
    return weight * np.where(allowed, scale_in[:, None], scale_out[:, None])


# ============================================================================================
# Episodes
# ============================================================================================


@dataclass(frozen=True)
class _Streams:
    cohort: np.random.Generator
    policy: np.random.Generator
    outcome: np.random.Generator
    follow_up: np.random.Generator
    truth: np.random.Generator
    posterior: np.random.Generator  # hidden-state draws for the truth's posterior average


def _streams(seed: int) -> _Streams:
    """Independent named streams from one seed; episodes and truth never share patients."""
    # Child i of a SeedSequence depends only on i, so adding a stream keeps the others.
    children = np.random.SeedSequence(_check_seed(seed)).spawn(6)
    return _Streams(*(np.random.default_rng(s) for s in children))


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(
            f"--seed must be a non-negative whole number, got {seed!r}; e.g. --seed 7"
        )
    return int(seed)


def _check_count(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"{what} must be a positive whole number, got {n!r}")
    return int(n)


@dataclass(frozen=True)
class EpisodeSimulation:
    """Logged episodes plus the ground truth behind each row (same row order as ``frame``)."""

    frame: pd.DataFrame  # contract episodes (CONTRACT §3) incl. propensity
    cohort: Cohort  # each row's patient at episode start, with hidden state
    plan_index: np.ndarray  # index into features.catalog.PLANS
    outcomes: Outcomes  # truth for the logged plan of each row
    config: SimulatorConfig


def _sample_plans(
    cohort: Cohort, uniform: np.ndarray, config: SimulatorConfig, bar: tqdm
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-CDF draw from the logging policy, chunked over patients to bound memory."""
    n, chunk = len(cohort), config.runtime.chunk_rows
    plan_index = np.empty(n, dtype=np.int64)
    propensity = np.empty(n)
    with _single_threaded_blas():
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            pi = logging_policy(cohort.take(rows), config)
            cdf = np.cumsum(pi, axis=1)
            # uniform ∈ (0, 1], so the draw never lands on a zero-probability plan.
            target = uniform[rows] * cdf[:, -1]
            chosen = np.minimum((cdf < target[:, None]).sum(axis=1), N_PLANS - 1)
            plan_index[rows] = chosen
            propensity[rows] = pi[np.arange(len(chosen)), chosen]
            bar.update(len(chosen))
    return plan_index, propensity


def _single_threaded_blas() -> threadpool_limits:
    """Scoped BLAS thread limit for the thin (rows × 14)·(14 × 839) products of the policy.

    Waking OpenBLAS threads costs more than such a product: measured 32 ms vs 0.7 ms per
    512-row chunk on 2 vCPUs. The limit is restored on exit.
    """
    return threadpool_limits(limits=1, user_api="blas")


def _realise(
    cohort: Cohort, plan_index: np.ndarray, rng: np.random.Generator, config: SimulatorConfig
) -> tuple[Outcomes, np.ndarray, np.ndarray]:
    """Draw peg_12wk = clip(peg − μ + ε, 0, 10) and adverse_event ~ Bernoulli(p)."""
    outcomes = true_outcomes(cohort, config.tables.plans[plan_index], config=config, paired=True)
    noise = config.natural_history.noise_sd * rng.standard_normal(len(cohort))
    peg_12wk = np.clip(cohort.peg - outcomes.mean_change + noise, PEG_MIN, PEG_MAX)
    adverse_event = rng.random(len(cohort)) < outcomes.p_adverse_event
    return outcomes, peg_12wk, adverse_event


def _follow_up(
    previous: Cohort,
    plan_index: np.ndarray,
    peg_12wk: np.ndarray,
    adverse_event: np.ndarray,
    days: np.ndarray,
    rng: np.random.Generator,
    config: SimulatorConfig,
) -> Cohort:
    """The same patients at a later episode: baseline = last peg_12wk, history updated."""
    rep = config.repeat_episodes
    plans = config.tables.plans[plan_index].astype(bool)
    # CONTRACT §3 responder (≤ 70 % of baseline) → responded; ≥ 10 % better (§1.2) → partial.
    outcome = np.where(
        peg_12wk <= rep.responder_fraction * previous.peg,
        _RESPONDED,
        np.where(peg_12wk <= rep.partial_fraction * previous.peg, _PARTIAL, _NO_RESPONSE),
    )
    prior = np.where(plans, outcome[:, None], previous.prior).astype(np.int8)
    # A treatment-limiting AE is blamed on one component of the plan, in proportion to its risk.
    weights = _component_ae_probability(previous, config) * plans
    cdf = np.cumsum(weights, axis=1)
    target = rng.random(len(previous)) * cdf[:, -1]
    blamed = np.minimum((cdf < target[:, None]).sum(axis=1), len(COMPONENT_CODES) - 1)
    rows = np.flatnonzero(adverse_event)
    prior[rows, blamed[rows]] = _INTOLERANT
    years = days / 365.25
    birthday = rng.random(len(previous)) < (years - np.floor(years))
    pain = np.clip(
        np.round(previous.pain + rep.pain_tracks_peg * (peg_12wk - previous.peg), 1),
        *_contract_range("pain_intensity"),
    )
    return replace(
        previous,
        peg=peg_12wk,
        pain=pain,
        prior=prior,
        age=np.minimum(
            previous.age + np.floor(years).astype(np.int64) + birthday, _contract_range("age")[1]
        ),
        duration=np.minimum(
            np.round(previous.duration + days / _DAYS_PER_MONTH, 1), config.cohort.duration_max
        ),
    )


def _start_dates(rng: np.random.Generator, n: int, config: SimulatorConfig) -> np.ndarray:
    first = np.datetime64(config.dates.first_start, "D")
    span = (np.datetime64(config.dates.last_start, "D") - first).astype(int)
    return first + rng.integers(0, span + 1, size=n).astype("timedelta64[D]")


@dataclass(frozen=True)
class _Logged:
    """One batch of logged episodes with everything the frame and the truth need."""

    cohort: Cohort
    plan_index: np.ndarray
    propensity: np.ndarray
    outcomes: Outcomes
    peg_12wk: np.ndarray
    adverse_event: np.ndarray
    start: np.ndarray  # datetime64[D]


def _log_episodes(
    cohort: Cohort, start: np.ndarray, streams: _Streams, config: SimulatorConfig, bar: tqdm
) -> _Logged:
    """The clinician picks a plan for each patient; the outcome happens."""
    plan_index, propensity = _sample_plans(
        cohort, 1 - streams.policy.random(len(cohort)), config, bar
    )
    outcomes, peg_12wk, adverse_event = _realise(cohort, plan_index, streams.outcome, config)
    return _Logged(cohort, plan_index, propensity, outcomes, peg_12wk, adverse_event, start)


def simulate_episode_cohort(
    n: int, *, seed: int, config: SimulatorConfig | None = None, progress: bool | None = None
) -> EpisodeSimulation:
    """Simulate ``n`` logged episodes and keep the truth behind each one.

    About ``second_episode_fraction`` of patients get a second, later episode, so ``n``
    episodes come from ``ceil(n / (1 + fraction))`` patients. Rows are ordered by patient, then
    start date; ``episode_id`` follows that order.
    """
    n = _check_count(n, "the number of episodes (--n)")
    config = SimulatorConfig.from_yaml() if config is None else config
    streams = _streams(seed)
    rep = config.repeat_episodes
    n_first = min(n, math.ceil(n / (1 + rep.second_episode_fraction)))
    n_second = n - n_first
    show = n >= config.runtime.progress_min_rows if progress is None else progress
    log.info("simulating %d episodes from %d patients (seed %d)", n, n_first, seed)

    patients = draw_cohort(n_first, rng=streams.cohort, config=config, id_prefix="P")
    with tqdm(total=n, desc="simulate", unit="episode", file=sys.stderr, disable=not show) as bar:
        batches = [
            _log_episodes(
                patients, _start_dates(streams.cohort, n_first, config), streams, config, bar
            )
        ]
        if n_second:
            first = batches[0]
            who = np.sort(streams.follow_up.choice(n_first, size=n_second, replace=False))
            days = rep.episode_days + streams.follow_up.integers(
                rep.gap_days_min, rep.gap_days_max + 1, size=n_second
            )
            again = _follow_up(
                patients.take(who),
                first.plan_index[who],
                first.peg_12wk[who],
                first.adverse_event[who],
                days,
                streams.follow_up,
                config,
            )
            batches.append(
                _log_episodes(
                    again, first.start[who] + days.astype("timedelta64[D]"), streams, config, bar
                )
            )
    logged = _concat(batches)
    logged = _take(logged, np.lexsort((logged.start, logged.cohort.patient_id)))

    frame = logged.cohort.frame()
    width = max(7, len(str(n)))
    frame["episode_id"] = np.char.add(
        "E", np.char.zfill(np.arange(1, n + 1).astype(str), width)
    ).astype(object)
    frame["plan"] = _PLAN_ARRAY[logged.plan_index]
    frame["peg_12wk"] = logged.peg_12wk
    frame["adverse_event"] = logged.adverse_event
    frame["start_date"] = np.datetime_as_string(logged.start, unit="D").astype(object)
    frame["propensity"] = logged.propensity
    return EpisodeSimulation(
        frame=frame[[c.name for c in EPISODE_COLUMNS]],
        cohort=logged.cohort,
        plan_index=logged.plan_index,
        outcomes=logged.outcomes,
        config=config,
    )


def simulate_episodes(
    n: int,
    *,
    seed: int,
    config: SimulatorConfig | None = None,
    propensity: bool = True,
    progress: bool | None = None,
) -> pd.DataFrame:
    """``n`` contract-valid episodes (CONTRACT §3), with ``propensity`` unless switched off."""
    frame = simulate_episode_cohort(n, seed=seed, config=config, progress=progress).frame
    return frame if propensity else frame.drop(columns=["propensity"])


# ============================================================================================
# Truth
# ============================================================================================


def truth_cohort(n_patients: int, *, seed: int, config: SimulatorConfig | None = None) -> Cohort:
    """The truth's patients: drawn from their own stream, so never the episode patients."""
    n_patients = _check_count(n_patients, "the number of truth patients (--truth-n)")
    config = SimulatorConfig.from_yaml() if config is None else config
    return draw_cohort(n_patients, rng=_streams(seed).truth, config=config, id_prefix="T")


def _history_log_likelihood(draws: Cohort, observed_prior: np.ndarray, config: SimulatorConfig) -> np.ndarray:
    """log P(observed prior_<c> history | hidden state) for each row of ``draws``.

    Mirrors :func:`_draw_prior_history`: whether a component was tried does not depend on the
    hidden state; a tried component was recorded intolerant with its AE-driven probability,
    otherwise by thresholding the patient's own benefit plus N(0, outcome_noise_sd²) noise.
    """
    h = config.prior_history
    mu = _individual_benefit(draws, config)
    sd = h.outcome_noise_sd
    fresh = replace(draws, prior=np.zeros_like(observed_prior))  # history is drawn before it exists
    p_int = np.clip(_component_ae_probability(fresh, config) * h.intolerance_scale, 1e-12, 1 - 1e-12)
    above_r = ndtr((mu - h.responded_threshold) / sd)
    above_p = ndtr((mu - h.partial_threshold) / sd)
    tolerated = np.log1p(-p_int)
    ll = np.zeros_like(mu)
    ll = np.where(observed_prior == _INTOLERANT, np.log(p_int), ll)
    ll = np.where(observed_prior == _RESPONDED, tolerated + np.log(np.maximum(above_r, 1e-300)), ll)
    ll = np.where(observed_prior == _PARTIAL,
                  tolerated + np.log(np.maximum(above_p - above_r, 1e-300)), ll)
    ll = np.where(observed_prior == _NO_RESPONSE,
                  tolerated + np.log(np.maximum(1 - above_p, 1e-300)), ll)
    return ll.sum(axis=1)


_MOMENT_DRAWS_FACTOR = 16  # moment draws per AE draw: moments are cheap, AE averages are not


def _posterior_outcomes(part: Cohort, rng: np.random.Generator, config: SimulatorConfig) -> Outcomes:
    """Expected outcomes of every plan given what the extract shows, not the hidden state.

    "Expected improvement" for a patient profile is E[Y | observed profile, plan]. The hidden
    responsiveness, placebo factor and AE susceptibility are averaged out under their posterior
    given the recorded prior-response history (self-normalised importance sampling over
    ``posterior_draws`` draws from their prior), so the truth is what a perfect model of the
    observable world could know — an oracle cannot win by knowing a hidden state.

    Variance reduction: the mean change μ is linear in (r, placebo factor), so its posterior
    mean is μ at the posterior mean, and its posterior variance vᵀΣv (v = ∂μ/∂hidden) widens
    the clipped-normal outcome instead of being sampled. Only the adverse-event probability,
    non-linear in the susceptibility, is averaged over the draws.
    """
    # Many cheap draws for the posterior moments (likelihood of a 12-item history only); the
    # first ``posterior_draws`` of them also average the adverse-event risk over all plans.
    m_ae = config.truth.posterior_draws
    m = m_ae * _MOMENT_DRAWS_FACTOR
    n = len(part)
    reps = part.take(np.repeat(np.arange(n), m))
    hidden = _draw_hidden_state(n * m, rng, config)
    draws = replace(reps, **hidden)
    ll = _history_log_likelihood(draws, reps.prior, config).reshape(n, m)
    w = np.exp(ll - ll.max(axis=1, keepdims=True))

    plans = config.tables.plans
    # Adverse events: average over the susceptibility draws.
    first = (np.arange(n)[:, None] * m + np.arange(m_ae)[None, :]).ravel()
    w_ae = w[:, :m_ae] / w[:, :m_ae].sum(axis=1, keepdims=True)
    log_no_ae = np.log1p(-_component_ae_probability(draws.take(first), config)) @ plans.T
    p_draws = _plan_ae(log_no_ae, _plan_interaction(plans, config)[None, :], config)
    p_ae = np.einsum("nm,nmp->np", w_ae, p_draws.reshape(n, m_ae, -1))
    w /= w.sum(axis=1, keepdims=True)

    # Improvement: posterior moments of h = (r_1..r_12, placebo factor).
    h = np.concatenate([hidden["responsiveness"], hidden["expectation"][:, None]], axis=1)
    h = h.reshape(n, m, -1)
    mean_h = np.einsum("nm,nmk->nk", w, h)
    centred = h - mean_h[:, None, :]
    cov_h = np.einsum("nm,nmk,nml->nkl", w, centred, centred)
    at_mean = replace(part, responsiveness=mean_h[:, :-1], expectation=mean_h[:, -1])
    mu = true_outcomes(at_mean, plans, config=config).mean_change
    grad = np.empty(mu.shape + (mean_h.shape[1],))
    for k in range(mean_h.shape[1]):
        bumped = mean_h.copy()
        bumped[:, k] += 1.0
        shifted = replace(part, responsiveness=bumped[:, :-1], expectation=bumped[:, -1])
        grad[:, :, k] = true_outcomes(shifted, plans, config=config).mean_change - mu
    var = np.einsum("npk,nkl,npl->np", grad, cov_h, grad)
    sd = np.sqrt(config.natural_history.noise_sd**2 + np.maximum(var, 0.0))
    peg = part.peg[:, None]
    ei = peg - _clipped_normal_mean(peg - mu, sd, PEG_MIN, PEG_MAX)
    return Outcomes(mean_change=mu, expected_improvement=ei, p_adverse_event=p_ae)


def truth_table(
    cohort: Cohort,
    *,
    config: SimulatorConfig,
    progress: bool | None = None,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """Long table: every patient × all 839 plans with the true EI, p_AE, utility and floor flag.

    The truth is the expectation given the observable profile (see :func:`_posterior_outcomes`);
    ``rng`` drives the posterior draws (seeded by :func:`simulate_truth`).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    n = len(cohort)
    chunk = max(1, config.runtime.chunk_rows // config.truth.posterior_draws)
    ei = np.empty((n, N_PLANS))
    p_ae = np.empty((n, N_PLANS))
    allowed = np.empty((n, N_PLANS), dtype=bool)
    show = n >= config.runtime.progress_min_truth_patients if progress is None else progress
    with (
        tqdm(total=n, desc="truth", unit="patient", file=sys.stderr, disable=not show) as bar,
        _single_threaded_blas(),
    ):
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            part = cohort.take(rows)
            out = _posterior_outcomes(part, rng, config)
            ei[rows], p_ae[rows] = out.expected_improvement, out.p_adverse_event
            allowed[rows] = floor_allowed_plans(part.floor_exclusions(), config)
            bar.update(len(part))
    ei_flat, p_flat = ei.ravel(), p_ae.ravel()
    return pd.DataFrame(
        {
            "patient_id": np.repeat(cohort.patient_id.astype(object), N_PLANS),
            "plan": pd.Categorical.from_codes(
                np.tile(np.arange(N_PLANS), n), categories=list(PLANS)
            ),
            "expected_improvement": ei_flat,
            "p_adverse_event": p_flat,
            "utility": ei_flat - config.truth.lambda_ae * p_flat,  # CONTRACT §4
            "floor_allowed": allowed.ravel(),
        },
        columns=list(TRUTH_COLUMNS),
    )


def simulate_truth(
    n_patients: int,
    *,
    seed: int,
    config: SimulatorConfig | None = None,
    progress: bool | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(patients, truth): contract patient profiles and their long-format truth over all plans."""
    config = SimulatorConfig.from_yaml() if config is None else config
    cohort = truth_cohort(n_patients, seed=seed, config=config)
    log.info("computing the truth for %d patients × %d plans", len(cohort), N_PLANS)
    table = truth_table(cohort, config=config, progress=progress, rng=_streams(seed).posterior)
    return cohort.frame(), table


# ============================================================================================
# Run (what the CLI calls) and the CLI options
# ============================================================================================


def truth_patients_path(truth: Path) -> Path:
    """``<truth stem>_patients<suffix>`` next to the truth file."""
    return truth.with_name(f"{truth.stem}_patients{truth.suffix}")


@dataclass(frozen=True)
class SimulateRunConfig:
    """Everything ``painplan simulate`` does, as one frozen value (checked on construction)."""

    n: int
    seed: int
    out: Path
    truth: Path | None = None
    truth_n: int = 2000
    propensity: bool = True
    simulator: SimulatorConfig | None = None  # None = the packaged simulator.yaml
    progress: bool | None = None  # None = only for large runs

    def __post_init__(self) -> None:
        _check_count(self.n, "--n (number of episodes)")
        _check_count(self.truth_n, "--truth-n (number of truth patients)")
        _check_seed(self.seed)
        object.__setattr__(self, "out", Path(self.out))
        if self.truth is not None:
            object.__setattr__(self, "truth", Path(self.truth))
        for option, path in (("--out", self.out), ("--truth", self.truth)):
            if path is not None and path.suffix.lower() not in SUFFIXES:
                raise ConfigError(
                    f"{option} {path}: unsupported file type {path.suffix or '(none)'!r}; "
                    "painplan writes .csv or .parquet files, chosen by the extension"
                )
        if self.truth is not None and self.out.resolve() in {
            self.truth.resolve(),
            truth_patients_path(self.truth).resolve(),
        }:
            raise ConfigError(
                f"--out {self.out} would be overwritten by the truth files; give --truth a "
                "different name"
            )


@dataclass(frozen=True)
class SimulateResult:
    episodes_path: Path
    n_episodes: int
    n_patients: int
    truth_path: Path | None
    truth_patients_path: Path | None
    n_truth_patients: int
    seconds: float


def run(config: SimulateRunConfig) -> SimulateResult:
    """Simulate episodes (and optionally the truth) and write them; returns what was written."""
    started = time.perf_counter()
    sim = SimulatorConfig.from_yaml() if config.simulator is None else config.simulator
    episodes = simulate_episodes(
        config.n,
        seed=config.seed,
        config=sim,
        propensity=config.propensity,
        progress=config.progress,
    )
    write_table(episodes, config.out)
    log.info("wrote %d episodes to %s", len(episodes), config.out)
    truth_path = patients_path = None
    if config.truth is not None:
        patients, truth = simulate_truth(
            config.truth_n, seed=config.seed, config=sim, progress=config.progress
        )
        truth_path, patients_path = config.truth, truth_patients_path(config.truth)
        write_table(truth, truth_path)
        write_table(patients, patients_path)
        log.info(
            "wrote the truth (%d rows) to %s and its patients to %s",
            len(truth),
            truth_path,
            patients_path,
        )
    return SimulateResult(
        episodes_path=config.out,
        n_episodes=len(episodes),
        n_patients=int(episodes["patient_id"].nunique()),
        truth_path=truth_path,
        truth_patients_path=patients_path,
        n_truth_patients=config.truth_n if config.truth is not None else 0,
        seconds=time.perf_counter() - started,
    )


def add_cli_options(p: argparse.ArgumentParser) -> None:
    """Options of ``painplan simulate`` (called by training.cli)."""
    p.description = (
        "Write a synthetic, literature-calibrated cohort of chronic-pain treatment episodes "
        "(CONTRACT §3) chosen by a confounded clinician policy. Every parameter and its evidence "
        "is in training/configs/simulator.yaml. Same --seed, same file."
    )
    p.add_argument(
        "--n",
        type=int,
        required=True,
        metavar="N",
        help="number of episodes to write (positive); a share of patients (25%% by default) "
        "have a second, later episode, so N episodes come from about N/1.25 patients",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="random seed (non-negative); the same seed gives identical output (default: 0)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="episode file to write, .csv or .parquet by extension",
    )
    p.add_argument(
        "--truth",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write, for a separate set of patients, the true expected improvement, "
        "adverse-event probability, utility (EI − 2.0·p_AE) and floor_allowed of all "
        "839 plans (long format), plus the patients' profiles as "
        "<stem>_patients<suffix> next to it",
    )
    p.add_argument(
        "--truth-n",
        type=int,
        default=2000,
        metavar="N",
        help="number of truth patients (default: 2000)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="simulator YAML to use instead of the packaged training/configs/simulator.yaml",
    )
    p.add_argument(
        "--confounding",
        type=float,
        default=None,
        metavar="X",
        help="strength of the clinicians' severity-driven plan choice (0 = none; "
        "default from the config: 1.0)",
    )
    p.add_argument(
        "--floor-violation-rate",
        type=float,
        default=None,
        metavar="P",
        help="probability that the clinician picks a plan breaking the CONTRACT §5 safety floor "
        "for a patient the floor constrains (default from the config: 0.02)",
    )
    p.add_argument(
        "--no-assumed-modifiers",
        action="store_true",
        help="switch off the effect modifiers that are modelling assumptions (A) in "
        "clinical-evidence §4; the established (E/P) ones stay on",
    )
    p.add_argument(
        "--no-propensity",
        action="store_true",
        help="omit the propensity column (the logging policy's probability of the plan)",
    )
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    simulator = SimulatorConfig.from_yaml(args.config).with_overrides(
        confounding=args.confounding,
        floor_violation_rate=args.floor_violation_rate,
        assumed_modifiers=False if args.no_assumed_modifiers else None,
    )
    result = run(
        SimulateRunConfig(
            n=args.n,
            seed=args.seed,
            out=args.out,
            truth=args.truth,
            truth_n=args.truth_n,
            propensity=not args.no_propensity,
            simulator=simulator,
        )
    )
    lines = [
        f"wrote {result.n_episodes} episodes of {result.n_patients} patients to "
        f"{result.episodes_path} in {result.seconds:.1f} s"
    ]
    if result.truth_path is not None:
        lines.append(
            f"wrote the truth for {result.n_truth_patients} patients × {N_PLANS} plans to "
            f"{result.truth_path} and their profiles to {result.truth_patients_path}"
        )
    print("\n".join(lines))  # noqa: T201 — the CLI handler's summary for the user
    return 0
