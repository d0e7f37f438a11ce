"""``painplan demo`` end to end on a tiny cohort: simulate, train, promote (which imports the
champion into the BentoML store), generate keys, serve, and the printed curl works."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 400


def test_demo_serves_and_its_printed_example_works(tmp_path, helpers):
    port = helpers.free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PAINPLAN_", "BENTOML_", "MLFLOW_"))
    }
    env["BENTOML_DO_NOT_TRACK"] = "true"
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "demo", "--n", "400", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    children: set[int] = set()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while "Ctrl-C stops the service" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "demo not serving in time"
            time.sleep(1)
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        text = log.read_text()
        clinician = re.search(r"clinician key : (\S+)", text).group(1)
        auditor = re.search(r"auditor key   : (\S+)", text).group(1)
        body = json.loads(re.search(r"-d '(\{.*\})'", text).group(1))
        url = f"http://127.0.0.1:{port}"
        assert "serving painplan:v1-" in text and url in text
        r = httpx.post(
            f"{url}/recommend",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {clinician}"},
        )
        assert r.status_code == 200, r.text
        assert not {"nsaid", "opioid"} & {
            c["code"] for p in r.json()["plans"] for c in p["components"]
        }
        audit = httpx.get(
            f"{url}/audit?limit=5", timeout=30, headers={"Authorization": f"Bearer {auditor}"}
        ).json()
        assert audit["count"] == 1
        home = tmp_path / ".painplan"
        assert (home / "mlflow.db").is_file() and (home / "audit.db").is_file()
        assert list((home / "bentoml" / "models" / "painplan").glob("v1-*"))
        assert (home / "demo" / "keys.env").stat().st_mode & 0o077 == 0
    finally:
        if proc.poll() is None:
            children |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for pid in children | {proc.pid}:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
