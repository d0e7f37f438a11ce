"""Safety gate: CONTRACT §5 floor row by row, the adopted evidence rules, and the vectorised
matrices against slow per-patient references."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from features.catalog import (
    COMPONENT_CODES,
    COMPONENT_INDEX,
    N_PLANS,
    PLAN_INDEX,
    PLANS,
    plan_components,
    plan_matrix,
)
from features.errors import ContractError, PlanError
from features.schema import PAIN_CONDITIONS, PRIOR_LEVELS, RISK_FLAGS
from features.validate import validate
from recommender.safety import (
    ALWAYS,
    RULES,
    RULESET_VERSION,
    Cond,
    CountRule,
    PairRule,
    Rule,
    RuleTable,
    assess,
    check_table,
    floor_violations,
    ruleset_version,
    when,
)

# A patient no rule blocks or flags (eGFR known and normal, 45 y, neuropathic pain).
BASE = {
    "patient_id": "p-0",
    "age": 45,
    "sex": "female",
    "pain_condition": "neuropathic",
    "pain_duration_months": 12.0,
    "pain_intensity": 6.0,
    "peg": 6.0,
    "phq9": 5,
    "gad7": 4,
    "egfr": 90.0,
}


def frame(*overrides: dict) -> pd.DataFrame:
    rows = [{**BASE, "patient_id": f"p-{i}", **o} for i, o in enumerate(overrides or ({},))]
    return validate(pd.DataFrame(rows), "patients").frame


def one(**overrides):
    return assess(frame(overrides))


def warning_ids(a, plan: str, i: int = 0) -> dict[str, str]:
    return {w["rule_id"]: w["action"] for w in a.plan_warnings(i, plan)}


def excluded(a, i: int = 0) -> dict[str, list[dict]]:
    return {e["component"]: e["rules"] for e in a.exclusions(i) if "component" in e}


def random_patients(n: int, seed: int) -> pd.DataFrame:
    """A seeded, deliberately risky cohort: every flag, prior level and eGFR band occurs."""
    rng = np.random.default_rng(seed)
    egfr = rng.uniform(5, 130, n).round(1)
    egfr[rng.random(n) < 0.25] = np.nan
    raw = {
        "patient_id": [f"r-{i}" for i in range(n)],
        "age": rng.integers(18, 96, n),
        "sex": rng.choice(["female", "male", "other"], n),
        "pain_condition": rng.choice(PAIN_CONDITIONS, n),
        "pain_duration_months": rng.uniform(3, 200, n),
        "pain_intensity": rng.uniform(0, 10, n),
        "peg": rng.uniform(0, 10, n),
        "phq9": rng.integers(0, 28, n),
        "gad7": rng.integers(0, 22, n),
        "alcohol_units_week": np.where(rng.random(n) < 0.2, rng.uniform(0, 80, n), np.nan),
        "egfr": egfr,
    }
    for name in RISK_FLAGS:
        raw[name] = rng.random(n) < 0.12
    for code in COMPONENT_CODES:
        raw[f"prior_{code}"] = rng.choice(PRIOR_LEVELS, n, p=[0.55, 0.1, 0.1, 0.1, 0.15])
    return validate(pd.DataFrame(raw), "patients").frame


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return random_patients(160, seed=20261121)


# --------------------------------------------------------------------------- CONTRACT §5

FLOOR_CASES = [
    *(
        pytest.param(
            {f"prior_{c}": "intolerant"},
            c,
            f"FLOOR-INTOLERANT-{c.upper().replace('_', '-')}",
            id=f"intolerant-{c}",
        )
        for c in COMPONENT_CODES
    ),
    pytest.param({"egfr": 29.9}, "nsaid", "FLOOR-NSAID-EGFR", id="nsaid-egfr<30"),
    pytest.param({"egfr": 0.0}, "nsaid", "FLOOR-NSAID-EGFR", id="nsaid-egfr-0"),
    pytest.param({"gi_bleed_history": True}, "nsaid", "FLOOR-NSAID-GIBLEED", id="nsaid-gi"),
    pytest.param({"heart_failure": True}, "nsaid", "FLOOR-NSAID-HF", id="nsaid-hf"),
    pytest.param({"pregnant": True}, "nsaid", "FLOOR-NSAID-PREGNANT", id="nsaid-pregnant"),
    pytest.param({"maoi": True}, "snri", "FLOOR-SNRI-MAOI", id="snri-maoi"),
    pytest.param({"maoi": True}, "tca", "FLOOR-TCA-MAOI", id="tca-maoi"),
    pytest.param(
        {"cardiac_conduction_disease": True}, "tca", "FLOOR-TCA-CONDUCTION", id="tca-conduction"
    ),
    pytest.param({"suicidal_ideation": True}, "tca", "FLOOR-TCA-SUICIDAL", id="tca-suicidal"),
    pytest.param({"opioid_use_disorder": True}, "opioid", "FLOOR-OPI-OUD", id="opioid-oud"),
    pytest.param({"benzodiazepine": True}, "opioid", "FLOOR-OPI-BENZO", id="opioid-benzo"),
    pytest.param({"maoi": True}, "opioid", "FLOOR-OPI-MAOI", id="opioid-maoi"),
]


@pytest.mark.parametrize(("overrides", "component", "rule_id"), FLOOR_CASES)
def test_every_contract_floor_row_blocks_its_component(overrides, component, rule_id):
    a = one(**overrides)
    j = COMPONENT_INDEX[component]
    assert a.blocked[0, j]

    containing = plan_matrix()[:, j].astype(bool)
    allowed = a.allowed_plans()[0]
    assert not allowed[containing].any()
    assert allowed[~containing].any()

    rules = excluded(a)[component]
    hit = [r for r in rules if r["id"] == rule_id]
    assert len(hit) == 1
    assert hit[0]["action"] == "BLOCK" and hit[0]["floor"] is True
    assert "CONTRACT §5" in hit[0]["source"]
    assert len(hit[0]["reason"]) > 20

    # The independent guard agrees, for the single-component plan and a combination.
    f = frame(overrides)
    assert floor_violations(f, [component])[0]
    other = "cbt" if component != "cbt" else "pt"
    assert floor_violations(f, [f"{other} + {component}"])[0]


def test_floor_rules_in_the_table_are_exactly_the_contract_rows():
    floor_ids = {r.id for r in RULES.rules if r.floor}
    assert floor_ids == {p.values[2] for p in FLOOR_CASES}
    assert all(r.action == "BLOCK" for r in RULES.rules if r.floor)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"egfr": 30.0}, id="egfr-30-exactly"),
        pytest.param({"egfr": None}, id="egfr-missing"),
        *(pytest.param({f"prior_{c}": "partial"}, id=f"partial-{c}") for c in COMPONENT_CODES),
        pytest.param({f"prior_{c}": "no_response" for c in COMPONENT_CODES}, id="no-response-all"),
        pytest.param({}, id="base"),
    ],
)
def test_negative_controls_block_nothing(overrides):
    a = one(**overrides)
    assert not a.blocked.any()
    assert a.allowed_plans().all()
    every_component = pd.concat([frame(overrides)] * len(COMPONENT_CODES), ignore_index=True)
    assert not floor_violations(every_component, COMPONENT_CODES).any()


def test_egfr_30_is_not_blocked_but_warned_as_reduced():
    a = one(egfr=30.0)
    assert warning_ids(a, "nsaid") == {"NSAID-9": "WARN"}
    assert not floor_violations(frame({"egfr": 30.0}), ["nsaid"])[0]


def test_missing_egfr_is_warned_not_blocked():
    a = one(egfr=None)
    assert not a.blocked[0, COMPONENT_INDEX["nsaid"]]
    nsaid = {w["rule_id"]: w for w in a.plan_warnings(0, "nsaid")}
    assert nsaid["NSAID-EGFR-UNKNOWN"]["action"] == "WARN"
    assert nsaid["NSAID-EGFR-UNKNOWN"]["reason"].startswith("eGFR unknown: check renal function")
    assert "SNRI-EGFR-UNKNOWN" in warning_ids(a, "snri")
    assert "GABA-EGFR-UNKNOWN" in warning_ids(a, "gabapentinoid")
    assert "NSAID-EGFR-UNKNOWN" not in warning_ids(one(), "nsaid")


def test_floor_guard_agrees_with_the_table_on_a_random_cohort(cohort):
    a = assess(cohort)
    n = len(cohort)
    for code in COMPONENT_CODES:
        guard = floor_violations(cohort, [code] * n)
        # Everything the contract excludes is blocked by the table (never fewer).
        assert not (guard & ~a.blocked[:, COMPONENT_INDEX[code]]).any(), code
    i, p = np.nonzero(a.allowed_plans())
    assert i.size > 0
    assert not floor_violations(cohort.iloc[i].reset_index(drop=True), p).any()


# --------------------------------------------------------------------------- stricter BLOCKs


@pytest.mark.parametrize(
    ("overrides", "component", "rule_id"),
    [
        ({"anticoagulant": True}, "nsaid", "NSAID-4"),
        ({"egfr": 25.0}, "snri", "SNRI-2"),
        ({"liver_disease": True}, "snri", "SNRI-3"),
        ({"alcohol_units_week": 36.0}, "snri", "SNRI-3"),
        ({"age": 65}, "tca", "TCA-4"),
        ({"age": 88}, "muscle_relaxant", "SMR-1"),
        ({"age": 65}, "muscle_relaxant", "SMR-1"),
        ({"pain_condition": "fibromyalgia"}, "opioid", "OPI-1"),
        ({"pain_condition": "low_back"}, "gabapentinoid", "GABA-5"),
        ({"pain_condition": "low_back", "neuropathic_component": True}, "gabapentinoid", "GABA-5"),
    ],
)
def test_adopted_stricter_block(overrides, component, rule_id):
    a = one(**overrides)
    assert a.blocked[0, COMPONENT_INDEX[component]]
    rules = {r["id"]: r for r in excluded(a)[component]}
    assert rules[rule_id]["action"] == "BLOCK" and rules[rule_id]["floor"] is False
    assert "evidence §5.2" in rules[rule_id]["source"]
    assert not a.allowed_plans()[0, PLAN_INDEX[component]]


@pytest.mark.parametrize(
    ("overrides", "component"),
    [
        ({"alcohol_units_week": 35.0}, "snri"),
        ({"age": 64}, "tca"),
        ({"age": 64}, "muscle_relaxant"),
        ({"pain_condition": "neck"}, "gabapentinoid"),
        ({"pain_condition": "low_back"}, "opioid"),  # REVIEW in the US profile, not BLOCK
    ],
)
def test_stricter_block_boundaries(overrides, component):
    assert not one(**overrides).blocked[0, COMPONENT_INDEX[component]]


# --------------------------------------------------------------------------- REVIEW / WARN


@pytest.mark.parametrize(
    ("overrides", "plan", "rule_id", "action"),
    [
        ({"age": 70}, "nsaid", "NSAID-3", "REVIEW"),
        ({"serotonergic_drug": True}, "nsaid", "NSAID-3", "REVIEW"),
        ({"cardiovascular_disease": True}, "nsaid", "NSAID-6", "REVIEW"),
        ({"egfr": 45.0}, "nsaid", "NSAID-9", "WARN"),
        ({"serotonergic_drug": True}, "snri", "SNRI-5", "REVIEW"),
        ({"bipolar_disorder": True}, "snri", "SNRI-6", "REVIEW"),
        ({"age": 20}, "snri", "SNRI-7", "WARN"),
        ({"age": 24}, "tca", "SNRI-7", "WARN"),
        ({"suicidal_ideation": True}, "snri", "SNRI-8", "REVIEW"),
        ({"anticoagulant": True}, "snri", "SNRI-10", "WARN"),
        ({"serotonergic_drug": True}, "tca", "TCA-6", "REVIEW"),
        ({"bipolar_disorder": True}, "tca", "TCA-7", "REVIEW"),
        ({"benzodiazepine": True}, "gabapentinoid", "GABA-2", "WARN"),
        ({"sleep_apnea": True}, "gabapentinoid", "GABA-2", "WARN"),
        ({"egfr": 59.9}, "gabapentinoid", "GABA-3", "WARN"),
        ({"opioid_use_disorder": True}, "gabapentinoid", "GABA-4", "REVIEW"),
        ({"pain_condition": "fibromyalgia"}, "gabapentinoid", "GABA-5-FM", "WARN"),
        ({}, "muscle_relaxant", "SMR-2", "WARN"),
        ({"benzodiazepine": True}, "muscle_relaxant", "SMR-3", "REVIEW"),
        ({"opioid_use_disorder": True}, "muscle_relaxant", "SMR-4", "REVIEW"),
        ({"maoi": True}, "muscle_relaxant", "SMR-5", "REVIEW"),
        ({"pain_condition": "low_back"}, "opioid", "OPI-2", "REVIEW"),
        ({"phq9": 15}, "opioid", "OPI-6", "REVIEW"),
        ({"bipolar_disorder": True}, "opioid", "OPI-6", "REVIEW"),
        ({"sleep_apnea": True}, "opioid", "OPI-7", "REVIEW"),
        ({"serotonergic_drug": True}, "opioid", "OPI-9", "REVIEW"),
        ({"pregnant": True}, "opioid", "OPI-10", "REVIEW"),
        ({"pregnant": True}, "snri", "PREG-DRUG", "REVIEW"),
        ({"pregnant": True}, "muscle_relaxant", "PREG-DRUG", "REVIEW"),
        ({"pregnant": True}, "acupuncture", "ACU-2", "WARN"),
        ({"bleeding_disorder": True}, "acupuncture", "ACU-1", "REVIEW"),
        ({"anticoagulant": True}, "acupuncture", "ACU-1", "REVIEW"),
        ({"suicidal_ideation": True}, "cbt", "PSY-1", "REVIEW"),
        ({"suicidal_ideation": True}, "mbsr", "PSY-1", "REVIEW"),
        ({"anticoagulant": True}, "diet", "DIET-1", "WARN"),
        ({"heart_failure": True}, "yoga", "EX-1-HF", "WARN"),
    ],
)
def test_review_and_warn_rules_reach_the_plan(overrides, plan, rule_id, action):
    a = one(**overrides)
    p = PLAN_INDEX[plan]
    assert a.allowed_plans()[0, p]
    items = {w["rule_id"]: w for w in a.plan_warnings(0, plan)}
    assert items[rule_id]["action"] == action
    assert items[rule_id]["components"] == [plan]
    assert items[rule_id]["reason"] and items[rule_id]["source"]
    flags = a.plan_flags([p])
    assert flags.needs_review[0, 0] == any(w["action"] == "REVIEW" for w in items.values())
    assert flags.has_warning[0, 0] == any(w["action"] == "WARN" for w in items.values())
    # The rule is about this patient, not the plan: the base patient does not get it.
    if overrides:
        assert rule_id not in warning_ids(one(), plan)


def test_review_rule_thresholds():
    assert "OPI-6" not in warning_ids(one(phq9=14, gad7=14), "opioid")
    assert "OPI-6" in warning_ids(one(gad7=15), "opioid")
    assert "NSAID-3" not in warning_ids(one(age=64), "nsaid")
    assert "SNRI-7" not in warning_ids(one(age=25), "snri")
    assert "GABA-3" not in warning_ids(one(egfr=60.0), "gabapentinoid")


def test_dose_rule_is_a_warn_whose_reason_says_dose():
    (item,) = [w for w in one(egfr=40.0).plan_warnings(0, "gabapentinoid")]
    assert item["rule_id"] == "GABA-3" and item["action"] == "WARN"
    assert item["reason"].startswith("DOSE:")


def test_warnings_list_review_before_warn_and_name_the_components():
    a = one(pregnant=True, anticoagulant=True, egfr=None)
    items = a.plan_warnings(0, "acupuncture+snri")
    actions = [w["action"] for w in items]
    assert actions == sorted(actions, key=["REVIEW", "WARN"].index)
    by_id = {w["rule_id"]: w["components"] for w in items}
    assert by_id["ACU-1"] == ["acupuncture"] and by_id["PREG-DRUG"] == ["snri"]


# --------------------------------------------------------------------------- pairs, counts


@pytest.mark.parametrize("pair", RULES.pair_rules, ids=lambda r: r.id)
def test_pair_rule_applies_to_the_combination_only(pair):
    a = one()
    combo = "+".join(sorted(pair.components))
    assert warning_ids(a, combo)[pair.id] == pair.action
    assert warning_ids(a, f"cbt+pt+{combo}")[pair.id] == pair.action
    for single in pair.components:
        assert pair.id not in warning_ids(a, single)
    flags = a.plan_flags([PLAN_INDEX[combo]])
    if pair.action == "REVIEW":
        assert flags.needs_review[0, 0]
    else:
        assert flags.has_warning[0, 0]


def test_pair_rules_cover_the_matrix_and_skip_forbidden_plans():
    pairs = {frozenset(r.components): r.action for r in RULES.pair_rules}
    assert pairs[frozenset({"nsaid", "snri"})] == "REVIEW"  # NSAID-3 raises the matrix WARN
    assert pairs[frozenset({"muscle_relaxant", "opioid"})] == "REVIEW"
    assert pairs[frozenset({"gabapentinoid", "tca"})] == "WARN"
    assert pairs[frozenset({"gabapentinoid", "muscle_relaxant"})] == "REVIEW"
    assert frozenset({"snri", "tca"}) not in pairs
    assert frozenset({"gabapentinoid", "opioid"}) not in pairs


def test_single_components_of_a_reviewed_pair_are_not_reviewed():
    flags = one().plan_flags([PLAN_INDEX[p] for p in ("gabapentinoid", "muscle_relaxant")])
    assert not flags.needs_review.any()
    assert flags.has_warning.tolist() == [[False, True]]  # SMR-2 on the relaxant only


@pytest.mark.parametrize(
    ("overrides", "plan", "expected"),
    [
        ({"age": 70, "benzodiazepine": True}, "gabapentinoid+snri", True),
        ({"age": 70, "benzodiazepine": True}, "cbt+gabapentinoid+snri", True),
        ({"age": 70, "benzodiazepine": True}, "snri", False),
        ({"age": 70, "benzodiazepine": True, "serotonergic_drug": True}, "snri", True),
        ({"age": 70}, "gabapentinoid+snri", False),
        ({"age": 64, "benzodiazepine": True}, "gabapentinoid+snri", False),
        ({"age": 70, "benzodiazepine": True}, "nsaid+snri", False),
        ({"age": 70, "benzodiazepine": True, "serotonergic_drug": True}, "cbt+pt", False),
    ],
)
def test_three_cns_drugs_at_65_needs_review(overrides, plan, expected):
    a = one(**overrides)
    assert ("CNS-3-65" in warning_ids(a, plan)) is expected
    if expected:
        assert a.plan_flags([PLAN_INDEX[plan]]).needs_review[0, 0]


def test_block_pair_and_count_rules_of_a_custom_table_exclude_plans():
    table = RuleTable(
        rules=(
            Rule("T-1", ("opioid",), when(Cond("age", ">=", 90)), "BLOCK", "test", "test"),
        ),
        pair_rules=(
            PairRule(
                "T-PAIR", ("nsaid", "snri"), "BLOCK", "test pair", "test",
                trigger=when(Cond("age", ">=", 60)),
            ),
        ),
        count_rules=(
            CountRule(
                "T-COUNT", ("nsaid", "tca", "opioid"), ("benzodiazepine",), 3, ALWAYS,
                "BLOCK", "test count", "test",
            ),
        ),
    )  # fmt: skip
    f = frame({"age": 70}, {"age": 50}, {"benzodiazepine": True})
    a = assess(f, table)
    allowed = a.allowed_plans()
    assert not allowed[0, PLAN_INDEX["nsaid+snri"]] and not allowed[0, PLAN_INDEX["cbt+nsaid+snri"]]
    assert allowed[0, PLAN_INDEX["nsaid"]] and allowed[0, PLAN_INDEX["snri"]]
    assert allowed[1, PLAN_INDEX["nsaid+snri"]]
    assert {"combination": "nsaid+snri", "rules": [{"id": "T-PAIR", "action": "BLOCK",
            "reason": "test pair", "source": "test", "floor": False}]} in a.exclusions(0)  # fmt: skip
    assert not allowed[2, PLAN_INDEX["nsaid+tca"]] and allowed[2, PLAN_INDEX["nsaid"]]
    assert allowed[0, PLAN_INDEX["nsaid+tca"]]  # no benzodiazepine: only 2 counted
    assert any(e.get("combination", "").startswith("2 or more") for e in a.exclusions(2))
    assert a.ruleset_version != RULESET_VERSION
    _assert_allowed_matches_reference(a, table)


def test_count_rule_needs_the_plan_to_add_a_counted_class():
    table = RuleTable(
        rules=(),
        count_rules=(
            CountRule(
                "T-C2", ("gabapentinoid", "snri"), ("benzodiazepine", "sleep_apnea"), 2,
                ALWAYS, "BLOCK", "test", "test",
            ),
        ),
    )  # fmt: skip
    a = assess(frame({"benzodiazepine": True, "sleep_apnea": True}), table)
    allowed = a.allowed_plans()[0]
    assert allowed[PLAN_INDEX["cbt"]] and allowed[PLAN_INDEX["nsaid+opioid"]]
    assert not allowed[PLAN_INDEX["snri"]] and not allowed[PLAN_INDEX["cbt+gabapentinoid"]]
    assert a.exclusions(0)[0]["combination"] == "1 or more of gabapentinoid, snri"
    _assert_allowed_matches_reference(a, table)


# --------------------------------------------------------------------------- matrices


def _reference_allowed(a, i: int, table: RuleTable) -> np.ndarray:
    """Slow per-plan reference built from exclusions(i) and the table's combination rules."""
    blocked = {e["component"] for e in a.exclusions(i) if "component" in e}
    out = np.ones(N_PLANS, dtype=bool)
    for p, plan in enumerate(PLANS):
        comps = set(plan_components(plan))
        if comps & blocked:
            out[p] = False
        for k, r in enumerate(table.pair_rules):
            if r.action == "BLOCK" and a.pair_hits[k, i] and set(r.components) <= comps:
                out[p] = False
        for k, r in enumerate(table.count_rules):
            added = len(comps & set(r.components))
            n = int(a.count_base[k, i]) + added
            if r.action == "BLOCK" and a.count_hits[k, i] and added and n >= r.at_least:
                out[p] = False
    return out


def _assert_allowed_matches_reference(a, table: RuleTable) -> None:
    allowed = a.allowed_plans()
    assert allowed.shape == (a.n_patients, N_PLANS) and allowed.dtype == bool
    for i in range(a.n_patients):
        np.testing.assert_array_equal(allowed[i], _reference_allowed(a, i, table), err_msg=str(i))


def test_allowed_plans_matches_a_slow_reference(cohort):
    a = assess(cohort)
    _assert_allowed_matches_reference(a, RULES)
    share = a.allowed_plans().mean()
    assert 0.05 < share < 0.95  # the cohort really exercises the gate


def test_blocked_matrix_matches_rule_hits(cohort):
    a = assess(cohort)
    for i in range(len(cohort)):
        expected = np.zeros(len(COMPONENT_CODES), dtype=bool)
        for k, rule in enumerate(RULES.rules):
            if rule.action == "BLOCK" and a.rule_hits[k, i]:
                expected[[COMPONENT_INDEX[c] for c in rule.components]] = True
        np.testing.assert_array_equal(a.blocked[i], expected)


def test_plan_flags_match_plan_warnings(cohort):
    a = assess(cohort)
    flags = a.plan_flags()
    np.testing.assert_array_equal(flags.allowed, a.allowed_plans())
    for i in range(0, len(cohort), 8):
        for p, plan in enumerate(PLANS):
            actions = {w["action"] for w in a.plan_warnings(i, plan)}
            assert flags.needs_review[i, p] == ("REVIEW" in actions), (i, plan)
            assert flags.has_warning[i, p] == ("WARN" in actions), (i, plan)


def test_plan_flags_for_a_subset_equal_the_full_columns(cohort):
    a = assess(cohort)
    full = a.plan_flags()
    idx = np.array([5, 0, 838, 400, PLAN_INDEX["nsaid+snri"]])
    sub = a.plan_flags(idx)
    np.testing.assert_array_equal(sub.plan_indices, idx)
    for name in ("allowed", "needs_review", "has_warning"):
        np.testing.assert_array_equal(getattr(sub, name), getattr(full, name)[:, idx])
    by_name = a.plan_flags(["snri + nsaid", "cbt"])
    np.testing.assert_array_equal(by_name.plan_indices, [PLAN_INDEX["nsaid+snri"], 1])


def test_row_order_does_not_change_per_patient_results(cohort):
    a = assess(cohort)
    perm = np.random.default_rng(7).permutation(len(cohort))
    b = assess(cohort.iloc[perm].reset_index(drop=True))
    for name in ("blocked", "review", "warn"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name)[perm])
    np.testing.assert_array_equal(b.allowed_plans(), a.allowed_plans()[perm])
    np.testing.assert_array_equal(b.plan_flags().needs_review, a.plan_flags().needs_review[perm])
    for k in range(0, len(cohort), 17):
        assert b.exclusions(k) == a.exclusions(perm[k])
        assert b.plan_warnings(k, "cbt+nsaid+snri") == a.plan_warnings(perm[k], "cbt+nsaid+snri")
    # A non-default index does not matter either.
    shifted = cohort.set_axis(np.arange(len(cohort)) * 3 + 11)
    np.testing.assert_array_equal(assess(shifted).allowed_plans(), a.allowed_plans())


@pytest.mark.parametrize("risk_flag", RISK_FLAGS)
def test_adding_a_risk_flag_never_adds_a_plan(cohort, risk_flag):
    before = assess(cohort).allowed_plans()
    after = assess(cohort.assign(**{risk_flag: True})).allowed_plans()
    assert not (after & ~before).any()


@pytest.mark.parametrize(
    ("risk_flag", "component"),
    [
        ("heart_failure", "nsaid"),
        ("anticoagulant", "nsaid"),
        ("maoi", "snri"),
        ("suicidal_ideation", "tca"),
        ("benzodiazepine", "opioid"),
        ("opioid_use_disorder", "opioid"),
        ("liver_disease", "snri"),
    ],
)
def test_adding_a_contraindication_removes_the_component(risk_flag, component):
    clean = one()
    assert clean.allowed_plans()[0, PLAN_INDEX[component]]
    flagged = one(**{risk_flag: True})
    j = COMPONENT_INDEX[component]
    assert not flagged.allowed_plans()[0, plan_matrix()[:, j].astype(bool)].any()
    # ...and nothing else: plans without any newly blocked component stay allowed.
    without = ~plan_matrix()[:, flagged.blocked[0]].astype(bool).any(axis=1)
    assert without.sum() >= N_PLANS // 4
    np.testing.assert_array_equal(
        flagged.allowed_plans()[0, without], clean.allowed_plans()[0, without]
    )


# --------------------------------------------------------------------------- version, table


def test_ruleset_version_is_stable_and_content_addressed():
    assert re.fullmatch(r"2026\.11-1\+[0-9a-f]{8}", RULESET_VERSION)
    assert ruleset_version(RULES) == ruleset_version(RULES) == RULESET_VERSION
    assert one().ruleset_version == RULESET_VERSION

    edited_reason = replace(
        RULES, rules=(replace(RULES.rules[0], reason="edited"),) + RULES.rules[1:]
    )
    k = next(k for k, r in enumerate(RULES.rules) if r.id == "FLOOR-NSAID-EGFR")
    stricter = replace(RULES.rules[k], trigger=when(Cond("egfr", "<", 31)))
    edited_threshold = replace(RULES, rules=RULES.rules[:k] + (stricter,) + RULES.rules[k + 1 :])
    dropped_pair = replace(RULES, pair_rules=RULES.pair_rules[1:])
    versions = {ruleset_version(t) for t in (RULES, edited_reason, edited_threshold, dropped_pair)}
    assert len(versions) == 4
    assert assess(frame(), edited_threshold).ruleset_version == ruleset_version(edited_threshold)


def test_ruleset_version_is_the_same_in_another_process():
    code = "from recommender.safety import RULESET_VERSION; print(RULESET_VERSION)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == RULESET_VERSION


def test_the_shipped_table_is_well_formed_and_ids_are_unique():
    check_table(RULES)
    ids = [r.id for r in (*RULES.rules, *RULES.pair_rules, *RULES.count_rules)]
    assert len(ids) == len(set(ids))
    for r in (*RULES.rules, *RULES.pair_rules, *RULES.count_rules):
        assert r.source and r.reason and r.action in ("BLOCK", "REVIEW", "WARN")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Rule("X", ("nsaid",), when(Cond("egrf", "<", 30)), "BLOCK", "r", "s"), "egrf"),
        (Rule("X", ("nsiad",), when(Cond("egfr", "<", 30)), "BLOCK", "r", "s"), "nsiad"),
        (Rule("X", ("nsaid",), when(Cond("egfr", "<", "30")), "BLOCK", "r", "s"), "numeric"),
        (Rule("X", ("opioid",), when(Cond("pain_condition", "==", "fibro")), "BLOCK", "r", "s"),
         "not a level"),
        (Rule("X", ("opioid",), when(Cond("pain_condition", "<", "neck")), "BLOCK", "r", "s"),
         "does not apply"),
        (Rule("X", ("nsaid",), when(Cond("pregnant", "==", 1)), "BLOCK", "r", "s"), "boolean"),
        (Rule("X", ("nsaid",), when(Cond("pregnant", "==", True)), "STOP", "r", "s"), "action"),
        (Rule("X", ("nsaid",), when(Cond("pregnant", "==", True)), "WARN", "r", "s", floor=True),
         "floor rule must BLOCK"),
        (Rule("FLOOR-NSAID-EGFR", ("nsaid",), ALWAYS, "BLOCK", "r", "s"), "duplicate"),
    ],
)  # fmt: skip
def test_check_table_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        check_table(replace(RULES, rules=RULES.rules + (bad,)))


def test_check_table_rejects_a_pair_no_plan_contains():
    bad = PairRule("X", ("snri", "tca"), "WARN", "r", "s")
    with pytest.raises(ValueError, match="not a pair"):
        check_table(replace(RULES, pair_rules=(bad,)))


# --------------------------------------------------------------------------- input handling


def test_absent_optional_columns_default_safely():
    minimal = pd.DataFrame([{k: v for k, v in BASE.items() if k != "egfr"}])
    a = assess(minimal.astype({"age": "int64"}))
    assert not a.blocked.any()
    assert "NSAID-EGFR-UNKNOWN" in warning_ids(a, "nsaid")


def test_untyped_or_incomplete_frames_are_refused():
    raw = frame().astype({"pregnant": object})
    raw.loc[0, "pregnant"] = "false"
    with pytest.raises(ContractError, match="pregnant"):
        assess(raw)
    with pytest.raises(ContractError, match="egfr"):
        assess(frame().astype({"egfr": str}))
    with pytest.raises(ContractError, match="age"):
        assess(frame().drop(columns="age"))


def test_plan_spellings_and_errors():
    a = one(pregnant=True)
    assert a.plan_warnings(0, "snri + cbt") == a.plan_warnings(0, PLAN_INDEX["cbt+snri"])
    with pytest.raises(PlanError):
        a.plan_warnings(0, "snri+tca")
    with pytest.raises(IndexError):
        a.plan_warnings(0, N_PLANS)
    with pytest.raises(ValueError, match="one plan per patient"):
        floor_violations(frame(), ["cbt", "pt"])


def test_results_are_read_only():
    a = one()
    with pytest.raises(ValueError):
        a.allowed_plans()[0, 0] = False
    with pytest.raises(ValueError):
        a.blocked[0, 0] = True


def test_no_patient_data_is_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="recommender.safety"):
        a = assess(frame({"patient_id": "secret-id-77", "pregnant": True}))
        a.exclusions(0)
        a.plan_warnings(0, "snri")
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "secret-id-77" not in text
