"""The HTTP service in-process (``PainPlan.to_asgi()`` + TestClient): answers, roles, error
bodies, the audit trail (SQLite and PostgreSQL), outcomes, the model card, and start-up
refusals. The same service over real HTTP is in test_service_http.py."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.catalog import COMPONENT_CODES, plan_components
from features.schema import columns_for
from features.validate import validate
from recommender.safety import floor_violations

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- answers


def test_recommend_happy_path(sqlite_client, served, helpers):
    r = helpers.post(
        sqlite_client, "/recommend", {"patient": helpers.PATIENT, "top_k": 5}, helpers.CLINICIAN
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert uuid.UUID(body["request_id"])
    assert body["model"] == {
        "name": "painplan",
        "version": "7",
        "tag": served.tag,
        "mlflow_run_id": served.run_id,
        "ruleset_version": body["model"]["ruleset_version"],
    }
    plans = body["plans"]
    assert [p["rank"] for p in plans] == [1, 2, 3, 4, 5]
    utilities = [p["utility"] for p in plans]
    assert utilities == sorted(utilities, reverse=True)
    for p in plans:
        assert [c["code"] for c in p["components"]] == list(plan_components(p["plan"]))
        low, high = p["improvement_interval"]
        assert low <= p["expected_improvement"] <= high
        assert 0 <= p["p_response"] <= 1 and 0 <= p["p_adverse_event"] <= 1
        assert p["utility"] == pytest.approx(
            p["expected_improvement"] - 2.0 * p["p_adverse_event"], abs=2e-4
        )
        assert isinstance(p["warnings"], list)
        assert p["explanation"]["contributions"], "every plan is explained"
        for item in p["explanation"]["contributions"]:
            assert {"feature", "value", "shap", "phrase"} <= set(item)
    assert body["excluded"] == [] or all("rules" in e for e in body["excluded"])
    assert body["input_warnings"] == []


def test_default_top_k_is_five_and_extra_profile_fields_are_warned_about(sqlite_client, helpers):
    r = helpers.post(
        sqlite_client,
        "/recommend",
        {"patient": {**helpers.PATIENT, "shoe_size": 42}},
        helpers.CLINICIAN,
    )
    assert r.status_code == 200
    assert len(r.json()["plans"]) == 5
    assert "shoe_size" in r.json()["input_warnings"][0]


def test_explanations_add_up_to_plan_effect(sqlite_client, helpers):
    body = helpers.post(
        sqlite_client, "/recommend", {"patient": helpers.PATIENT, "top_k": 5}, helpers.CLINICIAN
    ).json()
    for p in body["plans"]:
        ex = p["explanation"]
        total = ex["base_value"] + sum(c["shap"] for c in ex["contributions"])
        # each value is rounded to 4 decimals: at most ~8 roundings of 5e-5
        assert total == pytest.approx(ex["plan_effect"], abs=1e-3)
    # plan_effect is the utility minus the patient's usual-care baseline, the same for every
    # plan: differences of plan effects are differences of served utilities.
    first = body["plans"][0]
    for p in body["plans"][1:]:
        assert first["explanation"]["plan_effect"] - p["explanation"][
            "plan_effect"
        ] == pytest.approx(first["utility"] - p["utility"], abs=2e-3)


def test_contrast_contributions_add_up_to_the_gap(sqlite_client, helpers):
    r = helpers.post(
        sqlite_client,
        "/explain",
        {"patient": helpers.PATIENT, "plan_a": "pt + cbt", "plan_b": "nsaid+pt"},
        helpers.CLINICIAN,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["plan_a"], body["plan_b"]) == ("cbt+pt", "nsaid+pt")
    total = body["average_patient_gap"] + sum(c["shap"] for c in body["contributions"])
    assert total == pytest.approx(body["utility_gap"], abs=1e-3)
    assert [p["plan"] for p in body["plans"]] == ["cbt+pt", "nsaid+pt"]
    assert all(p["allowed"] for p in body["plans"])


def test_contrast_gap_matches_the_served_utilities(sqlite_client, helpers):
    body = helpers.post(
        sqlite_client,
        "/explain",
        {"patient": helpers.PATIENT, "plan_a": "cbt+pt", "plan_b": "nsaid+pt"},
        helpers.CLINICIAN,
    ).json()
    a, b = body["plans"]
    assert body["utility_gap"] == pytest.approx(a["utility"] - b["utility"], abs=2e-3)


def test_safety_flagged_patient_never_gets_an_excluded_component(sqlite_client, helpers):
    r = helpers.post(
        sqlite_client, "/recommend", {"patient": helpers.FLAGGED, "top_k": 50}, helpers.CLINICIAN
    )
    assert r.status_code == 200
    body = r.json()
    offered = {c for p in body["plans"] for c in plan_components(p["plan"])}
    assert len(body["plans"]) == 50
    assert not offered & {"nsaid", "opioid"}
    blocked = {
        e["component"]: {x["rule_id"] for x in e["rules"]}
        for e in body["excluded"]
        if "component" in e
    }
    assert {"nsaid", "opioid"} <= set(blocked)
    assert all(x["reason"] for e in body["excluded"] for x in e["rules"])
    assert any(x["floor"] for e in body["excluded"] for x in e["rules"])
    # An independent, hand-written copy of CONTRACT §5 agrees.
    frame = validate(pd.DataFrame([helpers.FLAGGED] * 50), "patients").frame
    from features.catalog import PLAN_INDEX

    idx = np.array([PLAN_INDEX[p["plan"]] for p in body["plans"]])
    assert not floor_violations(frame, idx).any()


def test_explaining_an_excluded_plan_says_it_is_not_allowed(sqlite_client, helpers):
    body = helpers.post(
        sqlite_client,
        "/explain",
        {"patient": helpers.FLAGGED, "plan_a": "pt", "plan_b": "nsaid"},
        helpers.CLINICIAN,
    ).json()
    assert [p["allowed"] for p in body["plans"]] == [True, False]
    assert any(e.get("component") == "nsaid" for e in body["excluded"])


# --------------------------------------------------------------------------- access


ROUTES = [
    ("post", "/recommend", "clinician"),
    ("post", "/explain", "clinician"),
    ("post", "/outcomes", "clinician"),
    ("get", "/audit", "auditor"),
    ("get", f"/audit/{uuid.uuid4()}", "auditor"),
    ("get", "/model", "auditor"),
]


@pytest.mark.parametrize(("method", "path", "role"), ROUTES)
def test_roles(sqlite_client, helpers, method, path, role):
    call = getattr(sqlite_client, method)
    kwargs = {"content": b"{}"} if method == "post" else {}
    none = call(path, **kwargs)
    assert none.status_code == 401
    assert none.headers["www-authenticate"].startswith("Bearer")
    assert none.json()["error"] == "unauthorized"
    assert call(path, headers={"Authorization": "Basic abc"}, **kwargs).status_code == 401
    unknown = call(path, headers={"Authorization": "Bearer " + "x" * 30}, **kwargs)
    assert unknown.status_code == 401 and "not known" in unknown.json()["message"]
    other = helpers.AUDITOR if role == "clinician" else helpers.CLINICIAN
    wrong = call(path, headers=other, **kwargs)
    assert wrong.status_code == 403
    assert f"needs the {role} role" in wrong.json()["message"]
    right = helpers.CLINICIAN if role == "clinician" else helpers.AUDITOR
    assert call(path, headers=right, **kwargs).status_code not in (401, 403)


def test_rejected_auth_is_checked_before_the_body_is_read(sqlite_client, helpers):
    r = sqlite_client.post("/recommend", content=b"not json at all")
    assert r.status_code == 401  # not 400: nothing about the body is revealed


# --------------------------------------------------------------------------- errors

BAD_RECOMMEND = [
    ({"age": 5}, "patient.age", 5, "out of range"),
    ({"sex": "robot"}, "patient.sex", "robot", "unknown level"),
    ({"peg": None}, "patient.peg", None, "required"),
    ({"bmi": "abc"}, "patient.bmi", "abc", "not a number"),
    ({"phq9": 12.5}, "patient.phq9", 12.5, "whole number"),
    ({"smoker": "maybe"}, "patient.smoker", "maybe", "not a boolean"),
    ({"prior_nsaid": "great"}, "patient.prior_nsaid", "great", "unknown level"),
    ({"patient_id": "x" * 65}, "patient.patient_id", "x" * 65, "longer than 64"),
    ({"gad7": [3]}, "patient.gad7", [3], "JSON string, number, boolean or null"),
    ({"egfr": 250}, "patient.egfr", 250, "out of range"),
    ({"pain_condition": "Low_Back"}, "patient.pain_condition", "Low_Back", "unknown level"),
]


@pytest.mark.parametrize(("change", "field", "value", "problem"), BAD_RECOMMEND)
def test_bad_profile_values_are_named(sqlite_client, helpers, change, field, value, problem):
    patient = {**helpers.PATIENT, **change}
    if change.get("peg", 0) is None:
        del patient["peg"]
    r = helpers.post(sqlite_client, "/recommend", {"patient": patient}, helpers.CLINICIAN)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    hits = [v for v in body["violations"] if v["field"] == field]
    assert len(hits) == 1, body
    assert problem in hits[0]["problem"]
    assert hits[0]["value"] == value
    assert field in body["message"] and "\n" not in body["message"]


BAD_ENVELOPE = [
    ({"top_k": 0}, "top_k", 0),
    ({"top_k": 51}, "top_k", 51),
    ({"top_k": "5"}, "top_k", "5"),
    ({"topk": 5}, "topk", 5),
    ({"patient": [1, 2]}, "patient", [1, 2]),
]


@pytest.mark.parametrize(("change", "field", "value"), BAD_ENVELOPE)
def test_bad_request_fields_are_named(sqlite_client, helpers, change, field, value):
    r = helpers.post(
        sqlite_client, "/recommend", {"patient": helpers.PATIENT, **change}, helpers.CLINICIAN
    )
    assert r.status_code == 400
    hits = [v for v in r.json()["violations"] if v["field"] == field]
    assert hits and hits[0]["value"] == value, r.json()


def test_every_problem_is_reported_at_once(sqlite_client, helpers):
    patient = {**helpers.PATIENT, "age": 200, "sex": "x", "phq9": -1}
    del patient["gad7"]
    r = helpers.post(
        sqlite_client, "/recommend", {"patient": patient, "top_k": 99}, helpers.CLINICIAN
    )
    fields = {v["field"] for v in r.json()["violations"]}
    assert fields == {"patient.age", "patient.sex", "patient.phq9", "patient.gad7", "top_k"}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b'{"patient": {"age": NaN}}', "NaN is not a JSON value"),
        (b"[1, 2]", "expected a JSON object"),
        ("{}".encode("utf-16"), "not valid UTF-8 JSON"),
    ],
)
def test_unparseable_bodies(sqlite_client, helpers, body, problem):
    r = sqlite_client.post("/recommend", content=body, headers=helpers.CLINICIAN)
    assert r.status_code == 400
    assert r.json()["violations"][0]["field"] == "(body)"
    assert problem in r.json()["message"]


@pytest.mark.parametrize(
    ("plans", "field", "text"),
    [
        ({"plan_a": "pt", "plan_b": "pt+foo"}, "plan_b", "'foo'"),
        ({"plan_a": "snri+tca", "plan_b": "pt"}, "plan_a", "forbidden combination"),
        ({"plan_a": "pt+pt", "plan_b": "cbt"}, "plan_a", "more than once"),
        ({"plan_a": "PT", "plan_b": "cbt"}, "plan_a", "lower-case"),
    ],
)
def test_unknown_or_invalid_plan_is_named(sqlite_client, helpers, plans, field, text):
    r = helpers.post(
        sqlite_client, "/explain", {"patient": helpers.PATIENT, **plans}, helpers.CLINICIAN
    )
    assert r.status_code == 400
    (hit,) = [v for v in r.json()["violations"] if v["field"] == field]
    assert text in hit["problem"] and hit["value"] == plans[field]


def test_request_size_limit(sqlite_client, helpers):
    big = {"patient": {**helpers.PATIENT, "notes": "x" * 70_000}}
    before = helpers.audit_counts(sqlite_client.audit_url)
    r = helpers.post(sqlite_client, "/recommend", big, helpers.CLINICIAN)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit still holds while streaming
        for _ in range(20):
            yield b"x" * 5000

    r = sqlite_client.post("/recommend", content=chunks(), headers=helpers.CLINICIAN)
    assert r.status_code == 413
    assert helpers.audit_counts(sqlite_client.audit_url) == before


# --------------------------------------------------------------------------- audit trail


def test_audit_row_for_every_answer_none_for_rejections_sqlite(sqlite_client, helpers):
    helpers.check_audit_trail(sqlite_client, sqlite_client.audit_url)
    db = Path(sqlite_client.audit_url.removeprefix("sqlite:///"))
    raw = b"".join(p.read_bytes() for p in db.parent.glob("audit.db*"))
    assert helpers.PATIENT["patient_id"].encode() not in raw, "raw patient id stored"


def test_audit_query_filters(sqlite_client, helpers):
    rid = helpers.post(
        sqlite_client, "/recommend", {"patient": helpers.PATIENT}, helpers.CLINICIAN
    ).json()["request_id"]
    everything = sqlite_client.get("/audit?limit=1000", headers=helpers.AUDITOR).json()
    assert everything["count"] >= 1 and rid in [r["request_id"] for r in everything["records"]]
    times = [r["created_at"] for r in everything["records"]]
    assert times == sorted(times)
    assert sqlite_client.get("/audit?limit=1", headers=helpers.AUDITOR).json()["count"] == 1
    assert (
        sqlite_client.get("/audit?model_version=999", headers=helpers.AUDITOR).json()["count"] == 0
    )
    assert (
        sqlite_client.get("/audit?model_version=7&limit=1000", headers=helpers.AUDITOR).json()[
            "count"
        ]
        == everything["count"]
    )
    assert (
        sqlite_client.get("/audit?since=2999-01-01", headers=helpers.AUDITOR).json()["count"] == 0
    )
    assert (
        sqlite_client.get("/audit?until=2000-01-01T00:00:00Z", headers=helpers.AUDITOR).json()[
            "count"
        ]
        == 0
    )
    bad = sqlite_client.get("/audit?limit=0&since=yesterday&sort=asc", headers=helpers.AUDITOR)
    assert bad.status_code == 400
    assert {v["field"] for v in bad.json()["violations"]} == {"limit", "since", "sort"}
    missing = sqlite_client.get(f"/audit/{uuid.uuid4()}", headers=helpers.AUDITOR)
    assert missing.status_code == 404 and missing.json()["violations"][0]["field"] == "request_id"


# --------------------------------------------------------------------------- outcomes


def test_outcomes(sqlite_client, helpers):
    body = helpers.post(
        sqlite_client, "/recommend", {"patient": helpers.PATIENT, "top_k": 4}, helpers.CLINICIAN
    ).json()
    rid, second = body["request_id"], body["plans"][1]["plan"]
    r = helpers.post(
        sqlite_client,
        "/outcomes",
        {"request_id": rid, "plan": second, "peg_12wk": 3.5, "adverse_event": "no"},
        helpers.CLINICIAN,
    )
    assert r.status_code == 201, r.text
    assert r.json()["shown_rank"] == 2 and r.json()["propensity"] == pytest.approx(0.25)
    off = next(
        p
        for p in ("acupuncture+diet+yoga", "cbt+mbsr", "tca")
        if p not in [x["plan"] for x in body["plans"]]
    )
    r = helpers.post(
        sqlite_client,
        "/outcomes",
        {"request_id": rid, "plan": off, "peg_12wk": 5, "adverse_event": True},
        helpers.CLINICIAN,
    )
    assert r.json()["shown_rank"] is None and r.json()["propensity"] is None
    record = sqlite_client.get(f"/audit/{rid}", headers=helpers.AUDITOR).json()
    assert [o["plan"] for o in record["outcomes"]] == [second, off]
    bad = helpers.post(
        sqlite_client,
        "/outcomes",
        {"request_id": rid, "plan": "pt+zz", "peg_12wk": 11, "adverse_event": "maybe"},
        helpers.CLINICIAN,
    )
    assert bad.status_code == 400
    assert {v["field"] for v in bad.json()["violations"]} == {
        "outcome.plan",
        "outcome.peg_12wk",
        "outcome.adverse_event",
    }
    missing = helpers.post(sqlite_client, "/outcomes", {"plan": "pt"}, helpers.CLINICIAN)
    assert {v["field"] for v in missing.json()["violations"]} == {
        "request_id",
        "peg_12wk",
        "adverse_event",
    }
    unknown = helpers.post(
        sqlite_client,
        "/outcomes",
        {"request_id": str(uuid.uuid4()), "plan": "pt", "peg_12wk": 3, "adverse_event": False},
        helpers.CLINICIAN,
    )
    assert unknown.status_code == 404


# --------------------------------------------------------------------------- model card


def test_model_card_and_lineage(sqlite_client, served, helpers):
    card = sqlite_client.get("/model", headers=helpers.AUDITOR).json()
    assert card["model"]["tag"] == served.tag
    lineage = card["lineage"]
    assert lineage["mlflow_run_id"] == served.run_id
    assert lineage["registered_version"] == "7"
    assert lineage["data_hash"] == "sha256:test-cohort"
    assert lineage["schema_fingerprint"] and len(lineage["content_sha256"]) == 64
    assert card["model_card"].startswith("# painplan test model")
    assert card["bundle"]["row_counts"] is not None


def test_openapi_document_derives_from_the_schema(sqlite_client):
    doc = sqlite_client.get("/openapi.json").json()
    profile = doc["components"]["schemas"]["PatientProfile"]
    columns = columns_for("request")
    assert list(profile["properties"]) == [c.name for c in columns]
    assert profile["required"] == [c.name for c in columns if c.required]
    for c in columns:
        prop = profile["properties"][c.name]
        if c.min is not None:
            assert prop["minimum"] == c.min and prop["maximum"] == c.max
        if c.levels:
            assert prop["enum"] == list(c.levels)
    assert set(doc["paths"]) == {
        "/recommend",
        "/explain",
        "/outcomes",
        "/audit",
        "/audit/{request_id}",
        "/model",
    }


def test_component_codes_are_complete():
    # guards the safety assertion above against a renamed component
    assert {"nsaid", "opioid"} <= set(COMPONENT_CODES)
