"""The CDS Hooks routes and FHIR input on the running service (in-process ASGI client):
discovery, a patient-view call answered with cards from the real model, an unsupported hook,
and ``POST /recommend`` with a FHIR bundle. The hook logic itself is tested in
test_cds_hooks.py; these tests check the wiring and that EHR requests are audited."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from recommender import cds_hooks

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
BRENDA = DATA / "cds-test-patients" / "ahrq-pain-management-summary" / "brenda_jackson.r4.json"
SERVICE_ID = cds_hooks.discovery()["services"][0]["id"]


@pytest.fixture
def client(asgi_client, tmp_path):
    # The test records carry fixed 2017-2023 dates: look back far enough to see them.
    with asgi_client(f"sqlite:///{tmp_path / 'audit.db'}", PAINPLAN_CDS_AUTH="off",
                     PAINPLAN_CDS_LOOKBACK_DAYS="20000",
                     PAINPLAN_MAX_BODY_BYTES=str(4 * 2**20)) as c:
        yield c


def test_discovery_lists_the_patient_view_service(client):
    r = client.get("/cds-services", follow_redirects=False)  # the spec's URL, exactly
    assert r.status_code == 200
    services = r.json()["services"]
    assert [s["hook"] for s in services] == ["patient-view"]
    assert services[0]["prefetch"]["patient"] == "Patient/{{context.patientId}}"


def test_patient_view_answers_cards_without_an_opioid_for_a_benzodiazepine_user(client):
    bundle = json.loads(BRENDA.read_text())
    request = cds_hooks.request_from_bundle(bundle)
    r = client.post(f"/cds-services/{SERVICE_ID}", json=request)
    assert r.status_code == 200, r.text
    cards = r.json()["cards"]
    assert cards and all(len(c["summary"]) <= 140 for c in cards)
    assert all(c["indicator"] in {"info", "warning", "critical"} for c in cards)
    text = " ".join(c.get("detail", "") for c in cards).lower()
    assert "opioid" in text  # the exclusion is explained ...
    ranked = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert ranked and not any("opioid" in line for line in ranked)  # ... and never ranked


def test_unsupported_hook_gets_an_operation_outcome(client):
    r = client.post(f"/cds-services/{SERVICE_ID}",
                    json={"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": {}})
    assert r.status_code == 400
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "order-sign" in body["issue"][0]["diagnostics"]


def test_recommend_accepts_a_fhir_bundle_and_reports_what_was_missing(client, helpers):
    bundle = json.loads(BRENDA.read_text())
    # The record has no GAD-7: refused, naming the field and how to supply it ...
    r = client.post("/recommend", headers=helpers.CLINICIAN,
                    json={"fhir_bundle": bundle, "top_k": 5, "as_of": "2023-10-16"})
    assert r.status_code == 400 and "gad7" in r.json()["message"]
    # ... and answered once the clinician adds it next to the bundle.
    r = client.post("/recommend", headers=helpers.CLINICIAN,
                    json={"fhir_bundle": bundle, "patient": {"gad7": 9}, "top_k": 5,
                          "as_of": "2023-10-16"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["plans"]
    assert all("opioid" not in p["plan"] for p in answer["plans"])
    assert "missing" in answer["fhir"] and "warnings" in answer["fhir"]


def test_recommend_with_a_broken_bundle_names_the_field(client, helpers):
    r = client.post("/recommend", headers=helpers.CLINICIAN, json={"fhir_bundle": "not a bundle"})
    assert r.status_code == 400
    assert r.json()["violations"][0]["field"] == "fhir_bundle"


def test_feedback_is_accepted_and_malformed_feedback_refused(client):
    ok = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden",
                        "outcomeTimestamp": "2026-11-21T10:00:00Z"}]}
    r = client.post(f"/cds-services/{SERVICE_ID}/feedback", json=ok)
    assert r.status_code == 200 and r.json() == {}
    r = client.post(f"/cds-services/{SERVICE_ID}/feedback", json={"feedback": []})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
