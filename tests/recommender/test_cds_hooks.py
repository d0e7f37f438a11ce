"""CDS Hooks service logic (recommender/cds_hooks.py, cds_cards.py) end to end.

The ``recommend`` callable handed to :func:`handle` runs the REAL ranking code
(``recommender.recommend.recommend``) with a small model trained once per session on 2000
simulated episodes, and builds the CONTRACT §8 ``/recommend`` body the service will pass.
Responses are checked against a pydantic mirror of the CDS Hooks 2.0 response model with its
invariants (interop.md §1.4).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import pandas as pd
import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.catalog import COMPONENT_BY_CODE, PLANS, plan_components
from features.errors import ContractError, ModelError
from features.fhir import latest_record_date
from features.validate import validate
from recommender import cds_hooks
from recommender.cds_cards import SHORT_NAMES, fit_summary, plan_label

# ../shared sits beside the repository (CONTRACT, data), on developers' machines and in CI.
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SYNTHEA = sorted((DATA / "synthea").glob("*/*.json"))
AHRQ = DATA / "cds-test-patients/ahrq-pain-management-summary/brenda_jackson.r4.json"
BUNDLES = [*SYNTHEA, AHRQ]
CDC_REQUESTS = sorted((DATA / "cds-hooks-examples/opioid-cds-r4/requests").glob("*/*.json"))
needs_data = pytest.mark.skipif(not AHRQ.exists(), reason="shared/data is not mounted")
SID = cds_hooks.SERVICE_ID
LOINC = "http://loinc.org"


# --------------------------------------------------------------------------- response schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Coding(_Strict):
    system: str | None = None
    code: str
    display: str | None = None


class OverrideCoding(Coding):
    display: str  # cds-resp-4: override reasons need a display


class Source(_Strict):
    label: str = Field(min_length=1)
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Action(_Strict):
    type: Literal["create", "update", "delete"]
    description: str = Field(min_length=1)  # cds-resp-5
    resource: dict | None = None
    resourceId: str | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type in ("create", "update") and not isinstance(self.resource, dict):
            raise ValueError("create/update actions carry a whole resource")
        if self.type == "delete" and not self.resourceId:
            raise ValueError("delete uses resourceId (cds-resp-2)")
        return self


class Suggestion(_Strict):
    label: str = Field(min_length=1)
    uuid: str | None = None
    isRecommended: bool | None = None
    actions: list[Action] = []


class Card(_Strict):
    uuid: str
    summary: str = Field(min_length=1, max_length=140)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[OverrideCoding] | None = None
    links: list[dict] | None = None

    @model_validator(mode="after")
    def _invariants(self):
        uuid.UUID(self.uuid)
        for s in self.suggestions or []:
            if s.uuid:
                uuid.UUID(s.uuid)
        if self.suggestions and self.selectionBehavior is None:
            raise ValueError("suggestions need selectionBehavior (cds-resp-6)")
        return self


class CdsResponse(_Strict):
    cards: list[Card]
    systemActions: list[Action] | None = None


class Issue(_Strict):
    severity: Literal["fatal", "error", "warning", "information"]
    code: str
    diagnostics: str


class OperationOutcome(_Strict):
    resourceType: Literal["OperationOutcome"]
    issue: list[Issue] = Field(min_length=1)


# --------------------------------------------------------------------------- model and stub


@pytest.fixture(scope="session")
def ranking_model():
    from recommender.model import PlanOutcomeModel
    from training.simulate import simulate_episodes

    df = simulate_episodes(2000, seed=1)
    return PlanOutcomeModel(random_state=0, max_rounds=60).fit(
        df,
        plans=df.plan,
        improvement=df.peg - df.peg_12wk,
        adverse_event=df.adverse_event.astype(int),
        groups=df.patient_id,
    )


class RecordingRecommend:
    """The service's ``recommend(profile) -> /recommend body`` on the real ranking and
    explanation code, in the shape recommender/api.py answers (components as objects,
    exclusions with ``rules``)."""

    def __init__(self, model, top_k: int = 3):
        self.model, self.top_k = model, top_k
        self.calls: list[tuple[dict, dict]] = []

    def __call__(self, profile: dict) -> dict:
        from recommender.explain import explain_plans
        from recommender.recommend import recommend

        frame = validate(pd.DataFrame([profile]), "request").frame
        ranked = recommend(self.model, frame, top_k=self.top_k)
        est, safety = ranked.estimates, ranked.safety
        order = [int(i) for i in ranked.order[0] if i >= 0]
        explanations = explain_plans(self.model, frame, [PLANS[i] for i in order]) if order else []
        plans = []
        for rank, (idx, ex) in enumerate(zip(order, explanations, strict=True), 1):
            plans.append(
                {
                    "rank": rank,
                    "plan": PLANS[idx],
                    "components": [
                        {
                            "code": c,
                            "kind": COMPONENT_BY_CODE[c].kind,
                            "name": COMPONENT_BY_CODE[c].name,
                        }
                        for c in plan_components(PLANS[idx])
                    ],
                    "utility": float(est.utility[0, idx]),
                    "expected_improvement": float(est.expected_improvement[0, idx]),
                    "improvement_interval": [
                        float(est.improvement_low[0, idx]),
                        float(est.improvement_high[0, idx]),
                    ],
                    "p_response": float(est.p_response[0, idx]),
                    "p_adverse_event": float(est.p_adverse_event[0, idx]),
                    "warnings": safety.plan_warnings(0, idx),
                    "explanation": ex,
                }
            )
        excluded = [
            {
                **{k: v for k, v in e.items() if k != "rules"},
                "rules": [
                    {
                        "rule_id": r["id"],
                        "action": r["action"],
                        "reason": r["reason"],
                        "floor": r["floor"],
                    }
                    for r in e["rules"]
                ],
            }
            for e in safety.exclusions(0)
        ]
        body = {
            "request_id": str(uuid.uuid4()),
            "model": {"name": "test", "version": "0"},
            "plans": plans,
            "excluded": excluded,
        }
        self.calls.append((profile, body))
        return body


def codes(plan: dict) -> list[str]:
    return [c["code"] for c in plan["components"]]


@pytest.fixture
def recommend_fn(ranking_model):
    return RecordingRecommend(ranking_model)


# --------------------------------------------------------------------------- FHIR search emulation


def _date_of(r: dict) -> str:
    return str(
        r.get("effectiveDateTime")
        or r.get("issued")
        or r.get("authoredOn")
        or r.get("onsetDateTime")
        or ""
    )


def search(resources: list[dict], rtype: str, params: dict[str, str]) -> dict:
    """A FHIR search over in-memory resources: patient, code (system|code), _sort=-date, _count."""
    pid = params.get("patient")
    out = [r for r in resources if r.get("resourceType") == rtype]
    if pid:
        refs = {f"Patient/{pid}", f"urn:uuid:{pid}"}
        out = [
            r
            for r in out
            if ((r.get("subject") or r.get("patient") or {}).get("reference")) in refs
        ]
    if "code" in params:
        system, _, code = params["code"].rpartition("|")
        out = [
            r
            for r in out
            if any(
                c.get("code") == code and (not system or c.get("system") == system)
                for c in (r.get("code") or {}).get("coding") or []
            )
        ]
    if params.get("_sort") == "-date":
        out.sort(key=_date_of, reverse=True)
    if "_count" in params:
        out = out[: int(params["_count"])]
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(out),
        "entry": [{"resource": r} for r in out],
    }


def run_query(resources: list[dict], query: str) -> dict | None:
    path, _, qs = query.partition("?")
    parts = path.strip("/").split("/")
    if len(parts) == 2 and not qs:
        return next(
            (r for r in resources if r.get("resourceType") == parts[0] and r.get("id") == parts[1]),
            None,
        )
    return search(resources, parts[-1], dict(parse_qsl(qs)))


def load(path: Path) -> tuple[dict, list[dict], dict, date]:
    raw = json.loads(path.read_text())
    resources = [e["resource"] for e in raw["entry"]]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    return raw, resources, patient, latest_record_date(raw)


def prefetch_for(resources: list[dict], patient_id: str) -> dict:
    """What a CDS client that honours every discovery template would send."""
    return {
        key: run_query(resources, template.replace("{{context.patientId}}", patient_id))
        for key, template in cds_hooks.prefetch_templates().items()
    }


def hook_request(patient_id: str, **extra) -> dict:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/example", "patientId": patient_id},
        **extra,
    }


def check_ok(status: int, body: dict) -> CdsResponse:
    assert status == 200, body
    return CdsResponse.model_validate(body)


def check_error(status: int, body: dict, expected: int) -> str:
    assert status == expected, body
    return " ".join(i.diagnostics for i in OperationOutcome.model_validate(body).issue)


def plan_rows(card: Card) -> list[str]:
    """The plan column of the options table in a card's markdown detail."""
    rows = [
        line
        for line in (card.detail or "").splitlines()
        if line.startswith("| ") and not line.startswith("| #")
    ]
    return [row.split("|")[2].strip() for row in rows]


def raw_latest_egfr(resources: list[dict], as_of: date, days: int = 365) -> float | None:
    """Independent of features/fhir.py: the newest eGFR (33914-3) value in the window."""
    found = []
    for r in resources:
        if r.get("resourceType") == "Observation" and any(
            c.get("code") == "33914-3" for c in r.get("code", {}).get("coding", [])
        ):
            when = date.fromisoformat(_date_of(r)[:10])
            if as_of - timedelta(days=days) <= when <= as_of:
                found.append((when, r["valueQuantity"]["value"]))
    return max(found)[1] if found else None


def raw_has_active_condition(resources: list[dict], code: str) -> bool:
    return any(
        r.get("resourceType") == "Condition"
        and any(c.get("code") == code for c in r["code"].get("coding", []))
        and r.get("clinicalStatus", {}).get("coding", [{}])[0].get("code") == "active"
        for r in resources
    )


# --------------------------------------------------------------------------- discovery


def test_discovery_lists_one_patient_view_service_with_loinc_templates():
    body = cds_hooks.discovery()
    (svc,) = body["services"]
    assert svc["hook"] == "patient-view" and svc["id"] == SID
    assert svc["title"] and svc["description"]
    assert svc["version"] == cds_hooks.CDS_HOOKS_VERSION and svc["hookVersion"] == "1.0"
    prefetch = svc["prefetch"]
    for key in ("patient", "conditions", "medicationRequests", "medicationStatements", "allergies"):
        assert key in prefetch
    codes = " ".join(prefetch.values())
    for code in ("72514-3", "91147-9", "44261-6", "70274-6", "39156-5", "33914-3", "72166-2"):
        assert f"code={LOINC}|{code}" in codes
    assert "44260-8" not in codes  # unverified rows never become templates
    for template in prefetch.values():
        assert "{{context.patientId}}" in template
        assert "{{" not in template.replace("{{context.patientId}}", "")
    json.dumps(body)


# --------------------------------------------------------------------------- shared data through handle()


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.name[:24])
def test_every_shared_bundle_gets_a_schema_valid_answer(path, recommend_fn):
    from features.fhir import bundle_to_profile

    raw, resources, patient, as_of = load(path)
    status, body = cds_hooks.handle(
        SID,
        hook_request(patient["id"], prefetch=prefetch_for(resources, patient["id"])),
        recommend=recommend_fn,
        fetch=_no_network,
        as_of=as_of,
    )
    response = check_ok(status, body)
    fp = bundle_to_profile(raw, as_of=as_of, assume_missing_scores=True)
    if not fp.applicable:
        assert response.cards == [] and recommend_fn.calls == []
        return
    assert response.cards
    ((profile, result),) = recommend_fn.calls
    assert profile == fp.profile  # the prefetch path and the bundle path agree
    options = response.cards[-1]
    assert plan_rows(options) == [plan_label(codes(p)) for p in result["plans"]]
    if result["plans"]:
        assert "Why option 1: " in options.detail  # the SHAP phrases of the top plan
    excluded = {e["component"] for e in result["excluded"] if "component" in e}
    for p in result["plans"]:
        assert not excluded & set(codes(p))
    if excluded:
        section = options.detail.split("**Excluded for this patient**")[1].split("\n\n")[0]
        for name in excluded:
            assert f"- {SHORT_NAMES[name]}: " in section
    if fp.assumed:
        assert options.summary.startswith("Provisional") and options.indicator != "info"
        labels = " ".join(s.label for s in options.suggestions or [])
        assert all(("PHQ-9" if k == "phq9" else "GAD-7") in labels for k in fp.assumed)
    for m in fp.missing:
        assert m["impact"][:40] in options.detail.replace("\\|", "|") or m["status"] == "not_mapped"


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.name[:24])
def test_renal_consequence_matches_what_the_record_contains(path, recommend_fn):
    """eGFR < 30 → NSAID excluded (floor); 30-59 → the NSAID-9 caution; none → 'check renal'."""
    raw, resources, patient, as_of = load(path)
    status, body = cds_hooks.handle(
        SID,
        hook_request(patient["id"], prefetch=prefetch_for(resources, patient["id"])),
        recommend=recommend_fn,
        fetch=_no_network,
        as_of=as_of,
    )
    cards = check_ok(status, body).cards
    if not cards:
        return
    detail = cards[-1].detail
    egfr = raw_latest_egfr(resources, as_of)
    if egfr is None:
        assert "NSAID-EGFR-UNKNOWN" in detail and "no eGFR" in detail
    elif egfr < 30:
        assert "FLOOR-NSAID-EGFR" in detail
        assert not any("NSAID" in row for row in plan_rows(cards[-1]))
    elif egfr < 60:
        assert "NSAID-9" in detail and "eGFR 30–59" in detail
    else:
        assert "NSAID-9" not in detail and "FLOOR-NSAID-EGFR" not in detail


@needs_data
@pytest.mark.slow
def test_ckd_patient_on_naproxen_gets_the_truthful_renal_answer(recommend_fn):
    # Isaiah_Schaden: CKD 1-2 and hand OA; naproxen was ordered (stopped 1993). His record has
    # eGFR 33914-3 readings of 40-45 in 2020, so the truthful consequence is the NSAID-9
    # caution (eGFR 30-59), not the eGFR < 30 floor exclusion.
    path = next(p for p in SYNTHEA if p.name.startswith("Isaiah_Schaden"))
    _, resources, patient, as_of = load(path)
    egfr = raw_latest_egfr(resources, as_of)
    assert egfr is not None and 30 <= egfr < 60
    status, body = cds_hooks.handle(
        SID,
        hook_request(patient["id"], prefetch=prefetch_for(resources, patient["id"])),
        recommend=recommend_fn,
        fetch=_no_network,
        as_of=as_of,
    )
    card = check_ok(status, body).cards[-1]
    assert "NSAID-9" in card.detail and "FLOOR-NSAID-EGFR" not in card.detail
    ((profile, result),) = recommend_fn.calls
    assert profile["egfr"] == pytest.approx(egfr, abs=0.05)
    for p in result["plans"]:
        if "nsaid" in codes(p):
            assert any(w["rule_id"] == "NSAID-9" for w in p["warnings"])


@needs_data
@pytest.mark.slow
def test_opioid_use_disorder_patient_gets_no_opioid(recommend_fn):
    path = next(p for p in SYNTHEA if p.name.startswith("Virginia_Mercado"))
    _, resources, patient, as_of = load(path)
    assert raw_has_active_condition(resources, "5602001")  # opioid abuse on the problem list
    status, body = cds_hooks.handle(
        SID,
        hook_request(patient["id"], prefetch=prefetch_for(resources, patient["id"])),
        recommend=recommend_fn,
        fetch=_no_network,
        as_of=as_of,
    )
    card = check_ok(status, body).cards[-1]
    ((profile, result),) = recommend_fn.calls
    assert profile["opioid_use_disorder"] is True
    assert result["plans"] and all("opioid" not in codes(p) for p in result["plans"])
    assert not any("opioid" in row for row in plan_rows(card))
    assert "FLOOR-OPI-OUD" in card.detail


@needs_data
@pytest.mark.slow
def test_benzodiazepine_and_opioid_patient_gets_no_opioid_and_a_critical_card(recommend_fn):
    raw, resources, patient, as_of = load(AHRQ)
    status, body = cds_hooks.handle(
        SID,
        hook_request(patient["id"], prefetch=prefetch_for(resources, patient["id"])),
        recommend=recommend_fn,
        fetch=_no_network,
        as_of=as_of,
    )
    cards = check_ok(status, body).cards
    ((profile, result),) = recommend_fn.calls
    assert profile["benzodiazepine"] is True
    assert all("opioid" not in codes(p) for p in result["plans"])
    conflict, options = cards
    assert conflict.indicator == "critical" and "opioid" in conflict.summary
    assert "FLOOR-OPI-BENZO" in conflict.detail and "oxycodone" in conflict.detail
    assert options.indicator == "warning" and "FLOOR-OPI-BENZO" in options.detail


@needs_data
def test_cdc_example_requests_parse_and_get_a_clear_unsupported_hook_answer():
    assert CDC_REQUESTS
    for path in CDC_REQUESTS:
        text = path.read_text()
        request, end = json.JSONDecoder().raw_decode(text)  # stray trailing '}' after the object
        assert text[end:].strip() in ("", "}")
        assert request["hook"] in ("order-select", "order-sign")
        status, body = cds_hooks.handle(SID, request, recommend=_never, fetch=_no_network)
        message = check_error(status, body, 400)
        assert f"hook '{request['hook']}' is not supported" in message and "patient-view" in message
        assert body["issue"][0]["code"] == "not-supported"


# --------------------------------------------------------------------------- request validation


def _never(profile):
    raise AssertionError("recommend must not be called")


def _no_network(url, token):
    raise AssertionError(f"unexpected fetch of {url}")


def test_invalid_requests_name_every_problem():
    status, body = cds_hooks.handle(
        SID,
        {
            "hook": "patient-view",
            "context": {},
            "fhirAuthorization": {"access_token": "t", "token_type": "Bearer"},
        },
        recommend=_never,
        fetch=_no_network,
    )
    message = check_error(status, body, 400)
    for part in ("hookInstance", "context.patientId", "context.userId", "cds-r-1"):
        assert part in message
    assert check_error(*cds_hooks.handle(SID, ["not", "an", "object"], recommend=_never), 400)
    assert "hook is required" in check_error(*cds_hooks.handle(SID, {}, recommend=_never), 400)
    message = check_error(*cds_hooks.handle("nope", hook_request("p"), recommend=_never), 404)
    assert SID in message


def test_missing_prefetch_without_a_fhir_server_is_412():
    status, body = cds_hooks.handle(
        SID,
        hook_request("p1", prefetch={"patient": {"resourceType": "Patient", "id": "p1"}}),
        recommend=_never,
        fetch=_no_network,
    )
    message = check_error(status, body, 412)
    assert "conditions" in message and "medicationRequests" in message and "fhirServer" in message


def test_prefetch_for_another_patient_is_refused():
    prefetch = {
        k: {"resourceType": "Bundle", "type": "searchset", "entry": []}
        for k in cds_hooks.prefetch_templates()
    }
    prefetch["patient"] = {"resourceType": "Patient", "id": "someone-else"}
    status, body = cds_hooks.handle(
        SID, hook_request("p1", prefetch=prefetch), recommend=_never, fetch=_no_network
    )
    assert "not the patient" in check_error(status, body, 400)


def test_not_a_chronic_pain_patient_gets_no_cards_and_no_ranking():
    prefetch = {
        k: {"resourceType": "Bundle", "type": "searchset", "entry": []}
        for k in cds_hooks.prefetch_templates()
    }
    prefetch["patient"] = {
        "resourceType": "Patient",
        "id": "p1",
        "birthDate": "1960-01-01",
        "gender": "male",
    }
    status, body = cds_hooks.handle(
        SID, hook_request("p1", prefetch=prefetch), recommend=_never, fetch=_no_network
    )
    assert check_ok(status, body).cards == []


def _minimal_prefetch(*resources, pid="p1"):
    prefetch = {
        k: {"resourceType": "Bundle", "type": "searchset", "entry": []}
        for k in cds_hooks.prefetch_templates()
    }
    prefetch["patient"] = {
        "resourceType": "Patient",
        "id": pid,
        "birthDate": "1970-01-01",
        "gender": "female",
    }
    prefetch["conditions"]["entry"] = [
        {"resource": r} for r in resources if r["resourceType"] == "Condition"
    ]
    for key, template in cds_hooks.prefetch_templates().items():
        if key.startswith("obs_"):
            code = template.split("|")[1].split("&")[0]
            prefetch[key]["entry"] = [
                {"resource": r}
                for r in resources
                if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == code
            ]
    return prefetch


def _cond(code, onset="2020-01-01"):
    return {
        "resourceType": "Condition",
        "id": f"c{code}",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
        "subject": {"reference": "Patient/p1"},
        "onsetDateTime": onset,
        "clinicalStatus": {"coding": [{"code": "active"}]},
    }


def _obs(code, value, when="2024-05-01"):
    return {
        "resourceType": "Observation",
        "id": f"o{code}",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value},
    }


def test_chronic_pain_record_without_a_pain_score_gets_an_incomplete_card():
    prefetch = _minimal_prefetch(_cond("278860009"), _obs("44261-6", 12))
    status, body = cds_hooks.handle(
        SID,
        hook_request("p1", prefetch=prefetch),
        recommend=_never,
        fetch=_no_network,
        as_of="2024-06-01",
    )
    (card,) = check_ok(status, body).cards
    assert card.indicator == "info" and "pain score" in card.summary and "PEG" in card.summary
    labels = [s.label for s in card.suggestions]
    assert any("pain intensity" in x for x in labels) and any("PEG" in x for x in labels)
    assert card.suggestions[0].actions[0].resource["subject"] == {"reference": "Patient/p1"}


@pytest.mark.slow
def test_strict_settings_do_not_assume_scores(recommend_fn):
    prefetch = _minimal_prefetch(_cond("278860009"), _obs("72514-3", 6))
    settings = cds_hooks.CdsSettings(assume_missing_scores=False)
    status, body = cds_hooks.handle(
        SID,
        hook_request("p1", prefetch=prefetch),
        recommend=recommend_fn,
        fetch=_no_network,
        as_of="2024-06-01",
        settings=settings,
    )
    (card,) = check_ok(status, body).cards
    assert "PHQ-9" in card.summary and "GAD-7" in card.summary and recommend_fn.calls == []
    status, body = cds_hooks.handle(
        SID,
        hook_request("p1", prefetch=prefetch),
        recommend=recommend_fn,
        fetch=_no_network,
        as_of="2024-06-01",
    )
    (card,) = check_ok(status, body).cards
    assert card.summary.startswith("Provisional") and len(recommend_fn.calls) == 1


def test_recommend_errors_map_to_operation_outcomes():
    prefetch = _minimal_prefetch(
        _cond("278860009"), _obs("72514-3", 6), _obs("44261-6", 5), _obs("70274-6", 5)
    )

    def refuses(profile):
        raise ContractError("bad profile", [{"column": "peg", "problem": "out of range"}])

    def no_model(profile):
        raise ModelError("no champion model registered")

    args = dict(fetch=_no_network, as_of="2024-06-01")
    message = check_error(
        *cds_hooks.handle(SID, hook_request("p1", prefetch=prefetch), recommend=refuses, **args),
        422,
    )
    assert "peg: out of range" in message
    assert "not available" in check_error(
        *cds_hooks.handle(SID, hook_request("p1", prefetch=prefetch), recommend=no_model, **args),
        503,
    )


@needs_data
@pytest.mark.slow
def test_no_patient_data_in_logs(caplog, recommend_fn):
    _, resources, patient, as_of = load(AHRQ)
    with caplog.at_level(logging.DEBUG):
        cds_hooks.handle(
            SID,
            hook_request(patient["id"], prefetch=prefetch_for(resources, patient["id"])),
            recommend=recommend_fn,
            fetch=_no_network,
            as_of=as_of,
        )
    text = caplog.text
    for secret in ("Brenda", "Jackson", patient["id"], "1961-01-25", "oxycodone"):
        assert secret not in text


def test_summaries_are_cut_at_a_word():
    long = "Top option: " + "very " * 40 + "long"
    cut = fit_summary(long)
    assert len(cut) < 140 and cut.endswith("…") and "  " not in cut
    assert fit_summary("short") == "short"
    assert plan_label(["snri", "pt", "cbt"]) == "PT/exercise + CBT + SNRI"


# --------------------------------------------------------------------------- fhirServer fetch (stub server)


class StubFhir:
    """A tiny read-only FHIR server on loopback serving one set of resources by search."""

    def __init__(self, resources: list[dict], fail: set[str] | None = None):
        self.resources, self.fail = resources, fail or set()
        self.requests: list[tuple[str, str | None]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                stub.requests.append((self.path, self.headers.get("Authorization")))
                split = urlsplit(self.path)
                path = unquote(split.path).removeprefix("/fhir/")
                rtype = path.split("/")[0]
                if rtype in stub.fail:
                    self._send(500, {"resourceType": "OperationOutcome", "issue": []})
                    return
                found = run_query(stub.resources, path + ("?" + split.query if split.query else ""))
                self._send(
                    200 if found else 404,
                    found or {"resourceType": "OperationOutcome", "issue": []},
                )

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@needs_data
@pytest.mark.slow
@pytest.mark.integration
def test_without_prefetch_the_service_fetches_from_the_fhir_server(recommend_fn):
    path = next(p for p in SYNTHEA if p.name.startswith("Virginia_Mercado"))
    _, resources, patient, as_of = load(path)
    # the prefetch answer, for comparison
    cds_hooks.handle(
        SID,
        hook_request(patient["id"], prefetch=prefetch_for(resources, patient["id"])),
        recommend=recommend_fn,
        fetch=_no_network,
        as_of=as_of,
    )
    with StubFhir(resources) as fhir:
        request = hook_request(
            patient["id"],
            fhirServer=fhir.base,
            fhirAuthorization={
                "access_token": "secret-token",
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.read",
                "subject": "painplan",
            },
            prefetch={"patient": patient},  # a client that satisfied only one template
        )
        status, body = cds_hooks.handle(SID, request, recommend=recommend_fn, as_of=as_of)
    response = check_ok(status, body)
    assert response.cards
    (via_prefetch, _), (via_server, result) = recommend_fn.calls
    assert via_server == via_prefetch and via_server["opioid_use_disorder"] is True
    assert all("opioid" not in codes(p) for p in result["plans"])
    paths = [p for p, _ in fhir.requests]
    assert not any(p.startswith("/fhir/Patient/") for p in paths)  # prefetched, not re-read
    assert any(p.startswith("/fhir/Condition?patient=") for p in paths)
    assert any("72514-3" in unquote(p) for p in paths)
    assert {auth for _, auth in fhir.requests} == {"Bearer secret-token"}


@pytest.mark.integration
def test_fhir_server_failures_and_medication_references():
    pid = "p1"
    resources = [
        {"resourceType": "Patient", "id": pid, "birthDate": "1970-01-01", "gender": "female"},
        _cond("278860009"),
        _obs("72514-3", 6),
        _obs("44261-6", 5),
        _obs("70274-6", 5),
        {
            "resourceType": "MedicationRequest",
            "id": "mr1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{pid}"},
            "authoredOn": "2024-05-01",
            "medicationReference": {"reference": "Medication/benzo"},
        },
        {
            "resourceType": "Medication",
            "id": "benzo",
            "code": {"text": "Alprazolam 0.5 MG Oral Tablet"},
        },
    ]
    captured = {}

    def recommend(profile):
        captured.update(profile)
        return {
            "plans": [],
            "excluded": [
                {
                    "component": "opioid",
                    "reasons": [
                        {"rule_id": "FLOOR-OPI-BENZO", "reason": "benzodiazepine", "floor": True}
                    ],
                }
            ],
        }

    with StubFhir(resources) as fhir:
        status, body = cds_hooks.handle(
            SID, hook_request(pid, fhirServer=fhir.base), recommend=recommend, as_of="2024-06-01"
        )
        cards = check_ok(status, body).cards
        assert captured["benzodiazepine"] is True  # Medication/benzo was read from the server
        assert cards[0].indicator == "warning" and "No treatment plan" in cards[0].summary
        assert any(p == "/fhir/Medication/benzo" for p, _ in fhir.requests)
    with StubFhir(resources, fail={"MedicationRequest"}) as fhir:
        status, body = cds_hooks.handle(
            SID, hook_request(pid, fhirServer=fhir.base), recommend=_never, as_of="2024-06-01"
        )
        message = check_error(status, body, 412)
        assert "medicationRequests" in message and "HTTP 500" in message
    status, body = cds_hooks.handle(
        SID,
        hook_request(
            pid,
            fhirServer="http://fhir.example.org/r4",
            fhirAuthorization={"access_token": "t", "token_type": "Bearer"},
        ),
        recommend=_never,
        fetch=_no_network,
    )
    assert "https" in check_error(status, body, 412)
    settings = cds_hooks.CdsSettings(allowed_fhir_servers=("https://ehr.example.org/fhir",))
    status, body = cds_hooks.handle(
        SID,
        hook_request(pid, fhirServer="https://evil.example.com/fhir"),
        recommend=_never,
        fetch=_no_network,
        settings=settings,
    )
    assert "allowed FHIR servers" in check_error(status, body, 412)


def test_httpx_fetch_reports_unreachable_servers():
    with pytest.raises(cds_hooks.FetchError, match="failed|timed out"):
        cds_hooks.httpx_fetch("http://127.0.0.1:9/fhir/Patient/x", None, timeout=0.5)


# --------------------------------------------------------------------------- feedback


def test_feedback_accepts_valid_outcomes_and_returns_storable_records():
    body = {
        "feedback": [
            {
                "card": str(uuid.uuid4()),
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": "s1"}],
                "outcomeTimestamp": "2026-11-21T10:15:00Z",
            },
            {
                "card": str(uuid.uuid4()),
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {
                        "system": "urn:painplan:override-reason",
                        "code": "patient-preference",
                        "display": "Patient preference",
                    },
                    "userComment": "prefers PT",
                },
                "outcomeTimestamp": "2026-11-21T10:16:00+01:00",
            },
        ]
    }
    status, out = cds_hooks.feedback(SID, body)
    assert status == 200
    first, second = out["records"]
    assert first["accepted_suggestions"] == ["s1"] and first["service_id"] == SID
    assert (
        second["override_reason"]["code"] == "patient-preference"
        and second["user_comment"] == "prefers PT"
    )
    assert second["outcome_timestamp"] == "2026-11-21T10:16:00+01:00"
    json.dumps(out)


def test_feedback_rejects_invalid_items_naming_each():
    body = {
        "feedback": [
            {"outcome": "accepted", "outcomeTimestamp": "2026-11-21T10:15:00Z"},
            {"card": "c", "outcome": "ignored", "outcomeTimestamp": "yesterday"},
            {
                "card": "c",
                "outcome": "accepted",
                "acceptedSuggestions": [{}],
                "outcomeTimestamp": "2026-11-21T10:15:00",
            },
        ]
    }
    message = check_error(*cds_hooks.feedback(SID, body), 400)
    for part in (
        "feedback[0].card",
        "feedback[0].acceptedSuggestions",
        "feedback[1].outcome",
        "feedback[1].outcomeTimestamp",
        "feedback[2].acceptedSuggestions[0].id",
        "feedback[2].outcomeTimestamp",
    ):
        assert part in message
    assert check_error(*cds_hooks.feedback(SID, {"feedback": []}), 400)
    assert check_error(*cds_hooks.feedback("other", body), 404)
