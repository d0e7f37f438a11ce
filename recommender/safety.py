"""Safety gate: which components and plans a patient may be offered, and with what caveats.

The rules are data: :data:`RULES` is a declarative table of

* **component rules** (:class:`Rule`): a trigger over profile columns → BLOCK / REVIEW / WARN
  for the listed components;
* **pair rules** (:class:`PairRule`): class–class interactions for combination plans
  (clinical-evidence.md §5.3), applying when both classes are in the plan;
* **count rules** (:class:`CountRule`): "≥ k CNS-active drugs" style rules that add the
  plan's classes to the patient's own co-medication.

Every hit carries its rule id, plain-words reason and source (CONTRACT / evidence row and
status tag V, V2, M or A). :func:`assess` evaluates the whole table on a patient frame with
numpy comparisons on column arrays (no per-row Python) and returns a
:class:`SafetyAssessment`; :func:`floor_violations` is an *independent*, hand-written copy
of CONTRACT §5 that evaluations and tests use to prove no path breaks the floor.

Input is expected to be ``features.validate.validate(df, kind).frame``. A frame that lacks
optional columns is accepted (absent risk flags = False, absent ``prior_*`` = ``none``,
absent numbers = unknown), but columns that are present must already be typed: raw strings
in a boolean or numeric column are refused, because silently reading ``"25"`` as unknown
would let an eGFR of 25 through the NSAID floor.

Unknown never triggers a rule. A missing eGFR does not block (the floor says ``egfr < 30``);
it raises a WARN to check renal function instead, for each component whose safety depends on
it (NSAID, SNRI, gabapentinoid dose).

What was adopted from clinical-evidence.md §5.2 (columns: CONTRACT §2)
-----------------------------------------------------------------------
Floor (BLOCK, ``floor=True``, exactly CONTRACT §5): prior ``intolerant`` (any component);
NSAID-1 eGFR < 30; NSAID-2 GI-bleed *history* (stricter than the sheet's "active" bleed);
NSAID-5 heart failure; NSAID-7 pregnancy (any week, stricter than ≥ 20 weeks); SNRI-1 and
TCA-1 MAOI; TCA-3 conduction disease; TCA-5 suicidal ideation; OPI-5 opioid use disorder;
OPI-3 benzodiazepine; opioid + MAOI (contract row without a §5.2 row: serotonin syndrome
with tramadol/pethidine/fentanyl, label M).

Stricter BLOCKs adopted, and why: NSAID-4 anticoagulant (major bleeding; the sheet's default
is BLOCK, "REVIEW if specialist" needs a specialist context the tool does not have); SNRI-2
eGFR < 30 and SNRI-3 liver disease or heavy alcohol (> 35 units/week, A: the UK "higher
risk" drinking threshold) — label avoid/contraindicated, duloxetine accumulates or is
hepatotoxic; TCA-4 and SMR-1 age ≥ 65 (Beers "avoid"; the low-dose exception needs a
clinician override, which a BLOCK cannot carry, so the safe default wins); OPI-1
fibromyalgia (NICE NG193 and EULAR agree: do not initiate); GABA-5 low back pain incl.
sciatica (no benefit and real harm, Enke 2018 V, all guideline profiles). Each is a case
where every guideline profile in §6 says "do not start" or the label says contraindicated.

REVIEW / WARN adopted (only the parts the contract columns can express): NSAID-3 (age ≥ 65
or serotonergic co-drug), NSAID-6 (CVD), NSAID-9 (eGFR 30–59); SNRI-5, SNRI-6, SNRI-7
(extended to TCAs: the boxed warning is class-wide, A), SNRI-8, SNRI-10 (anticoagulant);
TCA-6 (serotonergic co-drug: REVIEW, not BLOCK, because the flag also covers triptans),
TCA-7 (bipolar); GABA-2 (benzodiazepine, sleep apnoea as respiratory impairment), GABA-3
(DOSE, as a WARN whose reason starts "DOSE:"), GABA-4, GABA-5 for fibromyalgia as WARN (US /
EULAR profile; NICE would BLOCK); SMR-2 (every patient here has chronic pain), SMR-3
(benzodiazepine), SMR-4 and SMR-5 as class-level REVIEW (the BLOCK is agent-specific:
carisoprodol, cyclobenzaprine — sign-off means "choose another agent"); OPI-2 (low back:
REVIEW, US ACP/CDC profile), OPI-6 (PHQ-9 ≥ 15, GAD-7 ≥ 15, bipolar, suicidal ideation, or
heavy alcohol, A), OPI-7 (sleep apnoea), OPI-9 (serotonergic co-drug), OPI-10 (pregnancy);
ACU-1, ACU-2 (pregnancy), PSY-1 (suicidal ideation → triage before CBT/MBSR), DIET-1
(eGFR < 30 or anticoagulant), EX-1 only as a WARN for heart failure (decompensation is not
a column). §5.3: nine class pairs that the catalog allows (snri+tca and opioid+gabapentinoid
do not exist) and two global rules: ≥ 3 CNS-active drugs at age ≥ 65 → REVIEW (the plan's
CNS classes + benzodiazepine + serotonergic co-drug, counted conservatively because an SSRI
or tramadol is CNS-active in Beers), pregnancy → REVIEW every drug (NSAID is already
blocked, opioid has OPI-10). NSAID + SNRI is REVIEW, not the matrix's WARN, because NSAID-3
(REVIEW + PPI when on an SNRI) is the stricter of the two rows that cover it.

Not expressible with contract columns, so left out: NSAID-8 hypersensitivity, NSAID-10 and
GABA-7 (duplicate drug), SNRI-4 (CYP1A2 inhibitors), SNRI-9 glaucoma, SNRI-11 hypertension,
TCA-2 recent MI, the QT-drug part of TCA-3, the epilepsy/glaucoma/BPH/dementia/falls part
of TCA-7, GABA-6 falls, SMR-6 (baclofen at ≥ 65 is already blocked by SMR-1; tizanidine
co-drugs), OPI-8 (dose / MME: a plan names a class, not a dose), EX-1 (unstable angina,
arrhythmia …), EX-2 osteoporosis, RED-1 red flags (must be screened before this tool is
used). GABA-1 / OPI-4 cannot fire: the catalog forbids opioid + gabapentinoid.
The UK_NICE / US_ACP_CDC guideline-profile switch (§6.1) is not implemented: rules follow
the US profile where the two differ (OPI-2, GABA-5 in fibromyalgia) and say so in
``source``. As clinical-evidence.md says, every rule must be reviewed by a clinician or
pharmacist before it gates real patients.

Public API
----------
``assess(patients, table=RULES) -> SafetyAssessment`` with ``rule_hits``, ``blocked`` /
``review`` / ``warn`` (n, 12), ``allowed_plans()`` (n, 839), ``plan_flags(plans)``,
``exclusions(i)`` and ``plan_warnings(i, plan)``; ``floor_violations(patients, plans)``;
``RULES``, ``RULESET_VERSION``, ``ruleset_version(table)``, ``check_table(table)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd

from features.catalog import (
    COMPONENT_CODES,
    COMPONENT_INDEX,
    FORBIDDEN_PAIRS,
    N_PLANS,
    PLAN_INDEX,
    parse_plan,
    plan_matrix,
)
from features.errors import ContractError
from features.schema import COLUMNS_BY_NAME, PATIENT_COLUMNS

log = logging.getLogger(__name__)

Action = Literal["BLOCK", "REVIEW", "WARN"]
ACTIONS: tuple[str, ...] = ("BLOCK", "REVIEW", "WARN")
Op = Literal["==", "!=", "<", "<=", ">", ">=", "in", "missing"]

# Bumped by hand for a reviewed release of the table; the content hash is appended so any
# edit, even an unreviewed one, yields a different version in answers and audit records.
RULESET_SERIES = "2026.11-1"
# Part of the hashed content too: bump it when the *meaning* of a table changes (how a
# trigger, a pair or a count rule is evaluated), since the table text alone would not change.
_ENGINE_VERSION = 1


# --------------------------------------------------------------------------- table types


@dataclass(frozen=True)
class Cond:
    """One condition ``column op value``. A missing value never satisfies a comparison;
    only ``op="missing"`` looks at missingness."""

    column: str
    op: Op
    value: object = None


Clause = tuple[Cond, ...]  # conditions ANDed
Trigger = tuple[Clause, ...]  # clauses ORed; ((),) is "always"
ALWAYS: Trigger = ((),)


def when(*conds: Cond) -> Trigger:
    """A trigger that holds when all ``conds`` hold."""
    return (tuple(conds),)


def any_of(*triggers: Trigger) -> Trigger:
    """A trigger that holds when any of ``triggers`` holds."""
    return tuple(clause for t in triggers for clause in t)


def flag(column: str) -> Cond:
    return Cond(column, "==", True)


def is_(column: str, value: object) -> Cond:
    return Cond(column, "==", value)


@dataclass(frozen=True)
class Rule:
    """A component rule: when ``trigger`` holds, ``action`` applies to each of ``components``."""

    id: str
    components: tuple[str, ...]
    trigger: Trigger
    action: Action
    reason: str
    source: str
    floor: bool = False


@dataclass(frozen=True)
class PairRule:
    """A class–class rule: applies to plans containing *both* ``components``."""

    id: str
    components: tuple[str, str]
    action: Action
    reason: str
    source: str
    trigger: Trigger = ALWAYS


@dataclass(frozen=True)
class CountRule:
    """Applies to a plan that contains at least one of ``components`` when (plan classes in
    ``components``) + (patient ``flags`` set) reaches ``at_least`` and ``trigger`` holds.
    A plan adding none of the counted classes does not worsen the load, so it is not flagged."""

    id: str
    components: tuple[str, ...]
    flags: tuple[str, ...]
    at_least: int
    trigger: Trigger
    action: Action
    reason: str
    source: str


@dataclass(frozen=True)
class RuleTable:
    rules: tuple[Rule, ...]
    pair_rules: tuple[PairRule, ...] = ()
    count_rules: tuple[CountRule, ...] = ()


# --------------------------------------------------------------------------- the table

_FLOOR = "CONTRACT §5"


def _intolerance_rule(code: str) -> Rule:
    return Rule(
        f"FLOOR-INTOLERANT-{code.upper().replace('_', '-')}",
        (code,),
        when(is_(f"prior_{code}", "intolerant")),
        "BLOCK",
        f"Not tolerated before (prior_{code} recorded as 'intolerant'); do not re-challenge.",
        f"{_FLOOR} (any component: prior intolerant)",
        floor=True,
    )


_CNS_CLASSES = ("snri", "tca", "gabapentinoid", "muscle_relaxant", "opioid")
_HEAVY_ALCOHOL = Cond("alcohol_units_week", ">", 35)  # A: UK "higher risk" drinking, > 35 u/wk

# The table is laid out as a table on purpose: one rule per block, read by clinicians.
# fmt: off
RULES = RuleTable(
    rules=(
        # ---- CONTRACT §5 floor: exactly the contract's rows, never weakened -------------
        *(_intolerance_rule(code) for code in COMPONENT_CODES),
        Rule("FLOOR-NSAID-EGFR", ("nsaid",), when(Cond("egfr", "<", 30)), "BLOCK",
             "eGFR below 30: NSAIDs risk acute kidney injury and further decline.",
             f"{_FLOOR}; evidence §5.2 NSAID-1 (Beers 2023, V)", floor=True),
        Rule("FLOOR-NSAID-GIBLEED", ("nsaid",), when(flag("gi_bleed_history")), "BLOCK",
             "History of GI bleeding or ulcer: NSAIDs raise upper-GI complications 2–4×.",
             f"{_FLOOR}; evidence §5.2 NSAID-2 (label M; CNT 2013, V)", floor=True),
        Rule("FLOOR-NSAID-HF", ("nsaid",), when(flag("heart_failure")), "BLOCK",
             "Heart failure: NSAIDs roughly double the risk of heart-failure admission.",
             f"{_FLOOR}; evidence §5.2 NSAID-5 (CNT 2013, V)", floor=True),
        Rule("FLOOR-NSAID-PREGNANT", ("nsaid",), when(flag("pregnant")), "BLOCK",
             "Pregnancy: NSAIDs cause fetal renal dysfunction from 20 weeks and ductus closure "
             "from 30 weeks.",
             f"{_FLOOR}; evidence §5.2 NSAID-7 (FDA 2020, V)", floor=True),
        Rule("FLOOR-SNRI-MAOI", ("snri",), when(flag("maoi")), "BLOCK",
             "On an MAO inhibitor (now or within 14 days): risk of serotonin syndrome.",
             f"{_FLOOR}; evidence §5.2 SNRI-1 (label, M)", floor=True),
        Rule("FLOOR-TCA-MAOI", ("tca",), when(flag("maoi")), "BLOCK",
             "On an MAO inhibitor (now or within 14 days): hyperpyretic crises, convulsions.",
             f"{_FLOOR}; evidence §5.2 TCA-1 (label, V)", floor=True),
        Rule("FLOOR-TCA-CONDUCTION", ("tca",), when(flag("cardiac_conduction_disease")), "BLOCK",
             "Cardiac conduction disease / QT prolongation: tricyclics are conduction-toxic.",
             f"{_FLOOR}; evidence §5.2 TCA-3 (label, V/M)", floor=True),
        Rule("FLOOR-TCA-SUICIDAL", ("tca",), when(flag("suicidal_ideation")), "BLOCK",
             "Suicidal ideation: tricyclics are highly lethal in overdose.",
             f"{_FLOOR}; evidence §5.2 TCA-5 (M)", floor=True),
        Rule("FLOOR-OPI-OUD", ("opioid",), when(flag("opioid_use_disorder")), "BLOCK",
             "Opioid use disorder: do not start an opioid for pain; offer treatment for OUD.",
             f"{_FLOOR}; evidence §5.2 OPI-5 (CDC 2022 Rec 12, M)", floor=True),
        Rule("FLOOR-OPI-BENZO", ("opioid",), when(flag("benzodiazepine")), "BLOCK",
             "On a benzodiazepine: the combination with an opioid raises overdose risk.",
             f"{_FLOOR}; evidence §5.2 OPI-3, §5.3 global (Beers 2023, V)", floor=True),
        Rule("FLOOR-OPI-MAOI", ("opioid",), when(flag("maoi")), "BLOCK",
             "On an MAO inhibitor: serotonergic opioids (tramadol, pethidine, fentanyl, "
             "methadone) can cause serotonin syndrome.",
             f"{_FLOOR} (no §5.2 row; label, M)", floor=True),
        # ---- stricter BLOCKs adopted from §5.2 -----------------------------------------
        Rule("NSAID-4", ("nsaid",), when(flag("anticoagulant")), "BLOCK",
             "On an oral anticoagulant: adding an NSAID raises major-bleeding risk.",
             "evidence §5.2 NSAID-4 (Beers drug–drug, M)"),
        Rule("SNRI-2", ("snri",), when(Cond("egfr", "<", 30)), "BLOCK",
             "eGFR below 30: duloxetine accumulates (avoid in severe renal impairment).",
             "evidence §5.2 SNRI-2 (Beers 2023, V2; label M)"),
        Rule("SNRI-3", ("snri",), any_of(when(flag("liver_disease")), when(_HEAVY_ALCOHOL)),
             "BLOCK",
             "Chronic liver disease or heavy alcohol use (> 35 units/week): duloxetine is "
             "hepatotoxic.",
             "evidence §5.2 SNRI-3 (label, M; alcohol threshold A)"),
        Rule("TCA-4", ("tca",), when(Cond("age", ">=", 65)), "BLOCK",
             "Age 65 or over: tricyclics are strongly anticholinergic (confusion, falls, "
             "orthostasis).",
             "evidence §5.2 TCA-4 (Beers 2015 table V; 2023 M)"),
        Rule("SMR-1", ("muscle_relaxant",), when(Cond("age", ">=", 65)), "BLOCK",
             "Age 65 or over: muscle relaxants cause sedation, anticholinergic effects and "
             "fractures.",
             "evidence §5.2 SMR-1 (Beers 2023, V2)"),
        Rule("OPI-1", ("opioid",), when(is_("pain_condition", "fibromyalgia")), "BLOCK",
             "Fibromyalgia (chronic primary pain): do not start opioids.",
             "evidence §5.2 OPI-1 (NICE NG193, V; EULAR 2016, V)"),
        Rule("GABA-5", ("gabapentinoid",), when(is_("pain_condition", "low_back")), "BLOCK",
             "Low back pain or sciatica: gabapentinoids give no benefit and cause harm.",
             "evidence §5.2 GABA-5 (Enke 2018, V; NICE NG59, V)"),
        # ---- REVIEW: allowed only with explicit clinician sign-off ---------------------
        Rule("NSAID-3", ("nsaid",),
             any_of(when(Cond("age", ">=", 65)), when(flag("serotonergic_drug"))), "REVIEW",
             "Age 65+ or on an SSRI/serotonergic drug: GI-bleeding risk; co-prescribe a PPI.",
             "evidence §5.2 NSAID-3 (Beers, M; label, M)"),
        Rule("NSAID-6", ("nsaid",), when(flag("cardiovascular_disease")), "REVIEW",
             "Established cardiovascular disease: NSAIDs raise major vascular events (RR ≈ 1.4).",
             "evidence §5.2 NSAID-6 (CNT 2013, V)"),
        Rule("SNRI-5", ("snri",), when(flag("serotonergic_drug")), "REVIEW",
             "On another serotonergic drug: risk of serotonin syndrome (tramadol also lowers "
             "the seizure threshold).",
             "evidence §5.2 SNRI-5 (label class warning, M)"),
        Rule("SNRI-6", ("snri",), when(flag("bipolar_disorder")), "REVIEW",
             "Bipolar disorder: antidepressants can switch to mania.",
             "evidence §5.2 SNRI-6 (label, M)"),
        Rule("SNRI-8", ("snri",), when(flag("suicidal_ideation")), "REVIEW",
             "Suicidal ideation: urgent mental-health triage before starting an antidepressant.",
             "evidence §5.2 SNRI-8 (PHQ-9 item 9 rule V; action A)"),
        Rule("TCA-6", ("tca",), when(flag("serotonergic_drug")), "REVIEW",
             "On another serotonergic drug (SSRI?): serotonergic duplication and raised "
             "tricyclic levels.",
             "evidence §5.2 TCA-6 (M; REVIEW not BLOCK because the flag includes triptans, A)"),
        Rule("TCA-7", ("tca",), when(flag("bipolar_disorder")), "REVIEW",
             "Bipolar disorder: antidepressants can switch to mania.",
             "evidence §5.2 TCA-7 (label, M)"),
        Rule("GABA-4", ("gabapentinoid",), when(flag("opioid_use_disorder")), "REVIEW",
             "Opioid use disorder: gabapentinoids are misused in this group.",
             "evidence §5.2 GABA-4 (FDA 2019, V)"),
        Rule("SMR-3", ("muscle_relaxant",), when(flag("benzodiazepine")), "REVIEW",
             "On a benzodiazepine: additive sedation, falls and fractures.",
             "evidence §5.2 SMR-3 (Beers ≥3 CNS-active drugs, V)"),
        Rule("SMR-4", ("muscle_relaxant",), when(flag("opioid_use_disorder")), "REVIEW",
             "Substance-use history: avoid carisoprodol (misuse); choose another agent.",
             "evidence §5.2 SMR-4 (M; agent-level BLOCK applied as class REVIEW, A)"),
        Rule("SMR-5", ("muscle_relaxant",),
             any_of(when(flag("maoi")), when(flag("heart_failure")),
                    when(flag("cardiac_conduction_disease"))), "REVIEW",
             "MAOI, heart failure or conduction disease: cyclobenzaprine (TCA-like) is "
             "contraindicated; choose another agent.",
             "evidence §5.2 SMR-5 (label, M; agent-level BLOCK applied as class REVIEW, A)"),
        Rule("OPI-2", ("opioid",), when(is_("pain_condition", "low_back")), "REVIEW",
             "Chronic low back pain: opioids only after non-opioid options have failed.",
             "evidence §5.2 OPI-2 (ACP 2017 Rec 3, V; CDC 2022, V; US profile — NICE NG59 "
             "would block)"),
        Rule("OPI-6", ("opioid",),
             any_of(when(Cond("phq9", ">=", 15)), when(Cond("gad7", ">=", 15)),
                    when(flag("bipolar_disorder")), when(flag("suicidal_ideation")),
                    when(_HEAVY_ALCOHOL)), "REVIEW",
             "Mental-health comorbidity or heavy alcohol use: higher misuse and overdose risk; "
             "prescribe naloxone.",
             "evidence §5.2 OPI-6 (CDC 2022 Rec 8, M; PHQ-9/GAD-7 ≥ 15 bands V; alcohol A)"),
        Rule("OPI-7", ("opioid",), when(flag("sleep_apnea")), "REVIEW",
             "Sleep apnoea: opioids raise the risk of respiratory depression.",
             "evidence §5.2 OPI-7 (CDC, M)"),
        Rule("OPI-9", ("opioid",), when(flag("serotonergic_drug")), "REVIEW",
             "On a serotonergic drug: avoid tramadol, tapentadol, methadone, fentanyl "
             "(serotonin syndrome, seizures).",
             "evidence §5.2 OPI-9 (M)"),
        Rule("OPI-10", ("opioid",), when(flag("pregnant")), "REVIEW",
             "Pregnancy: opioid exposure risks neonatal withdrawal.",
             "evidence §5.2 OPI-10 (M)"),
        Rule("PREG-DRUG", ("snri", "tca", "gabapentinoid", "muscle_relaxant"),
             when(flag("pregnant")), "REVIEW",
             "Pregnancy: every drug needs an obstetric risk–benefit review.",
             "evidence §5.3 global rule (A)"),
        Rule("ACU-1", ("acupuncture",),
             any_of(when(flag("bleeding_disorder")), when(flag("anticoagulant"))), "REVIEW",
             "Bleeding disorder or anticoagulant: bleeding and haematoma are the commonest "
             "acupuncture harms.",
             "evidence §5.2 ACU-1 (V; caution M)"),
        Rule("PSY-1", ("cbt", "mbsr"), when(flag("suicidal_ideation")), "REVIEW",
             "Suicidal ideation: mental-health triage before a CBT or mindfulness programme.",
             "evidence §5.2 PSY-1 (PHQ-9 item 9 rule V; A)"),
        # ---- WARN: recommend with a flag -----------------------------------------------
        Rule("NSAID-9", ("nsaid",), when(Cond("egfr", ">=", 30), Cond("egfr", "<", 60)), "WARN",
             "eGFR 30–59: kidney-injury risk; avoid with ACE-i/ARB plus diuretic, monitor "
             "renal function and blood pressure.",
             "evidence §5.2 NSAID-9 (M)"),
        Rule("NSAID-EGFR-UNKNOWN", ("nsaid",), when(Cond("egfr", "missing")), "WARN",
             "eGFR unknown: check renal function before starting an NSAID (blocked below 30).",
             f"{_FLOOR} / evidence §5.2 NSAID-1: unknown is not < 30 (A)"),
        Rule("SNRI-7", ("snri", "tca"), when(Cond("age", "<=", 24)), "WARN",
             "Age 18–24: boxed warning for suicidality in young adults on antidepressants; "
             "monitor closely.",
             "evidence §5.2 SNRI-7 (FDA label boxed warning, V; extended to TCAs, A)"),
        Rule("SNRI-10", ("snri",), when(flag("anticoagulant")), "WARN",
             "On an anticoagulant: SNRIs add bleeding risk.",
             "evidence §5.2 SNRI-10 (M)"),
        Rule("SNRI-EGFR-UNKNOWN", ("snri",), when(Cond("egfr", "missing")), "WARN",
             "eGFR unknown: check renal function before starting duloxetine (avoid below 30).",
             "evidence §5.2 SNRI-2: unknown is not < 30 (A)"),
        Rule("GABA-2", ("gabapentinoid",),
             any_of(when(flag("benzodiazepine")), when(flag("sleep_apnea"))), "WARN",
             "On a benzodiazepine or with sleep apnoea: respiratory depression; start low and "
             "monitor.",
             "evidence §5.2 GABA-2 (FDA 2019, V)"),
        Rule("GABA-3", ("gabapentinoid",), when(Cond("egfr", "<", 60)), "WARN",
             "DOSE: reduce the dose for eGFR below 60 (pregabalin max 300 mg/day at 30–60, "
             "150 mg at 15–30, 75 mg below 15).",
             "evidence §5.2 GABA-3 (Beers, V; CKD dosing table, V)"),
        Rule("GABA-EGFR-UNKNOWN", ("gabapentinoid",), when(Cond("egfr", "missing")), "WARN",
             "DOSE: eGFR unknown; check renal function to set the gabapentinoid dose.",
             "evidence §5.2 GABA-3: unknown renal function (A)"),
        Rule("GABA-5-FM", ("gabapentinoid",), when(is_("pain_condition", "fibromyalgia")),
             "WARN",
             "Fibromyalgia: pregabalin has weak support (EULAR); NICE advises not to start "
             "gabapentinoids.",
             "evidence §5.2 GABA-5 (EULAR 2016, V; NICE NG193, V; US/EULAR profile)"),
        Rule("SMR-2", ("muscle_relaxant",), when(Cond("pain_duration_months", ">=", 3)), "WARN",
             "Evidence is for acute low back pain only; limit to 2–3 weeks.",
             "evidence §5.2 SMR-2 (ACP 2017 Rec 1, V)"),
        Rule("EX-1-HF", ("pt", "yoga"), when(flag("heart_failure")), "WARN",
             "Heart failure: confirm it is compensated before an exercise programme.",
             "evidence §5.2 EX-1 (ACSM, M; decompensation not recorded, so WARN, A)"),
        Rule("ACU-2", ("acupuncture",), when(flag("pregnant")), "WARN",
             "Pregnancy: avoid certain acupuncture points.",
             "evidence §5.2 ACU-2 (M)"),
        Rule("DIET-1", ("diet",),
             any_of(when(Cond("egfr", "<", 30)), when(flag("anticoagulant"))), "WARN",
             "eGFR below 30 (protein/potassium limits) or on an anticoagulant (omega-3/turmeric "
             "supplements): dietitian-supervised programme.",
             "evidence §5.2 DIET-1 (A/M)"),
    ),
    pair_rules=(
        PairRule("PAIR-NSAID-SNRI", ("nsaid", "snri"), "REVIEW",
                 "SNRI with NSAID: additive GI-bleeding risk; co-prescribe a PPI.",
                 "evidence §5.3 NSAID×SNRI (WARN) raised to REVIEW by §5.2 NSAID-3 (M)"),
        PairRule("PAIR-SNRI-GABA", ("gabapentinoid", "snri"), "WARN",
                 "SNRI with gabapentinoid: additive dizziness and somnolence.",
                 "evidence §5.3 SNRI×gabapentinoid (M)"),
        PairRule("PAIR-SNRI-SMR", ("muscle_relaxant", "snri"), "WARN",
                 "SNRI with muscle relaxant: additive sedation; cyclobenzaprine is serotonergic "
                 "(needs review).",
                 "evidence §5.3 SNRI×muscle relaxant (M)"),
        PairRule("PAIR-SNRI-OPI", ("opioid", "snri"), "REVIEW",
                 "SNRI with opioid: avoid serotonergic opioids (tramadol, tapentadol, methadone, "
                 "fentanyl).",
                 "evidence §5.3 SNRI×opioid; §5.2 OPI-9 (M)"),
        PairRule("PAIR-TCA-GABA", ("gabapentinoid", "tca"), "WARN",
                 "Tricyclic with gabapentinoid: additive sedation and falls.",
                 "evidence §5.3 TCA×gabapentinoid (M)"),
        PairRule("PAIR-TCA-SMR", ("muscle_relaxant", "tca"), "REVIEW",
                 "Tricyclic with muscle relaxant: anticholinergic and sedative load; never with "
                 "cyclobenzaprine (TCA-like).",
                 "evidence §5.3 TCA×muscle relaxant (M)"),
        PairRule("PAIR-TCA-OPI", ("opioid", "tca"), "REVIEW",
                 "Tricyclic with opioid: sedation; tramadol adds seizure and serotonin risk.",
                 "evidence §5.3 TCA×opioid (M)"),
        PairRule("PAIR-GABA-SMR", ("gabapentinoid", "muscle_relaxant"), "REVIEW",
                 "Gabapentinoid with muscle relaxant: CNS depression, falls.",
                 "evidence §5.3 gabapentinoid×muscle relaxant; §5.2 SMR-3 (Beers, V)"),
        PairRule("PAIR-SMR-OPI", ("muscle_relaxant", "opioid"), "REVIEW",
                 "Muscle relaxant with opioid: CNS and respiratory depression; never "
                 "carisoprodol.",
                 "evidence §5.3 muscle relaxant×opioid (M)"),
    ),
    count_rules=(
        CountRule("CNS-3-65", _CNS_CLASSES, ("benzodiazepine", "serotonergic_drug"), 3,
                  when(Cond("age", ">=", 65)), "REVIEW",
                  "Age 65+ with three or more CNS-active drugs (plan plus current "
                  "benzodiazepine/serotonergic drug): falls and fractures.",
                  "evidence §5.3 global rule (Beers 2023, V); co-drug counting A"),
    ),
)
# fmt: on


def ruleset_version(table: RuleTable, series: str = RULESET_SERIES) -> str:
    """``series+<8 hex>``: SHA-256 over a canonical JSON dump of the table.

    Deterministic across processes and platforms (unlike ``hash()``), and any change to an
    id, trigger, threshold, action, reason or source changes it.
    """
    payload = json.dumps(
        {"engine": _ENGINE_VERSION, "table": asdict(table)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=repr,
    )
    return f"{series}+{hashlib.sha256(payload.encode('utf-8')).hexdigest()[:8]}"


RULESET_VERSION: str = ruleset_version(RULES)


# --------------------------------------------------------------------------- table checks

_PROFILE = {c.name: c for c in PATIENT_COLUMNS if c.name != "patient_id"}
_OPS_BY_DTYPE = {
    "bool": {"==", "!=", "missing"},
    "category": {"==", "!=", "in", "missing"},
    "int": {"==", "!=", "<", "<=", ">", ">=", "in", "missing"},
    "float": {"==", "!=", "<", "<=", ">", ">=", "in", "missing"},
}


def check_table(table: RuleTable) -> None:
    """Raise ``ValueError`` listing every malformed rule (unknown column, code, level, op …)."""
    problems: list[str] = []
    all_rules = (*table.rules, *table.pair_rules, *table.count_rules)
    ids = [r.id for r in all_rules]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(f"duplicate rule id(s) {dup}")
    for r in all_rules:
        if r.action not in ACTIONS:
            problems.append(f"{r.id}: action {r.action!r} is not one of {ACTIONS}")
        if not r.reason.strip() or not r.source.strip():
            problems.append(f"{r.id}: reason and source must be non-empty")
        unknown = [c for c in r.components if c not in COMPONENT_INDEX]
        if unknown or not r.components:
            problems.append(f"{r.id}: unknown or no component code(s) {unknown}")
        problems.extend(_check_trigger(r.id, r.trigger))
    for r in table.rules:
        if r.floor and r.action != "BLOCK":
            problems.append(f"{r.id}: a floor rule must BLOCK")
    for p in table.pair_rules:
        pair = frozenset(p.components)
        if len(pair) != 2 or pair in FORBIDDEN_PAIRS:
            problems.append(f"{p.id}: {p.components} is not a pair that any plan contains")
    for c in table.count_rules:
        problems.extend(_check_trigger(c.id, when(*(flag(f) for f in c.flags))))
        if c.at_least < 1:
            problems.append(f"{c.id}: at_least must be 1 or more")
    if _bits_needed(table) > _WORD_BITS:
        problems.append(
            f"pair and count rules need {_bits_needed(table)} plan-feature bits; at most "
            f"{_WORD_BITS} fit the gate word (merge rules or widen the word)"
        )
    if problems:
        raise ValueError("safety rule table is malformed: " + "; ".join(problems))


def _check_trigger(rule_id: str, trigger: Trigger) -> list[str]:
    out = []
    if not trigger:
        out.append(f"{rule_id}: empty trigger (use ALWAYS for an unconditional rule)")
    for clause in trigger:
        for cond in clause:
            col = _PROFILE.get(cond.column)
            if col is None:
                out.append(f"{rule_id}: {cond.column!r} is not a patient profile column")
                continue
            if cond.op not in _OPS_BY_DTYPE[col.dtype]:
                out.append(
                    f"{rule_id}: op {cond.op!r} does not apply to {col.dtype} "
                    f"column {cond.column!r}"
                )
                continue
            values = cond.value if cond.op == "in" else (cond.value,)
            if cond.op == "missing":
                continue
            if cond.op == "in" and not isinstance(cond.value, tuple):
                out.append(f"{rule_id}: 'in' needs a tuple of values")
            elif col.levels and any(v not in col.levels for v in values):
                out.append(f"{rule_id}: {cond.value!r} is not a level of {cond.column!r}")
            elif col.dtype == "bool" and not all(isinstance(v, bool) for v in values):
                out.append(f"{rule_id}: {cond.column!r} is boolean; compare with True/False")
            elif col.dtype in ("int", "float") and not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            ):
                out.append(f"{rule_id}: {cond.column!r} is numeric; compare with a number")
    return out


# A plan "feature" is one bit of a 64-bit word: bits 0-11 are the components, then one bit per
# pair rule (plan contains the pair), then, per count rule, one bit per threshold t = 1..k
# (plan has >= t counted classes). A patient's word for an action sets the bits of everything
# that action hits; the rule applies to a plan iff the two words share a bit. This is the
# `blocked @ plan_matrix().T > 0` product in bit form, and patients with the same word share
# one row of work. It avoids the (n, 839) float temporaries whose page faults dominated the
# float32 matmul (bench, 10k patients: ~19 ms for the matmul, ~2 ms for this), and BLAS.
_COMPONENT_BITS = np.uint64(1) << np.arange(len(COMPONENT_CODES), dtype=np.uint64)
_WORD_BITS = 64


def _bits_needed(table: RuleTable) -> int:
    return len(COMPONENT_CODES) + len(table.pair_rules) + sum(c.at_least for c in table.count_rules)


@dataclass(frozen=True)
class _Compiled:
    """The table as arrays: which component/plan each rule touches."""

    component_mask: np.ndarray  # (n_rules, 12) bool
    action: np.ndarray  # (n_rules,) str
    pair_plan_mask: np.ndarray  # (n_pair, N_PLANS) bool: plan contains the pair
    count_plan: np.ndarray  # (n_count, N_PLANS) int: plan classes counted by the rule
    count_bit0: tuple[int, ...]  # first threshold bit of each count rule
    plan_words: np.ndarray  # (N_PLANS,) uint64 plan features
    version: str


@lru_cache(maxsize=8)
def _compile(table: RuleTable) -> _Compiled:
    check_table(table)
    comp = np.zeros((len(table.rules), len(COMPONENT_CODES)), dtype=bool)
    for k, r in enumerate(table.rules):
        comp[k, [COMPONENT_INDEX[c] for c in r.components]] = True
    pm = plan_matrix().astype(bool)
    words = pm.astype(np.uint64) @ _COMPONENT_BITS
    pair = np.zeros((len(table.pair_rules), N_PLANS), dtype=bool)
    for k, p in enumerate(table.pair_rules):
        a, b = (COMPONENT_INDEX[c] for c in p.components)
        pair[k] = pm[:, a] & pm[:, b]
        words |= pair[k].astype(np.uint64) << np.uint64(len(COMPONENT_CODES) + k)
    count = np.zeros((len(table.count_rules), N_PLANS), dtype=np.int16)
    bit0 = []
    offset = len(COMPONENT_CODES) + len(table.pair_rules)
    for k, c in enumerate(table.count_rules):
        count[k] = pm[:, [COMPONENT_INDEX[x] for x in c.components]].sum(axis=1)
        bit0.append(offset)
        for t in range(1, c.at_least + 1):  # bit offset + t - 1: "plan has >= t counted"
            words |= (count[k] >= t).astype(np.uint64) << np.uint64(offset + t - 1)
        offset += c.at_least
    for arr in (comp, pair, count, words):
        arr.setflags(write=False)
    actions = np.array([r.action for r in table.rules])
    return _Compiled(comp, actions, pair, count, tuple(bit0), words, ruleset_version(table))


_CHUNK = 2048  # rows per block: keeps the uint64 temporary ~14 MB at most


def _gate(words: np.ndarray, plan_words: np.ndarray, *, applies: bool) -> np.ndarray:
    """(n, k) bool: whether each patient word shares a bit with each plan word (``applies``)
    or shares none (``applies=False``). Patients with identical words are computed once."""
    uniq, inverse = np.unique(words, return_inverse=True)
    table = np.empty((uniq.size, plan_words.size), dtype=bool)
    compare = np.not_equal if applies else np.equal
    for s in range(0, uniq.size, _CHUNK):
        compare(uniq[s : s + _CHUNK, None] & plan_words[None, :], 0, out=table[s : s + _CHUNK])
    return table[inverse.reshape(-1)]


# --------------------------------------------------------------------------- evaluation


class _Columns:
    """Column arrays of a patient frame, converted once, with every condition memoised.

    With ``encoded`` (the model's encoded matrix of the same validated frame and its column
    names, ``features.encode.PatientEncoder``) the columns it holds are read from it instead:
    level codes, 0/1 booleans and numbers with NaN for missing are exactly what the typed
    frame holds, and slicing a matrix costs microseconds where a pandas column of a one-row
    request costs ~20 µs each (~1.5 ms per request in all). ``frame`` may then be None."""

    def __init__(self, frame: pd.DataFrame | None,
                 encoded: tuple[np.ndarray, Sequence[str]] | None = None):
        if frame is None and encoded is None:
            raise ValueError("the safety check needs the validated patient frame or its "
                             "encoded matrix (encoded=(X, feature_names)); got neither")
        self.frame = frame
        self._encoded = None
        if encoded is not None:
            X, names = encoded
            self._encoded = (X, {name: j for j, name in enumerate(names)})
        self.n = len(frame) if frame is not None else len(encoded[0])
        if frame is not None and encoded is not None and len(encoded[0]) != self.n:
            raise ValueError(f"encoded matrix has {len(encoded[0])} rows for {self.n} patients")
        self._arrays: dict[str, tuple] = {}
        self._conds: dict[Cond, np.ndarray] = {}

    def column(self, name: str) -> tuple:
        """(values, missing) for bool/numeric columns; (codes, categories) for categories."""
        if name not in self._arrays:
            self._arrays[name] = self._convert(name)
        return self._arrays[name]

    def _convert(self, name: str) -> tuple:
        col = COLUMNS_BY_NAME[name]
        if self._encoded is not None and name in self._encoded[1]:
            X, index = self._encoded
            x = X[:, index[name]]
            missing = np.isnan(x)
            if col.dtype == "category":
                return np.where(missing, -1, x).astype(np.int8), tuple(col.levels)
            if col.dtype == "bool":
                return x == 1.0, missing
            return x, missing
        if self.frame is None:
            raise ContractError(
                f"column '{name}' is needed for the safety check but the encoded matrix has "
                "no such feature; pass the validated patient frame as well"
            )
        if name not in self.frame.columns:
            if col.required:
                raise ContractError(
                    f"column '{name}' is required for the safety check but absent; pass the "
                    "frame returned by features.validate.validate(df, 'patients')"
                )
            if col.dtype == "category":  # prior_*: absent means 'none'
                return np.full(self.n, col.levels.index(col.default), np.int8), col.levels
            if col.dtype == "bool":  # risk flags default False; other booleans unknown
                return np.zeros(self.n, bool), np.full(self.n, col.default is None)
            return np.full(self.n, np.nan), np.ones(self.n, bool)
        s = self.frame[name]
        # Typed columns (what validation returns) are read straight from their arrays: the
        # HTTP service assesses one patient per call, where pandas' per-column Series
        # round trips cost more than the rules themselves.
        if col.dtype == "category":
            if isinstance(s.dtype, pd.CategoricalDtype):
                return s.array.codes, tuple(s.dtype.categories)
            cat = s.astype(pd.CategoricalDtype(list(col.levels)))
            if cat.isna().equals(s.isna()):
                return cat.cat.codes.to_numpy(), tuple(cat.cat.categories)
        elif col.dtype == "bool" and s.dtype == np.bool_:
            return s.to_numpy(), np.zeros(self.n, bool)
        elif col.dtype == "bool" and pd.api.types.is_bool_dtype(s.dtype):
            array = s.array
            return array.to_numpy(dtype=bool, na_value=False), np.asarray(array.isna())
        elif (
            col.dtype in ("int", "float")
            and pd.api.types.is_numeric_dtype(s.dtype)
            and not pd.api.types.is_bool_dtype(s.dtype)
        ):
            values = s.to_numpy(dtype=np.float64, na_value=np.nan)
            return values, np.isnan(values)
        raise ContractError(
            f"column '{name}' has dtype {s.dtype} but the safety check needs typed "
            f"{col.dtype} values; pass the frame returned by features.validate.validate"
        )

    def holds(self, cond: Cond) -> np.ndarray:
        hit = self._conds.get(cond)
        if hit is None:
            hit = self._conds[cond] = self._evaluate(cond)
        return hit

    def _evaluate(self, cond: Cond) -> np.ndarray:
        dtype = COLUMNS_BY_NAME[cond.column].dtype
        first, second = self.column(cond.column)
        if dtype == "category":
            codes, levels = first, second
            if cond.op == "missing":
                return codes < 0
            wanted = cond.value if cond.op == "in" else (cond.value,)
            idx = [levels.index(v) for v in wanted if v in levels]
            hit = np.isin(codes, idx) if len(idx) > 1 else codes == (idx[0] if idx else -2)
            return (~hit & (codes >= 0)) if cond.op == "!=" else hit
        values, missing = first, second
        if cond.op == "missing":
            return missing.copy()
        if cond.op == "in":
            return np.isin(values, cond.value) & ~missing
        compare = {
            "==": np.equal,
            "!=": np.not_equal,
            "<": np.less,
            "<=": np.less_equal,
            ">": np.greater,
            ">=": np.greater_equal,
        }[cond.op]
        # `& ~missing`: unknown never triggers (NaN already compares False, NA booleans are
        # read as False, so this matters for `== False` and `!=`).
        return compare(values, cond.value) & ~missing

    def trigger(self, trigger: Trigger) -> np.ndarray:
        out = np.zeros(self.n, bool)
        for clause in trigger:
            hit = np.ones(self.n, bool)
            for cond in clause:
                hit &= self.holds(cond)
            out |= hit
        return out


@dataclass(frozen=True)
class PlanFlags:
    """Gate flags per patient (rows) and plan (columns; ``plan_indices`` into PLANS)."""

    plan_indices: np.ndarray
    allowed: np.ndarray
    needs_review: np.ndarray
    has_warning: np.ndarray


@dataclass(eq=False)
class SafetyAssessment:
    """The rule table evaluated on ``n`` patients. Arrays are read-only.

    Attributes
    ----------
    table : RuleTable
    ruleset_version : str
    rule_hits : ndarray of shape (n_rules, n), bool
        Component rule ``k`` (``table.rules[k]``) fired for patient ``i``.
    pair_hits : ndarray of shape (n_pair_rules, n), bool
        The pair rule's patient-side trigger holds (it applies to plans containing the pair).
    count_hits, count_base : ndarray of shape (n_count_rules, n)
        The count rule's trigger holds; how many of its co-medication flags the patient has.
    blocked, review, warn : ndarray of shape (n, 12), bool
        Some component rule with that action hits component ``j``
        (order ``features.catalog.COMPONENT_CODES``).
    gate_words : ndarray of shape (3, n), uint64
        Per action (BLOCK, REVIEW, WARN), the plan features the patient's hits touch.
    """

    table: RuleTable
    ruleset_version: str
    rule_hits: np.ndarray
    pair_hits: np.ndarray
    count_hits: np.ndarray
    count_base: np.ndarray
    blocked: np.ndarray
    review: np.ndarray
    warn: np.ndarray
    gate_words: np.ndarray
    _allowed: np.ndarray | None = field(default=None, repr=False)
    _compiled: _Compiled | None = field(default=None, repr=False)

    def _comp(self) -> _Compiled:
        """``_compile(self.table)``, looked up once: the lookup hashes the whole table,
        which cost more than the rest of a one-plan :meth:`plan_warnings` call."""
        if self._compiled is None:
            self._compiled = _compile(self.table)
        return self._compiled

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.table.rules

    @property
    def n_patients(self) -> int:
        return self.blocked.shape[0]

    def allowed_plans(self) -> np.ndarray:
        """(n, 839) bool, order ``features.catalog.PLANS``: no component of the plan is
        blocked and no BLOCK pair or count rule applies. Computed once, then cached."""
        if self._allowed is None:
            self._allowed = self._applies("BLOCK", np.arange(N_PLANS), applies=False)
            self._allowed.setflags(write=False)
        return self._allowed

    def plan_flags(self, plan_indices: np.ndarray | None = None) -> PlanFlags:
        """Vectorised gate for many plans (default: all 839, in PLANS order): allowed,
        needs clinician review (a REVIEW rule applies), has a warning (a WARN rule applies)."""
        if plan_indices is None:
            idx = np.arange(N_PLANS)
            allowed = self.allowed_plans()
        else:
            idx = np.asarray([_plan_index(p) for p in np.atleast_1d(plan_indices)], dtype=int)
            allowed = self._applies("BLOCK", idx, applies=False)
        return PlanFlags(idx, allowed, self._applies("REVIEW", idx), self._applies("WARN", idx))

    def exclusions(self, i: int) -> list[dict]:
        """Everything blocked for patient ``i``.

        One entry per blocked component, in catalog order:
        ``{"component": code, "rules": [{id, action, reason, source, floor}, ...]}``; then
        one per BLOCK pair/count rule that applies: ``{"combination": ..., "rules": [...]}``.
        """
        comp = self._comp()
        hits = self.rule_hits[:, i] & (comp.action == "BLOCK")
        out: list[dict] = []
        for j in np.flatnonzero(self.blocked[i]):
            ks = np.flatnonzero(hits & comp.component_mask[:, j])
            out.append(
                {
                    "component": COMPONENT_CODES[j],
                    "rules": [_rule_item(self.table.rules[k]) for k in ks],
                }
            )
        for k, p in enumerate(self.table.pair_rules):
            if p.action == "BLOCK" and self.pair_hits[k, i]:
                out.append(
                    {"combination": "+".join(sorted(p.components)), "rules": [_rule_item(p)]}
                )
        for k, c in enumerate(self.table.count_rules):
            if c.action == "BLOCK" and self.count_hits[k, i]:
                need = max(c.at_least - int(self.count_base[k, i]), 1)
                out.append(
                    {
                        "combination": f"{need} or more of {', '.join(c.components)}",
                        "rules": [_rule_item(c)],
                    }
                )
        return out

    def plan_warnings(self, i: int, plan: str | int) -> list[dict]:
        """REVIEW and WARN items for patient ``i`` and one plan (any spelling, or an index
        into PLANS), REVIEW first, then table order:
        ``{"rule_id", "action", "reason", "source", "components": [codes]}``.
        BLOCKs are not repeated here; see :meth:`exclusions`."""
        p = _plan_index(plan)
        in_plan = plan_matrix()[p].astype(bool)
        comp = self._comp()
        items = []
        for k in np.flatnonzero(self.rule_hits[:, i] & (comp.action != "BLOCK")):
            touched = comp.component_mask[k] & in_plan
            if touched.any():
                codes = [COMPONENT_CODES[j] for j in np.flatnonzero(touched)]
                items.append(_warning_item(self.table.rules[k], codes))
        for k, r in enumerate(self.table.pair_rules):
            if r.action != "BLOCK" and self.pair_hits[k, i] and comp.pair_plan_mask[k, p]:
                items.append(_warning_item(r, sorted(r.components)))
        for k, r in enumerate(self.table.count_rules):
            total = int(self.count_base[k, i]) + int(comp.count_plan[k, p])
            adds = comp.count_plan[k, p] > 0
            if r.action != "BLOCK" and self.count_hits[k, i] and adds and total >= r.at_least:
                codes = [c for c in r.components if in_plan[COMPONENT_INDEX[c]]]
                items.append(_warning_item(r, codes))
        return sorted(items, key=lambda d: ACTIONS.index(d["action"]))  # stable sort

    def _applies(self, action: str, idx: np.ndarray, *, applies: bool = True) -> np.ndarray:
        words = self._comp().plan_words[idx]
        return _gate(self.gate_words[ACTIONS.index(action)], words, applies=applies)


def _rule_item(rule: Rule | PairRule | CountRule) -> dict:
    return {
        "id": rule.id,
        "action": rule.action,
        "reason": rule.reason,
        "source": rule.source,
        "floor": bool(getattr(rule, "floor", False)),
    }


def _warning_item(rule: Rule | PairRule | CountRule, components: list[str]) -> dict:
    return {
        "rule_id": rule.id,
        "action": rule.action,
        "reason": rule.reason,
        "source": rule.source,
        "components": components,
    }


def _plan_index(plan: str | int | np.integer) -> int:
    if isinstance(plan, int | np.integer):
        if not 0 <= int(plan) < N_PLANS:
            raise IndexError(f"plan index {plan} is outside 0..{N_PLANS - 1}")
        return int(plan)
    found = PLAN_INDEX.get(plan)
    return found if found is not None else PLAN_INDEX[parse_plan(plan)]


def assess(patients: pd.DataFrame | None, table: RuleTable = RULES, *,
           encoded: tuple[np.ndarray, Sequence[str]] | None = None) -> SafetyAssessment:
    """Evaluate ``table`` on every patient.

    Parameters
    ----------
    patients : DataFrame
        ``features.validate.validate(df, "patients").frame`` (``"request"`` and
        ``"episodes"`` frames work too). Row ``i`` of every result is row ``i`` here.
    table : RuleTable, default=RULES
        Checked with :func:`check_table` on first use.
    encoded : (X, feature_names), optional
        The same patients as encoded by the model (``PatientEncoder.transform`` of the
        validated frame, or ``transform_values`` of validated records): the columns it
        holds are read from it, with identical results. ``patients`` may then be None.

    Returns
    -------
    SafetyAssessment

    Examples
    --------
    >>> a = assess(validate(df, "patients").frame)        # doctest: +SKIP
    >>> a.allowed_plans().shape                            # doctest: +SKIP
    (len(df), 839)
    """
    comp = _compile(table)
    cols = _Columns(patients, encoded)
    n = cols.n
    rule_hits = np.empty((len(table.rules), n), dtype=bool)
    for k, rule in enumerate(table.rules):
        rule_hits[k] = cols.trigger(rule.trigger)
    pair_hits = np.empty((len(table.pair_rules), n), dtype=bool)
    for k, pair in enumerate(table.pair_rules):
        pair_hits[k] = cols.trigger(pair.trigger)
    count_hits = np.empty((len(table.count_rules), n), dtype=bool)
    count_base = np.zeros((len(table.count_rules), n), dtype=np.int16)
    for k, rule in enumerate(table.count_rules):
        count_hits[k] = cols.trigger(rule.trigger)
        for name in rule.flags:
            count_base[k] += cols.holds(flag(name))

    # Which components each patient's hits touch, per action: an OR of whole rows into a
    # (12, n) matrix. This is the (n, n_rules) @ (n_rules, 12) product, written as ~70 row
    # ORs because a float matmul hands 10k rows to threaded BLAS, which stalled for ~15 ms
    # (vs 0.5 ms idle) whenever other processes held both cores during the bench.
    touched = np.zeros((len(ACTIONS), len(COMPONENT_CODES), n), dtype=bool)
    for k, rule in enumerate(table.rules):
        for code in rule.components:
            touched[ACTIONS.index(rule.action), COMPONENT_INDEX[code]] |= rule_hits[k]
    by_action = {a: np.ascontiguousarray(touched[a_i].T) for a_i, a in enumerate(ACTIONS)}
    words = np.zeros((len(ACTIONS), n), dtype=np.uint64)
    for a_i in range(len(ACTIONS)):
        for j, bit in enumerate(_COMPONENT_BITS):
            words[a_i] |= touched[a_i, j].astype(np.uint64) * bit
    for k, pair in enumerate(table.pair_rules):
        bit = np.uint64(len(COMPONENT_CODES) + k)
        words[ACTIONS.index(pair.action)] |= pair_hits[k].astype(np.uint64) << bit
    for k, rule in enumerate(table.count_rules):
        # The patient needs `need` more counted classes from the plan: set the plan-feature
        # bit "plan has >= need counted classes".
        need = np.clip(rule.at_least - count_base[k], 1, rule.at_least).astype(np.uint64)
        bit = np.uint64(1) << (np.uint64(comp.count_bit0[k]) + need - np.uint64(1))
        words[ACTIONS.index(rule.action)] |= np.where(count_hits[k], bit, np.uint64(0))

    for arr in (rule_hits, pair_hits, count_hits, count_base, words, *by_action.values()):
        arr.setflags(write=False)
    log.debug("safety: %d patient(s) assessed against ruleset %s", n, comp.version)
    return SafetyAssessment(
        table=table,
        ruleset_version=comp.version,
        rule_hits=rule_hits,
        pair_hits=pair_hits,
        count_hits=count_hits,
        count_base=count_base,
        blocked=by_action["BLOCK"],
        review=by_action["REVIEW"],
        warn=by_action["WARN"],
        gate_words=words,
        _compiled=comp,
    )


# --------------------------------------------------------------------------- floor guard


def _floor_blocked(patients: pd.DataFrame) -> np.ndarray:
    """(n, 12) components CONTRACT §5 excludes, written out by hand on purpose: it shares
    only the column reader with the rule table, so a table edit cannot silently weaken it."""
    cols = _Columns(patients)

    def yes(name: str) -> np.ndarray:
        return cols.holds(flag(name))

    out = np.zeros((cols.n, len(COMPONENT_CODES)), bool)
    for code in COMPONENT_CODES:
        out[:, COMPONENT_INDEX[code]] = cols.holds(is_(f"prior_{code}", "intolerant"))
    out[:, COMPONENT_INDEX["nsaid"]] |= (
        cols.holds(Cond("egfr", "<", 30))
        | yes("gi_bleed_history")
        | yes("heart_failure")
        | yes("pregnant")
    )
    out[:, COMPONENT_INDEX["snri"]] |= yes("maoi")
    out[:, COMPONENT_INDEX["tca"]] |= (
        yes("maoi") | yes("cardiac_conduction_disease") | yes("suicidal_ideation")
    )
    out[:, COMPONENT_INDEX["opioid"]] |= (
        yes("opioid_use_disorder") | yes("benzodiazepine") | yes("maoi")
    )
    return out


def floor_violations(patients: pd.DataFrame, plans) -> np.ndarray:
    """For each row ``i``: does ``plans[i]`` (spelling or index into PLANS) break CONTRACT §5
    for patient ``patients.iloc[i]``? Returns a bool array of length ``len(patients)``."""
    plans = list(plans) if not isinstance(plans, np.ndarray) else plans
    if len(plans) != len(patients):
        raise ValueError(
            f"got {len(plans)} plan(s) for {len(patients)} patient(s); "
            "pass one plan per patient row"
        )
    idx = np.fromiter((_plan_index(p) for p in plans), dtype=np.int64, count=len(plans))
    return (_floor_blocked(patients) & plan_matrix()[idx].astype(bool)).any(axis=1)


__all__ = [
    "ACTIONS",
    "ALWAYS",
    "Cond",
    "CountRule",
    "PairRule",
    "PlanFlags",
    "RULES",
    "RULESET_SERIES",
    "RULESET_VERSION",
    "Rule",
    "RuleTable",
    "SafetyAssessment",
    "any_of",
    "assess",
    "check_table",
    "flag",
    "floor_violations",
    "is_",
    "ruleset_version",
    "when",
]
