"""Fuzzing the HTTP API in-process (docs/reliability.md §1).

Generated requests — schemathesis cases (positive and negative) from the service's own
``GET /openapi.json`` and targeted Hypothesis mutations: malformed JSON, wrong types, huge
numbers, unicode (lone surrogates, RTL, NUL, emoji), missing and extra fields, deep nesting,
oversize bodies (declared and chunked), bad plans, bad outcome reports, odd audit queries
and ids, missing/unknown/wrong-role keys — must never get a 5xx; every 4xx is in the error
format and names the field at fault; every 2xx has its documented shape and exactly one
audit row, and a refused request none. ``bench/bench_fuzz.py`` runs the same with 2,000+
requests; the regressions below pin what the fuzzer found.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import reliability_harness as H

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = int(os.environ.get("PAINPLAN_FUZZ_SEED", "20261121"))
TARGETED, SCHEMA_CASES = 300, 150  # ~30 s on two busy cores


def _seed_request(client) -> str:
    body = {"patient": H.random_profile(random.Random(0), H.SENTINEL_ID)}
    response = client.post("/recommend", content=json.dumps(body), headers=_headers())
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def _headers(role: str = "clinician") -> dict:
    return {"Authorization": f"Bearer {H.KEYS[role]}", "Content-Type": "application/json"}


def test_fuzzing_gives_no_5xx_and_every_4xx_names_the_field(asgi, env_for, tmp_path):
    url = f"sqlite:///{tmp_path}/audit.db"
    with asgi(env_for(url)) as client:
        request_id = _seed_request(client)
        document = client.get("/openapi.json").json()
        report = H.fuzz(H.asgi_sender(client), targeted=TARGETED, schema_cases=SCHEMA_CASES,
                        seed=SEED, max_body=65536, document=document, request_id=request_id)
    summary = H.fuzz_summary(report)
    print(json.dumps(summary, indent=1))
    assert not report.problems, f"{len(report.problems)} problem(s):\n" + "\n".join(
        report.problems)
    assert report.n == TARGETED + SCHEMA_CASES
    assert max(report.statuses) < 500
    # every family of malformation was exercised, and every kind of answer seen
    assert {"malformed", "oversize", "unicode", "recommend", "explain", "outcomes", "audit",
            "auth", "fhir", "schemathesis/positive", "schemathesis/negative"} <= set(
        summary["families"])
    assert {200, 400, 401, 403, 404, 413} <= set(report.statuses)
    # one audit row per answered /recommend and /explain (and the seed request); none else
    figures = H.check_rows(url, [request_id, *report.answered], exact=True)
    assert figures["rows"] == len(report.answered) + 1


def _post(client, path: str, body: bytes, role: str = "clinician"):
    return client.post(path, content=body, headers=_headers(role))


PATIENT = H.random_profile(random.Random(1), "MRN-regression")


def _with(token: str, **extra) -> bytes:
    """A /recommend body whose ``age`` is the raw JSON ``token``."""
    return json.dumps({"patient": {**PATIENT, "age": "@RAW@"}, **extra}).replace(
        '"@RAW@"', token).encode()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        # RecursionError in json.loads was a 500
        ("/recommend", b'{"patient":' + b"[" * 20000 + b"]" * 20000 + b"}", "(body)"),
        ("/recommend", b'{"patient":{"age":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}}",
         "(body)"),
        ("/recommend", b'{"patient":' + b"[" * 50 + b"]" * 50 + b"}", "patient"),
        # lone surrogate escapes could not be encoded by pandas or in the error answer: 500
        ("/recommend", _with('"\\ud800"'), "patient.age"),
        ("/recommend", json.dumps({"patient": {**PATIENT, "patient_id": "@"}}).replace(
            '"@"', '"MRN\\udfff"').encode(), "patient.patient_id"),
        ("/recommend", json.dumps({"patient": {**PATIENT, "@": 1}}).replace(
            '"@"', '"\\ud83d"').encode(), "patient.\\ud83d"),
        ("/recommend", json.dumps({"patient": PATIENT, "@": 1}).replace(
            '"@"', '"\\udbff"').encode(), "\\udbff"),
        ("/explain", json.dumps({"patient": PATIENT, "plan_a": "@", "plan_b": "pt"}).replace(
            '"@"', '"cbt\\ud800"').encode(), "plan_a"),
        # 1e400 parses to inf, which the strict-JSON error answer could not carry: 500
        ("/recommend", _with("1e400"), "patient.age"),
        ("/recommend", _with("-1.8e308"), "patient.age"),
        ("/recommend", json.dumps({"patient": {**PATIENT, "age": "@RAW@"}}).replace(
            '"@RAW@"', "[1e999]").encode(), "patient.age"),
        ("/outcomes", b'{"request_id": "@RID@", "plan": "pt", "peg_12wk": 1e400, '
                      b'"adverse_event": false}', "outcome.peg_12wk"),
        # surrogate pairs are ordinary characters: the field is named as a bad level
        ("/recommend", json.dumps({"patient": {**PATIENT, "sex": "\U0001f600"}}).encode(),
         "patient.sex"),
    ],
    ids=["deep-array", "deep-object", "nested-50", "surrogate-value", "surrogate-id",
         "surrogate-key", "surrogate-top-key", "surrogate-plan", "1e400", "-1.8e308",
         "inf-in-list", "outcome-1e400", "emoji-level"],
)
def test_regressions_found_by_the_fuzzer(asgi, env_for, tmp_path, path, body, field):
    with asgi(env_for(f"sqlite:///{tmp_path}/audit.db")) as client:
        body = body.replace(b"@RID@", _seed_request(client).encode())
        response = _post(client, path, body)
    assert response.status_code == 400, response.text
    fields = [v["field"] for v in response.json()["violations"]]
    assert any(f == field or f.startswith((field + "[", field + ".")) for f in fields), fields
    json.loads(response.content, parse_constant=pytest.fail)  # strict JSON: no NaN/Infinity


def _fhir(token: str | None = None, **options) -> bytes:
    """A FHIR /recommend body; ``token`` replaces the raw placeholder "@RAW@"."""
    body = json.dumps({"fhir_bundle": H.fhir_bundle(), "as_of": "2024-06-01", **options})
    return body.replace('"@RAW@"', token).encode() if token else body.encode()


def _fhir_with(where: str, token: str) -> bytes:
    bundle = H.fhir_bundle()
    bundle["entry"][0]["resource"][where] = "@RAW@"
    body = json.dumps({"fhir_bundle": bundle, "as_of": "2024-06-01"})
    return body.replace('"@RAW@"', token).encode()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_fhir_with("extension", "[" * 5000 + "]" * 5000), "(body)"),  # RecursionError
        (_fhir_with("gender", '"\\ud800"'), "fhir_bundle.entry[0].resource.gender"),
        (_fhir("1e400", lookback_days="@RAW@"), "fhir_bundle"),  # int(inf): OverflowError
        (_fhir(lookback_days=10**30), "fhir_bundle"),  # OverflowError (C int)
        (_fhir(as_of="0001-01-01"), "fhir_bundle"),  # date arithmetic: OverflowError
        (_fhir("NaN", lookback_days="@RAW@"), "(body)"),
    ],
    ids=["deep", "surrogate", "lookback-1e400", "lookback-10e30", "as-of-year-1", "nan"],
)
def test_fhir_bundle_regressions(asgi, env_for, tmp_path, body, field):
    """POST /recommend with a FHIR bundle parsed its body without the checks above: each of
    these was a 500."""
    with asgi(env_for(f"sqlite:///{tmp_path}/audit.db")) as client:
        assert _post(client, "/recommend", _fhir()).status_code == 200  # the bundle is fine
        response = _post(client, "/recommend", body)
    assert response.status_code == 400, response.text
    assert field in [v["field"] for v in response.json()["violations"]]


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:30:00-05:00"])
def test_audit_query_dates_that_leave_the_calendar_in_utc(asgi, env_for, tmp_path, moment):
    """datetime.astimezone raised OverflowError (500) for these."""
    with asgi(env_for(f"sqlite:///{tmp_path}/audit.db")) as client:
        response = client.get("/audit", params={"since": moment}, headers=_headers("auditor"))
    assert response.status_code == 400, response.text
    assert [v["field"] for v in response.json()["violations"]] == ["since"]


@pytest.mark.postgres
def test_nul_in_ids_is_not_found_not_an_outage_postgres(asgi, env_for, throwaway_pg):
    """PostgreSQL text cannot hold NUL: looking one up raised a DataError, answered as 503
    audit_unavailable (and counted as an audit failure) instead of 404."""
    url = throwaway_pg.create_database("painplan_fuzz_nul")
    with asgi(env_for(url)) as client:
        request_id = _seed_request(client)
        record = client.get("/audit/abc%00def", headers=_headers("auditor"))
        outcome = _post(client, "/outcomes", json.dumps(
            {"request_id": "a\u0000b", "plan": "pt", "peg_12wk": 3, "adverse_event": False}
        ).encode())
        query = client.get("/audit", params={"model_version": "7\u0000"},
                           headers=_headers("auditor"))
        assert client.get(f"/audit/{request_id}", headers=_headers("auditor")).status_code == 200
    assert record.status_code == 404, record.text
    assert outcome.status_code == 404, outcome.text
    assert outcome.json()["violations"][0]["field"] == "request_id"
    assert query.status_code == 200 and query.json()["count"] == 0, query.text
