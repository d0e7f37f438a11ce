"""Crashes with a PostgreSQL audit store (docs/reliability.md §3), on a private cluster the
tests may stop: ``bentoml serve`` killed with SIGKILL in the middle of load and restarted;
then PostgreSQL itself stopped with ``pg_ctl stop -m immediate`` in the middle of load —
answers must turn into quick 503s (never a hang, never an answer without its record) — and
started again, after which the service must recover by itself."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import reliability_harness as H

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

CONCURRENCY = 32
BODIES = H.load_bodies(256, seed=2)
CLIENT_TIMEOUT_S = 10.0  # no answer may take longer, even while the database is down


@pytest.fixture(scope="module")
def pg_service(model, env_for, throwaway_pg, tmp_path_factory):
    root = tmp_path_factory.mktemp("pg-crash")
    audit_url = throwaway_pg.create_database("painplan_crash")
    server = H.Server(env_for(audit_url), root / "server.log").start()
    try:
        server.wait_ready()
        yield {"server": server, "audit_url": audit_url, "pg": throwaway_pg}
    finally:
        server.stop()
        if not throwaway_pg.running():
            throwaway_pg.start()


def _answered(results) -> list[str]:
    return [r.request_id for r in results if r.status is not None and 200 <= r.status < 300]


def _wait_answers(load: H.Load, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(_answered(load.results)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_answered(load.results)) >= n, "the service answered too little under load"


def test_kill9_in_the_middle_of_load_loses_no_answered_record_postgres(pg_service):
    server, audit_url = pg_service["server"], pg_service["audit_url"]
    before = set(H.audit_request_ids(audit_url))
    load = H.Load(server.url, BODIES, concurrency=CONCURRENCY, timeout=60, connect_timeout=2,
                  backoff=0.2).start()
    _wait_answers(load, 20)
    t_kill = load.now()
    gone = server.kill9()
    time.sleep(1.0)
    load.stop()
    results = load.join(90)
    t0 = time.monotonic()
    server.start()
    ready = server.wait_ready()
    results_after = H.Load(server.url, BODIES, concurrency=8, duration=4, timeout=60).run()
    print(json.dumps({"answered_before_kill": len(_answered(results)), **gone,
                      "restart_to_ready_s": ready, "restart_total_s": time.monotonic() - t0},
                     indent=1))

    assert all(r.status == 200 for r in results if r.started + r.latency < t_kill)
    assert all(r.status in (200, None) for r in results), {r.status for r in results}
    assert results_after and all(r.status == 200 for r in results_after)
    figures = H.check_rows(audit_url, _answered(results) + _answered(results_after),
                           exact=False, ignore=before)
    assert figures["rows_without_answer"] <= CONCURRENCY, figures
    integrity = H.pg_integrity(audit_url)
    assert integrity["orphaned_outcomes"] == 0 and integrity["indexes_checked"] >= 3


def test_postgres_going_away_gives_quick_503s_and_the_service_recovers(pg_service):
    server, audit_url, pg = pg_service["server"], pg_service["audit_url"], pg_service["pg"]
    before = set(H.audit_request_ids(audit_url))
    load = H.Load(server.url, BODIES, concurrency=CONCURRENCY, timeout=CLIENT_TIMEOUT_S,
                  connect_timeout=2).start()
    _wait_answers(load, 20)
    t_stop = load.now()
    pg.stop("immediate")
    t_down = load.now()
    # while it is down: a clear, quick refusal; the process itself stays up
    probe_t0 = time.monotonic()
    probe = httpx.post(f"{server.url}/recommend", content=BODIES[0][1], timeout=CLIENT_TIMEOUT_S,
                       headers={"Authorization": f"Bearer {H.CLINICIAN_KEY}",
                                "Content-Type": "application/json"})
    probe_s = time.monotonic() - probe_t0
    time.sleep(3.0)
    t_start = load.now()
    pg.start()
    deadline = time.monotonic() + 60
    recovered = None
    while recovered is None and time.monotonic() < deadline:
        recovered = next((r.started + r.latency for r in list(load.results)
                          if r.status == 200 and r.started >= t_start), None)
        time.sleep(0.1)
    time.sleep(2.0)
    load.stop()
    results = load.join(CLIENT_TIMEOUT_S + 30)
    statuses = {str(r.status) for r in results}
    print(json.dumps({
        **H.summarize(results, load.elapsed), "down_s": t_start - t_down,
        "probe_503_s": probe_s, "pg_start_to_first_200_s": None if recovered is None
        else recovered - t_start,
    }, indent=1))

    assert probe.status_code == 503, probe.text
    assert probe.json()["error"] == "audit_unavailable" and "plans" not in probe.json()
    assert probe.headers["retry-after"] == "5"
    assert probe_s < 5
    assert recovered is not None, "no 200 within 60 s of PostgreSQL coming back"
    assert statuses <= {"200", "503"}, statuses  # no hang (timeout), no other failure
    assert max(r.latency for r in results) < CLIENT_TIMEOUT_S
    assert all(r.status == 200 for r in results if r.started + r.latency < t_stop)
    refused = [r for r in results if r.status == 503]
    assert refused and all(r.error == "audit_unavailable" and r.retry_after == "5"
                           for r in refused)
    assert all(r.started + r.latency >= t_stop for r in refused)
    # every answer the clients got has its record
    figures = H.check_rows(audit_url, _answered(results), exact=False, ignore=before)
    assert figures["rows_without_answer"] <= CONCURRENCY, figures
    assert H.pg_integrity(audit_url)["orphaned_outcomes"] == 0
    # every request carried the sentinel id and name: neither reached the rows or any log
    texts = {"audit rows": H.audit_dump(audit_url), "server log": server.log_text(),
             "PostgreSQL log": pg.logfile.read_text(errors="replace")}
    for where, text in texts.items():
        assert H.SENTINEL_ID not in text and H.SENTINEL_NAME not in text, where
