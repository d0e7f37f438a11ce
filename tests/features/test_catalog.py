"""The therapy catalog and plan spelling (CONTRACT §1)."""

from __future__ import annotations

import numpy as np
import pytest

from features.catalog import (
    COMPONENT_CODES,
    COMPONENT_INDEX,
    DRUG,
    N_PLANS,
    NON_DRUG,
    PLAN_INDEX,
    PLANS,
    parse_plan,
    plan_components,
    plan_matrix,
)
from features.errors import ContractError, PlanError

CONTRACT_NON_DRUG = {"pt", "cbt", "mbsr", "acupuncture", "diet", "yoga"}
CONTRACT_DRUG = {"nsaid", "snri", "tca", "gabapentinoid", "muscle_relaxant", "opioid"}


def _obeys_rules(components: set[str]) -> bool:
    """The §1 plan rules, written out independently of features.catalog."""
    return (
        len(components) >= 1
        and len(components & CONTRACT_NON_DRUG) <= 3
        and len(components & CONTRACT_DRUG) <= 2
        and not {"snri", "tca"} <= components
        and not {"opioid", "gabapentinoid"} <= components
    )


def test_components_are_the_contract_twelve():
    assert set(NON_DRUG) == CONTRACT_NON_DRUG
    assert set(DRUG) == CONTRACT_DRUG
    assert len(COMPONENT_CODES) == 12


def test_exactly_839_plans():
    assert N_PLANS == len(PLANS) == 839


def test_plans_are_canonical_and_unique():
    assert len(set(PLANS)) == len(PLANS)
    for plan in PLANS:
        codes = plan.split("+")
        assert codes == sorted(codes), plan
        assert len(set(codes)) == len(codes), plan
        assert set(codes) <= set(COMPONENT_CODES), plan
        assert parse_plan(plan) == plan


def test_every_plan_obeys_the_rules():
    broken = [p for p in PLANS if not _obeys_rules(set(p.split("+")))]
    assert broken == []


def test_brute_force_over_all_subsets_finds_the_same_839():
    allowed = set()
    for mask in range(2**12):
        components = {c for i, c in enumerate(sorted(COMPONENT_CODES)) if mask >> i & 1}
        if _obeys_rules(components):
            allowed.add("+".join(sorted(components)))
    assert len(allowed) == 839
    assert allowed == set(PLANS)


def test_plan_index_matches_order():
    assert all(PLAN_INDEX[p] == i for i, p in enumerate(PLANS))
    sizes = [p.count("+") for p in PLANS]
    assert sizes == sorted(sizes), "PLANS is ordered by number of components first"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cbt+pt+snri", "cbt+pt+snri"),
        ("snri+pt+cbt", "cbt+pt+snri"),
        ("snri + pt + cbt", "cbt+pt+snri"),
        ("  pt+  cbt ", "cbt+pt"),
        ("pt\t+\tcbt", "cbt+pt"),
        ("opioid", "opioid"),
        ("yoga+nsaid+diet+acupuncture+tca", "acupuncture+diet+nsaid+tca+yoga"),
    ],
)
def test_parse_plan_accepts_any_order_and_spaces(text, expected):
    assert parse_plan(text) == expected


def test_parse_plan_round_trips_every_permutation_of_a_plan():
    for order in [("snri", "pt", "cbt"), ("pt", "snri", "cbt"), ("cbt", "snri", "pt")]:
        assert parse_plan("+".join(order)) == "cbt+pt+snri"
        assert parse_plan(" + ".join(order)) == "cbt+pt+snri"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("cbt+massage", "unknown component code(s) 'massage'"),
        ("CBT+pt", "unknown component code(s) 'CBT'"),
        ("pt+pt", "lists pt more than once"),
        ("cbt+pt+cbt+snri", "lists cbt more than once"),
        ("pt+cbt+mbsr+yoga", "4 non-drug components cbt, mbsr, pt, yoga"),
        ("nsaid+snri+opioid", "3 drug classes nsaid, opioid, snri"),
        ("snri+tca", "forbidden combination snri + tca"),
        ("tca+pt+snri", "forbidden combination snri + tca"),
        ("opioid+gabapentinoid", "forbidden combination gabapentinoid + opioid"),
        ("", "is empty or not text"),
        ("   ", "is empty or not text"),
        ("cbt+pt+", "empty part between '+' signs"),
        ("+cbt", "empty part between '+' signs"),
        ("cbt++pt", "empty part between '+' signs"),
        (None, "None is empty or not text"),
        (42, "42 is empty or not text"),
        (["cbt", "pt"], "['cbt', 'pt'] is empty or not text"),
    ],
)
def test_parse_plan_errors_name_the_offending_part(text, names):
    with pytest.raises(PlanError) as info:
        parse_plan(text)
    message = str(info.value)
    assert names in message
    assert "\n" not in message
    assert isinstance(info.value, ContractError)


def test_unknown_code_error_lists_the_known_codes():
    with pytest.raises(PlanError, match="known codes are pt, cbt"):
        parse_plan("massage")


def test_lower_case_hint_only_for_case_mistakes():
    with pytest.raises(PlanError, match=r"codes are lower-case"):
        parse_plan("NSAID")
    with pytest.raises(PlanError) as info:
        parse_plan("massage")
    assert "lower-case" not in str(info.value)


def test_plan_components_in_canonical_order():
    assert plan_components("cbt+pt+snri") == ("cbt", "pt", "snri")


def test_plan_matrix_shape_and_consistency():
    m = plan_matrix()
    assert m.shape == (839, 12)
    assert set(np.unique(m)) == {0, 1}
    assert not m.flags.writeable
    for i, plan in enumerate(PLANS):
        on = {COMPONENT_CODES[j] for j in np.flatnonzero(m[i])}
        assert on == set(plan_components(plan)), plan
    assert (m.sum(axis=1) == [len(plan_components(p)) for p in PLANS]).all()
    non_drug = m[:, [COMPONENT_INDEX[c] for c in NON_DRUG]].sum(axis=1)
    drug = m[:, [COMPONENT_INDEX[c] for c in DRUG]].sum(axis=1)
    assert non_drug.max() == 3 and drug.max() == 2 and (non_drug + drug).min() == 1
    assert len({row.tobytes() for row in m}) == 839, "no two plans share a matrix row"
