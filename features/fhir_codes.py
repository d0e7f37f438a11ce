"""The FHIR code table (``features/fhir_codes.yaml``): loading, checking and lookups.

The table says which LOINC / SNOMED CT / ICD-10-CM / RxNorm codes feed which CONTRACT §2
field. Only rows with ``status: verified`` are used; ``unverified`` rows stay in the file so
a reviewer sees what was left out and why (interop.md: codes marked "(verify)" must be checked
or left out, never guessed). :func:`load_code_table` checks every row on load and raises
:class:`~features.errors.ConfigError` listing all problems, so a bad edit fails loudly in the
first test rather than silently dropping a safety flag.

Lookups take plain codings, ``(system, code, display)`` tuples, plus the concept's ``text``,
so they work the same for R4B models and raw dicts. A coded row always wins; the term lists
are a documented fallback on display/text (see the YAML header).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from features.catalog import DRUG
from features.errors import ConfigError
from features.schema import PAIN_CONDITIONS, RISK_FLAGS

Coding = tuple[str | None, str | None, str | None]  # (system, code, display)

MEASURES = frozenset(
    {
        "pain_intensity",
        "peg",
        "peg_enjoyment",
        "peg_activity",
        "phq9",
        "phq9_item9",
        "gad7",
        "bmi",
        "egfr",
        "smoking_status",
        "activity_days",
        "activity_minutes",
        "creatinine",
        "pcs",
        "isi",
    }
)
FLAG_CLASSES = ("benzodiazepine", "maoi", "serotonergic_drug", "anticoagulant")
DRUG_CLASSES = frozenset(DRUG) | frozenset(FLAG_CLASSES)
CONTEXTS = frozenset({"depression", "overdose_history"})
STATUSES = ("verified", "unverified")


@dataclass(frozen=True)
class ObservationCode:
    measure: str
    tier: int
    code: str
    display: str


@dataclass(frozen=True)
class ConditionMap:
    """What one condition code (or term) means for the profile."""

    pain_condition: str | None = None
    neuropathic: bool = False
    flag: str | None = None
    ckd_stage: int | None = None
    context: str | None = None


@dataclass(frozen=True)
class ConditionHit:
    meaning: ConditionMap
    via: str  # "code" or "text"
    matched: str  # the code, or the term that matched


@dataclass(frozen=True)
class CodeTable:
    version: str
    source: str
    systems: dict[str, str]
    observations: dict[tuple[str, str], ObservationCode]
    smoking_values: dict[tuple[str, str], bool]
    smoking_terms: dict[str, tuple[str, ...]]
    conditions: dict[tuple[str, str], ConditionMap]
    condition_prefixes: tuple[tuple[str, str, ConditionMap], ...]
    condition_terms: tuple[tuple[str, ConditionMap], ...]
    condition_term_exclusions: tuple[str, ...]
    pain_term_exclusions: tuple[str, ...]
    pain_condition_priority: tuple[str, ...]
    medication_codes: dict[tuple[str, str], str]
    ingredients: dict[str, frozenset[str]]
    allergy_extra: dict[str, frozenset[str]]
    allergy_terms: dict[str, tuple[str, ...]]
    assumed_values: dict[str, tuple[float, str]]
    unverified: tuple[dict, ...]
    _ingredient_re: re.Pattern = field(repr=False, compare=False, default=None)

    # ------------------------------------------------------------------ lookups
    def observation(self, codings: Iterable[Coding]) -> ObservationCode | None:
        """The measure of an Observation code, best tier first; None when no row matches."""
        found = [self.observations.get(_key(s, c)) for s, c, _ in codings]
        found = [f for f in found if f is not None]
        return min(found, key=lambda f: f.tier) if found else None

    def is_code(self, codings: Iterable[Coding], system: str, code: str) -> bool:
        url = self.systems[system]
        return any(_key(s, c) == (url, code) for s, c, _ in codings)

    def conditions_for(self, codings: Sequence[Coding], text: str | None) -> list[ConditionHit]:
        """Every meaning of one Condition.code: coded rows first; terms only if no code hit."""
        hits: list[ConditionHit] = []
        for s, c, _ in codings:
            key = _key(s, c)
            if key in self.conditions:
                hits.append(ConditionHit(self.conditions[key], "code", c or ""))
                continue
            for url, prefix, meaning in self.condition_prefixes:
                if key[0] == url and key[1].startswith(prefix):
                    hits.append(ConditionHit(meaning, "code", c or ""))
        if hits:
            return hits
        words = _words(codings, text)
        if not words or any(x in words for x in self.condition_term_exclusions):
            return []
        for term, meaning in self.condition_terms:
            if meaning.pain_condition and any(x in words for x in self.pain_term_exclusions):
                continue
            if term in words:
                hits.append(ConditionHit(meaning, "text", term))
        return hits

    def medication_ingredients(
        self, codings: Sequence[Coding], text: str | None
    ) -> tuple[frozenset[str], str]:
        """Ingredient names of a medication concept and how they were found (code/text)."""
        coded = {
            self.medication_codes[k]
            for s, c, _ in codings
            if (k := _key(s, c)) in self.medication_codes
        }
        if coded:
            return frozenset(coded), "code"
        words = _words(codings, text)
        names = {m.group(0) for m in self._ingredient_re.finditer(words)} if words else set()
        return frozenset(names), "text"

    def classes_of(self, ingredients: Iterable[str]) -> frozenset[str]:
        out: set[str] = set()
        for name in ingredients:
            out |= self.ingredients.get(name, frozenset())
        return frozenset(out)

    def allergy_classes(
        self, codings: Sequence[Coding], text: str | None
    ) -> tuple[frozenset[str], str]:
        """Catalog drug classes an AllergyIntolerance substance rules out (CONTRACT §2 prior_*)."""
        names, via = self.medication_ingredients(codings, text)
        classes = {c for c in self.classes_of(names) if c in DRUG}
        words = _words(codings, text)
        for name, extra in self.allergy_extra.items():
            if words and re.search(rf"(?<![a-z]){re.escape(name)}(?![a-z])", words):
                classes |= extra
                via = "text"
        for code, terms in self.allergy_terms.items():
            if words and any(t in words for t in terms):
                classes.add(code)
                via = "text"
        return frozenset(classes), via

    def smoking(self, codings: Sequence[Coding], text: str | None) -> bool | None:
        """Current smoker from a 72166-2 value: True / False / None (unknown)."""
        for s, c, _ in codings:
            if (k := _key(s, c)) in self.smoking_values:
                return self.smoking_values[k]
        words = _words(codings, text)
        if not words or any(t in words for t in self.smoking_terms["unknown"]):
            return None
        if any(t in words for t in self.smoking_terms["not_current"]):
            return False
        if any(t in words for t in self.smoking_terms["current"]):
            return True
        return None


def _key(system: str | None, code: str | None) -> tuple[str, str]:
    return ((system or "").strip().rstrip("/"), (code or "").strip())


def _words(codings: Iterable[Coding], text: str | None) -> str:
    parts = [d for _, _, d in codings if d] + ([text] if text else [])
    return " | ".join(parts).lower()


# ---------------------------------------------------------------------------- loading

_DEFAULT = "fhir_codes.yaml"


@lru_cache(maxsize=4)
def load_code_table(path: str | Path | None = None) -> CodeTable:
    """Load and check the code table (the packaged one by default). Cached per path."""
    if path is None:
        text = resources.files("features").joinpath(_DEFAULT).read_text(encoding="utf-8")
        where = f"features/{_DEFAULT}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML ({err}); fix the file") from err
    problems = check_code_table(raw)
    if problems:
        raise ConfigError(
            f"{where} has {len(problems)} problem(s): "
            + "; ".join(problems)
            + ". Fix the rows named; every row needs system, code or prefix, maps_to, status "
            "and a source (verified) or reason (unverified)."
        )
    return _build(raw)


def check_code_table(raw: object) -> list[str]:
    """Every problem in a parsed code table, as short strings (empty list: fine)."""
    if not isinstance(raw, dict):
        return ["the file must hold a mapping at the top level"]
    out: list[str] = []
    if not isinstance(raw.get("version"), str) or not raw["version"].strip():
        out.append("'version' must be a non-empty string")
    systems = raw.get("systems") or {}
    for name in ("snomed", "icd10cm", "loinc", "rxnorm"):
        if name not in systems:
            out.append(f"systems.{name} is missing")

    def row_common(section: str, i: int, row: dict, need_code: bool = True) -> bool:
        where = f"{section}[{i}]"
        if not isinstance(row, dict):
            out.append(f"{where} is not a mapping")
            return False
        if row.get("system") not in systems:
            out.append(f"{where}: system {row.get('system')!r} is not one of {sorted(systems)}")
        if need_code and not (row.get("code") or row.get("prefix")):
            out.append(f"{where}: needs 'code' or 'prefix'")
        status = row.get("status")
        if status not in STATUSES:
            out.append(f"{where}: status {status!r} is not one of {STATUSES}")
        elif status == "verified" and not row.get("source"):
            out.append(f"{where}: a verified row needs a 'source'")
        elif status == "unverified" and not row.get("reason"):
            out.append(f"{where}: an unverified row needs a 'reason'")
        return True

    for i, row in enumerate(raw.get("observations") or []):
        if row_common("observations", i, row):
            if row.get("maps_to") not in MEASURES:
                out.append(
                    f"observations[{i}]: maps_to {row.get('maps_to')!r} is not a known measure"
                )
            if row.get("tier") not in (1, 2):
                out.append(f"observations[{i}]: tier must be 1 or 2")
    for i, row in enumerate(raw.get("smoking_values") or []):
        if row_common("smoking_values", i, row) and not isinstance(row.get("smoker"), bool):
            out.append(f"smoking_values[{i}]: smoker must be true or false")
    for i, row in enumerate(raw.get("conditions") or []):
        if row_common("conditions", i, row):
            out.extend(f"conditions[{i}]: {p}" for p in _check_condition_map(row.get("maps_to")))
    ingredients = raw.get("ingredients") or {}
    for name, classes in ingredients.items():
        bad = [c for c in classes or [] if c not in DRUG_CLASSES]
        if not classes or bad:
            out.append(
                f"ingredients.{name}: classes {bad or classes!r} not in {sorted(DRUG_CLASSES)}"
            )
    for i, row in enumerate(raw.get("medication_codes") or []):
        if row_common("medication_codes", i, row) and row.get("ingredient") not in ingredients:
            out.append(
                f"medication_codes[{i}]: ingredient {row.get('ingredient')!r} is not listed under ingredients"
            )
    terms = raw.get("condition_terms") or {}
    for level in terms.get("pain_condition") or {}:
        if level not in PAIN_CONDITIONS:
            out.append(f"condition_terms.pain_condition.{level} is not a pain_condition level")
    for flag in terms.get("flag") or {}:
        if flag not in RISK_FLAGS:
            out.append(f"condition_terms.flag.{flag} is not a CONTRACT §2 risk flag")
    for ctx in terms.get("context") or {}:
        if ctx not in CONTEXTS:
            out.append(f"condition_terms.context.{ctx} is not one of {sorted(CONTEXTS)}")
    priority = raw.get("pain_condition_priority") or []
    if sorted(priority) != sorted(PAIN_CONDITIONS):
        out.append("pain_condition_priority must list every pain_condition level exactly once")
    for code in raw.get("allergy_terms") or {}:
        if code not in DRUG:
            out.append(f"allergy_terms.{code} is not a catalog drug class")
    for name, spec in (raw.get("assumed_values") or {}).items():
        if name not in ("phq9", "gad7") or not isinstance(spec, dict) or "value" not in spec:
            out.append(f"assumed_values.{name}: only phq9/gad7 with a value and source")
    return out


def _check_condition_map(maps: object) -> list[str]:
    if not isinstance(maps, dict) or not maps:
        return ["maps_to must be a non-empty mapping"]
    out = []
    known = {"pain_condition", "neuropathic", "flag", "ckd_stage", "context"}
    for k in maps:
        if k not in known:
            out.append(f"maps_to key {k!r} is not one of {sorted(known)}")
    if "pain_condition" in maps and maps["pain_condition"] not in PAIN_CONDITIONS:
        out.append(f"pain_condition {maps['pain_condition']!r} is not a level")
    if "flag" in maps and maps["flag"] not in RISK_FLAGS:
        out.append(f"flag {maps['flag']!r} is not a risk flag")
    if "ckd_stage" in maps and maps["ckd_stage"] not in (0, 1, 2, 3, 4, 5):
        out.append("ckd_stage must be 0-5")
    if "context" in maps and maps["context"] not in CONTEXTS:
        out.append(f"context {maps['context']!r} is not one of {sorted(CONTEXTS)}")
    return out


def _build(raw: dict) -> CodeTable:
    systems = {k: str(v).rstrip("/") for k, v in raw["systems"].items()}
    used = [
        (section, row)
        for section in ("observations", "smoking_values", "conditions", "medication_codes")
        for row in raw.get(section) or []
        if row["status"] == "verified"
    ]
    observations, smoking, conditions, prefixes, meds = {}, {}, {}, [], {}
    for section, row in used:
        url = systems[row["system"]]
        if section == "observations":
            observations[(url, row["code"])] = ObservationCode(
                row["maps_to"], row["tier"], row["code"], row.get("display", "")
            )
        elif section == "smoking_values":
            smoking[(url, row["code"])] = row["smoker"]
        elif section == "conditions":
            meaning = ConditionMap(**row["maps_to"])
            if row.get("prefix"):
                prefixes.append((url, row["prefix"], meaning))
            else:
                conditions[(url, row["code"])] = meaning
        else:
            meds[(url, row["code"])] = row["ingredient"]
    terms: list[tuple[str, ConditionMap]] = []
    ct = raw.get("condition_terms") or {}
    for level, words in (ct.get("pain_condition") or {}).items():
        terms += [(w, ConditionMap(pain_condition=level)) for w in words]
    terms += [(w, ConditionMap(neuropathic=True)) for w in ct.get("neuropathic") or []]
    for flag, words in (ct.get("flag") or {}).items():
        terms += [(w, ConditionMap(flag=flag)) for w in words]
    for ctx, words in (ct.get("context") or {}).items():
        terms += [(w, ConditionMap(context=ctx)) for w in words]
    ingredients = {k: frozenset(v) for k, v in raw["ingredients"].items()}
    names = sorted(ingredients, key=len, reverse=True)
    ingredient_re = re.compile(
        r"(?<![a-z])(?:" + "|".join(re.escape(n) for n in names) + r")(?![a-z])"
    )
    unverified = tuple(
        {"section": section, **row}
        for section in ("observations", "smoking_values", "conditions", "medication_codes")
        for row in raw.get(section) or []
        if row["status"] == "unverified"
    )
    return CodeTable(
        version=raw["version"],
        source=raw.get("source", ""),
        systems=systems,
        observations=observations,
        smoking_values=smoking,
        smoking_terms={k: tuple(v) for k, v in (raw.get("smoking_terms") or {}).items()},
        conditions=conditions,
        condition_prefixes=tuple(prefixes),
        condition_terms=tuple(terms),
        condition_term_exclusions=tuple(raw.get("condition_term_exclusions") or ()),
        pain_term_exclusions=tuple(raw.get("pain_term_exclusions") or ()),
        pain_condition_priority=tuple(raw["pain_condition_priority"]),
        medication_codes=meds,
        ingredients=ingredients,
        allergy_extra={k: frozenset(v) for k, v in (raw.get("allergy_extra") or {}).items()},
        allergy_terms={k: tuple(v) for k, v in (raw.get("allergy_terms") or {}).items()},
        assumed_values={
            k: (float(v["value"]), str(v.get("source", "")))
            for k, v in (raw.get("assumed_values") or {}).items()
        },
        unverified=unverified,
        _ingredient_re=ingredient_re,
    )


__all__ = [
    "CodeTable",
    "ConditionHit",
    "ConditionMap",
    "Coding",
    "ObservationCode",
    "check_code_table",
    "load_code_table",
]
