"""The service over real HTTP: ``painplan serve`` → ``bentoml serve`` on a free port, polled
until ``/readyz`` answers (bounded), always stopped. Also: ``bentoml serve`` refusing a
tampered model, the subprocess import used at promotion, and ``bentoml build``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 150


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server at {url} not ready after {timeout} s")


def _kill_tree(proc: subprocess.Popen, pids: set[int]) -> None:
    """Kill what is still alive of the processes this test started, by pid."""
    for pid in pids | {proc.pid}:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def server(served, service_env, tmp_path_factory, helpers):
    """``painplan serve`` in a subprocess; yields its URL and audit URL."""
    audit_url = helpers.sqlite_url(tmp_path_factory.mktemp("http-audit") / "audit.db")
    port = helpers.free_port()
    env = {**os.environ, **service_env(audit_url), "PAINPLAN_MAX_BODY_BYTES": "8192"}
    log = tmp_path_factory.mktemp("http-log") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "training.cli",
                "serve",
                "--port",
                str(port),
                "--model-tag",
                served.tag,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    children: set[int] = set()
    try:
        _wait_ready(url, proc)
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        yield {"url": url, "audit_url": audit_url, "proc": proc, "children": children, "log": log}
    finally:
        if proc.poll() is None:
            children |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            proc.send_signal(signal.SIGTERM)  # painplan serve stops bentoml serve itself
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _kill_tree(proc, children)


def test_health_readiness_and_metrics(server):
    url = server["url"]
    assert httpx.get(f"{url}/livez").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert httpx.post(f"{url}/recommend", json={"patient": {"age": 1}}).status_code == 401
    metrics = httpx.get(f"{url}/metrics").text
    assert "bentoml_service_request_duration_seconds" in metrics
    assert 'painplan_rejected_requests_total{endpoint="recommend",status="401"}' in metrics


def test_answers_roles_errors_and_audit_over_http(server, helpers):
    url, audit_url = server["url"], server["audit_url"]
    before = helpers.audit_counts(audit_url)["painplan_requests"]
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post(
            "/recommend", json={"patient": helpers.FLAGGED, "top_k": 5}, headers=helpers.CLINICIAN
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["plans"]) == 5
        assert not {"nsaid", "opioid"} & {c["code"] for p in body["plans"] for c in p["components"]}
        assert (
            client.post(
                "/recommend", json={"patient": helpers.PATIENT}, headers=helpers.AUDITOR
            ).status_code
            == 403
        )
        assert client.get("/model", headers=helpers.CLINICIAN).status_code == 403
        bad = client.post(
            "/recommend",
            json={"patient": {**helpers.PATIENT, "age": 300}},
            headers=helpers.CLINICIAN,
        )
        assert bad.status_code == 400
        (violation,) = bad.json()["violations"]
        assert (violation["field"], violation["value"]) == ("patient.age", 300)
        too_big = client.post(
            "/recommend",
            content=b"{" + b" " * 9000 + b"}",
            headers={**helpers.CLINICIAN, "Content-Type": "application/json"},
        )
        assert too_big.status_code == 413
        record = client.get(f"/audit/{body['request_id']}", headers=helpers.AUDITOR)
        assert record.status_code == 200
        assert record.json()["shown_plans"] == [p["plan"] for p in body["plans"]]
        card = client.get("/model", headers=helpers.AUDITOR).json()
        assert card["model"]["tag"] == body["model"]["tag"]
    assert helpers.audit_counts(audit_url)["painplan_requests"] == before + 1
    metrics = httpx.get(f"{url}/metrics").text
    assert 'painplan_rejected_requests_total{endpoint="recommend",status="400"}' in metrics
    assert 'painplan_rejected_requests_total{endpoint="recommend",status="413"}' in metrics
    assert "painplan_recommend_batch_size_count" in metrics  # the micro-batches served


def test_concurrent_requests_are_each_answered_and_recorded(server, helpers):
    before = helpers.audit_counts(server["audit_url"])["painplan_requests"]

    def one(i: int) -> int:
        patient = {**helpers.PATIENT, "patient_id": f"concurrent-{i}", "age": 30 + i}
        return httpx.post(
            f"{server['url']}/recommend",
            json={"patient": patient},
            headers=helpers.CLINICIAN,
            timeout=60,
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(16))) == [200] * 16
    assert helpers.audit_counts(server["audit_url"])["painplan_requests"] == before + 16


def test_raw_patient_ids_are_not_logged(server, helpers):
    httpx.post(
        f"{server['url']}/recommend",
        json={"patient": helpers.PATIENT},
        headers=helpers.CLINICIAN,
        timeout=30,
    )
    time.sleep(0.5)
    assert helpers.PATIENT["patient_id"] not in server["log"].read_text(errors="replace")


def test_bentoml_serve_refuses_a_tampered_model(served, service_env, tmp_path, helpers):
    import bentoml

    from recommender.service import import_model

    tag = import_model(served.bundle_dir, version="30", run_id=served.run_id)
    with (Path(bentoml.models.get(tag).path) / "model.pkl").open("ab") as fh:
        fh.write(b"tampered")
    env = {
        **os.environ,
        **service_env(helpers.sqlite_url(tmp_path / "a.db")),
        "PAINPLAN_MODEL_TAG": tag,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "recommender.service:PainPlan",
            "--port",
            str(helpers.free_port()),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc, set())
    assert proc.returncode != 0
    (line,) = [x for x in out.splitlines() if "painplan service cannot start" in x]
    assert tag in line and "content_sha256" in line


def test_promotion_imports_through_a_subprocess(served):
    from training.serving import import_bundle

    # Same bundle, same version: the store already has it, and the tag is reported.
    assert import_bundle(served.bundle_dir, version="7", run_id=served.run_id) == served.tag


def test_bentoml_build_leaves_training_out(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (bento,) = [
        p
        for p in (tmp_path / "bentoml" / "bentos" / "painplan").iterdir()
        if p.is_dir() and p.name != "latest"
    ]
    src = bento / "src"
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert "recommender/service.py" in files and "features/schema.py" in files
    assert not [f for f in files if f.startswith(("training/", "tests/", "bench/"))], files
    assert not [f for f in files if "__pycache__" in f]
    bento_yaml = (bento / "bento.yaml").read_text()
    assert "recommender.service:PainPlan" in bento_yaml
