"""The therapy catalog (CONTRACT §1): twelve components, the plan rules and the 839 plans.

A *plan* is a set of components. Canonical spelling: codes sorted alphabetically, joined by
``+``. Everything downstream (encoder, safety, ranking, simulator) indexes plans by their
position in :data:`PLANS`, so that order is part of the contract of this module: it is the
canonical spellings sorted by (number of components, spelling).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np

from features.errors import PlanError


@dataclass(frozen=True)
class Component:
    code: str
    kind: str  # "non-drug" | "drug"
    name: str
    evidence: str  # one line, with the clinical-evidence.md rows it comes from


COMPONENTS: tuple[Component, ...] = (
    Component(
        "pt",
        "non-drug",
        "physical therapy / graded exercise programme",
        "Exercise: small-moderate benefit in CLBP and knee OA (Hayden 2021; Fransen 2015; evidence §3.1).",
    ),
    Component(
        "cbt",
        "non-drug",
        "cognitive behavioural therapy for pain",
        "Small effects on pain and disability (Williams 2020 Cochrane; Cherkin 2016; evidence §3.1).",
    ),
    Component(
        "mbsr",
        "non-drug",
        "mindfulness-based stress reduction",
        "Comparable to CBT in CLBP (Cherkin 2016; Khoo 2019 NMA; evidence §3.1).",
    ),
    Component(
        "acupuncture",
        "non-drug",
        "acupuncture course",
        "0.42 SD vs no acupuncture, persists at 12 months (Vickers 2012/2018; evidence §3.1).",
    ),
    Component(
        "diet",
        "non-drug",
        "anti-inflammatory diet / nutrition programme",
        "Small effects, mostly via weight loss in OA (Brain 2019; Messier 2013; evidence §3.1, §4).",
    ),
    Component(
        "yoga",
        "non-drug",
        "yoga or tai chi programme",
        "Yoga/tai chi small-moderate benefit in CLBP, OA and fibromyalgia (Wieland 2017; Wang 2018).",
    ),
    Component(
        "nsaid",
        "drug",
        "non-steroidal anti-inflammatory drug",
        "Clinically relevant in OA, tiny in CLBP, none in neuropathic pain (da Costa 2017; Enthoven 2016).",
    ),
    Component(
        "snri",
        "drug",
        "serotonin-noradrenaline reuptake inhibitor (e.g. duloxetine)",
        "Neuropathic NNT ~6.4, fibromyalgia and OA benefit; nausea common (Finnerup 2015; Sultan 2008).",
    ),
    Component(
        "tca",
        "drug",
        "tricyclic antidepressant (e.g. amitriptyline)",
        "Neuropathic NNT 3.6; anticholinergic, dangerous in overdose (Finnerup 2015; evidence §5.1).",
    ),
    Component(
        "gabapentinoid",
        "drug",
        "gabapentin or pregabalin",
        "Neuropathic NNT 6-8; no effect in low back pain or sciatica (Finnerup 2015; Enke 2018).",
    ),
    Component(
        "muscle_relaxant",
        "drug",
        "skeletal muscle relaxant",
        "Evidence for acute LBP only; sedation and falls (ACP 2017; Beers 2023).",
    ),
    Component(
        "opioid",
        "drug",
        "opioid analgesic",
        "Pain WMD -0.69/10 vs placebo, no better than non-opioids, misuse risk (Busse 2018; Krebs 2018).",
    ),
)

COMPONENT_CODES: tuple[str, ...] = tuple(c.code for c in COMPONENTS)
COMPONENT_INDEX: dict[str, int] = {c: i for i, c in enumerate(COMPONENT_CODES)}
COMPONENT_BY_CODE: dict[str, Component] = {c.code: c for c in COMPONENTS}
NON_DRUG: tuple[str, ...] = tuple(c.code for c in COMPONENTS if c.kind == "non-drug")
DRUG: tuple[str, ...] = tuple(c.code for c in COMPONENTS if c.kind == "drug")

MAX_NON_DRUG = 3
MAX_DRUG = 2
FORBIDDEN_PAIRS: tuple[frozenset[str], ...] = (
    frozenset({"snri", "tca"}),  # serotonergic duplication (CONTRACT §1; evidence §5.3)
    frozenset({"opioid", "gabapentinoid"}),  # respiratory depression (CONTRACT §1; FDA 2019)
)


def canonical(components: frozenset[str] | set[str] | tuple[str, ...]) -> str:
    """Canonical spelling of a set of component codes."""
    return "+".join(sorted(components))


def plan_violation(components: frozenset[str]) -> str | None:
    """Why a set of known components is not a valid plan, or None if it is."""
    if not components:
        return "a plan needs at least one component"
    non_drug = sorted(c for c in components if c in NON_DRUG)
    drug = sorted(c for c in components if c not in NON_DRUG)
    if len(non_drug) > MAX_NON_DRUG:
        return (
            f"{len(non_drug)} non-drug components {', '.join(non_drug)} "
            f"(at most {MAX_NON_DRUG} allowed)"
        )
    if len(drug) > MAX_DRUG:
        return f"{len(drug)} drug classes {', '.join(drug)} (at most {MAX_DRUG} allowed)"
    for pair in FORBIDDEN_PAIRS:
        if pair <= components:
            return f"forbidden combination {' + '.join(sorted(pair))}"
    return None


def _enumerate_plans() -> tuple[str, ...]:
    plans = []
    for k_non in range(MAX_NON_DRUG + 1):
        for non in combinations(NON_DRUG, k_non):
            for k_drug in range(MAX_DRUG + 1):
                for drug in combinations(DRUG, k_drug):
                    comps = frozenset(non + drug)
                    if plan_violation(comps) is None:
                        plans.append(canonical(comps))
    return tuple(sorted(plans, key=lambda p: (p.count("+"), p)))


PLANS: tuple[str, ...] = _enumerate_plans()
PLAN_INDEX: dict[str, int] = {p: i for i, p in enumerate(PLANS)}
N_PLANS = len(PLANS)


def parse_plan(text: object) -> str:
    """Parse a plan string (codes in any order, ``+``-separated, spaces allowed) to canonical form.

    Raises :class:`PlanError` naming the offending part: an unknown code, a duplicate code,
    too many components of a kind, or a forbidden pair.
    """
    if not isinstance(text, str) or not text.strip():
        raise PlanError(
            f"plan {text!r} is empty or not text; write component codes joined by '+', "
            f"e.g. 'cbt+pt+snri' (codes: {', '.join(COMPONENT_CODES)})"
        )
    parts = [p.strip() for p in text.split("+")]
    if any(p == "" for p in parts):
        raise PlanError(f"plan {text!r} has an empty part between '+' signs; remove the extra '+'")
    unknown = [p for p in parts if p not in COMPONENT_INDEX]
    if unknown:
        case = any(u.lower() in COMPONENT_INDEX for u in unknown)
        raise PlanError(
            f"plan {text!r} has unknown component code(s) {', '.join(repr(u) for u in unknown)}; "
            f"known codes are {', '.join(COMPONENT_CODES)}"
            + (" (codes are lower-case)" if case else "")
        )
    seen: set[str] = set()
    dups = sorted({p for p in parts if p in seen or seen.add(p)})
    if dups:
        raise PlanError(
            f"plan {text!r} lists {', '.join(dups)} more than once; list each component once"
        )
    why = plan_violation(frozenset(parts))
    if why:
        raise PlanError(f"plan {text!r} is not allowed: {why} (CONTRACT §1 plan rules)")
    return canonical(parts)


def plan_components(plan: str) -> tuple[str, ...]:
    """Component codes of a canonical plan, in canonical order."""
    return tuple(plan.split("+"))


@lru_cache(maxsize=1)
def plan_matrix() -> np.ndarray:
    """(N_PLANS, 12) 0/1 matrix: row p has a 1 for each component of PLANS[p]."""
    m = np.zeros((N_PLANS, len(COMPONENT_CODES)), dtype=np.int8)
    for i, plan in enumerate(PLANS):
        for c in plan_components(plan):
            m[i, COMPONENT_INDEX[c]] = 1
    m.setflags(write=False)
    return m
