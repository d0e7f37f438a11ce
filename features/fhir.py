"""FHIR R4 → CONTRACT §2 patient profile.

:func:`bundle_to_profile` reads a FHIR R4 Bundle (transaction, collection, searchset …);
:func:`resources_to_profile` reads a Patient plus a flat list of resources (what a CDS Hooks
prefetch or a FHIR search gives). Both return a :class:`FhirProfile`: the profile itself, what
was missing and how that limits the recommendation, parse/data warnings, and the resource
behind every field. Which codes feed which field is data, in ``features/fhir_codes.yaml``
(versioned; see :mod:`features.fhir_codes`).

Parsing is lenient where real data are messy (interop.md §1.9 "parsing advice")
-------------------------------------------------------------------------------
Each resource we read is validated on its own with the ``fhir.resources.R4B`` models (R4-era
data fail the default R5 models). Resource ids that are not legal FHIR ids (the AHRQ test
patient's ``brenda_jackson``) are rewritten; elements the model does not know (R5 fields,
typos, vendor additions) are dropped and named in a warning; a resource that still fails is
skipped with a warning. A bad resource never sinks the profile. Resources about another
patient are ignored. Warnings name resources and elements, never values or names, and
nothing here logs patient data.

Time (AHRQ lesson, interop.md §5.2-5.3)
---------------------------------------
Everything is evaluated *as of* a date (default today, UTC): resources dated after ``as_of``
are ignored, so a fixed-date extract can be replayed as of its own date
(:func:`latest_record_date`). Observations count only inside ``lookback_days`` (default 365)
before ``as_of``; within that window the most recent reading wins, except that a tier-1
instrument always beats a tier-2 approximation (the Wong-Baker FACES scale for pain). A
reading found only before the window is reported as *stale* with its date.

Rules for the required fields (CONTRACT §2) — what a clinician would expect
--------------------------------------------------------------------------
* ``age`` from ``Patient.birthDate`` at ``as_of``; ``sex`` from ``Patient.gender``
  (absent → ``unknown``, with a warning).
* ``pain_condition``: active, not refuted Conditions (clinicalStatus read as of ``as_of``:
  a condition resolved *after* ``as_of`` was active then). Several → the first in
  ``pain_condition_priority`` (neuropathic, fibromyalgia, low back, neck, OA, headache,
  generic chronic pain: the indication-level effect modifiers of evidence §4 first); the
  others are named in a warning. No chronic-pain condition → the profile is *not applicable*
  (this is a chronic-pain tool; it does not guess a pain type from a pain score).
* ``pain_duration_months`` from the earliest onset (``onset[x]``, else ``recordedDate``) of
  the active chronic-pain conditions, clipped to the contract's 3-600. A chronic-pain
  diagnosis means ≥ 3 months by definition, so an undated one gives 3 (flagged).
* ``pain_intensity``: NRS 72514-3 or the PEG pain item 75893-8 (a standalone observation or
  the PEG component; 75893-8 is literally "average pain over the past week"); Wong-Baker
  FACES 38221-8 only when neither is present, flagged as an approximation.
* ``peg``: PEG mean 91147-9 (its value, or the mean of its three components). If absent, the
  pain score stands in for it, flagged: the PEG's interference items are unknown, so benefit
  estimates (which are in PEG points) are less certain. No pain score at all → incomplete.
* ``phq9`` / ``gad7``: 44261-6 (and 89204-2, where Synthea stores adult PHQ-9) / 70274-6.
  They cannot be derived. Absent → the profile is *incomplete* and ``missing`` says so.
  With ``assume_missing_scores=True`` (the CDS Hooks default) they are filled with the
  cohort median from the code table (PHQ-9 8, GAD-7 7), listed in ``assumed`` and in
  ``missing`` (status ``assumed``) so every answer built on them says it is provisional and
  that the mood-dependent rules (OPI-6 at PHQ-9/GAD-7 ≥ 15) could not be checked.
  A clinician would rather see provisional, clearly labelled options plus a prompt to screen
  than nothing, and would never want a score silently invented; ``/recommend`` callers who
  can send the score themselves get the strict default (``False``).

Optional fields: ``bmi`` 39156-5, ``egfr`` 33914-3, ``smoker`` 72166-2 (value code or display
text), ``activity_min_week`` = 89555-7 days × 68516-4 minutes. Not read (no verified code):
``pcs``, ``isi``; not representable from FHIR without a questionnaire: ``alcohol_units_week``,
``diet_quality``. A serum creatinine is never converted to eGFR (the lab's eGFR is the value
clinicians act on); if only creatinine is on file, ``missing`` says so.

Risk flags: from active Conditions (codes, else the display-text fallback of the code table)
and *current* medications. Pregnancy counts only if its Condition started within 300 days of
``as_of`` (older "active" pregnancy entries are stale problem-list hygiene, not pregnancy).
Current medication = MedicationRequest ``active``/``on-hold`` (any age: an active order on the
medication list is treated as taken, the safe direction for the safety floor; orders older than
a year are named in a warning asking for medication reconciliation), ``completed`` within 90
days, MedicationStatement ``active``/``intended``/``on-hold``. ``doNotPerform`` orders,
``cancelled``/``entered-in-error``/``draft`` are ignored.

Prior response (``prior_<code>``), conservative on purpose
---------------------------------------------------------
* ``intolerant``: an active, not refuted AllergyIntolerance whose substance maps to the class
  (an aspirin/NSAID hypersensitivity blocks NSAIDs, evidence §5.2 NSAID-8), or a stopped order
  whose ``statusReason`` says intolerance / adverse effect / allergy.
* ``no_response``: a stopped order whose ``statusReason`` says it was ineffective.
* Otherwise ``none``, even when the class was used before: having *tried* a drug is not
  evidence of response or non-response, and the contract has no "tried, unknown" level. Such
  use is listed in ``FhirProfile.tried`` and in ``notes`` so the clinician can set the prior
  explicitly. ``responded`` and ``partial`` are never derived (interop.md §2.4: no standard
  element; PEG/NRS trajectories are confounded by everything else that changed).

Public API
----------
``bundle_to_profile(bundle, *, as_of=None, lookback_days=365, assume_missing_scores=False)``,
``resources_to_profile(patient, resources, *, ...)``, ``FhirProfile``,
``latest_record_date(bundle)``, ``DEFAULT_LOOKBACK_DAYS``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from features.catalog import DRUG
from features.errors import ContractError
from features.fhir_codes import FLAG_CLASSES, CodeTable, Coding, load_code_table
from features.schema import COLUMNS_BY_NAME, PATIENT_COLUMNS, PATIENT_ID

log = logging.getLogger(__name__)

DEFAULT_LOOKBACK_DAYS = 365
RECENT_COMPLETED_DAYS = 90  # a completed prescription this recent may still be being taken (A)
OLD_ACTIVE_ORDER_DAYS = 365  # active orders older than this get a reconciliation warning (A)
PREGNANCY_MAX_DAYS = 300  # ~42 weeks + margin: an older "active" pregnancy is stale (A)
DAYS_PER_MONTH = 30.4375
READ_TYPES = frozenset(
    {
        "Patient",
        "Condition",
        "Observation",
        "MedicationRequest",
        "MedicationStatement",
        "Medication",
        "AllergyIntolerance",
    }
)
REQUIRED_FIELDS: tuple[str, ...] = tuple(
    c.name for c in PATIENT_COLUMNS if c.required and c.name != PATIENT_ID
)
_INACTIVE_CLINICAL = {"inactive", "remission", "resolved"}
_EXCLUDED_VERIFICATION = {"refuted", "entered-in-error"}
_OBS_SKIP_STATUS = {"entered-in-error", "cancelled", "registered"}
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_INTOLERANCE_TERMS = ("intoleran", "adverse", "side effect", "allerg", "reaction", "sintol", "salg")
_INEFFECTIVE_TERMS = (
    "ineffective",
    "not effective",
    "lack of efficacy",
    "no effect",
    "no benefit",
    "treatment failure",
)

# How each absent field limits the recommendation (shown to the clinician verbatim).
IMPACT: dict[str, str] = {
    "age": "no birth date: age is required (it gates TCA-4/SMR-1 at 65+ and the Beers rules), so plans cannot be ranked",
    "sex": "no administrative gender: recorded as 'unknown'",
    "pain_condition": "no active chronic-pain condition on the problem list: this tool ranks plans for chronic pain only",
    "pain_duration_months": "no onset date on the chronic-pain condition: duration set to the 3-month minimum a chronic-pain diagnosis implies",
    "pain_intensity": "no pain score (NRS 72514-3 or PEG item 75893-8) in the look-back window: plans cannot be ranked without current pain intensity",
    "peg": "no PEG (91147-9): the pain score stands in for it, but the PEG's enjoyment and activity items are unknown, so benefit estimates (in PEG points) are less certain",
    "phq9": "no PHQ-9: mood-dependent effects (CBT/MBSR benefit, antidepressant choice, adherence) are uncertain, and the opioid review for PHQ-9 >= 15 (OPI-6) cannot be checked",
    "gad7": "no GAD-7: anxiety-dependent effects are uncertain, and the opioid review for GAD-7 >= 15 (OPI-6) cannot be checked",
    "egfr": "no eGFR: the renal rules (NSAID and duloxetine blocked below 30, NSAID caution 30-59, gabapentinoid dosing) cannot run; NSAID, SNRI and gabapentinoid carry a 'check renal function' warning",
    "bmi": "no BMI: weight-related effects (diet programme, osteoarthritis) use population averages",
    "smoker": "smoking status unknown: its prognostic effect is averaged out",
    "activity_min_week": "physical activity not recorded: exercise-programme estimates use population averages",
    "pcs": "Pain Catastrophizing Scale not read (no verified LOINC code): its prognostic effect is averaged out",
    "isi": "Insomnia Severity Index not read (no verified LOINC code): sleep-related effects are averaged out",
    "alcohol_units_week": "alcohol units/week are not derivable from FHIR screens: the heavy-drinking duloxetine rule (SNRI-3) cannot run",
    "diet_quality": "diet quality is not recorded in FHIR: diet-programme estimates use population averages",
}
_MISSING_ORDER = (
    "age",
    "sex",
    "pain_condition",
    "pain_duration_months",
    "pain_intensity",
    "peg",
    "phq9",
    "gad7",
    "egfr",
    "bmi",
    "smoker",
    "activity_min_week",
    "pcs",
    "isi",
    "alcohol_units_week",
    "diet_quality",
)
_NOT_MAPPED = ("pcs", "isi", "alcohol_units_week", "diet_quality")


@dataclass
class FhirProfile:
    """A CONTRACT §2 profile read from FHIR, with its provenance and gaps.

    Attributes
    ----------
    profile : dict
        Contract columns with a value (absent optional columns stay absent; risk flags only
        when true, ``prior_*`` only when not ``none``). ``patient_id`` is never set: EHR ids
        are not pseudonyms.
    missing : list of dict
        ``{field, required, status, impact}`` (+ ``last_seen`` for stale data); status is
        ``absent``, ``stale``, ``approximated``, ``assumed`` or ``not_mapped``.
    warnings : list of str
        Data-quality and parsing notes (never values of identifiers or names).
    sources : dict
        Field → the resource reference it came from (``"Observation/abc"``).
    applicable / not_applicable_reason :
        False when the tool does not apply (no chronic-pain condition, under 18, deceased).
    assumed : dict
        Field → ``{value, source}`` for provisional values (``assume_missing_scores``).
    current_medications : list of dict
        ``{class, ingredients, reference}`` for catalog/risk classes currently prescribed.
    tried : dict
        Catalog drug class → ``[{ingredients, last, reference}]`` of earlier use.
    notes : list of str
        Things the clinician should know that are not data problems (earlier use without a
        documented response, other chronic-pain conditions, CKD stage, overdose history).
    """

    profile: dict[str, Any]
    missing: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    applicable: bool = True
    not_applicable_reason: str | None = None
    assumed: dict[str, dict] = field(default_factory=dict)
    current_medications: list[dict] = field(default_factory=list)
    tried: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    as_of: date | None = None
    lookback_days: int = DEFAULT_LOOKBACK_DAYS
    code_table_version: str = ""

    @property
    def incomplete(self) -> list[str]:
        """Required contract fields (CONTRACT §2) still absent."""
        return [f for f in REQUIRED_FIELDS if self.profile.get(f) is None]

    @property
    def ready(self) -> bool:
        """Applicable and complete: the profile can be ranked."""
        return self.applicable and not self.incomplete

    @property
    def current_classes(self) -> list[str]:
        return sorted({m["class"] for m in self.current_medications})

    def require_ready(self) -> None:
        """Raise :class:`ContractError` naming every reason the profile cannot be ranked."""
        if not self.applicable:
            raise ContractError(
                f"the FHIR record cannot be ranked: {self.not_applicable_reason}",
                [{"column": "fhir_bundle", "problem": self.not_applicable_reason}],
            )
        if self.incomplete:
            why = {m["field"]: m["impact"] for m in self.missing}
            violations = [
                {"column": f, "problem": why.get(f, "required field absent from the record")}
                for f in self.incomplete
            ]
            raise ContractError(
                "the FHIR record lacks required profile field(s) "
                + ", ".join(self.incomplete)
                + " (CONTRACT §2); record them in the EHR, send them in 'patient' next to "
                "'fhir_bundle', or allow provisional scores where offered",
                violations,
            )

    def report(self) -> dict:
        """What an answer should carry next to the ranking: JSON-ready."""
        return {
            "missing": self.missing,
            "warnings": self.warnings,
            "assumed": self.assumed,
            "sources": self.sources,
            "notes": self.notes,
            "current_medications": self.current_medications,
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "lookback_days": self.lookback_days,
            "code_table_version": self.code_table_version,
        }


# ------------------------------------------------------------------------------ entry points


def bundle_to_profile(
    bundle: dict,
    *,
    as_of: date | datetime | str | None = None,
    lookback_days: int = DEFAULT_LOOKBACK_DAYS,
    assume_missing_scores: bool = False,
    code_table: CodeTable | None = None,
) -> FhirProfile:
    """Map one patient's FHIR R4 Bundle to a CONTRACT §2 profile.

    Parameters
    ----------
    bundle : dict
        A parsed FHIR Bundle holding exactly one Patient (any Bundle.type).
    as_of : date, datetime or ISO string, default=None (today, UTC)
        The evaluation date: age, look-back and "current" are computed at this date and
        resources dated later are ignored.
    lookback_days : int, default=365
        Observations older than this (before ``as_of``) are reported stale, not used.
    assume_missing_scores : bool, default=False
        Fill absent PHQ-9/GAD-7 with the code table's cohort medians, flagged as assumed.

    Raises
    ------
    ContractError
        The input is not a Bundle, or holds no Patient or several.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ContractError(
            "fhir_bundle must be a FHIR R4 Bundle object (resourceType 'Bundle') holding one "
            "patient's resources; got "
            + (
                f"resourceType {bundle.get('resourceType')!r}"
                if isinstance(bundle, dict)
                else type(bundle).__name__
            )
        )
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise ContractError("fhir_bundle.entry must be a list of {resource: {...}} entries")
    patients, others, aliases = [], [], []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "Patient":
            patients.append(resource)
            if isinstance(entry.get("fullUrl"), str):
                aliases.append(entry["fullUrl"])
        else:
            others.append((entry.get("fullUrl"), resource))
    if len(patients) != 1:
        raise ContractError(
            f"fhir_bundle must hold exactly one Patient resource, found {len(patients)}; send "
            "one bundle per patient"
        )
    return _map(
        patients[0],
        others,
        as_of=as_of,
        lookback_days=lookback_days,
        assume_missing_scores=assume_missing_scores,
        patient_aliases=aliases,
        table=code_table,
    )


def resources_to_profile(
    patient: dict,
    resources: Iterable[dict],
    *,
    as_of: date | datetime | str | None = None,
    lookback_days: int = DEFAULT_LOOKBACK_DAYS,
    assume_missing_scores: bool = False,
    code_table: CodeTable | None = None,
) -> FhirProfile:
    """Map a Patient resource plus a flat list of its resources (CDS Hooks prefetch, FHIR
    search results) to a profile. Same rules and parameters as :func:`bundle_to_profile`;
    searchset Bundles inside ``resources`` are unpacked."""
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        raise ContractError("patient must be a FHIR Patient resource object")
    flat: list[tuple[str | None, dict]] = []
    for r in resources:
        if isinstance(r, dict) and r.get("resourceType") == "Bundle":
            flat += [
                (e.get("fullUrl"), e["resource"])
                for e in r.get("entry") or []
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            ]
        elif isinstance(r, dict):
            flat.append((None, r))
    return _map(
        patient,
        flat,
        as_of=as_of,
        lookback_days=lookback_days,
        assume_missing_scores=assume_missing_scores,
        patient_aliases=(),
        table=code_table,
    )


def latest_record_date(bundle: dict) -> date | None:
    """The newest clinical date in a bundle (observations, conditions, medications, allergies).

    Pass it as ``as_of`` to replay a fixed-date extract (the AHRQ test patient, an old Synthea
    export) as of the day it was taken.
    """
    best: date | None = None
    for entry in (bundle or {}).get("entry") or []:
        r = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(r, dict) or r.get("resourceType") not in READ_TYPES:
            continue
        for key in (
            "effectiveDateTime",
            "issued",
            "onsetDateTime",
            "recordedDate",
            "authoredOn",
            "dateAsserted",
        ):
            d = _parse_date(r.get(key))
            if d and (best is None or d > best):
                best = d
    return best


# ------------------------------------------------------------------------------ the mapping


@dataclass
class _Reading:
    value: float
    when: date
    tier: int
    ref: str
    code: str


@dataclass
class _State:
    """Everything collected while reading one patient's resources."""

    table: CodeTable
    as_of: date
    lookback_days: int
    warnings: list[str] = field(default_factory=list)
    readings: dict[str, list[_Reading]] = field(default_factory=dict)
    pain_conditions: list[tuple[str, date | None, str, str]] = field(default_factory=list)
    flags: dict[str, str] = field(default_factory=dict)
    neuropathic_ref: str | None = None
    ckd_stage: tuple[int, str] | None = None
    context: dict[str, str] = field(default_factory=dict)
    priors: dict[str, tuple[str, str]] = field(default_factory=dict)
    current: list[dict] = field(default_factory=list)
    tried: dict[str, list[dict]] = field(default_factory=dict)
    latest_active_order: dict[str, date] = field(default_factory=dict)
    unresolved_medications: int = 0
    undated_observations: int = 0
    rewritten_ids: int = 0
    dropped_elements: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)
    foreign: int = 0


def _map(
    patient_raw: dict,
    items: Sequence[tuple[str | None, dict]],
    *,
    as_of,
    lookback_days: int,
    assume_missing_scores: bool,
    patient_aliases: Iterable[str],
    table: CodeTable | None,
) -> FhirProfile:
    table = table or load_code_table()
    if not isinstance(lookback_days, int) or isinstance(lookback_days, bool) or lookback_days < 1:
        raise ContractError(
            f"lookback_days must be a positive whole number of days, got {lookback_days!r}"
        )
    st = _State(table=table, as_of=_as_of(as_of), lookback_days=lookback_days)
    patient = _parse(patient_raw, st)
    if patient is None:
        raise ContractError(
            "the Patient resource could not be read as FHIR R4: " + "; ".join(st.skipped)
        )
    pid = patient.id or ""
    refs = {f"Patient/{pid}", pid, *patient_aliases}
    medications: dict[str, Any] = {}
    parsed: list[tuple[str, Any]] = []
    for full_url, raw in items:
        rtype = raw.get("resourceType")
        if rtype not in READ_TYPES or rtype == "Patient":
            continue
        model = _parse(raw, st)
        if model is None:
            continue
        if rtype == "Medication":
            medications[f"Medication/{model.id}"] = model
            if full_url:
                medications[full_url] = model
            continue
        subject = getattr(model, "patient" if rtype == "AllergyIntolerance" else "subject", None)
        ref = getattr(subject, "reference", None) if subject is not None else None
        if ref and not _same_patient(ref, refs):
            st.foreign += 1
            continue
        parsed.append((rtype, model))
    for rtype, model in parsed:
        if rtype == "Observation":
            _read_observation(model, st)
        elif rtype == "Condition":
            _read_condition(model, st)
        elif rtype in ("MedicationRequest", "MedicationStatement"):
            _read_medication(model, rtype, medications, st)
        elif rtype == "AllergyIntolerance":
            _read_allergy(model, st)
    fp = _assemble(patient, st, assume_missing_scores)
    log.debug(
        "fhir: mapped %d resource(s); %d warning(s); %d missing; ready=%s",
        len(parsed),
        len(fp.warnings),
        len(fp.missing),
        fp.ready,
    )
    return fp


def _same_patient(ref: str, refs: set[str]) -> bool:
    """Whether a subject reference points at the patient: ``Patient/<id>``, an absolute URL
    ending in it, or the ``urn:uuid:<id>`` fullUrl transaction bundles use (Synthea)."""
    if ref in refs:
        return True
    if ref.startswith("urn:uuid:"):
        return ref[len("urn:uuid:") :] in refs
    tail = ref.rstrip("/").split("/")
    return len(tail) >= 2 and tail[-2] == "Patient" and f"Patient/{tail[-1]}" in refs


# ----------------------------------------------------------------------------- parsing


def _parse(raw: dict, st: _State):
    """Validate one resource with the R4B model; lenient about ids and unknown elements."""
    from fhir.resources.R4B import get_fhir_model_class  # heavy-ish; only needed here

    rtype = raw.get("resourceType")
    try:
        cls = get_fhir_model_class(rtype)
    except KeyError:
        st.skipped.append(f"unknown resourceType {rtype!r}")
        return None
    data = _sanitise_ids(raw, st)
    label = f"{rtype}/{data.get('id', '?')}"
    for _attempt in range(2):
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            errors = err.errors()
            extra = [e["loc"] for e in errors if e.get("type") == "extra_forbidden"]
            if extra and _attempt == 0:
                data = _drop_paths(data, extra)
                st.dropped_elements.update(".".join(str(p) for p in loc) for loc in extra)
                continue
            first = errors[0] if errors else {"loc": (), "msg": str(err)}
            where = ".".join(str(p) for p in first.get("loc", ())) or "(resource)"
            st.skipped.append(
                f"{label} ({len(errors)} problem(s), first at {where}: {first.get('msg')})"
            )
            return None
    return None


def _sanitise_ids(raw: dict, st: _State) -> dict:
    def fix(value):
        if isinstance(value, str) and not _FHIR_ID.match(value):
            st.rewritten_ids += 1
            return (re.sub(r"[^A-Za-z0-9\-.]", "-", value) or "x")[:64]
        return value

    data = dict(raw)
    if "id" in data:
        data["id"] = fix(data["id"])
    if isinstance(data.get("contained"), list):
        data["contained"] = [
            {**c, "id": fix(c["id"])} if isinstance(c, dict) and "id" in c else c
            for c in data["contained"]
        ]
    return data


def _drop_paths(data: dict, paths: list[tuple]) -> dict:
    import copy

    out = copy.deepcopy(data)
    for loc in paths:
        node = out
        for part in loc[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


# ----------------------------------------------------------------------------- readers


def _codings(cc) -> tuple[list[Coding], str | None]:
    if cc is None:
        return [], None
    codings = [(c.system, c.code, c.display) for c in (cc.coding or [])]
    return codings, cc.text


def _status_code(cc) -> str | None:
    codings, text = _codings(cc)
    for _, code, _ in codings:
        if code:
            return code.lower()
    return text.lower() if text else None


def _read_observation(obs, st: _State) -> None:
    status = (obs.status or "").lower()
    if status in _OBS_SKIP_STATUS:
        return
    codings, _ = _codings(obs.code)
    row = st.table.observation(codings)
    components = obs.component or []
    if row is None and not components:
        return
    when = _obs_date(obs)
    if when is None:
        if row is not None:
            st.undated_observations += 1
        return
    if when > st.as_of:
        return  # recorded after the evaluation date
    ref = f"Observation/{obs.id}"
    if row is not None and row.measure == "smoking_status":
        vc, vt = _codings(obs.valueCodeableConcept)
        smoker = st.table.smoking(vc, vt)
        if smoker is not None:
            _add(st, "smoker", _Reading(float(smoker), when, 1, ref, row.code))
        return
    value = _numeric_value(obs)
    if row is not None and row.measure == "peg" and value is None:
        items = []
        for comp in components:
            crow = st.table.observation(_codings(comp.code)[0])
            if crow and crow.measure in ("pain_intensity", "peg_enjoyment", "peg_activity"):
                v = _numeric_value(comp)
                if v is not None:
                    items.append(v)
        if len(items) == 3:  # the PEG score is the mean of its three items (Krebs 2009)
            value = sum(items) / 3
    if row is not None and value is not None:
        _add(st, row.measure, _Reading(value, when, row.tier, ref, row.code))
    for comp in components:  # e.g. the PEG pain item 75893-8 inside the PEG panel
        crow = st.table.observation(_codings(comp.code)[0])
        if crow is not None and crow.measure == "pain_intensity":
            v = _numeric_value(comp)
            if v is not None:
                _add(st, "pain_intensity", _Reading(v, when, crow.tier, ref, crow.code))


def _add(st: _State, measure: str, reading: _Reading) -> None:
    st.readings.setdefault(measure, []).append(reading)


def _numeric_value(x) -> float | None:
    q = getattr(x, "valueQuantity", None)
    if q is not None and q.value is not None:
        return float(q.value)
    for name in ("valueInteger", "valueDecimal"):
        v = getattr(x, name, None)
        if v is not None:
            return float(v)
    s = getattr(x, "valueString", None)
    if isinstance(s, str):
        try:
            return float(s.strip())
        except ValueError:
            return None
    return None


def _obs_date(obs) -> date | None:
    for v in (
        obs.effectiveDateTime,
        obs.effectiveInstant,
        getattr(obs.effectivePeriod, "end", None),
        getattr(obs.effectivePeriod, "start", None),
        obs.issued,
    ):
        d = _parse_date(v)
        if d is not None:
            return d
    return None


def _condition_active(cond, st: _State) -> bool:
    if (_status_code(cond.verificationStatus) or "") in _EXCLUDED_VERIFICATION:
        return False
    start = _condition_onset(cond)
    if start is not None and start > st.as_of:
        return False
    ended = _parse_date(cond.abatementDateTime) or _parse_date(
        getattr(cond.abatementPeriod, "end", None)
    )
    if ended is not None:
        return ended > st.as_of  # resolved after as_of: it was active then
    # Unknown or absent clinicalStatus counts as active (lenient; AHRQ reads active/recurrence/
    # relapse, and a missed risk condition is the unsafe direction).
    return _status_code(cond.clinicalStatus) not in _INACTIVE_CLINICAL


def _condition_onset(cond) -> date | None:
    for v in (cond.onsetDateTime, getattr(cond.onsetPeriod, "start", None), cond.recordedDate):
        d = _parse_date(v)
        if d is not None:
            return d
    return None


def _read_condition(cond, st: _State) -> None:
    if not _condition_active(cond, st):
        return
    codings, text = _codings(cond.code)
    hits = st.table.conditions_for(codings, text)
    if not hits:
        return
    ref = f"Condition/{cond.id}"
    onset = _condition_onset(cond)
    for hit in hits:
        m = hit.meaning
        via = "" if hit.via == "code" else " (matched by display text)"
        if m.pain_condition:
            st.pain_conditions.append((m.pain_condition, onset, ref + via, hit.matched))
        if m.neuropathic and st.neuropathic_ref is None:
            st.neuropathic_ref = ref + via
        if m.flag:
            if m.flag == "pregnant" and (
                onset is None or (st.as_of - onset).days > PREGNANCY_MAX_DAYS
            ):
                continue
            st.flags.setdefault(m.flag, ref + via)
        if m.ckd_stage and (st.ckd_stage is None or m.ckd_stage > st.ckd_stage[0]):
            st.ckd_stage = (m.ckd_stage, ref)
        if m.context:
            st.context.setdefault(m.context, ref + via)
    if text or codings:
        stage = re.search(
            r"chronic kidney disease stage (\d)",
            (text or "").lower() + " " + " ".join((d or "").lower() for _, _, d in codings),
        )
        if stage and not any(h.meaning.ckd_stage for h in hits):
            s = int(stage.group(1))
            if 1 <= s <= 5 and (st.ckd_stage is None or s > st.ckd_stage[0]):
                st.ckd_stage = (s, ref + " (matched by display text)")


def _read_medication(med, rtype: str, medications: dict, st: _State) -> None:
    status = (med.status or "").lower()
    if getattr(med, "doNotPerform", None):
        return
    if rtype == "MedicationRequest":
        when = _parse_date(med.authoredOn)
        if status in ("active", "on-hold"):
            current = True
        elif status == "completed":
            current = when is not None and (st.as_of - when).days <= RECENT_COMPLETED_DAYS
        elif status == "stopped":
            current = False
        else:  # cancelled, entered-in-error, draft, unknown
            return
        reasons = [med.statusReason] if med.statusReason else []
    else:
        when = (
            _parse_date(med.effectiveDateTime)
            or _parse_date(getattr(med.effectivePeriod, "start", None))
            or _parse_date(med.dateAsserted)
        )
        if status in ("active", "intended", "on-hold"):
            current = True
        elif status in ("completed", "stopped"):
            current = False
        else:  # not-taken, entered-in-error, unknown
            return
        reasons = list(med.statusReason or [])
    if when is not None and when > st.as_of:
        return
    codings, text = _medication_concept(med, medications, st)
    if not codings and not text:
        return
    ingredients, via = st.table.medication_ingredients(codings, text)
    classes = st.table.classes_of(ingredients)
    if not classes:
        return
    ref = f"{rtype}/{med.id}" + ("" if via == "code" else " (matched by display text)")
    names = sorted(ingredients)
    if current and status == "active" and when is not None:
        for name in names:
            if name not in st.latest_active_order or when > st.latest_active_order[name]:
                st.latest_active_order[name] = when
    for cls in sorted(classes):
        if current:
            if cls in FLAG_CLASSES:
                st.flags.setdefault(cls, ref)
            if cls in DRUG:
                st.current.append(
                    {
                        "class": cls,
                        "ingredients": names,
                        "reference": ref,
                        "since": when.isoformat() if when else None,
                    }
                )
        elif cls in DRUG:
            st.tried.setdefault(cls, []).append(
                {"ingredients": names, "last": when.isoformat() if when else None, "reference": ref}
            )
    if status in ("stopped", "completed") and reasons:
        words = " ".join(
            " ".join(filter(None, [t, *(f"{c} {d}" for _, c, d in cs)]))
            for cs, t in (_codings(r) for r in reasons)
        ).lower()
        level = None
        if any(t in words for t in _INTOLERANCE_TERMS):
            level = "intolerant"
        elif any(t in words for t in _INEFFECTIVE_TERMS):
            level = "no_response"
        for cls in classes:
            if level and cls in DRUG:
                _set_prior(st, cls, level, f"{rtype}/{med.id} (statusReason)")


def _medication_concept(med, medications: dict, st: _State) -> tuple[list[Coding], str | None]:
    if med.medicationCodeableConcept is not None:
        return _codings(med.medicationCodeableConcept)
    ref = med.medicationReference
    if ref is None:
        return [], None
    target = ref.reference or ""
    found = None
    if target.startswith("#"):
        for c in med.contained or []:
            if getattr(c, "id", None) == target[1:] and c.get_resource_type() == "Medication":
                found = c
    else:
        found = medications.get(target) or medications.get(
            "Medication/" + target.rstrip("/").split("/")[-1]
        )
    if found is not None:
        return _codings(found.code)
    if ref.display:
        return [], ref.display
    st.unresolved_medications += 1
    return [], None


def _read_allergy(allergy, st: _State) -> None:
    if (_status_code(allergy.verificationStatus) or "") in _EXCLUDED_VERIFICATION:
        return
    if (_status_code(allergy.clinicalStatus) or "active") in ("inactive", "resolved"):
        return
    recorded = _parse_date(allergy.recordedDate) or _parse_date(allergy.onsetDateTime)
    if recorded is not None and recorded > st.as_of:
        return
    codings, text = _codings(allergy.code)
    classes, via = st.table.allergy_classes(codings, text)
    suffix = "" if via == "code" else " (matched by display text)"
    for cls in classes:
        _set_prior(st, cls, "intolerant", f"AllergyIntolerance/{allergy.id}{suffix}")


def _set_prior(st: _State, cls: str, level: str, ref: str) -> None:
    rank = {"intolerant": 2, "no_response": 1}
    old = st.priors.get(cls)
    if old is None or rank[level] > rank[old[0]]:
        st.priors[cls] = (level, ref)


# ----------------------------------------------------------------------------- assembly


def _assemble(patient, st: _State, assume_missing_scores: bool) -> FhirProfile:
    table = st.table
    profile: dict[str, Any] = {}
    sources: dict[str, str] = {}
    missing: list[dict] = []
    warnings = list(st.warnings)
    notes: list[str] = []
    assumed: dict[str, dict] = {}
    pref = f"Patient/{patient.id}"
    applicable, reason = True, None

    def gap(name: str, status: str, extra: dict | None = None) -> None:
        col = COLUMNS_BY_NAME[name]
        missing.append(
            {
                "field": name,
                "required": bool(col.required),
                "status": status,
                "impact": IMPACT[name],
                **(extra or {}),
            }
        )

    # demographics
    birth = _parse_date(patient.birthDate)
    if birth is not None:
        age = (
            st.as_of.year - birth.year - ((st.as_of.month, st.as_of.day) < (birth.month, birth.day))
        )
        if age < 18:
            applicable, reason = (
                False,
                f"the patient is {age} (under 18); this tool is for adults (CONTRACT §2 age 18-110)",
            )
        elif age > 110:
            applicable, reason = False, f"age {age} is outside the contract range 18-110"
        else:
            profile["age"], sources["age"] = int(age), pref
    else:
        gap("age", "absent")
    if patient.deceasedBoolean or patient.deceasedDateTime:
        applicable, reason = False, "the patient is recorded as deceased"
    gender = (patient.gender or "").lower()
    if gender in ("female", "male", "other", "unknown"):
        profile["sex"], sources["sex"] = gender, pref
    else:
        profile["sex"], sources["sex"] = "unknown", pref
        warnings.append("Patient.gender is absent: sex recorded as 'unknown'")

    # pain condition and duration
    if st.pain_conditions:
        levels = {lvl for lvl, *_ in st.pain_conditions}
        main = next(lvl for lvl in table.pain_condition_priority if lvl in levels)
        ref = next(r for lvl, _, r, _ in st.pain_conditions if lvl == main)
        profile["pain_condition"], sources["pain_condition"] = main, ref
        others = sorted(levels - {main, "other"})
        if others:
            notes.append(
                f"Several chronic-pain conditions are active ({', '.join([main, *others])}); ranked "
                f"for {main} (priority: {', '.join(table.pain_condition_priority)}). Send "
                "pain_condition explicitly if another is the main complaint."
            )
        onsets = [(d, r) for _, d, r, _ in st.pain_conditions if d is not None]
        if onsets:
            first, ref = min(onsets)
            months = (st.as_of - first).days / DAYS_PER_MONTH
            if months < 3:
                notes.append(
                    "The chronic-pain condition was recorded less than 3 months ago; duration set to 3 months, the minimum a chronic-pain diagnosis implies."
                )
            elif months > 600:
                notes.append(
                    "Pain duration is over 50 years; capped at the contract maximum of 600 months."
                )
            profile["pain_duration_months"] = round(min(max(months, 3.0), 600.0), 1)
            sources["pain_duration_months"] = ref
        else:
            profile["pain_duration_months"] = 3.0
            sources["pain_duration_months"] = st.pain_conditions[0][2]
            gap("pain_duration_months", "approximated")
    elif applicable:
        applicable, reason = (
            False,
            "no active chronic-pain condition on record (this tool ranks chronic-pain treatment plans)",
        )
        gap("pain_condition", "absent")
    if st.neuropathic_ref:
        profile["neuropathic_component"] = True
        sources["neuropathic_component"] = st.neuropathic_ref

    # observations
    pain = _pick(st, "pain_intensity")
    if pain is not None:
        profile["pain_intensity"] = round(pain.value, 2)
        sources["pain_intensity"] = pain.ref
        if pain.tier == 2:
            warnings.append(
                f"Pain intensity comes from the Wong-Baker FACES scale ({pain.code}, {pain.when}) "
                "because no NRS or PEG pain item was recorded in the look-back window; it "
                "approximates the NRS."
            )
    else:
        gap("pain_intensity", *_stale(st, "pain_intensity"))
    peg = _pick(st, "peg")
    if peg is not None:
        profile["peg"], sources["peg"] = round(peg.value, 2), peg.ref
    elif pain is not None:
        profile["peg"] = round(pain.value, 2)
        sources["peg"] = f"{pain.ref} (approximated from pain score {pain.code})"
        gap("peg", "approximated")
    else:
        gap("peg", *_stale(st, "peg"))
    for name in ("phq9", "gad7"):
        r = _pick(st, name)
        if r is not None:
            profile[name], sources[name] = int(round(r.value)), r.ref
        elif assume_missing_scores and name in table.assumed_values:
            value, why = table.assumed_values[name]
            profile[name] = int(value)
            sources[name] = "assumed"
            assumed[name] = {"value": int(value), "source": why}
            gap(name, "assumed", _stale(st, name)[1])
        else:
            gap(name, *_stale(st, name))
    if "phq9" not in profile and "depression" in st.context:
        notes.append(
            "Depression is on the problem list but no PHQ-9 was recorded in the look-back window."
        )
    for name in ("egfr", "bmi"):
        r = _pick(st, name)
        if r is not None:
            profile[name], sources[name] = round(r.value, 1), r.ref
        else:
            gap(name, *_stale(st, name))
    if "egfr" not in profile:
        creat = _pick(st, "creatinine")
        if creat is not None:
            for m in missing:
                if m["field"] == "egfr":
                    m["impact"] += (
                        f"; a serum creatinine ({creat.when}) is on file: ask the lab for the eGFR"
                    )
        if st.ckd_stage is not None and st.ckd_stage[0] >= 4:
            warnings.append(
                f"CKD stage {st.ckd_stage[0]} is on the problem list ({st.ckd_stage[1]}) but no "
                "eGFR was recorded in the look-back window: treat NSAIDs and duloxetine as "
                "contraindicated until an eGFR is available (eGFR < 30, CONTRACT §5)."
            )
    if st.ckd_stage is not None:
        notes.append(f"Chronic kidney disease stage {st.ckd_stage[0]} on the problem list.")
    smoke = _pick(st, "smoker")
    if smoke is not None:
        profile["smoker"], sources["smoker"] = bool(smoke.value), smoke.ref
    else:
        gap("smoker", *_stale(st, "smoker"))
    days, minutes = _pick(st, "activity_days"), _pick(st, "activity_minutes")
    if days is not None and minutes is not None:
        profile["activity_min_week"] = round(days.value * minutes.value, 1)
        sources["activity_min_week"] = f"{days.ref} x {minutes.ref}"
    else:
        gap("activity_min_week", "absent")
    for name in _NOT_MAPPED:
        gap(name, "not_mapped")

    # risk flags, priors, medication context
    for flag_name, ref in st.flags.items():
        profile[flag_name], sources[flag_name] = True, ref
    for cls, (level, ref) in st.priors.items():
        profile[f"prior_{cls}"], sources[f"prior_{cls}"] = level, ref
    for cls, uses in sorted(st.tried.items()):
        if cls in st.priors:
            continue
        last = max((u["last"] for u in uses if u["last"]), default=None)
        names = sorted({n for u in uses for n in u["ingredients"]})
        notes.append(
            f"{cls} used before ({', '.join(names)}{', last ' + last if last else ''}); no "
            f"response is documented, so prior_{cls} stays 'none' (no evidence either way)."
        )
    if "overdose_history" in st.context:
        notes.append(
            "Drug overdose on record: a CDC 2022 Rec 8 risk factor (offer naloxone if an opioid is continued)."
        )

    # range check against the contract, so the profile always validates
    for name in list(profile):
        col = COLUMNS_BY_NAME.get(name)
        v = profile[name]
        if col is None or col.min is None or not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if not (col.min <= v <= col.max):
            warnings.append(
                f"{name} {v} from {sources.get(name)} is outside the contract range "
                f"{col.range_text()} and was ignored"
            )
            profile.pop(name)
            sources.pop(name, None)
            if name in IMPACT:
                gap(name, "absent")

    # data-quality warnings, aggregated
    if st.rewritten_ids:
        warnings.append(
            f"{st.rewritten_ids} resource id(s) were not valid FHIR ids and were rewritten"
        )
    if st.dropped_elements:
        warnings.append(
            "Unknown element(s) ignored: " + ", ".join(sorted(st.dropped_elements)[:10])
        )
    if st.skipped:
        warnings.append(
            f"{len(st.skipped)} resource(s) could not be read and were skipped: "
            + "; ".join(st.skipped[:5])
        )
    if st.foreign:
        warnings.append(f"{st.foreign} resource(s) about another patient were ignored")
    if st.undated_observations:
        warnings.append(
            f"{st.undated_observations} relevant observation(s) had no date and were not used"
        )
    if st.unresolved_medications:
        warnings.append(
            f"{st.unresolved_medications} medication reference(s) could not be resolved; those medications were not read"
        )
    old = sorted(
        n for n, d in st.latest_active_order.items() if (st.as_of - d).days > OLD_ACTIVE_ORDER_DAYS
    )
    if old:
        warnings.append(
            f"Active order(s) for {', '.join(old)} were last written more than "
            f"{OLD_ACTIVE_ORDER_DAYS} days ago; they are treated as current: reconcile the "
            "medication list"
        )

    order = {name: i for i, name in enumerate(_MISSING_ORDER)}
    missing.sort(key=lambda m: (not m["required"], order.get(m["field"], 99)))
    return FhirProfile(
        profile=profile,
        missing=missing,
        warnings=warnings,
        sources=sources,
        applicable=applicable,
        not_applicable_reason=reason,
        assumed=assumed,
        current_medications=st.current,
        tried=st.tried,
        notes=notes,
        as_of=st.as_of,
        lookback_days=st.lookback_days,
        code_table_version=table.version,
    )


def _pick(st: _State, measure: str) -> _Reading | None:
    """Best tier, then most recent, inside the look-back window."""
    start = st.as_of - timedelta(days=st.lookback_days)
    inside = [r for r in st.readings.get(measure, []) if r.when >= start]
    if not inside:
        return None
    best_tier = min(r.tier for r in inside)
    return max((r for r in inside if r.tier == best_tier), key=lambda r: r.when)


def _stale(st: _State, measure: str) -> tuple[str, dict]:
    """("stale", {last_seen}) if the measure was recorded only before the window, else absent."""
    older = st.readings.get(measure, [])
    if older:
        return "stale", {"last_seen": max(r.when for r in older).isoformat()}
    return "absent", {}


# ----------------------------------------------------------------------------- dates


def _as_of(value) -> date:
    if value is None:
        return datetime.now(UTC).date()
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    parsed = _parse_date(value)
    if parsed is None:
        raise ContractError(f"as_of must be an ISO date (YYYY-MM-DD), got {value!r}")
    return parsed


def _parse_date(value) -> date | None:
    """A date from a FHIR date/dateTime/instant (model value or JSON string), else None."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if not isinstance(value, str):
        return None
    s = value.strip()
    m = re.match(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", s)
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1))
    except ValueError:
        return None


__all__ = [
    "DEFAULT_LOOKBACK_DAYS",
    "FhirProfile",
    "IMPACT",
    "REQUIRED_FIELDS",
    "bundle_to_profile",
    "latest_record_date",
    "resources_to_profile",
]
