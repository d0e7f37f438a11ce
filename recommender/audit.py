"""The audit store: every answered request, kept append-only (CONTRACT §8).

One small interface, :class:`AuditStore`, over SQLAlchemy 2. By default a SQLite file in
WAL mode (``$PAINPLAN_HOME/audit.db``, ``synchronous=FULL`` so a committed record survives a
power cut); PostgreSQL (or any SQLAlchemy URL) through ``PAINPLAN_AUDIT_URL``.

Two tables:

``painplan_requests``
    one row per answered ``/recommend`` or ``/explain``: request id, time (UTC), the
    pseudonymous patient key (HMAC-SHA256 of the patient id under ``PAINPLAN_HMAC_KEY``; the
    raw id is never stored or logged), a SHA-256 of the input, the profile without direct
    identifiers, model name/version/tag/MLflow run id, safety ruleset version, the ranked
    output, the exclusions, the SHAP explanations, and the plans shown in rank order.
``painplan_outcomes``
    outcome reports referencing a request id. A correction is a new row; the export uses
    the latest report per request.

Append-only by construction and by the database: the class has no update or delete method,
and triggers (SQLite and PostgreSQL) refuse ``UPDATE``/``DELETE`` (and ``TRUNCATE`` on
PostgreSQL) on both tables, so not even a maintenance script can rewrite history without
first dropping a trigger, which is itself visible.

Every write commits before it returns; a failure raises :class:`AuditUnavailable`, which
the service turns into a 503 so an answer is never given without its record.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import SQLAlchemyError

from features.errors import ConfigError, PainplanError
from features.schema import (
    ADVERSE_EVENT,
    EPISODE_ID,
    PATIENT_COLUMNS,
    PATIENT_ID,
    PEG_12WK,
    PLAN,
    PROPENSITY,
    START_DATE,
)
from recommender.wal_checkpoint import CHECKPOINTER

log = logging.getLogger(__name__)

MAX_QUERY_LIMIT = 1000
_JSON = sa.JSON().with_variant(JSONB(), "postgresql")
_METADATA = sa.MetaData()

REQUESTS = sa.Table(
    "painplan_requests",
    _METADATA,
    sa.Column("request_id", sa.String(36), primary_key=True),
    sa.Column("created_at", sa.DateTime(), nullable=False, index=True),  # UTC
    sa.Column("endpoint", sa.String(16), nullable=False),  # recommend | explain
    sa.Column("patient_key", sa.String(64), nullable=True, index=True),
    sa.Column("input_sha256", sa.String(64), nullable=False),
    sa.Column("profile", _JSON, nullable=False),
    sa.Column("parameters", _JSON, nullable=False),  # top_k, or plan_a/plan_b
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False, index=True),
    sa.Column("model_tag", sa.String(256), nullable=False),
    sa.Column("mlflow_run_id", sa.String(64), nullable=True),
    sa.Column("ruleset_version", sa.String(64), nullable=False),
    sa.Column("ranked", _JSON, nullable=False),
    sa.Column("exclusions", _JSON, nullable=False),
    sa.Column("explanations", _JSON, nullable=False),  # SHAP values, PEG points
    sa.Column("shown_plans", _JSON, nullable=False),
    sa.Column("input_warnings", _JSON, nullable=False),
)

OUTCOMES = sa.Table(
    "painplan_outcomes",
    _METADATA,
    sa.Column("outcome_id", sa.String(36), primary_key=True),
    sa.Column(
        "request_id",
        sa.String(36),
        sa.ForeignKey(REQUESTS.c.request_id),
        nullable=False,
        index=True,
    ),
    sa.Column("recorded_at", sa.DateTime(), nullable=False),  # UTC
    sa.Column("plan", sa.String(128), nullable=False),
    sa.Column("peg_12wk", sa.Float(), nullable=False),
    sa.Column("adverse_event", sa.Boolean(), nullable=False),
)

_PG_FUNCTION = sa.DDL(
    "CREATE OR REPLACE FUNCTION painplan_audit_append_only() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
    "'painplan audit records are append-only: %% on %% refused', TG_OP, TG_TABLE_NAME; "
    "END $$"
)


def _append_only(table: sa.Table) -> None:
    """Triggers refusing UPDATE/DELETE (and TRUNCATE) once ``table`` is created."""
    name = table.name
    sa.event.listen(table, "after_create", _PG_FUNCTION.execute_if(dialect="postgresql"))
    sa.event.listen(
        table,
        "after_create",
        sa.DDL(
            f"CREATE TRIGGER {name}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {name} "
            "FOR EACH STATEMENT EXECUTE FUNCTION painplan_audit_append_only()"
        ).execute_if(dialect="postgresql"),
    )
    for op in ("UPDATE", "DELETE"):
        sa.event.listen(
            table,
            "after_create",
            sa.DDL(
                f"CREATE TRIGGER IF NOT EXISTS {name}_no_{op.lower()} BEFORE {op} ON {name} "
                f"BEGIN SELECT RAISE(ABORT, 'painplan audit records are append-only: {op} "
                f"on {name} refused'); END"
            ).execute_if(dialect="sqlite"),
        )


_append_only(REQUESTS)
_append_only(OUTCOMES)
_INSERT_REQUEST = sa.insert(REQUESTS)


class AuditUnavailable(PainplanError):
    """The audit store cannot be written or read; the service answers 503."""


def pseudonym(patient_id: str | None, key: bytes) -> str | None:
    """HMAC-SHA256 of a patient id (hex): stable per key, not reversible without it."""
    if patient_id is None:
        return None
    return hmac.new(key, str(patient_id).encode("utf-8"), hashlib.sha256).hexdigest()


def input_hash(patient_key: str | None, profile: dict, parameters: dict) -> str:
    """SHA-256 of the canonical JSON of what the answer was computed from."""
    canonical = json.dumps(
        {"patient_key": patient_key, "profile": profile, "parameters": parameters},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def utc_now() -> datetime:
    """Now, UTC, naive (how both SQLite and PostgreSQL columns store it here)."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True)
class RequestRecord:
    """One answered request, as stored."""

    request_id: str
    created_at: datetime
    endpoint: str
    patient_key: str | None
    input_sha256: str
    profile: dict
    parameters: dict
    model_name: str
    model_version: str
    model_tag: str
    mlflow_run_id: str | None
    ruleset_version: str
    ranked: list
    exclusions: list
    explanations: list
    shown_plans: list
    input_warnings: list


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:299] + "…"


class AuditStore:
    """Append-only store of answered requests and reported outcomes.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///path/audit.db`` or
        ``postgresql+psycopg://user@host:5432/db``.
    """

    def __init__(self, url: str):
        self.url = url
        try:
            self._engine = self._create_engine(url)
        except (SQLAlchemyError, ValueError) as err:  # ValueError: malformed URL
            raise ConfigError(
                f"cannot use audit store URL {redact(url)} ({_one_line(err)}); set "
                "PAINPLAN_AUDIT_URL to e.g. sqlite:///path/audit.db or "
                "postgresql+psycopg://user@host:5432/db."
            ) from err
        self._closed = False

    @staticmethod
    def _create_engine(url: str) -> sa.Engine:
        parsed = sa.make_url(url)
        if parsed.get_backend_name() != "sqlite":
            return sa.create_engine(parsed, pool_pre_ping=True)
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets auditors read while the service writes; FULL makes a commit durable
            # before the answer leaves (the contract's "kept" means on disk, not in cache).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            # SQLite's automatic checkpoint (in the commit that takes the log past 1000
            # pages) stays on: it is what lets the log start again under steady writes.
            # recommender.wal_checkpoint copies most pages in the background beforehand,
            # so that commit has little left to copy.
            cursor.close()

        return engine

    def __repr__(self) -> str:
        return f"AuditStore({redact(self.url)!r})"

    # ----------------------------------------------------------------------- lifecycle

    def create_schema(self) -> None:
        """Create the tables and their append-only triggers when they do not exist."""
        try:
            with self._connect() as conn:
                if self._engine.dialect.name == "postgresql":
                    # Several workers start at once; one creates, the others wait and see it.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(72611)"))
                _METADATA.create_all(conn, checkfirst=True)
        except SQLAlchemyError as err:
            if "already exists" not in str(err):
                raise self._unavailable("create its tables in", err) from err
            log.debug("audit tables were created concurrently by another worker")

    def has_schema(self) -> bool:
        """Whether the audit tables exist (a store nothing was ever recorded in has none)."""
        try:
            with self._connect() as conn:
                names = set(sa.inspect(conn).get_table_names())
        except SQLAlchemyError as err:
            raise self._unavailable("read from", err) from err
        return {REQUESTS.name, OUTCOMES.name} <= names

    def close(self) -> None:
        """Release connections; the store refuses every call afterwards."""
        self._closed = True
        CHECKPOINTER.forget(self)
        self._engine.dispose()  # the last connection to close checkpoints what is left

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy the SQLite write-ahead log into the database file without blocking writers
        (``PRAGMA wal_checkpoint(PASSIVE)``): (busy, pages in the log, pages copied).
        Run by :data:`recommender.wal_checkpoint.CHECKPOINTER`; a no-op on other databases."""
        if self._closed or self._engine.dialect.name != "sqlite":
            return (0, 0, 0)
        with self._engine.connect() as conn:
            busy, frames, copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        return int(busy), int(frames), int(copied)

    def _written(self) -> None:
        if self._engine.dialect.name == "sqlite":
            CHECKPOINTER.written(self)

    def _connect(self):
        if self._closed:
            raise AuditUnavailable(
                "the audit store has been closed, so nothing can be recorded; restart the service."
            )
        return self._engine.begin()

    def _unavailable(self, action: str, err: BaseException) -> AuditUnavailable:
        return AuditUnavailable(
            f"cannot {action} the audit store {redact(self.url)} ({type(err).__name__}: "
            f"{_one_line(err)}); check that the database is reachable and writable "
            "(PAINPLAN_AUDIT_URL)."
        )

    # ----------------------------------------------------------------------- writing

    def record_request(self, record: RequestRecord) -> None:
        """Insert and commit one answered request, or raise :class:`AuditUnavailable`."""
        self.record_requests([record])

    def record_requests(self, records: Sequence[RequestRecord]) -> None:
        """Insert and commit several answered requests in one transaction (all or none),
        or raise :class:`AuditUnavailable`, in which case none of them is recorded."""
        if not records:
            return
        try:
            with self._connect() as conn:
                # Parameters, not .values(**record): the statement then compiles once and is
                # cached, where .values() built and compiled a new one per call (~0.3 ms).
                params = [r.__dict__ for r in records]
                conn.execute(_INSERT_REQUEST, params[0] if len(params) == 1 else params)
        except SQLAlchemyError as err:
            raise self._unavailable("write to", err) from err
        self._written()

    def record_outcome(
        self, *, request_id: str, plan: str, peg_12wk: float, adverse_event: bool
    ) -> dict:
        """Insert and commit an outcome report; returns it with its id and time."""
        row = {
            "outcome_id": str(uuid.uuid4()),
            "request_id": request_id,
            "recorded_at": utc_now(),
            "plan": plan,
            "peg_12wk": float(peg_12wk),
            "adverse_event": bool(adverse_event),
        }
        try:
            with self._connect() as conn:
                conn.execute(sa.insert(OUTCOMES).values(**row))
        except SQLAlchemyError as err:
            raise self._unavailable("write to", err) from err
        self._written()
        return row

    # ----------------------------------------------------------------------- reading

    def get(self, request_id: str) -> dict | None:
        """One request with its outcome reports, or None."""
        if "\x00" in request_id:  # no stored id holds one, and PostgreSQL text cannot: the
            return None  # lookup would fail as an outage (503) instead of "not found"
        try:
            with self._connect() as conn:
                row = (
                    conn.execute(sa.select(REQUESTS).where(REQUESTS.c.request_id == request_id))
                    .mappings()
                    .first()
                )
                if row is None:
                    return None
                outcomes = (
                    conn.execute(
                        sa.select(OUTCOMES)
                        .where(OUTCOMES.c.request_id == request_id)
                        .order_by(OUTCOMES.c.recorded_at)
                    )
                    .mappings()
                    .all()
                )
        except SQLAlchemyError as err:
            raise self._unavailable("read from", err) from err
        return _public(row, outcomes)

    def find(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
        limit: int = 100,
    ) -> list[dict]:
        """Requests in time order with ``since <= created_at < until`` (UTC)."""
        if model_version is not None and "\x00" in model_version:
            return []  # as in get(): no version holds a NUL, and PostgreSQL cannot compare one
        query = sa.select(REQUESTS).order_by(REQUESTS.c.created_at, REQUESTS.c.request_id)
        if since is not None:
            query = query.where(REQUESTS.c.created_at >= since)
        if until is not None:
            query = query.where(REQUESTS.c.created_at < until)
        if model_version is not None:
            query = query.where(REQUESTS.c.model_version == model_version)
        query = query.limit(max(1, min(int(limit), MAX_QUERY_LIMIT)))
        try:
            with self._connect() as conn:
                rows = conn.execute(query).mappings().all()
                ids = [r["request_id"] for r in rows]
                outcomes = (
                    conn.execute(
                        sa.select(OUTCOMES)
                        .where(OUTCOMES.c.request_id.in_(ids))
                        .order_by(OUTCOMES.c.recorded_at)
                    )
                    .mappings()
                    .all()
                    if ids
                    else []
                )
        except SQLAlchemyError as err:
            raise self._unavailable("read from", err) from err
        by_request: dict[str, list] = {}
        for o in outcomes:
            by_request.setdefault(o["request_id"], []).append(o)
        return [_public(r, by_request.get(r["request_id"], [])) for r in rows]

    def count(self) -> dict[str, int]:
        """Rows per table (for tests, health checks and the demo)."""
        try:
            with self._connect() as conn:
                return {
                    t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar())
                    for t in (REQUESTS, OUTCOMES)
                }
        except SQLAlchemyError as err:
            raise self._unavailable("read from", err) from err

    def outcome_episodes(self) -> pd.DataFrame:
        """Reported outcomes as CONTRACT §3 episodes, one per recommendation (its latest
        report), ordered by the time of the recommendation.

        * profile: as recorded with the recommendation; ``patient_id`` is the pseudonymous
          patient key (or ``request-<id>`` when none was sent), so a patient's episodes
          still group together without the raw id;
        * ``episode_id`` = request id; ``start_date`` = date of the recommendation;
        * ``propensity``: the probability that the *served policy* chose the reported plan.
          The served policy is: the service shows its top-k plans and the clinician, with
          the patient, picks one of them, modelled as uniformly at random, so a shown plan
          has propensity 1/k. A plan that was not shown was chosen by a policy the service
          does not know, so its propensity is left empty (off-policy estimators must then
          model it, as for any logged episode without one).
        """
        try:
            with self._connect() as conn:
                rows = (
                    conn.execute(
                        sa.select(
                            REQUESTS.c.request_id,
                            REQUESTS.c.created_at,
                            REQUESTS.c.patient_key,
                            REQUESTS.c.profile,
                            REQUESTS.c.shown_plans,
                            OUTCOMES.c.plan,
                            OUTCOMES.c.peg_12wk,
                            OUTCOMES.c.adverse_event,
                            OUTCOMES.c.recorded_at,
                            OUTCOMES.c.outcome_id,
                        )
                        .join(OUTCOMES, OUTCOMES.c.request_id == REQUESTS.c.request_id)
                        .where(REQUESTS.c.endpoint == "recommend")
                        .order_by(
                            REQUESTS.c.created_at, OUTCOMES.c.recorded_at, OUTCOMES.c.outcome_id
                        )
                    )
                    .mappings()
                    .all()
                )
        except SQLAlchemyError as err:
            raise self._unavailable("read from", err) from err
        latest: dict[str, Any] = {}
        for row in rows:  # ordered by report time, so the last one per request wins
            latest[row["request_id"]] = row
        return _episodes(latest.values())


def _public(row, outcomes: Iterable) -> dict:
    out = dict(row)
    out["created_at"] = iso(out["created_at"])
    out["outcomes"] = [{**dict(o), "recorded_at": iso(o["recorded_at"])} for o in outcomes]
    for o in out["outcomes"]:
        o.pop("request_id", None)
    return out


_PROFILE_COLUMNS = [c.name for c in PATIENT_COLUMNS if c.name != PATIENT_ID]


def _episodes(rows: Iterable) -> pd.DataFrame:
    records = []
    for row in rows:
        shown = list(row["shown_plans"] or [])
        records.append(
            {
                PATIENT_ID: row["patient_key"] or f"request-{row['request_id']}",
                **{c: row["profile"].get(c) for c in _PROFILE_COLUMNS},
                EPISODE_ID: row["request_id"],
                PLAN: row["plan"],
                PEG_12WK: row["peg_12wk"],
                ADVERSE_EVENT: bool(row["adverse_event"]),
                START_DATE: row["created_at"].date().isoformat(),
                PROPENSITY: 1.0 / len(shown) if row["plan"] in shown else None,
            }
        )
    columns = [
        PATIENT_ID,
        *_PROFILE_COLUMNS,
        EPISODE_ID,
        PLAN,
        PEG_12WK,
        ADVERSE_EVENT,
        START_DATE,
        PROPENSITY,
    ]
    return pd.DataFrame.from_records(records, columns=columns)


__all__ = [
    "AuditStore",
    "AuditUnavailable",
    "MAX_QUERY_LIMIT",
    "OUTCOMES",
    "REQUESTS",
    "RequestRecord",
    "input_hash",
    "iso",
    "pseudonym",
    "utc_now",
]
