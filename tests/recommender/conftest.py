"""Fixtures for the HTTP service tests (test_service*.py, test_audit.py).

Built once per session, because training is the slow part:

* ``served`` — a small model (3000 simulated episodes, 100 rounds, one thread) saved as a
  bundle with a model card and imported into a temporary BentoML store; the store's home
  is process-wide in BentoML, so the session sets ``BENTOML_HOME`` once for all tests;
* ``pg_url`` — a fresh PostgreSQL database ``painplan_test_<random>`` on 127.0.0.1:5432,
  dropped at the end (the ``postgres`` tests must run, never skip);
* ``service_env(audit_url)`` — the environment a service process needs;
* ``asgi_client(audit_url)`` — the service in-process (``PainPlan.to_asgi()`` + Starlette's
  TestClient, lifespan included, so ``__init__`` runs as under ``bentoml serve``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

CLINICIAN_KEY = "clinician-key-" + "c" * 24
AUDITOR_KEY = "auditor-key-" + "a" * 24
HMAC_KEY = "hmac-" + "k" * 40
CLINICIAN = {"Authorization": f"Bearer {CLINICIAN_KEY}"}
AUDITOR = {"Authorization": f"Bearer {AUDITOR_KEY}"}
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

# A conforming profile with none of the risk flags set.
PATIENT = {
    "patient_id": "MRN-0042-raw-identifier",
    "age": 58,
    "sex": "female",
    "pain_condition": "low_back",
    "pain_duration_months": 30,
    "pain_intensity": 6.5,
    "peg": 6.2,
    "phq9": 12,
    "gad7": 8,
    "bmi": 29.5,
    "egfr": 85,
    "prior_nsaid": "partial",
}
# The brief's safety-flagged patient: eGFR 20 and a GI bleed (NSAID floor), prior opioid
# intolerance and opioid use disorder (opioid floor).
FLAGGED = {
    **PATIENT,
    "patient_id": "MRN-flagged",
    "pain_condition": "osteoarthritis",
    "egfr": 20,
    "gi_bleed_history": True,
    "prior_opioid": "intolerant",
    "opioid_use_disorder": True,
}


@dataclass(frozen=True)
class Served:
    bundle_dir: Path
    bentoml_home: Path
    home: Path
    tag: str
    run_id: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    """Train, save and import the test model; set BENTOML_HOME for the session."""
    from features.validate import validate
    from recommender.artifact import save_bundle
    from training.config import ModelParams, TrainConfig
    from training.pipeline import fit_bundle
    from training.simulate import simulate_episodes

    root = tmp_path_factory.mktemp("serving")
    bentoml_home = root / "bentoml"
    mp = pytest.MonkeyPatch()
    mp.setenv("BENTOML_HOME", str(bentoml_home))
    mp.setenv("BENTOML_DO_NOT_TRACK", "true")
    mp.setenv("PAINPLAN_HOME", str(root / "home"))

    episodes = validate(simulate_episodes(3000, seed=11, progress=False), "episodes").frame
    config = TrainConfig(data="(memory)", seed=0, model=ModelParams(max_rounds=100, n_jobs=1))
    bundle = fit_bundle(episodes, config, progress=lambda _msg: None)
    run_id = uuid.uuid4().hex
    bundle.metadata = {
        "data_hash": "sha256:test-cohort",
        "mlflow_run_id": run_id,
        "model_name": "painplan",
    }
    bundle_dir = root / "bundle"
    save_bundle(bundle, bundle_dir)
    (bundle_dir / "model_card.md").write_text("# painplan test model\n", encoding="utf-8")

    import bentoml

    from recommender.service import import_model

    tag = import_model(bundle_dir, version="7", run_id=run_id)
    stored = Path(bentoml.models.get(tag).path)
    if bentoml_home not in stored.parents:
        pytest.fail(
            f"BentoML's store was resolved before the session set BENTOML_HOME "
            f"({stored}); run the serving tests in a fresh process"
        )
    yield Served(bundle_dir, bentoml_home, root / "home", tag, run_id)
    mp.undo()


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for the session, dropped afterwards."""
    import psycopg

    name = f"painplan_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        drop_database(name)


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_pg_database():
    """``make()`` → URL of a new database, dropped at teardown (for destructive tests)."""
    import psycopg

    names: list[str] = []

    def make() -> tuple[str, str]:
        name = f"painplan_test_{secrets.token_hex(6)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    yield make
    for name in names:
        drop_database(name)


@pytest.fixture(scope="session")
def service_env(served):
    def env(audit_url: str, **extra: str) -> dict[str, str]:
        return {
            "BENTOML_HOME": str(served.bentoml_home),
            "BENTOML_DO_NOT_TRACK": "true",
            "PAINPLAN_HOME": str(served.home),
            "PAINPLAN_MODEL_TAG": served.tag,
            "PAINPLAN_AUDIT_URL": audit_url,
            "PAINPLAN_API_KEYS": f"clinician:{CLINICIAN_KEY},auditor:{AUDITOR_KEY}",
            "PAINPLAN_HMAC_KEY": HMAC_KEY,
            **extra,
        }

    return env


_APP: list = []


def _app():
    """One ASGI app per process: BentoML registers its Prometheus metrics when an app first
    serves, and a second app would register them again. Each client still starts its own
    service instance (the lifespan runs ``__init__`` with the client's environment)."""
    if not _APP:
        from recommender.service import PainPlan

        _APP.append(PainPlan.to_asgi())
    return _APP[0]


@contextlib.contextmanager
def _asgi_client(env: dict[str, str]):
    with warnings.catch_warnings():
        # Starlette's TestClient warns that it will move to httpx2; not our concern.
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    mp = pytest.MonkeyPatch()
    for key in ("PAINPLAN_API_KEYS_FILE", "PAINPLAN_DEMO", "PAINPLAN_MAX_BODY_BYTES"):
        mp.delenv(key, raising=False)
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        client = TestClient(_app())
        with client:
            yield client
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def asgi_client(service_env):
    """``asgi_client(audit_url, **env)`` → context manager yielding a TestClient."""

    def make(audit_url: str, **extra: str):
        return _asgi_client(service_env(audit_url, **extra))

    return make


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.as_posix()}"


@pytest.fixture(scope="module")
def sqlite_client(served, asgi_client, tmp_path_factory):
    """An in-process service with a SQLite audit store, shared by a module's tests."""
    url = sqlite_url(tmp_path_factory.mktemp("audit") / "audit.db")
    with asgi_client(url) as client:
        client.audit_url = url
        yield client


def audit_counts(url: str) -> dict[str, int]:
    """Rows per audit table, read through a separate connection."""
    from recommender.audit import AuditStore

    store = AuditStore(url)
    try:
        return store.count()
    finally:
        store.close()


def post(client, path, body, headers):
    return client.post(
        path, content=json.dumps(body), headers={**headers, "Content-Type": "application/json"}
    )


def exercise(client) -> tuple[int, int]:
    """A mix of answered and rejected requests; returns (answered, rejected)."""
    answered = rejected = 0
    for body, headers, path in [
        ({"patient": PATIENT, "top_k": 3}, CLINICIAN, "/recommend"),
        ({"patient": FLAGGED}, CLINICIAN, "/recommend"),
        ({"patient": PATIENT, "plan_a": "cbt", "plan_b": "pt"}, CLINICIAN, "/explain"),
        ({"patient": {**PATIENT, "age": 1}}, CLINICIAN, "/recommend"),
        ({"patient": PATIENT}, AUDITOR, "/recommend"),
        ({"patient": PATIENT}, {}, "/recommend"),
        ({"patient": PATIENT, "plan_a": "cbt", "plan_b": "zz"}, CLINICIAN, "/explain"),
    ]:
        if post(client, path, body, headers).status_code == 200:
            answered += 1
        else:
            rejected += 1
    return answered, rejected


def check_audit_trail(client, url: str) -> str:
    """Every answered request leaves one record and a rejected one none; the record holds
    the pseudonym (never the raw id), model lineage, ranking, exclusions and SHAP values.
    Returns the id of the last recommendation."""
    before = audit_counts(url)["painplan_requests"]
    assert exercise(client) == (3, 4)
    assert audit_counts(url)["painplan_requests"] == before + 3
    answer = post(client, "/recommend", {"patient": PATIENT, "top_k": 2}, CLINICIAN).json()
    rid = answer["request_id"]
    record = client.get(f"/audit/{rid}", headers=AUDITOR).json()
    expected_key = hmac.new(
        HMAC_KEY.encode(), PATIENT["patient_id"].encode(), hashlib.sha256
    ).hexdigest()
    assert record["patient_key"] == expected_key
    assert "patient_id" not in record["profile"]
    assert PATIENT["patient_id"] not in json.dumps(record)
    assert record["model_version"] == "7" and record["mlflow_run_id"]
    assert record["model_tag"] == answer["model"]["tag"]
    assert record["ruleset_version"] == answer["model"]["ruleset_version"]
    assert [p["plan"] for p in record["ranked"]] == [p["plan"] for p in answer["plans"]]
    assert (
        record["explanations"][0]["contributions"]
        == answer["plans"][0]["explanation"]["contributions"]
    )
    assert record["shown_plans"] == [p["plan"] for p in answer["plans"]]
    assert record["exclusions"] == answer["excluded"]
    assert len(record["input_sha256"]) == 64
    return rid


@pytest.fixture(scope="session")
def helpers():
    """Module-level helpers as a namespace (tests run with --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        CLINICIAN=CLINICIAN,
        AUDITOR=AUDITOR,
        CLINICIAN_KEY=CLINICIAN_KEY,
        AUDITOR_KEY=AUDITOR_KEY,
        HMAC_KEY=HMAC_KEY,
        PATIENT=PATIENT,
        FLAGGED=FLAGGED,
        free_port=free_port,
        audit_counts=audit_counts,
        sqlite_url=sqlite_url,
        drop_database=drop_database,
        post=post,
        exercise=exercise,
        check_audit_trail=check_audit_trail,
    )
