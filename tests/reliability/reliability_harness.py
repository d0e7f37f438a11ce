"""Machinery shared by the reliability tests (``tests/reliability``) and benchmarks
(``bench/bench_fuzz.py``, ``bench/bench_load.py``): see docs/reliability.md.

* a small model trained and imported into BentoML's store;
* :class:`Server` — ``bentoml serve`` in its own process group, its output captured to a
  file, polled for ``/readyz`` with a deadline, stopped gracefully or killed with SIGKILL;
* :class:`Load` — N concurrent clients (asyncio + httpx, bounded timeouts) in a background
  thread, recording every answer: status, latency, request id;
* :class:`ThrowawayPostgres` — a private PostgreSQL cluster (``initdb``/``pg_ctl``) on a free
  port in a temporary directory, which the tests may stop with ``-m immediate`` and restart;
* the fuzzer: schemathesis cases from the service's own OpenAPI document plus targeted
  Hypothesis mutations (malformed JSON, wrong types, huge numbers, unicode, missing and
  extra fields, oversize bodies …), each checked by :func:`check` (no 5xx, every 4xx names
  the field);
* audit-store checks: request ids, integrity checks, a text dump to grep.

Loaded by ``tests/reliability/conftest.py`` under the module name ``reliability_harness``;
the benchmarks put this directory on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
SERVICE = "recommender.service:PainPlan"

CLINICIAN_KEY = "reliability-clinician-" + "c" * 24
AUDITOR_KEY = "reliability-auditor-" + "a" * 24
HMAC_KEY = "reliability-hmac-" + "k" * 40
KEYS = {"clinician": CLINICIAN_KEY, "auditor": AUDITOR_KEY}
# What must never appear in a log, an audit row or an MLflow artifact.
SENTINEL_ID = "MRN-SENTINEL-123"
SENTINEL_NAME = "Jane Q. Sentinel"

READY_TIMEOUT_S = 180.0
# Variables of the caller's environment that would change what a test server does.
_SCRUB = (
    "PAINPLAN_API_KEYS_FILE",
    "PAINPLAN_DEMO",
    "PAINPLAN_MAX_BODY_BYTES",
    "PAINPLAN_THREADS",
    "PAINPLAN_AUDIT_URL",
    "PAINPLAN_MODEL_TAG",
    "BENTOML_CONFIG_OPTIONS",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


# --------------------------------------------------------------------------- model


def train_bundle(directory: Path, *, episodes: int = 1500, seed: int = 11) -> Path:
    """A small model bundle (one thread, 100 rounds), as the serving tests train."""
    from features.validate import validate
    from recommender.artifact import save_bundle
    from training.config import ModelParams, TrainConfig
    from training.pipeline import fit_bundle
    from training.simulate import simulate_episodes

    frame = validate(simulate_episodes(episodes, seed=seed, progress=False), "episodes").frame
    config = TrainConfig(data="(memory)", seed=0, model=ModelParams(max_rounds=100, n_jobs=1))
    bundle = fit_bundle(frame, config, progress=lambda _msg: None)
    bundle.metadata = {
        "data_hash": f"simulated:{episodes}:{seed}",
        "mlflow_run_id": uuid.uuid4().hex,
        "model_name": "painplan",
    }
    save_bundle(bundle, directory)
    (directory / "model_card.md").write_text("# painplan reliability model\n", encoding="utf-8")
    return directory


def import_here(bundle_dir: Path, version: str) -> tuple[str, Path]:
    """Import a bundle into this process's BentoML store; returns (tag, BENTOML_HOME)."""
    import bentoml

    from recommender.service import import_model

    tag = import_model(bundle_dir, version=version)
    stored = Path(bentoml.models.get(tag).path)  # <home>/models/painplan/<version>
    return tag, stored.parents[2]


def service_env(
    *, bentoml_home: Path, home: Path, tag: str, audit_url: str, **extra: str | None
) -> dict[str, str]:
    """The environment of a service (in-process or ``bentoml serve``); an ``extra`` value of
    None removes that variable."""
    env = {
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "PAINPLAN_HOME": str(home),
        "PAINPLAN_MODEL_TAG": tag,
        "PAINPLAN_AUDIT_URL": audit_url,
        "PAINPLAN_API_KEYS": f"clinician:{CLINICIAN_KEY},auditor:{AUDITOR_KEY}",
        "PAINPLAN_HMAC_KEY": HMAC_KEY,
    }
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# --------------------------------------------------------------------------- profiles


def _request_columns():
    from features.schema import columns_for

    return columns_for("request")


def random_profile(rng: random.Random, patient_id: str | None = None) -> dict:
    """A conforming CONTRACT §2 profile: every required column, about half the optional
    ones, a few risk flags and prior responses."""
    profile: dict[str, Any] = {}
    for col in _request_columns():
        if col.name == "patient_id":
            continue
        if not col.required and rng.random() < (0.85 if col.default is not None else 0.5):
            continue
        if col.dtype == "int":
            profile[col.name] = rng.randint(int(col.min), int(col.max))
        elif col.dtype == "float":
            profile[col.name] = round(rng.uniform(float(col.min), float(col.max)), 2)
        elif col.dtype == "bool":
            profile[col.name] = rng.random() < 0.3
        elif col.levels:
            profile[col.name] = rng.choice(col.levels)
    if patient_id is not None:
        profile["patient_id"] = patient_id
    return profile


def load_bodies(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(path, body) pairs for load: 7 in 8 ``/recommend``, 1 in 8 ``/explain``. Every body
    carries the free-text sentinel name in an extra field; a quarter use the sentinel
    patient id itself, the rest ids that start with it."""
    from features.catalog import PLANS

    rng = random.Random(seed)
    out = []
    for i in range(n):
        pid = SENTINEL_ID if i % 4 == 0 else f"{SENTINEL_ID}-{i:05d}"
        patient = {**random_profile(rng, pid), "name": SENTINEL_NAME}
        if i % 8 == 7:
            a, b = rng.sample(PLANS, 2)
            out.append(("/explain", json.dumps({"patient": patient, "plan_a": a, "plan_b": b})))
        else:
            out.append(("/recommend", json.dumps({"patient": patient, "top_k": rng.randint(1, 8)})))
    return [(path, body.encode()) for path, body in out]


# --------------------------------------------------------------------------- server


class Server:
    """``bentoml serve`` for the painplan service, in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path, *, port: int | None = None,
                 workers: int = 1):
        self.env = env
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        environ = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        environ.update(self.env)
        for key in [k for k in environ if k.startswith("PAINPLAN_") and k not in self.env]:
            environ.pop(key)  # only what the test configured
        environ["BENTOML_CONFIG_OPTIONS"] = f"services.painplan.workers={self.workers}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=environ,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until ``/readyz`` answered 200; AssertionError if the server exits first
        or the deadline passes."""
        assert self.proc is not None
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > timeout:
                raise AssertionError(f"server not ready after {timeout:.0f} s:\n" + self.log_tail())
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def descendants(self) -> list:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill9(self, orphan_timeout: float = 15.0) -> dict:
        """SIGKILL the server's process group, as a crash would. BentoML's workers run in
        sessions of their own, so they are not in that group: they must notice and exit by
        themselves (recommender.service watches its parent). Returns seconds until the group
        was gone and until every process of the service was gone; a worker still alive after
        ``orphan_timeout`` is killed and reported (AssertionError)."""
        import psutil

        assert self.proc is not None
        workers = self.descendants()
        start = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        group_gone = time.monotonic() - start
        _, alive = psutil.wait_procs(workers, timeout=orphan_timeout)
        if alive:
            for proc in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            raise AssertionError(
                f"worker(s) {[p.pid for p in alive]} outlived the killed server by "
                f"{orphan_timeout:.0f} s (orphans keep serving and hold the port)")
        return {"workers": len(workers), "group_gone_s": group_gone,
                "all_gone_s": time.monotonic() - start}

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after 30 s (workers included)."""
        if self.proc is None:
            return
        import psutil

        workers = self.descendants()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self._group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


# --------------------------------------------------------------------------- load


@dataclass
class Result:
    endpoint: str
    started: float  # seconds since the load started
    latency: float  # seconds
    status: int | None  # None: no HTTP answer (connection refused or reset, timeout)
    error: str | None = None  # transport error, or the "error" code of a non-2xx answer
    request_id: str | None = None
    retry_after: str | None = None


class Load:
    """``concurrency`` clients posting ``bodies`` in rotation until ``stop()`` or
    ``duration`` seconds, in a background thread. Each client waits for its answer before
    sending the next request; after a failed connection it waits ``backoff`` seconds."""

    def __init__(self, url: str, bodies: list[tuple[str, bytes]], *, concurrency: int = 32,
                 duration: float | None = None, timeout: float = 60.0, connect_timeout=5.0,
                 backoff: float = 0.05):
        self.url = url
        self.bodies = bodies
        self.concurrency = concurrency
        self.duration = duration
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.backoff = backoff
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0
        self.elapsed = 0.0
        self.failure: BaseException | None = None

    def start(self) -> Load:
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()
        return self

    def now(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> list[Result]:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"load clients did not finish within {timeout} s (a hang)")
        if self.failure is not None:
            raise self.failure
        return self.results

    def run(self) -> list[Result]:
        """Start, wait for ``duration``, join."""
        assert self.duration is not None
        self.start()
        return self.join(self.duration + self.timeout.read + 30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # reported by join()
            self.failure = err
        finally:
            self.elapsed = self.now()

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency,
                              max_keepalive_connections=self.concurrency)
        headers = {"Authorization": f"Bearer {CLINICIAN_KEY}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits,
                                     headers=headers) as client:
            await asyncio.gather(*(self._client(k, client) for k in range(self.concurrency)))

    async def _client(self, k: int, client: httpx.AsyncClient) -> None:
        i = k
        while not self._stop.is_set():
            if self.duration is not None and self.now() >= self.duration:
                return
            path, body = self.bodies[i % len(self.bodies)]
            i += self.concurrency
            started = self.now()
            t0 = time.perf_counter()
            try:
                response = await client.post(path, content=body)
            except httpx.HTTPError as err:
                self.results.append(Result(path, started, time.perf_counter() - t0, None,
                                           type(err).__name__))
                await asyncio.sleep(self.backoff)
                continue
            latency = time.perf_counter() - t0
            rid, error = None, None
            try:
                data = response.json()
                if 200 <= response.status_code < 300:
                    rid = data["request_id"]
                else:
                    error = data.get("error")
            except (ValueError, KeyError, AttributeError) as err:  # an answer must be whole
                error = f"unreadable body: {type(err).__name__}"
            self.results.append(Result(path, started, latency, response.status_code, error, rid,
                                       response.headers.get("retry-after")))


def summarize(results: list[Result], elapsed: float) -> dict:
    """Counts, status histogram, latency percentiles (ms) and throughput of a load run."""
    statuses = Counter("error" if r.status is None else str(r.status) for r in results)
    ok = [r.latency for r in results if r.status is not None and 200 <= r.status < 300]
    return {
        "requests": len(results),
        "statuses": dict(sorted(statuses.items())),
        "answered": len(ok),
        "p50_ms": 1000 * percentile(ok, 50),
        "p99_ms": 1000 * percentile(ok, 99),
        "max_ms": 1000 * max(ok, default=math.nan),
        "throughput": len(ok) / elapsed if elapsed else math.nan,
        "seconds": elapsed,
    }


# --------------------------------------------------------------------------- audit store


def _engine(url: str):
    import sqlalchemy as sa

    return sa.create_engine(url)


def audit_request_ids(url: str) -> list[str]:
    """Every request id in ``painplan_requests`` (duplicates kept, so a caller can count)."""
    import sqlalchemy as sa

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text("SELECT request_id FROM painplan_requests"))]
    finally:
        engine.dispose()


def check_rows(url: str, answered: list[str], *, exact: bool,
               ignore: set[str] | frozenset[str] = frozenset()) -> dict:
    """Every answered request id has exactly one row; with ``exact``, no other row exists
    (rows whose id is in ``ignore``, e.g. from before the run, are left out).
    Returns the figures; raises AssertionError naming what is wrong."""
    ids = [i for i in audit_request_ids(url) if i not in ignore]
    counts = Counter(ids)
    duplicated = [i for i, n in counts.items() if n > 1]
    missing = [i for i in answered if i not in counts]
    extra = set(counts) - set(answered)
    assert len(set(answered)) == len(answered), "the service gave two answers the same id"
    assert not duplicated, f"request ids with several rows: {duplicated[:5]}"
    assert not missing, f"{len(missing)} answered request(s) have no audit row: {missing[:5]}"
    if exact:
        assert not extra, f"{len(extra)} audit row(s) without an answer: {sorted(extra)[:5]}"
    return {"rows": len(ids), "answered": len(answered), "rows_without_answer": len(extra)}


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def sqlite_integrity(url: str) -> dict:
    """``PRAGMA integrity_check`` and ``foreign_key_check`` of a SQLite audit file (after the
    WAL is replayed, as any reader does on open)."""
    conn = sqlite3.connect(sqlite_path(url))
    try:
        return {
            "integrity_check": conn.execute("PRAGMA integrity_check").fetchone()[0],
            "foreign_key_check": conn.execute("PRAGMA foreign_key_check").fetchall(),
            "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
            "requests": conn.execute("SELECT count(*) FROM painplan_requests").fetchone()[0],
            "outcomes": conn.execute("SELECT count(*) FROM painplan_outcomes").fetchone()[0],
        }
    finally:
        conn.close()


def pg_integrity(url: str) -> dict:
    """B-tree checks (``amcheck``: every index entry points at a heap row and the order is
    right), orphaned outcomes, and row counts of a PostgreSQL audit database."""
    import sqlalchemy as sa

    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS amcheck"))
            indexes = conn.execute(sa.text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_am a ON a.oid = c.relam "
                "WHERE t.relname LIKE 'painplan_%' AND a.amname = 'btree'"
            )).scalars().all()
            for name in indexes:
                conn.execute(sa.text("SELECT bt_index_check(CAST(:n AS regclass), true)"),
                             {"n": name})
            orphans = conn.execute(sa.text(
                "SELECT count(*) FROM painplan_outcomes o LEFT JOIN painplan_requests r "
                "USING (request_id) WHERE r.request_id IS NULL")).scalar()
            return {
                "indexes_checked": len(indexes),
                "orphaned_outcomes": orphans,
                "requests": conn.execute(sa.text("SELECT count(*) FROM painplan_requests")).scalar(),
            }
    finally:
        engine.dispose()


def audit_dump(url: str) -> str:
    """Every audit row as text, to search for what must not be there."""
    import sqlalchemy as sa

    if url.startswith("sqlite"):
        conn = sqlite3.connect(sqlite_path(url))
        try:
            return "\n".join(conn.iterdump())
        finally:
            conn.close()
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return "\n".join(
                conn.execute(sa.text(f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {t} t"))
                .scalar()
                for t in ("painplan_requests", "painplan_outcomes")
            )
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- PostgreSQL


class ThrowawayPostgres:
    """A private PostgreSQL cluster on a free port, in a temporary directory, owned by
    whoever may run it (``initdb`` refuses root: as root, the ``postgres`` user runs it via
    ``runuser``). ``stop("immediate")`` is a crash from the clients' point of view."""

    def __init__(self, port: int | None = None):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
        found = shutil.which("initdb")
        if not bins and not found:
            raise RuntimeError("no initdb found (install PostgreSQL server binaries)")
        self.bindir = bins[-1].parent if bins else Path(found).parent
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="painplan-pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "postgres.log"
        self.runas: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError as err:
                raise RuntimeError("running as root and no 'postgres' user to run initdb") from err
            self.runas = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.dir.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-instructions", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nmax_connections = 60\n"
                "shared_buffers = 32MB\nfsync = on\nsynchronous_commit = on\n"
            )

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.runas, str(self.bindir / tool), *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc

    def start(self) -> float:
        """Start and wait until it accepts connections; returns seconds taken."""
        t0 = time.monotonic()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "120",
                  "start")
        return time.monotonic() - t0

    def stop(self, mode: str = "fast") -> float:
        t0 = time.monotonic()
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        return time.monotonic() - t0

    def running(self) -> bool:
        return subprocess.run([*self.runas, str(self.bindir / "pg_ctl"), "-D", str(self.data),
                               "status"], capture_output=True, check=False).returncode == 0

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.running():
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- fuzzing


@dataclass
class Case:
    """One request to send. ``role`` picks the Authorization header (``None``: none;
    ``"bogus"``: an unknown key); ``expect``: statuses that are right for it (empty: any
    non-5xx); ``field``: the field a 4xx answer must name."""

    kind: str
    method: str
    path: str
    role: str | None = "clinician"
    body: bytes | None = None
    params: dict | None = None
    chunked: bool = False
    expect: tuple[int, ...] = ()
    field: str | None = None
    headers: dict | None = None
    auth: str | None = None  # schemathesis' generated Authorization header


@dataclass
class FuzzReport:
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    kind_status: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)  # request ids of 2xx /recommend, /explain
    rejected: int = 0  # painplan 4xx answers (what the Prometheus counter should count)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return sum(self.statuses.values())

    def add_problem(self, case: Case, status: int, text: str) -> None:
        if len(self.problems) < 50:
            body = (case.body or b"")[:300]
            self.problems.append(f"[{case.kind}] {case.method} {case.path[:120]} "
                                 f"params={case.params!r:.200} body={body!r} -> {status}: {text}")


_ERROR_CODES = {400: "invalid_request", 404: "not_found", 413: "payload_too_large",
                401: "unauthorized", 403: "forbidden"}


def _names(expected: str, got: str) -> bool:
    """Whether a violation field ``got`` names the ``expected`` one: the same path, or one
    of its parents or children (a shape problem on ``patient`` names ``patient.age``)."""
    norm = {expected, expected.removeprefix("outcome.")}
    got = got.removeprefix("outcome.")
    return any(got == e or got.startswith(e + ".") or got.startswith(e + "[")
               or e.startswith(got + ".") for e in norm)


def check(case: Case, status: int, body: bytes, seconds: float, report: FuzzReport) -> None:
    """The oracle: no 5xx; a JSON body; a 2xx answer of the documented shape; every 4xx in
    the error format, naming the field at fault; the expected status when one is known; no
    answer slower than 20 s (a hang)."""
    from recommender.api_schema import ContrastResponse, OutcomeResponse, RecommendResponse

    report.statuses[status] += 1
    report.kinds[case.kind] += 1
    report.kind_status[(case.kind, status)] += 1
    report.latencies.append(seconds)
    if seconds > 20:
        report.add_problem(case, status, f"answer took {seconds:.1f} s")
    if status >= 500:
        report.add_problem(case, status, body[:500].decode("utf-8", "replace"))
        return
    if case.expect and status not in case.expect:
        report.add_problem(case, status, f"expected {case.expect}: {body[:400]!r}")
    try:
        data = json.loads(body)
    except ValueError:
        if status == 404 and body.startswith(b"Not Found"):
            return  # Starlette's router: no such route (a path the generator mangled)
        report.add_problem(case, status, f"answer is not JSON: {body[:200]!r}")
        return
    route = case.path.split("?")[0]
    if 200 <= status < 300:
        model = {"/recommend": RecommendResponse, "/explain": ContrastResponse,
                 "/outcomes": OutcomeResponse}.get(route)
        try:
            if model is not None:
                model.model_validate(data)
        except ValueError as err:
            report.add_problem(case, status, f"answer does not match its schema: {err}")
        if route in ("/recommend", "/explain"):
            report.answered.append(data["request_id"])
        return
    if status in _ERROR_CODES and isinstance(data, dict) and "error" in data:
        report.rejected += 1
    if not isinstance(data, dict) or data.get("error") != _ERROR_CODES.get(status):
        report.add_problem(case, status, f"not the error format: {str(data)[:300]}")
        return
    if status in (401, 403):
        if not re.search(r"Authorization|API key|role", data.get("message", "")):
            report.add_problem(case, status, f"auth refusal does not say why: {data['message']}")
        return
    violations = data.get("violations") or []
    if not violations:
        report.add_problem(case, status, f"4xx without violations: {str(data)[:300]}")
        return
    for v in violations:
        name = v.get("field")
        # (an empty or blank field is right when the request's own key was empty or blank)
        if not isinstance(name, str) or not v.get("message", "").startswith(name):
            report.add_problem(case, status, f"violation does not name its field: {v}")
    if case.field is not None and not any(_names(case.field, v["field"]) for v in violations):
        report.add_problem(case, status, f"expected field {case.field!r} to be named, got "
                                         f"{[v['field'] for v in violations]}")


Send = Callable[[Case], tuple[int, bytes, float]]


def asgi_sender(client) -> Send:
    """Send cases through a Starlette TestClient (in-process, whole ASGI stack)."""

    def send(case: Case) -> tuple[int, bytes, float]:
        headers = dict(case.headers or {})
        if case.role in KEYS:
            headers["Authorization"] = f"Bearer {KEYS[case.role]}"
        elif case.role == "bogus":
            headers["Authorization"] = "Bearer " + "x" * 32
        content: Any = case.body
        if case.body is not None:
            headers.setdefault("Content-Type", "application/json")
            if case.chunked:
                data = case.body
                content = (data[i : i + 4096] for i in range(0, len(data), 4096))
        t0 = time.perf_counter()
        response = client.request(case.method, case.path, content=content, params=case.params,
                                  headers=headers)
        return response.status_code, response.content, time.perf_counter() - t0

    return send


def run_cases(send: Send, cases: Iterator[Case] | list[Case], report: FuzzReport) -> None:
    for case in cases:
        try:
            status, body, seconds = send(case)
        except Exception as err:  # an exception escaping the app is a 5xx
            report.statuses[599] += 1
            report.kinds[case.kind] += 1
            report.add_problem(case, 599, f"{type(err).__name__}: {err}")
            continue
        check(case, status, body, seconds, report)


# ---- targeted strategies (Hypothesis)


def fhir_bundle() -> dict:
    """A minimal FHIR R4 bundle the service can rank (as of 2024-06-01): a patient with
    chronic low back pain, a pain score, PHQ-9 and GAD-7."""
    def obs(code: str, value: float) -> dict:
        return {"resourceType": "Observation", "id": f"o{code}", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-05-20",
                "valueQuantity": {"value": value}}

    resources = [
        {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01", "gender": "female"},
        {"resourceType": "Condition", "id": "c1",
         "clinicalStatus": {"coding": [{
             "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
             "code": "active"}]},
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "278860009",
                              "display": "Chronic low back pain"}]},
         "subject": {"reference": "Patient/p1"}, "onsetDateTime": "2020-01-01"},
        obs("72514-3", 6), obs("44261-6", 9), obs("70274-6", 4),
    ]
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": r} for r in resources]}



def _strategies(max_body: int, request_id: str):
    """A Hypothesis strategy of targeted :class:`Case` objects."""
    from hypothesis import strategies as st

    from features.catalog import PLANS, parse_plan
    from features.errors import PlanError

    columns = [c for c in _request_columns() if c.name != "patient_id"]
    required = [c for c in columns if c.required]
    names = {c.name for c in _request_columns()}
    seeds = st.integers(0, 2**32 - 1)
    profiles = seeds.map(lambda s: random_profile(random.Random(s), f"fuzz-{s}"))
    text = st.text(st.characters(codec="utf-8"), max_size=40)
    weird = st.sampled_from(["", " ", "\u0000", "\u202e", "e\u0301", "\u200b", "🙂", "ﷺ",
                             "Ω" * 70, "\\", '"', "'; DROP TABLE painplan_requests; --",
                             "${jndi:ldap://x}", "<script>", "%00", "NaN", "null", SENTINEL_NAME])
    text = st.one_of(text, weird)

    def not_number(s: str) -> bool:
        try:
            float(s.strip())
        except ValueError:
            return True
        return False

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    def raw(obj, token: str) -> bytes:  # obj with the "@RAW@" string replaced by a raw token
        return json.dumps(obj).replace('"@RAW@"', token).encode()

    def recommend(patient, **top) -> dict:
        return {"patient": patient, **top}

    @st.composite
    def valid(draw):
        return Case("recommend/valid", "POST", "/recommend",
                    body=body(recommend(draw(profiles), top_k=draw(st.integers(1, 50)))),
                    expect=(200,))

    @st.composite
    def extra_patient_field(draw):
        key = draw(text.filter(lambda k: k not in names))
        value = draw(st.one_of(text, st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                               st.none()))
        patient = {**draw(profiles), key: value, "name": SENTINEL_NAME}
        return Case("recommend/extra-patient-field", "POST", "/recommend",
                    body=body(recommend(patient)), expect=(200,))

    @st.composite
    def wrong_value(draw):
        col = draw(st.sampled_from(columns))
        options = [st.lists(st.integers(), max_size=3), st.dictionaries(text, st.integers(),
                                                                        max_size=2)]
        if col.dtype in ("int", "float"):
            options += [st.booleans(), text.filter(lambda s: s.strip() and not_number(s)),
                        st.floats(max_value=col.min - 1e-6, allow_nan=False, allow_infinity=False)
                        if col.min is not None else st.nothing(),
                        st.floats(min_value=col.max + 1e-3, allow_nan=False, allow_infinity=False)
                        if col.max is not None else st.nothing(),
                        st.integers(min_value=2**63 - 10, max_value=10**30),
                        st.integers(max_value=-(2**63), min_value=-(10**30))]
            if col.dtype == "int":
                lo, hi = int(col.min), int(col.max)
                options.append(st.integers(lo, hi - 1).map(lambda v: v + 0.5))
        elif col.dtype == "bool":
            spellings = {"true", "false", "1", "0", "yes", "no", "1.0", "0.0"}
            options += [st.integers().filter(lambda v: v not in (0, 1)),
                        st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v not in (0, 1)),
                        text.filter(lambda s: s.strip().lower() not in spellings and s.strip())]
        else:
            options += [st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                        text.filter(lambda s: s.strip() not in (col.levels or ()) and s.strip())]
        value = draw(st.one_of(options))
        patient = {**draw(profiles), col.name: value}
        return Case(f"recommend/wrong-value/{col.dtype}", "POST", "/recommend",
                    body=body(recommend(patient)), expect=(400,), field=f"patient.{col.name}")

    @st.composite
    def huge_number(draw):
        col = draw(st.sampled_from([c for c in columns if c.dtype in ("int", "float")]))
        token, where = draw(st.sampled_from([
            ("1e400", "field"), ("-1e400", "field"), ("1" + "0" * 400, "field"),
            ("-" + "9" * 300, "field"), ("1.7976931348623157e309", "field"),
            ("NaN", "(body)"), ("Infinity", "(body)"), ("-Infinity", "(body)"),
            ("9" * 5000, "(body)"),
        ]))
        patient = {**draw(profiles), col.name: "@RAW@"}
        return Case("recommend/huge-number", "POST", "/recommend",
                    body=raw(recommend(patient), token), expect=(400,),
                    field=f"patient.{col.name}" if where == "field" else "(body)")

    @st.composite
    def missing_required(draw):
        col = draw(st.sampled_from(required))
        patient = draw(profiles)
        patient.pop(col.name, None)
        return Case("recommend/missing-required", "POST", "/recommend",
                    body=body(recommend(patient)), expect=(400,), field=f"patient.{col.name}")

    @st.composite
    def missing_patient(draw):
        return Case("recommend/missing-patient", "POST", "/recommend",
                    body=body({"top_k": draw(st.integers(1, 5))}), expect=(400,), field="patient")

    @st.composite
    def extra_top_field(draw):
        key = draw(text.filter(lambda k: k not in ("patient", "top_k")))
        return Case("recommend/extra-top-field", "POST", "/recommend",
                    body=body({"patient": draw(profiles), key: SENTINEL_NAME}), expect=(400,),
                    field=key or None)

    @st.composite
    def bad_top_k(draw):
        value = draw(st.one_of(st.integers(max_value=0), st.integers(min_value=51),
                               st.sampled_from(["5", 5.0, 2.5, True, None, [5], {"k": 5}]), text))
        return Case("recommend/bad-top_k", "POST", "/recommend",
                    body=body(recommend(draw(profiles), top_k=value)), expect=(400,),
                    field="top_k")

    @st.composite
    def patient_not_object(draw):
        value = draw(st.one_of(st.lists(st.integers(), max_size=2), text, st.integers(),
                               st.none(), st.booleans()))
        return Case("recommend/patient-not-object", "POST", "/recommend",
                    body=body({"patient": value}), expect=(400,), field="patient")

    @st.composite
    def malformed(draw):
        good = body(recommend(draw(profiles)))
        how = draw(st.sampled_from(["truncate", "bad-utf8", "bom", "trailing", "quotes",
                                    "not-object", "empty", "utf16", "binary"]))
        if how == "truncate":
            data = good[: draw(st.integers(0, len(good) - 1))]
        elif how == "bad-utf8":
            at = draw(st.integers(0, len(good)))
            data = good[:at] + draw(st.sampled_from([b"\x80", b"\xff", b"\xc3", b"\xed\xa0\x80"])) \
                + good[at:]
        elif how == "bom":
            data = b"\xef\xbb\xbf" + good
        elif how == "trailing":
            data = good + draw(st.sampled_from([b"x", b"}", b",", b"{}", b"\x00"]))
        elif how == "quotes":
            data = good.replace(b'"', b"'")
        elif how == "not-object":
            data = draw(st.sampled_from([b"[]", b'"patient"', b"1", b"null", b"true", b"[{}]"]))
        elif how == "empty":
            data = b""
        elif how == "utf16":
            data = good.decode().encode("utf-16")
        else:
            data = draw(st.binary(max_size=200))
        return Case(f"malformed/{how}", "POST", draw(st.sampled_from(["/recommend", "/explain"])),
                    body=data, expect=(400,), field=None if how == "binary" else "(body)")

    @st.composite
    def deep(draw):
        depth = draw(st.integers(9, max_body // 2 - 20))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        depth = min(depth, (max_body - 40) // (len(opener) + len(closer)))
        data = b'{"patient":' + opener * depth + b"1" + closer * depth + b"}"
        return Case("malformed/deep-nesting", "POST", "/recommend", body=data, expect=(400,))

    @st.composite
    def surrogate(draw):
        patient = draw(profiles)
        col = draw(st.sampled_from([*(c.name for c in columns), "patient_id"]))
        where = draw(st.sampled_from(["value", "key"]))
        lone = draw(st.sampled_from(["\\ud800", "\\udfff", "\\udbff", "x\\ud83dy"]))
        if where == "value":
            patient[col] = "@RAW@"
            data = raw(recommend(patient), f'"{lone}"')
            name = f"patient.{col}"
        else:
            patient["@KEY@"] = 1
            data = json.dumps(recommend(patient)).replace('"@KEY@"', f'"{lone}"').encode()
            name = "patient"
        return Case(f"unicode/lone-surrogate-{where}", "POST", "/recommend", body=data,
                    expect=(400,), field=name)

    @st.composite
    def oversize(draw):
        size = draw(st.integers(max_body + 1, 4 * max_body))
        chunked = draw(st.booleans())
        patient = {**draw(profiles), "padding": ""}
        data = body(recommend(patient))
        data = data.replace(b'"padding": ""', b'"padding": "' + b"x" * (size - len(data)) + b'"')
        return Case("oversize/" + ("chunked" if chunked else "content-length"), "POST",
                    draw(st.sampled_from(["/recommend", "/explain", "/outcomes"])), body=data,
                    chunked=chunked, expect=(413,), field="(body)")

    def plan_ok(s: str) -> bool:
        try:
            parse_plan(s)
        except PlanError:
            return False
        return True

    @st.composite
    def explain(draw):
        patient = draw(profiles)
        a, b = draw(st.sampled_from(PLANS)), draw(st.sampled_from(PLANS))
        which = draw(st.sampled_from(["valid", "plan_a", "plan_b"]))
        if which == "valid":
            return Case("explain/valid", "POST", "/explain",
                        body=body({"patient": patient, "plan_a": a, "plan_b": b}), expect=(200,))
        bad = draw(st.one_of(
            st.sampled_from(["snri+tca", "opioid+gabapentinoid", "pt+cbt+mbsr+yoga", "cbt+cbt",
                             "nsaid+snri+opioid", "", "+", "PT", "pt++cbt", "pt,cbt"]),
            text.filter(lambda s: not plan_ok(s)),
            st.integers(), st.none(), st.lists(st.sampled_from(["pt", "cbt"]), max_size=2)))
        plans = {"plan_a": a, "plan_b": b, which: bad}
        return Case("explain/bad-plan", "POST", "/explain", body=body({"patient": patient, **plans}),
                    expect=(400,), field=which)

    @st.composite
    def outcome(draw):
        which = draw(st.sampled_from(["valid", "unknown-id", "plan", "peg_12wk", "adverse_event",
                                      "missing", "extra", "request_id-type"]))
        report = {"request_id": request_id, "plan": draw(st.sampled_from(PLANS)),
                  "peg_12wk": draw(st.floats(0, 10)), "adverse_event": draw(st.booleans())}
        expect, name = (400,), which
        if which == "valid":
            expect, name = (201,), None
        elif which == "unknown-id":
            report["request_id"] = draw(st.one_of(st.uuids().map(str), text.filter(bool)))
            expect, name = (404, 400), "request_id"
        elif which == "plan":
            report["plan"] = draw(st.one_of(st.sampled_from(["snri+tca", "x", ""]), st.integers()))
        elif which == "peg_12wk":
            report["peg_12wk"] = draw(st.one_of(st.floats(min_value=10.001, allow_nan=False, allow_infinity=False),
                                                st.floats(max_value=-0.001, allow_nan=False, allow_infinity=False),
                                                text.filter(not_number)))
        elif which == "adverse_event":
            report["adverse_event"] = draw(st.sampled_from(["maybe", 2, -1, "", [True]]))
        elif which == "missing":
            name = draw(st.sampled_from(sorted(report)))
            report.pop(name)
        elif which == "extra":
            name = draw(text.filter(lambda k: k not in report and k))
            report[name] = SENTINEL_NAME
        else:
            report["request_id"] = draw(st.one_of(st.integers(), st.none(), st.just("x" * 65)))
            name = "request_id"
        return Case(f"outcomes/{which}", "POST", "/outcomes", body=body(report), expect=expect,
                    field=name)

    @st.composite
    def audit_record(draw):
        rid = draw(st.one_of(
            st.just(request_id), st.uuids().map(str),
            text.filter(lambda s: s.strip(".") and "/" not in s and s.strip())))
        path = "/audit/" + urllib.parse.quote(rid, safe="")
        known = rid == request_id
        return Case("audit/record" + ("" if known else "-unknown"), "GET", path, role="auditor",
                    expect=(200,) if known else (404,), field=None if known else "request_id")

    @st.composite
    def audit_query(draw):
        moments = st.one_of(
            st.dates().map(str), st.datetimes().map(lambda d: d.isoformat()),
            st.sampled_from(["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-14:00",
                             "2026-13-40", "yesterday", "", "2026-11-21Z", "1e9"]), text)
        params = draw(st.fixed_dictionaries({}, optional={
            "since": moments, "until": moments, "model_version": st.one_of(text, st.just("7")),
            "limit": st.one_of(st.integers(-(10**20), 10**20).map(str), text,
                               st.just("9" * 5000)),
            draw(text.filter(lambda k: k not in ("since", "until", "model_version", "limit")
                             and k)): text,
        }))
        return Case("audit/query", "GET", "/audit", role="auditor", params=params,
                    expect=(200, 400))

    @st.composite
    def auth(draw):
        route, role = draw(st.sampled_from([("/recommend", "auditor"), ("/audit", "clinician"),
                                            ("/model", "clinician"), ("/recommend", None),
                                            ("/recommend", "bogus"), ("/model", None)]))
        headers = None
        if role is None:
            headers = draw(st.sampled_from([{}, {"Authorization": "Basic dXNlcjpwYXNz"},
                                            {"Authorization": "Bearer"},
                                            {"Authorization": "Bearer " + CLINICIAN_KEY[:-1]}]))
        method = "POST" if route == "/recommend" else "GET"
        return Case("auth/" + (role or "none"), method, route, role=role, headers=headers,
                    body=body(recommend(draw(profiles))) if method == "POST" else None,
                    expect=(401, 403) if role in ("auditor", "clinician") else (401,))

    def model_card(_):
        return Case("model/card", "GET", "/model", role="auditor", expect=(200,))

    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(),
                  st.floats(allow_nan=False, allow_infinity=False), text),
        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                st.dictionaries(text, inner, max_size=3)), max_leaves=8)

    @st.composite
    def fhir(draw):
        """``POST /recommend`` with ``{"fhir_bundle": …}``: a minimal rankable bundle, as is
        or with one part replaced (options, a resource element, deep nesting, a lone
        surrogate)."""
        bundle = fhir_bundle()
        request: dict[str, Any] = {"fhir_bundle": bundle, "as_of": "2024-06-01"}
        how = draw(st.sampled_from(["valid", "option", "element", "deep", "surrogate"]))
        expect: tuple[int, ...] = (200, 400)
        data = None
        if how == "valid":
            expect = (200,)
        elif how == "option":
            key = draw(st.sampled_from(["as_of", "lookback_days", "assume_missing_scores",
                                        "top_k", "patient", "unknown"]))
            request[key] = draw(st.one_of(
                json_values, st.dates().map(str),
                st.sampled_from(["0001-01-01", "9999-12-31", "@RAW@"])))
            data = raw(request, draw(st.sampled_from(["1e400", "-1e400", "1" + "0" * 40])))
        elif how == "element":
            entry = draw(st.integers(0, len(bundle["entry"]) - 1))
            resource = bundle["entry"][entry]["resource"]
            key = draw(st.sampled_from(sorted(resource)))
            resource[key] = draw(json_values)
        elif how == "deep":
            depth = draw(st.integers(65, 2000))
            bundle["entry"][0]["resource"]["extension"] = "@RAW@"
            data = raw(request, "[" * depth + "]" * depth)
            expect = (400,)
        else:
            entry = draw(st.integers(0, len(bundle["entry"]) - 1))
            bundle["entry"][entry]["resource"]["id"] = "@RAW@"
            data = raw(request, '"x\\udc00"')  # a lone surrogate escape
            expect = (400,)
        return Case(f"fhir/{how}", "POST", "/recommend", body=data or body(request),
                    expect=expect)

    kinds = [valid(), valid(), extra_patient_field(), wrong_value(), wrong_value(), huge_number(),
             missing_required(), missing_patient(), extra_top_field(), bad_top_k(),
             patient_not_object(), malformed(), deep(), surrogate(), oversize(), explain(),
             outcome(), audit_record(), audit_query(), auth(), st.just(None).map(model_card),
             fhir()]
    return st.one_of(kinds)


def _schemathesis_cases(document: dict):
    """Strategies of schemathesis cases (positive and negative) for every operation of the
    service's OpenAPI document, turned into :class:`Case` objects."""
    from hypothesis import strategies as st
    from schemathesis import openapi
    from schemathesis.generation import GenerationMode

    schema = openapi.from_dict(document)
    out = []
    for result in schema.get_all_operations():
        operation = result.ok()
        role = "auditor" if operation.path.startswith(("/audit", "/model")) else "clinician"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"schemathesis/{mode.value}/{operation.method.upper()} {operation.path}"
            try:
                strategy = operation.as_strategy(generation_mode=mode)
            except Exception:  # e.g. nothing to make negative in GET /model
                continue

            def convert(case, label=label, role=role):
                kw = case.as_transport_kwargs(base_url="http://testserver")
                url = urllib.parse.urlsplit(kw["url"])
                headers = {k: v for k, v in kw.get("headers", {}).items()
                           if k.lower() not in ("authorization", "content-length", "host")}
                data = kw.get("json", kw.get("data"))
                if data is not None and not isinstance(data, bytes):
                    data = json.dumps(data).encode() if not isinstance(data, str) else data.encode()
                return Case(label, kw["method"], url.path, role=role, body=data,
                            params=kw.get("params") or None, headers=headers,
                            auth=kw.get("headers", {}).get("Authorization"))

            out.append(strategy.map(convert))
    # One case in ten (by a checksum of the request: Hypothesis draws small integers far more
    # often than 1 in 10) is sent with schemathesis' own Authorization header — generated, so
    # not a key the service knows, or none at all — instead of the role's key.
    def own_auth(case: Case) -> Case:
        if zlib.crc32(case.path.encode() + (case.body or b"")) % 10:
            return case
        headers = {**(case.headers or {}), **({"Authorization": case.auth} if case.auth else {})}
        return dataclasses.replace(case, role=None, headers=headers)

    return st.one_of(out).map(own_auth)


def _drive(strategy, count: int, seed: int, send: Send, report: FuzzReport) -> int:
    """Draw up to ``count`` cases from ``strategy`` with Hypothesis and send each; returns
    how many were sent (Hypothesis may stop early when it has seen everything)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    sent = 0

    @hseed(seed)
    @settings(database=None, deadline=None, phases=[Phase.generate], max_examples=count,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def one(case):
        nonlocal sent
        if sent < count:
            run_cases(send, [case], report)
            sent += 1

    one()
    return sent


def fuzz(send: Send, *, targeted: int, schema_cases: int, seed: int, max_body: int,
         document: dict, request_id: str, report: FuzzReport | None = None) -> FuzzReport:
    """Send ``targeted`` targeted cases and ``schema_cases`` schemathesis cases (both
    generated by Hypothesis from ``seed``); returns the report (see :func:`check`)."""
    report = report or FuzzReport()
    t0 = time.monotonic()
    for strategy, count in ((_strategies(max_body, request_id), targeted),
                            (_schemathesis_cases(document), schema_cases)):
        sent, rounds = 0, 0
        while sent < count and rounds < 20:
            sent += _drive(strategy, count - sent, seed + 7919 * rounds, send, report)
            rounds += 1
    report.seconds = time.monotonic() - t0
    return report


def fuzz_summary(report: FuzzReport) -> dict:
    kinds = Counter()
    for kind, n in report.kinds.items():
        kinds[kind.split("/")[0] if not kind.startswith("schemathesis") else
              "/".join(kind.split("/")[:2])] += n
    return {
        "requests": report.n,
        "statuses": {str(k): v for k, v in sorted(report.statuses.items())},
        "families": dict(sorted(kinds.items())),
        "p50_ms": 1000 * percentile(report.latencies, 50),
        "p99_ms": 1000 * percentile(report.latencies, 99),
        "max_ms": 1000 * max(report.latencies, default=math.nan),
        "answered": len(report.answered),
        "problems": len(report.problems),
        "seconds": report.seconds,
    }


def rejected_counter(metrics_text: str) -> float:
    """Sum of ``painplan_rejected_requests_total`` in a Prometheus text exposition."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("painplan_rejected_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
