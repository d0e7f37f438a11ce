"""Every column of the interface contract (CONTRACT.md §2–§3), declared once.

The validator (:mod:`features.validate`), the readers, the simulator, the encoder and the
service's request models are all derived from these declarations; nothing else in the
project retypes a column name, range or level list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from features.catalog import COMPONENT_CODES

DType = Literal["string", "int", "float", "bool", "category", "date", "plan"]

PRIOR_LEVELS = ("none", "responded", "partial", "no_response", "intolerant")
SEX_LEVELS = ("female", "male", "other", "unknown")
PAIN_CONDITIONS = (
    "low_back",
    "neck",
    "osteoarthritis",
    "fibromyalgia",
    "neuropathic",
    "headache",
    "other",
)


@dataclass(frozen=True)
class Column:
    """One contract column.

    ``required`` is for data files; the HTTP request relaxes ``patient_id`` only.
    ``default`` is the value an absent/empty optional column takes (risk flags ``False``,
    prior responses ``"none"``); ``None`` means absent stays missing.
    """

    name: str
    dtype: DType
    required: bool
    group: str
    description: str
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    levels: tuple[str, ...] | None = None
    default: object = None
    max_length: int | None = None

    def range_text(self) -> str:
        if self.levels:
            return "one of " + ", ".join(self.levels)
        if self.dtype == "bool":
            return "true/false, 1/0 or yes/no"
        if self.min is not None and self.max is not None:
            span = f"{self.min:g}–{self.max:g}"
            if self.min_exclusive:  # e.g. propensity (0, 1]
                span = f"({self.min:g}, {self.max:g}]"
            return span + (f" {self.unit}" if self.unit else "")
        return self.dtype


def _risk(name: str, description: str) -> Column:
    return Column(name, "bool", False, "risk", description, default=False)


def _prior(code: str) -> Column:
    return Column(
        f"prior_{code}",
        "category",
        False,
        "prior",
        f"how the patient responded when {code} was tried before",
        levels=PRIOR_LEVELS,
        default="none",
    )


PATIENT_COLUMNS: tuple[Column, ...] = (
    Column(
        "patient_id", "string", True, "identity", "pseudonymous patient identifier", max_length=64
    ),
    Column("age", "int", True, "demographics", "age", unit="years", min=18, max=110),
    Column("sex", "category", True, "demographics", "sex", levels=SEX_LEVELS),
    Column("bmi", "float", False, "lifestyle", "body-mass index", unit="kg/m²", min=10, max=80),
    Column(
        "pain_condition",
        "category",
        True,
        "pain",
        "main chronic pain condition",
        levels=PAIN_CONDITIONS,
    ),
    Column(
        "neuropathic_component",
        "bool",
        False,
        "pain",
        "neuropathic features, e.g. radicular pain or DN4 ≥ 4 (missing = unknown)",
    ),
    Column(
        "pain_duration_months",
        "float",
        True,
        "pain",
        "duration of the pain",
        unit="months",
        min=3,
        max=600,
    ),
    Column(
        "pain_intensity",
        "float",
        True,
        "pain",
        "average pain over the last week (NRS)",
        unit="NRS 0–10",
        min=0,
        max=10,
    ),
    Column(
        "peg",
        "float",
        True,
        "pain",
        "PEG-3 mean score (pain, enjoyment, general activity)",
        unit="points",
        min=0,
        max=10,
    ),
    Column("phq9", "int", True, "mood", "PHQ-9 depression score", unit="points", min=0, max=27),
    Column("gad7", "int", True, "mood", "GAD-7 anxiety score", unit="points", min=0, max=21),
    Column("pcs", "int", False, "mood", "Pain Catastrophizing Scale", unit="points", min=0, max=52),
    Column("isi", "int", False, "mood", "Insomnia Severity Index", unit="points", min=0, max=28),
    Column("smoker", "bool", False, "lifestyle", "current smoker (missing = unknown)"),
    Column(
        "activity_min_week",
        "float",
        False,
        "lifestyle",
        "moderate physical activity",
        unit="min/week",
        min=0,
        max=3000,
    ),
    Column(
        "alcohol_units_week",
        "float",
        False,
        "lifestyle",
        "alcohol",
        unit="units/week",
        min=0,
        max=300,
    ),
    Column(
        "diet_quality",
        "float",
        False,
        "lifestyle",
        "diet quality score (higher = better)",
        unit="points",
        min=0,
        max=100,
    ),
    Column(
        "egfr",
        "float",
        False,
        "lifestyle",
        "estimated glomerular filtration rate",
        unit="mL/min/1.73 m²",
        min=0,
        max=200,
    ),
    _risk("gi_bleed_history", "history of GI bleeding or ulcer"),
    _risk("heart_failure", "heart failure"),
    _risk("cardiovascular_disease", "established cardiovascular disease"),
    _risk("anticoagulant", "on an oral anticoagulant"),
    _risk("bleeding_disorder", "bleeding disorder"),
    _risk("bipolar_disorder", "bipolar disorder"),
    _risk("suicidal_ideation", "current suicidal ideation (e.g. PHQ-9 item 9 > 0)"),
    _risk("maoi", "on an MAO inhibitor (now or within 14 days)"),
    _risk("serotonergic_drug", "on another serotonergic drug (SSRI, tramadol, triptan …)"),
    _risk("opioid_use_disorder", "opioid use disorder"),
    _risk("benzodiazepine", "on a benzodiazepine"),
    _risk("sleep_apnea", "sleep apnoea"),
    _risk("cardiac_conduction_disease", "cardiac conduction disease / QT prolongation"),
    _risk("pregnant", "pregnant"),
    _risk("liver_disease", "chronic liver disease"),
    *(_prior(code) for code in COMPONENT_CODES),
)

EPISODE_EXTRA_COLUMNS: tuple[Column, ...] = (
    Column("episode_id", "string", True, "episode", "unique episode identifier", max_length=128),
    Column("plan", "plan", True, "episode", "the plan actually given (CONTRACT §1 spelling)"),
    Column(
        "peg_12wk",
        "float",
        True,
        "episode",
        "PEG-3 score 12 weeks after the start",
        unit="points",
        min=0,
        max=10,
    ),
    Column(
        "adverse_event", "bool", True, "episode", "treatment-limiting adverse event within 12 weeks"
    ),
    Column("start_date", "date", False, "episode", "start of the episode (ISO date)"),
    Column(
        "propensity",
        "float",
        False,
        "episode",
        "probability with which the logging policy chose this plan",
        min=0,
        max=1,
        min_exclusive=True,
    ),
)

EPISODE_COLUMNS: tuple[Column, ...] = PATIENT_COLUMNS + EPISODE_EXTRA_COLUMNS
COLUMNS_BY_NAME: dict[str, Column] = {c.name: c for c in EPISODE_COLUMNS}

RISK_FLAGS: tuple[str, ...] = tuple(c.name for c in PATIENT_COLUMNS if c.group == "risk")
PRIOR_COLUMNS: tuple[str, ...] = tuple(f"prior_{code}" for code in COMPONENT_CODES)
# Everything the model may look at: the profile minus the identifier.
FEATURE_COLUMNS: tuple[str, ...] = tuple(c.name for c in PATIENT_COLUMNS if c.name != "patient_id")

# Column-name constants used across packages.
PATIENT_ID = "patient_id"
EPISODE_ID = "episode_id"
PLAN = "plan"
PEG = "peg"
PEG_12WK = "peg_12wk"
ADVERSE_EVENT = "adverse_event"
PROPENSITY = "propensity"
START_DATE = "start_date"

# Responder: peg_12wk <= 0.7 * peg (IMMPACT ≥30 % reduction; CONTRACT §3, evidence §1.2).
RESPONDER_FRACTION = 0.7

Kind = Literal["patients", "episodes", "request"]


def columns_for(kind: Kind) -> tuple[Column, ...]:
    """The declared columns for a kind of input."""
    if kind == "episodes":
        return EPISODE_COLUMNS
    if kind == "patients":
        return PATIENT_COLUMNS
    if kind == "request":
        return tuple(
            replace(c, required=False) if c.name == PATIENT_ID else c for c in PATIENT_COLUMNS
        )
    raise ValueError(f"kind must be 'patients', 'episodes' or 'request', not {kind!r}")
