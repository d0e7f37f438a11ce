"""Fixtures for the browser tests: a real ``bentoml serve`` and Debian's Chromium.

* ``ui_server`` (module) — a small model trained here, imported into a temporary BentoML
  store by the same subprocess promotion uses (``python -m recommender.service
  import-model``), then ``bentoml serve recommender.service:PainPlan`` on a free loopback
  port with a SQLite audit store; stopped at the end. Everything BentoML touches lives in
  the subprocesses' environment, so this never fights the in-process store that
  ``tests/recommender`` sets up in the same pytest session.
* ``browser`` (module) — headless Chromium at ``/usr/bin/chromium`` driven by Playwright.
  Playwright's own browser download is never used: nothing is fetched at run time.
* ``open_page`` — a fresh browser context (own sessionStorage) at a viewport; it records
  uncaught page errors and any request to another origin, and the test fails on either.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "tests" / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
INSTALL_HINT = (
    "install Debian's Chromium with 'apt-get update && apt-get install -y chromium' "
    "(as root; .ci/run does this). Do not run 'playwright install': the tests must not "
    "download a browser."
)
READY_TIMEOUT_S = 120


@dataclass
class UIServer:
    url: str
    tag: str
    run_id: str
    clinician_key: str
    auditor_key: str
    log: Path


@dataclass
class PageProblems:
    errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_bundle(root: Path) -> tuple[Path, str]:
    """A small model (the recommender tests' recipe, smaller: the pages need answers, not
    a good model) saved as a bundle with a model card."""
    from features.validate import validate
    from recommender.artifact import save_bundle
    from training.config import ModelParams, TrainConfig
    from training.pipeline import fit_bundle
    from training.simulate import simulate_episodes

    episodes = validate(simulate_episodes(1500, seed=11, progress=False), "episodes").frame
    config = TrainConfig(data="(memory)", seed=0, model=ModelParams(max_rounds=60, n_jobs=1))
    bundle = fit_bundle(episodes, config, progress=lambda _msg: None)
    run_id = uuid.uuid4().hex
    bundle.metadata = {
        "data_hash": "sha256:web-test-cohort",
        "mlflow_run_id": run_id,
        "model_name": "painplan",
    }
    bundle_dir = root / "bundle"
    save_bundle(bundle, bundle_dir)
    (bundle_dir / "model_card.md").write_text(
        "# painplan browser-test model\n\nTrained on 1500 simulated episodes.\n", encoding="utf-8"
    )
    return bundle_dir, run_id


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"bentoml serve not ready after {READY_TIMEOUT_S} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory) -> UIServer:
    from training.serving import stop_server

    root = tmp_path_factory.mktemp("web")
    bundle_dir, run_id = _train_bundle(root)
    # Keys made up per run: nothing secret is written in the repository.
    clinician_key = "clinician-" + secrets.token_urlsafe(24)
    auditor_key = "auditor-" + secrets.token_urlsafe(24)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PAINPLAN_", "BENTOML_"))
    }
    env.update(
        BENTOML_HOME=str(root / "bentoml"),
        BENTOML_DO_NOT_TRACK="true",
        PAINPLAN_HOME=str(root / "home"),
        PAINPLAN_API_KEYS=f"clinician:{clinician_key},auditor:{auditor_key}",
        PAINPLAN_HMAC_KEY=secrets.token_hex(32),
        PAINPLAN_AUDIT_URL=f"sqlite:///{(root / 'audit.db').as_posix()}",
    )
    imported = subprocess.run(
        [sys.executable, "-m", "recommender.service", "import-model", "--bundle", str(bundle_dir)]
        + ["--version", "7", "--run-id", run_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if imported.returncode != 0:
        pytest.fail(f"import-model failed:\n{imported.stderr}")
    env["PAINPLAN_MODEL_TAG"] = tag = imported.stdout.strip().splitlines()[-1]

    port = _free_port()
    log = root / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "recommender.service:PainPlan"]
            + ["--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole below
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield UIServer(url, tag, run_id, clinician_key, auditor_key, log)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}; {INSTALL_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright for Python: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
        except Exception as err:  # Playwright raises its own Error types
            pytest.fail(f"Chromium at {CHROMIUM} did not start ({err}); {INSTALL_HINT}")
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, ui_server):
    """``open_page(path, width=1280, height=800)`` → a Playwright page in a new context.
    After the test: no uncaught script error and no request to another origin."""
    contexts, problems = [], PageProblems()

    def make(path: str, width: int = 1280, height: int = 800):
        def note_foreign(request) -> None:
            if not request.url.startswith((ui_server.url + "/", "data:")):
                problems.foreign_requests.append(request.url)

        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        context.on("request", note_foreign)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda err: problems.errors.append(str(err)))
        page.goto(ui_server.url + path)
        page.wait_for_selector("body[data-ready=true]")
        return page

    yield make
    for context in contexts:
        context.close()
    assert not problems.errors, f"script errors on the page: {problems.errors}"
    assert not problems.foreign_requests, f"requests to other origins: {problems.foreign_requests}"


@pytest.fixture(scope="session")
def screenshot():
    """``screenshot(page, name, full_page=False)`` → tests/artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(target, name: str, **kwargs) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        target.screenshot(path=str(path), **kwargs)
        return path

    return take
