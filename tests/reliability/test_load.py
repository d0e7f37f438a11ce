"""Load, data protection in logs and audit rows, and a crash — against ``bentoml serve`` over
real HTTP with a SQLite audit store (docs/reliability.md §2, §3, §5).

One server for the module (starting one costs 10-15 s): 32 clients for ~20 s, then the
server's captured output and the audit rows are searched for the sentinel patient id and
name every load request carried, then the server is killed with SIGKILL in the middle of
load and restarted. ``bench/bench_load.py`` runs the load for minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time

import httpx
import pytest
import reliability_harness as H

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOAD_S = float(os.environ.get("PAINPLAN_LOAD_SECONDS", "20"))
CONCURRENCY = 32
BODIES = H.load_bodies(256, seed=1)


@pytest.fixture(scope="module")
def service(model, env_for, tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    audit_url = f"sqlite:///{root}/audit.db"
    server = H.Server(env_for(audit_url), root / "server.log").start()
    try:
        server.wait_ready()
        yield {"server": server, "audit_url": audit_url}
    finally:
        server.stop()


def _answered(results) -> list[str]:
    return [r.request_id for r in results if r.status is not None and 200 <= r.status < 300]


def test_32_clients_get_answers_with_zero_errors_and_one_audit_row_each(service):
    server, audit_url = service["server"], service["audit_url"]
    before = set(H.audit_request_ids(audit_url))
    load = H.Load(server.url, BODIES, concurrency=CONCURRENCY, duration=LOAD_S, timeout=60)
    results = load.run()
    summary = H.summarize(results, load.elapsed)
    print(json.dumps(summary, indent=1))
    failed = [r for r in results if r.status != 200 or r.error]
    assert not failed, f"{len(failed)} failed request(s), e.g. {failed[:3]}"
    assert summary["answered"] >= CONCURRENCY  # every client got answers
    assert {r.endpoint for r in results} == {"/recommend", "/explain"}
    figures = H.check_rows(audit_url, _answered(results), exact=True, ignore=before)
    assert figures["rows"] == summary["answered"]


def test_no_patient_id_name_or_key_in_logs_or_audit_rows(service):
    """Every load request carried the sentinel patient id (or one starting with it) and the
    sentinel name in an extra field; here also refused requests carry them in bad values."""
    server, audit_url = service["server"], service["audit_url"]
    headers = {"Authorization": f"Bearer {H.CLINICIAN_KEY}"}
    patient = {**H.random_profile(__import__("random").Random(5), H.SENTINEL_ID),
               "name": H.SENTINEL_NAME}
    metrics_before = H.rejected_counter(httpx.get(f"{server.url}/metrics").text)
    rows_before = len(H.audit_request_ids(audit_url))
    refused = [
        {"patient": {**patient, "sex": H.SENTINEL_NAME}},  # bad level, echoed to the client
        {"patient": patient, "name": H.SENTINEL_NAME},  # unknown top-level field
        {"patient": {**patient, "patient_id": H.SENTINEL_ID * 6}},  # too long
        {"patient": {**patient, "age": 300}, "top_k": 0},
    ]
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        for body in refused:
            assert client.post("/recommend", json=body).status_code == 400
        answer = client.post("/recommend", json={"patient": patient}).json()
        record = client.get(f"/audit/{answer['request_id']}",
                            headers={"Authorization": f"Bearer {H.AUDITOR_KEY}"}).json()
    time.sleep(1.0)  # let the worker flush its log lines
    # refused requests: counted, not recorded
    assert len(H.audit_request_ids(audit_url)) == rows_before + 1
    metrics_after = H.rejected_counter(httpx.get(f"{server.url}/metrics").text)
    assert metrics_after - metrics_before == len(refused)
    # the record: pseudonym only, no extra field, nothing of the name
    assert record["patient_key"] == hmac.new(H.HMAC_KEY.encode(), H.SENTINEL_ID.encode(),
                                             hashlib.sha256).hexdigest()
    assert "patient_id" not in record["profile"] and "name" not in record["profile"]

    log = server.log_text()
    dump = H.audit_dump(audit_url)
    assert "POST /recommend" in log or "/recommend" in log  # the log is really captured
    assert len(dump) > 10_000  # ... and so are the rows
    secrets = {
        "sentinel patient id": H.SENTINEL_ID,
        "sentinel name": H.SENTINEL_NAME,
        "clinician key": H.CLINICIAN_KEY,
        "auditor key": H.AUDITOR_KEY,
        "HMAC key": H.HMAC_KEY,
        "clinician key digest": hashlib.sha256(H.CLINICIAN_KEY.encode()).hexdigest(),
    }
    for what, text in secrets.items():
        assert text not in log, f"the {what} is in the server log"
        assert text not in dump, f"the {what} is in the audit store"
        assert text.lower() not in log.lower() and text.lower() not in dump.lower()


def test_kill9_in_the_middle_of_load_loses_no_answered_record_sqlite(service):
    server, audit_url = service["server"], service["audit_url"]
    before = set(H.audit_request_ids(audit_url))
    load = H.Load(server.url, BODIES, concurrency=CONCURRENCY, timeout=60, connect_timeout=2,
                  backoff=0.2).start()
    deadline = time.monotonic() + 60
    while len(_answered(load.results)) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    t_kill = load.now()
    gone = server.kill9()
    time.sleep(1.0)  # clients see refused connections for a while
    load.stop()
    results = load.join(90)
    t0 = time.monotonic()
    server.start()
    ready = server.wait_ready()
    after = H.Load(server.url, BODIES, concurrency=8, duration=4, timeout=60)
    results_after = after.run()
    timings = {"answered_before_kill": len(_answered(results)), **gone,
               "restart_to_ready_s": ready, "restart_total_s": time.monotonic() - t0}
    print(json.dumps(timings, indent=1))

    assert len(_answered(results)) >= 20
    done_before_kill = [r for r in results if r.started + r.latency < t_kill]
    assert all(r.status == 200 for r in done_before_kill)
    assert all(r.status in (200, None) for r in results), {r.status for r in results}
    assert any(r.status is None for r in results)  # the crash was felt
    assert results_after and all(r.status == 200 for r in results_after)
    figures = H.check_rows(audit_url, _answered(results) + _answered(results_after),
                           exact=False, ignore=before)
    # rows without an answer: requests committed whose answer was lost in the crash
    assert figures["rows_without_answer"] <= CONCURRENCY, figures
    integrity = H.sqlite_integrity(audit_url)
    assert integrity["integrity_check"] == "ok" and integrity["foreign_key_check"] == []
    assert integrity["journal_mode"] == "wal"
