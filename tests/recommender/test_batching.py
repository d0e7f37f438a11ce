"""Micro-batching of ``POST /recommend`` (docs/serving.md): a batch answers every request
exactly as it would be answered alone, a bad request fails only itself, a failed audit
commit fails the whole batch and records nothing; and the batcher itself: no wait when
idle, everything queued (up to the bound) in the next batch."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from recommender.api_schema import InvalidRequest
from recommender.audit import AuditUnavailable
from recommender.batching import MicroBatcher

pytestmark = pytest.mark.integration

FHIR_BUNDLE = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {"resource": r}
        for r in [
            {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01", "gender": "female"},
            {
                "resourceType": "Condition", "id": "c1",
                "clinicalStatus": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "278860009"}]},
                "subject": {"reference": "Patient/p1"}, "onsetDateTime": "2020-01-01",
            },
            *[
                {
                    "resourceType": "Observation", "id": f"o{code}", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                    "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-05-20",
                    "valueQuantity": {"value": value},
                }
                for code, value in (("72514-3", 6), ("44261-6", 9), ("70274-6", 4))
            ],
        ]
    ],
}


def _cohort(n: int, seed: int) -> list[dict]:
    """n simulated patients as JSON profiles (missing values left out)."""
    from features.io import profile_records
    from training.simulate import simulate_episodes

    return profile_records(simulate_episodes(n, seed=seed, progress=False))


def _bodies(helpers) -> list[bytes]:
    """Good requests of every kind: plain, safety-flagged, other top_k, extra fields (a
    warning), values as text (the full validator's path), no patient_id, FHIR, a cohort."""
    patient = helpers.PATIENT
    requests = [
        {"patient": patient},
        {"patient": helpers.FLAGGED, "top_k": 7},
        {"patient": patient, "top_k": 1},
        {"patient": {**patient, "name": "ignored", "ward": 3}, "top_k": 3},
        {"patient": {**patient, "age": "61", "smoker": "YES", "bmi": " 31.5 "}},
        {"patient": {k: v for k, v in patient.items() if k != "patient_id"}, "top_k": 50},
        {"patient": {**patient, "maoi": True, "suicidal_ideation": "yes", "age": 70}},
        {"fhir_bundle": FHIR_BUNDLE, "as_of": "2024-06-01"},
        *({"patient": p, "top_k": 2 + i % 4} for i, p in enumerate(_cohort(24, seed=5))),
        {"patient": patient},  # the same payload twice in one batch
    ]
    return [json.dumps(r).encode() for r in requests]


BAD = [
    b"not json",
    json.dumps({"patient": {"age": 300}}).encode(),
    json.dumps({"patient": [1, 2]}).encode(),
    json.dumps({"fhir_bundle": {"resourceType": "Bundle"}}).encode(),
]


@pytest.fixture(scope="module")
def make_api(served, helpers, tmp_path_factory):
    """``make_api()`` → a PainPlanAPI on the test model with a fresh SQLite audit store."""
    from recommender.api import PainPlanAPI
    from recommender.audit import AuditStore
    from recommender.service import load_served_model
    from recommender.settings import ServiceConfig

    model = load_served_model(served.tag)
    stores = []

    def make():
        url = helpers.sqlite_url(tmp_path_factory.mktemp("batch-audit") / "audit.db")
        config = ServiceConfig.from_env({
            "PAINPLAN_MODEL_TAG": served.tag,
            "PAINPLAN_AUDIT_URL": url,
            "PAINPLAN_API_KEYS": f"clinician:{helpers.CLINICIAN_KEY}",
            "PAINPLAN_HMAC_KEY": helpers.HMAC_KEY,
        })
        store = AuditStore(url)
        store.create_schema()
        stores.append(store)
        return PainPlanAPI(model, store, config)

    yield make
    for store in stores:
        store.close()


def _same(answer: dict) -> dict:
    """An answer or audit record without what differs between two identical requests."""
    return {k: v for k, v in answer.items() if k not in ("request_id", "created_at", "outcomes")}


def _records(api) -> list[str]:
    return sorted(json.dumps(_same(r), sort_keys=True) for r in api.store.find(limit=1000))


def _alone(api, body: bytes):
    try:
        return api.recommend(body)
    except InvalidRequest as err:
        return err


# --------------------------------------------------------------------------- PainPlanAPI


def test_a_batch_answers_each_request_exactly_as_alone(make_api, helpers):
    bodies = _bodies(helpers)
    single, batched = make_api(), make_api()
    alone = [single.recommend(b) for b in bodies]
    together = batched.recommend_many(bodies)
    assert len(together) == len(bodies)
    for a, b in zip(alone, together, strict=True):
        assert isinstance(b, dict), b
        assert _same(b) == _same(a)  # every number, plan, warning, exclusion and SHAP value
    assert len({a["request_id"] for a in together}) == len(bodies)
    # the audit trail holds the same records, one per answer
    assert _records(batched) == _records(single)
    assert batched.store.count()["painplan_requests"] == len(bodies)
    # and smaller batches (of 5, then one request) change nothing either
    again = make_api()
    parts = [r for s in range(0, len(bodies), 5) for r in again.recommend_many(bodies[s:s + 5])]
    assert [_same(a) for a in parts] == [_same(a) for a in alone]


@pytest.mark.parametrize("path", ["frame", "typed values"])
def test_batched_scoring_matches_recommend_and_explain_plans(make_api, helpers, path):
    """The library level: recommend_each / explain_each give, per patient, exactly what
    recommend / explain_plans give for that patient's one-row frame; also when given no
    frame but the encoding of the validated values (what the service does)."""
    import numpy as np

    from features.catalog import PLANS
    from features.validate import validate_records
    from recommender.explain import explain_each, explain_plans
    from recommender.recommend import recommend, recommend_each

    model = make_api().model
    checked = validate_records(_cohort(30, seed=8))
    frame = checked.frame
    ks = [1 + i % 7 for i in range(len(frame))]
    if path == "frame":
        each = recommend_each(model, frame, ks)
    else:
        X = model.encoder_.transform_values(checked.values)
        each = recommend_each(model, None, ks, X=X)
    plans = [[PLANS[j] for j in r.order[0] if j >= 0] for r in each]
    if path == "frame":
        explained = explain_each(model, frame, plans)
    else:
        shared = {key: np.concatenate([r.coefficients[key] for r in each])
                  for key in ("X", "prior")}
        explained = explain_each(model, None, plans, coefficients=shared)
    for i, (r, k) in enumerate(zip(each, ks, strict=True)):
        one = frame.iloc[[i]].reset_index(drop=True)
        ref = recommend(model, one, k)
        np.testing.assert_array_equal(r.order, ref.order)
        for name in ("utility", "expected_improvement", "improvement_low", "improvement_high",
                     "p_response", "p_adverse_event"):
            np.testing.assert_array_equal(getattr(r.estimates, name),
                                          getattr(ref.estimates, name))
        assert r.safety.exclusions(r.row) == ref.safety.exclusions(0)
        assert [r.safety.plan_warnings(r.row, p) for p in plans[i]] == [
            ref.safety.plan_warnings(0, p) for p in plans[i]]
        assert explained[i] == explain_plans(model, one, plans[i])


def test_scoring_without_a_frame_needs_the_encoding(make_api):
    from recommender.explain import explain_each
    from recommender.recommend import recommend_each

    model = make_api().model
    with pytest.raises(ValueError, match="frame or its encoded matrix X"):
        recommend_each(model, None, [5])
    with pytest.raises(ValueError, match="coefficients with X and prior"):
        explain_each(model, None, [["pt"]])


def test_a_bad_request_fails_only_itself(make_api, helpers):
    good = _bodies(helpers)[:6]
    bodies = [BAD[0], *good[:3], BAD[1], BAD[2], *good[3:], BAD[3]]
    api = make_api()
    results = api.recommend_many(bodies)
    for body, result in zip(bodies, results, strict=True):
        alone = _alone(make_api(), body)
        if body in BAD:
            assert isinstance(result, InvalidRequest)
            assert isinstance(alone, InvalidRequest)
            assert (result.status, result.error, str(result), result.violations) == (
                alone.status, alone.error, str(alone), alone.violations)
        else:
            assert isinstance(result, dict), result
            assert _same(result) == _same(alone)
    assert api.store.count()["painplan_requests"] == len(good)
    # a batch of bad requests only records nothing and answers each with its own 400
    only_bad = make_api()
    assert all(isinstance(r, InvalidRequest) for r in only_bad.recommend_many(BAD))
    assert only_bad.store.count()["painplan_requests"] == 0


def test_audit_outage_fails_every_answer_of_the_batch(make_api, helpers):
    good = _bodies(helpers)[:5]
    api = make_api()
    api.store.close()  # the database goes away
    results = api.recommend_many([good[0], BAD[1], *good[1:]])
    assert isinstance(results[1], InvalidRequest)  # its own 400, not the outage
    others = [results[0], *results[2:]]
    assert all(isinstance(r, AuditUnavailable) for r in others), others
    with pytest.raises(AuditUnavailable):
        api.recommend(good[0])


def test_a_commit_that_fails_part_way_records_nothing(make_api, helpers):
    """The second insert of the batch's transaction is refused: the first is rolled back
    with it, and no answer of the batch is given."""
    good = _bodies(helpers)[:4]
    api = make_api()
    engine = sa.create_engine(api.store.url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TRIGGER refuse_second BEFORE INSERT ON painplan_requests "
            "WHEN (SELECT count(*) FROM painplan_requests) >= 1 "
            "BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END"))
    engine.dispose()
    results = api.recommend_many(good)
    assert all(isinstance(r, AuditUnavailable) for r in results), results
    assert "disk full (test)" in str(results[0])
    assert api.store.count()["painplan_requests"] == 0
    # one request alone still goes through (the trigger allows the first row)
    assert isinstance(api.recommend_many(good[:1])[0], dict)
    assert api.store.count()["painplan_requests"] == 1


def test_a_request_that_breaks_scoring_fails_only_itself(make_api, helpers, monkeypatch):
    """Should batched scoring raise, each request is scored alone: only the one that
    raises again fails (a 500), its neighbours are answered and recorded."""
    import recommender.api as api_module

    good = _bodies(helpers)[:4]
    api = make_api()
    real = api_module.recommend_each

    def fragile(model, frame, top_k, **kwargs):
        if len(top_k) > 1 or top_k == [1]:  # the batch, and the top_k=1 request alone
            raise RuntimeError("scoring bug")
        return real(model, frame, top_k, **kwargs)

    monkeypatch.setattr(api_module, "recommend_each", fragile)
    results = api.recommend_many(good)  # good[2] asks for top_k=1
    assert isinstance(results[2], RuntimeError)
    assert all(isinstance(results[i], dict) for i in (0, 1, 3))
    assert api.store.count()["painplan_requests"] == 3


# --------------------------------------------------------------------------- MicroBatcher


def _batcher(sizes: list[int], gate: asyncio.Event | None = None, **kwargs) -> MicroBatcher:
    async def run(items):
        sizes.append(len(items))
        if gate is not None and len(sizes) == 1:
            await gate.wait()
        return [item if not isinstance(item, str) else ValueError(item) for item in items]

    return MicroBatcher(run, **kwargs)


def test_an_idle_batcher_runs_a_request_at_once_alone():
    async def main():
        sizes: list[int] = []
        batcher = _batcher(sizes)
        assert await batcher.submit(1) == 1
        assert await batcher.submit(2) == 2
        return sizes

    assert asyncio.run(main()) == [1, 1]


@pytest.mark.parametrize("max_batch, expected", [(32, [1, 7]), (3, [1, 3, 3, 1])])
def test_requests_queued_while_a_batch_runs_form_the_next_batch(max_batch, expected):
    async def main():
        sizes: list[int] = []
        gate = asyncio.Event()
        batcher = _batcher(sizes, gate, max_batch=max_batch)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0)  # the first batch starts and waits at the gate
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 8)]
        await asyncio.sleep(0)
        assert sizes == [1] and batcher.queued == 7
        gate.set()
        assert await asyncio.gather(first, *rest) == list(range(8))
        return sizes

    assert asyncio.run(main()) == expected


def test_an_exception_result_goes_to_its_own_caller_only():
    async def main():
        sizes: list[int] = []
        gate = asyncio.Event()
        batcher = _batcher(sizes, gate)
        tasks = [asyncio.create_task(batcher.submit(x)) for x in (0, 1, "bad", 3)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True), sizes

    results, sizes = asyncio.run(main())
    assert sizes == [4]  # all four were queued before the first runner started
    assert results[0] == 0 and results[1] == 1 and results[3] == 3
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad"


def test_a_failing_batch_fails_its_items_and_the_next_batch_runs():
    async def main():
        calls = []
        gate = asyncio.Event()

        async def run(items):
            calls.append(list(items))
            if len(calls) == 1:
                await gate.wait()
            if len(calls) == 2:
                raise RuntimeError("batch down")
            return items

        batcher = MicroBatcher(run)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        later = await batcher.submit(9)
        return calls, results, later

    calls, results, later = asyncio.run(main())
    assert calls == [[0], [1, 2], [9]]
    assert results[0] == 0 and all(isinstance(r, RuntimeError) for r in results[1:])
    assert later == 9


def test_a_cancelled_caller_does_not_lose_the_others_answers():
    async def main():
        sizes: list[int] = []
        gate = asyncio.Event()
        batcher = _batcher(sizes, gate)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0)
        tasks[2].cancel()
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], asyncio.CancelledError)


def test_a_cancelled_batch_releases_every_caller_waiting_on_it():
    """Shutdown cancels the runner in the middle of a batch: its callers must not wait on."""

    async def main():
        started = asyncio.Event()

        async def run(items):
            started.set()
            await asyncio.Event().wait()  # never finishes on its own

        batcher = MicroBatcher(run, max_batch=4)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        await started.wait()
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__ == "MicroBatcher._drain":
                task.cancel()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

    results = asyncio.run(main())
    assert all(isinstance(r, asyncio.CancelledError) for r in results)


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def held_service(asgi_client, helpers, tmp_path):
    """The in-process service whose first /recommend batch is held until ``release()``,
    so that the requests sent meanwhile queue and form the next batch (no sleeps)."""
    import bentoml

    url = helpers.sqlite_url(tmp_path / "audit.db")
    with asgi_client(url) as client:
        service = bentoml.get_current_service()
        real = service.api.recommend_many
        sizes: list[int] = []
        entered, gate = threading.Event(), threading.Event()
        before_second: list = []

        def held(bodies):
            sizes.append(len(bodies))
            if len(sizes) == 1:
                entered.set()
                assert gate.wait(60), "the test never released the first batch"
            elif len(sizes) == 2:
                for action in before_second:
                    action()
            return real(bodies)

        service.api.recommend_many = held

        def run(bodies: list[bytes]) -> list:
            """POST the first body, wait until its batch runs, POST the rest, wait until
            they are all queued, release; returns the responses in order."""
            headers = {**helpers.CLINICIAN, "Content-Type": "application/json"}
            with ThreadPoolExecutor(len(bodies)) as pool:
                futures = [pool.submit(client.post, "/recommend", content=bodies[0],
                                       headers=headers)]
                assert entered.wait(60)
                futures += [pool.submit(client.post, "/recommend", content=b, headers=headers)
                            for b in bodies[1:]]
                deadline = time.monotonic() + 60
                while service._batcher.queued < len(bodies) - 1:
                    assert time.monotonic() < deadline, "requests never reached the queue"
                    time.sleep(0.01)
                gate.set()
                return [f.result(timeout=120) for f in futures]

        yield client, service, sizes, run, before_second, url


def test_concurrent_requests_are_batched_and_each_answered_as_alone(held_service, helpers):
    client, service, sizes, run, _, url = held_service
    bodies = _bodies(helpers)[:9]
    responses = run(bodies)
    assert sizes == [1, 8]
    assert [r.status_code for r in responses] == [200] * 9
    assert all(r.headers["server-timing"].startswith("app;dur=") for r in responses)
    alone = [helpers.post(client, "/recommend", json.loads(b), helpers.CLINICIAN).json()
             for b in bodies]
    assert [_same(r.json()) for r in responses] == [_same(a) for a in alone]
    assert helpers.audit_counts(url)["painplan_requests"] == 18
    record = client.get(f"/audit/{responses[4].json()['request_id']}", headers=helpers.AUDITOR)
    assert record.status_code == 200
    assert record.json()["shown_plans"] == [p["plan"] for p in responses[4].json()["plans"]]


def test_a_bad_request_in_an_http_batch_gets_its_own_400(held_service, helpers):
    client, _, sizes, run, _, url = held_service
    good = _bodies(helpers)[:5]
    bodies = [good[0], good[1], BAD[1], good[2], BAD[0], good[3]]
    responses = run(bodies)
    assert sizes == [1, 5]
    assert [r.status_code for r in responses] == [200, 200, 400, 200, 400, 200]
    for body, r in zip(bodies, responses, strict=True):
        if body in BAD:
            alone = client.post("/recommend", content=body,
                                headers={**helpers.CLINICIAN, "Content-Type": "application/json"})
            assert r.json() == alone.json()
    assert helpers.audit_counts(url)["painplan_requests"] == 4


def test_an_audit_outage_gives_every_answer_of_the_http_batch_503(held_service, helpers):
    client, service, sizes, run, before_second, url = held_service
    good = _bodies(helpers)[:5]
    before_second.append(service.api.store.close)  # the database goes away mid-flight
    responses = run([good[0], good[1], BAD[1], *good[2:]])
    assert sizes == [1, 5]
    assert responses[0].status_code == 200
    assert responses[2].status_code == 400
    refused = [responses[1], *responses[3:]]
    assert [r.status_code for r in refused] == [503] * 4
    assert all(r.json()["error"] == "audit_unavailable" and "plans" not in r.json()
               for r in refused)
    assert helpers.audit_counts(url)["painplan_requests"] == 1
