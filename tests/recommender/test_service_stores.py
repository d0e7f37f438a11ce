"""The audit trail behind the service, in SQLite and PostgreSQL: a record for every answered
request and none for a rejected one, and a 503 (never a silent success) when the record
cannot be committed."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.integration


@pytest.mark.postgres
def test_audit_row_for_every_answer_none_for_rejections_postgres(asgi_client, pg_url, helpers):
    with asgi_client(pg_url) as client:
        rid = helpers.check_audit_trail(client, pg_url)
        outcome = helpers.post(
            client,
            "/outcomes",
            {"request_id": rid, "plan": "pt", "peg_12wk": 4.0, "adverse_event": False},
            helpers.CLINICIAN,
        )
        assert outcome.status_code == 201
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM painplan_outcomes")).scalar() == 1
            dump = conn.execute(
                sa.text("SELECT string_agg(t::text, '') FROM painplan_requests t")
            ).scalar()
    finally:
        engine.dispose()
    assert helpers.PATIENT["patient_id"] not in dump


def test_commit_failure_gives_503_and_no_record_sqlite(asgi_client, tmp_path, helpers):
    url = helpers.sqlite_url(tmp_path / "audit.db")
    with asgi_client(url) as client:
        assert (
            helpers.post(
                client, "/recommend", {"patient": helpers.PATIENT}, helpers.CLINICIAN
            ).status_code
            == 200
        )
        import bentoml

        bentoml.get_current_service().api.store.close()  # the database goes away
        r = helpers.post(client, "/recommend", {"patient": helpers.PATIENT}, helpers.CLINICIAN)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "audit_unavailable"
        assert "not given" in r.json()["message"] and "plans" not in r.json()
        assert r.headers["retry-after"]
    assert helpers.audit_counts(url)["painplan_requests"] == 1


@pytest.mark.postgres
def test_commit_failure_gives_503_postgres(asgi_client, fresh_pg_database, helpers):
    name, url = fresh_pg_database()
    with asgi_client(url) as client:
        assert (
            helpers.post(
                client, "/recommend", {"patient": helpers.PATIENT}, helpers.CLINICIAN
            ).status_code
            == 200
        )
        helpers.drop_database(name)  # the server loses its database mid-flight
        r = helpers.post(client, "/recommend", {"patient": helpers.PATIENT}, helpers.CLINICIAN)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "audit_unavailable" and "plans" not in r.json()
        explain = helpers.post(
            client,
            "/explain",
            {"patient": helpers.PATIENT, "plan_a": "pt", "plan_b": "cbt"},
            helpers.CLINICIAN,
        )
        assert explain.status_code == 503
