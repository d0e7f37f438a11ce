"""recommender.audit: append-only by interface and by database, in SQLite and PostgreSQL;
pseudonyms; queries; outcomes exported as CONTRACT §3 episodes with the served policy's
propensity."""

from __future__ import annotations

import inspect
import re
import uuid
from datetime import timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from features.errors import ConfigError
from features.validate import validate
from recommender import audit
from recommender.audit import AuditStore, AuditUnavailable, RequestRecord, pseudonym, utc_now

FORBIDDEN = re.compile(
    r"update|delete|remove|drop|truncate|purge|erase|edit|modify|replace|"
    r"overwrite|clear|reset|set_",
    re.IGNORECASE,
)
PROFILE = {
    "age": 50,
    "sex": "female",
    "pain_condition": "neck",
    "pain_duration_months": 12.0,
    "pain_intensity": 5.0,
    "peg": 6.0,
    "phq9": 4,
    "gad7": 3,
    "smoker": False,
    "prior_nsaid": "partial",
    "gi_bleed_history": False,
}


def _record(
    *,
    request_id=None,
    created=None,
    patient_key="k" * 64,
    version="3",
    shown=("pt", "cbt+pt", "yoga"),
    endpoint="recommend",
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id or str(uuid.uuid4()),
        created_at=created or utc_now(),
        endpoint=endpoint,
        patient_key=patient_key,
        input_sha256="0" * 64,
        profile=PROFILE,
        parameters={"top_k": len(shown)},
        model_name="painplan",
        model_version=version,
        model_tag=f"painplan:v{version}-abc",
        mlflow_run_id="run",
        ruleset_version="r1",
        ranked=[{"plan": p} for p in shown],
        exclusions=[],
        explanations=[],
        shown_plans=list(shown),
        input_warnings=[],
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path, fresh_pg_database):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/audit.db"
    else:
        _, url = fresh_pg_database()
    s = AuditStore(url)
    s.create_schema()
    s.create_schema()  # idempotent
    yield s
    s.close()


def test_public_interface_has_no_way_to_change_history():
    public = [n for n in dir(AuditStore) if not n.startswith("_")]
    assert {"record_request", "record_outcome", "get", "find", "outcome_episodes"} <= set(public)
    assert not [n for n in public if FORBIDDEN.search(n)], public
    assert not [n for n in audit.__all__ if FORBIDDEN.search(n)]
    module_functions = [
        n
        for n, f in inspect.getmembers(audit, inspect.isfunction)
        if f.__module__ == audit.__name__ and not n.startswith("_")
    ]
    assert not [n for n in module_functions if FORBIDDEN.search(n)], module_functions


def test_database_refuses_update_and_delete(store):
    rid = str(uuid.uuid4())
    store.record_request(_record(request_id=rid))
    store.record_outcome(request_id=rid, plan="pt", peg_12wk=3.0, adverse_event=False)
    engine = sa.create_engine(store.url)
    try:
        for statement in (
            "UPDATE painplan_requests SET model_version = 'forged'",
            "DELETE FROM painplan_requests",
            "UPDATE painplan_outcomes SET peg_12wk = 0",
            "DELETE FROM painplan_outcomes",
        ):
            with pytest.raises(sa.exc.DatabaseError, match="append-only"):
                with engine.begin() as conn:
                    conn.execute(sa.text(statement))
        if engine.dialect.name == "postgresql":
            with pytest.raises(sa.exc.DatabaseError, match="append-only"):
                with engine.begin() as conn:
                    conn.execute(sa.text("TRUNCATE painplan_outcomes"))
    finally:
        engine.dispose()
    assert store.get(rid)["model_version"] == "3"
    assert store.count() == {"painplan_requests": 1, "painplan_outcomes": 1}


def test_round_trip_and_queries(store):
    t0 = utc_now()
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for k, rid in enumerate(ids):
        store.record_request(
            _record(
                request_id=rid, created=t0 + timedelta(seconds=k), version="3" if k < 2 else "4"
            )
        )
    got = store.get(ids[0])
    assert got["profile"] == PROFILE and got["shown_plans"] == ["pt", "cbt+pt", "yoga"]
    assert got["created_at"].endswith("Z") and got["outcomes"] == []
    assert store.get(str(uuid.uuid4())) is None
    assert [r["request_id"] for r in store.find()] == ids
    assert [r["request_id"] for r in store.find(model_version="4")] == ids[2:]
    assert [r["request_id"] for r in store.find(since=t0 + timedelta(seconds=1))] == ids[1:]
    assert [r["request_id"] for r in store.find(until=t0 + timedelta(seconds=1))] == ids[:1]
    assert len(store.find(limit=2)) == 2
    with pytest.raises(AuditUnavailable):  # a duplicate id is refused, not overwritten
        store.record_request(_record(request_id=ids[0], version="99"))
    assert store.get(ids[0])["model_version"] == "3"


def test_outcomes_export_as_episodes_with_served_policy_propensity(store):
    shown = ("pt", "cbt+pt", "yoga", "acupuncture")
    a, b, c, d = (str(uuid.uuid4()) for _ in range(4))
    t0 = utc_now()
    store.record_request(_record(request_id=a, shown=shown, created=t0))
    store.record_request(
        _record(request_id=b, shown=shown, patient_key=None, created=t0 + timedelta(seconds=1))
    )
    store.record_request(_record(request_id=c, created=t0 + timedelta(seconds=2)))  # no outcome
    store.record_request(
        _record(request_id=d, endpoint="explain", shown=(), created=t0 + timedelta(seconds=3))
    )
    store.record_outcome(request_id=a, plan="pt", peg_12wk=5.0, adverse_event=False)
    store.record_outcome(request_id=a, plan="yoga", peg_12wk=4.0, adverse_event=False)  # fix
    store.record_outcome(request_id=b, plan="nsaid+pt", peg_12wk=3.0, adverse_event=True)
    with pytest.raises(AuditUnavailable):  # outcomes must reference a recorded request
        store.record_outcome(
            request_id=str(uuid.uuid4()), plan="pt", peg_12wk=1, adverse_event=False
        )
    episodes = store.outcome_episodes()
    assert list(episodes["episode_id"]) == [a, b]
    first, second = episodes.iloc[0], episodes.iloc[1]
    assert first["plan"] == "yoga" and first["propensity"] == pytest.approx(0.25)
    assert first["patient_id"] == "k" * 64
    assert pd.isna(second["propensity"])  # not shown: the choosing policy is unknown
    assert second["patient_id"] == f"request-{b}"
    checked = validate(episodes, "episodes").frame  # what 'painplan train' runs
    assert len(checked) == 2 and checked["adverse_event"].tolist() == [False, True]


def test_sqlite_store_uses_wal(tmp_path):
    store = AuditStore(f"sqlite:///{tmp_path}/sub/dir/audit.db")
    store.create_schema()
    with store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()
    with pytest.raises(AuditUnavailable, match="closed"):
        store.get("x")


def _rows_in_main_file(path) -> int:
    """Records in the database file itself, ignoring its write-ahead log (immutable=1 makes
    SQLite read the file as it is), i.e. only what a checkpoint has copied there."""
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM painplan_requests").fetchone()[0]
    except sqlite3.OperationalError:  # the table itself is still only in the log
        return 0
    finally:
        conn.close()


def test_the_log_stays_bounded_under_continuous_writes(tmp_path):
    """Under a steady stream of commits a background checkpoint rarely finds a moment with
    no new frames, so it alone never lets SQLite start the log again (with the automatic
    checkpoint turned off this log grew to ~60 MB); the commit that crosses 1000 pages
    finishes the checkpoint and the log restarts."""
    path = tmp_path / "audit.db"
    store = AuditStore(f"sqlite:///{path}")
    store.create_schema()
    big = ["x" * 2000] * 6  # ~12 kB per record, as a real answer's record
    for _ in range(1500):  # ~18 MB through the log
        store.record_requests([audit.RequestRecord(**{**_record().__dict__, "exclusions": big})])
    assert store.count()["painplan_requests"] == 1500
    assert (tmp_path / "audit.db-wal").stat().st_size < 8_000_000
    store.close()


def test_background_thread_checkpoints_what_was_written(tmp_path):
    import time

    from recommender.wal_checkpoint import CHECKPOINTER

    path = tmp_path / "audit.db"
    store = AuditStore(f"sqlite:///{path}")
    store.create_schema()
    rid = str(uuid.uuid4())
    store.record_request(_record(request_id=rid))
    store.record_outcome(request_id=rid, plan="pt", peg_12wk=3.0, adverse_event=False)
    deadline = time.monotonic() + 10 * CHECKPOINTER.interval
    while _rows_in_main_file(path) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _rows_in_main_file(path) == 1
    assert store.get(rid)["outcomes"][0]["plan"] == "pt"
    store.close()
    assert store.checkpoint() == (0, 0, 0)  # a closed store is left alone


def test_a_failing_checkpoint_is_retried_and_spares_the_others(caplog):
    from recommender.wal_checkpoint import WalCheckpointer

    class Broken:
        def checkpoint(self):
            raise OSError("disk gone")

    class Fine:
        calls = 0

        def checkpoint(self):
            self.calls += 1
            return (0, 3, 3)

    ckpt = WalCheckpointer(interval=3600)  # its thread sleeps; flush() runs passes here
    broken, fine = Broken(), Fine()
    ckpt.written(broken)
    ckpt.written(fine)
    ckpt.flush()
    assert fine.calls == 1
    assert "WAL checkpoint failed (retrying): disk gone" in caplog.text
    ckpt.flush()  # the broken one is tried again, the fine one was done
    assert fine.calls == 1
    assert caplog.text.count("disk gone") == 2


def test_pseudonym_is_keyed_and_stable():
    assert pseudonym(None, b"k") is None
    assert pseudonym("p1", b"k" * 32) == pseudonym("p1", b"k" * 32)
    assert pseudonym("p1", b"k" * 32) != pseudonym("p1", b"j" * 32)
    assert len(pseudonym("p1", b"k" * 32)) == 64 and "p1" not in pseudonym("p1", b"k" * 32)


def test_bad_urls_fail_with_one_paragraph(tmp_path):
    with pytest.raises(ConfigError, match="PAINPLAN_AUDIT_URL"):
        AuditStore("not a url")
    unreachable = AuditStore("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    with pytest.raises(AuditUnavailable) as err:
        unreachable.create_schema()
    assert "secret" not in str(err.value) and "nobody:***@" in str(err.value)
    assert "\n" not in str(err.value)
